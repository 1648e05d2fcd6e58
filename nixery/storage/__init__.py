"""Where blobs and metadata live: one interface (`Storage`), three drivers.

`open_storage(settings)` picks the driver named by NIXERY_STORAGE_BACKEND:

* ``filesystem``: a local directory (STORAGE_PATH);
* ``s3``: an S3 bucket (AWS or S3-compatible, via obstore);
* ``gcs``: a Google Cloud Storage bucket (via google-cloud-storage).

The cloud drivers stage builder output under STORAGE_PATH/tmp before uploading.
Their modules are imported only when chosen, so a filesystem deployment does
not load the cloud client libraries.
"""

from __future__ import annotations

from nixery.config import ConfigError, Settings
from nixery.storage.base import (
    BackendUnavailable,
    BlobNotFound,
    BlobSource,
    ByteStream,
    InvalidKey,
    LocalFile,
    Redirect,
    Storage,
    StorageError,
    StorageInaccessible,
)
from nixery.storage.filesystem import FilesystemStorage

__all__ = [
    "BackendUnavailable",
    "BlobNotFound",
    "BlobSource",
    "ByteStream",
    "FilesystemStorage",
    "InvalidKey",
    "LocalFile",
    "Redirect",
    "Storage",
    "StorageError",
    "StorageInaccessible",
    "open_storage",
]


def open_storage(settings: Settings) -> Storage:
    """The storage driver the settings ask for (raises ConfigError if incomplete,
    StorageInaccessible if STORAGE_PATH cannot be used)."""
    try:
        return _open(settings)
    except OSError as error:  # creating STORAGE_PATH's directories (every backend stages there)
        raise StorageInaccessible(
            settings.storage_backend, f"cannot use STORAGE_PATH={str(settings.storage_path)!r}: {error}"
        ) from error


def _open(settings: Settings) -> Storage:
    backend = settings.storage_backend
    if backend == "filesystem":
        return FilesystemStorage(settings.storage_path, verified_links=settings.verified_blob_links)
    if backend == "s3":
        if settings.s3 is None:
            raise ConfigError("S3_BUCKET must be set when NIXERY_STORAGE_BACKEND=s3")
        from nixery.storage.s3 import S3Storage

        return S3Storage(
            settings.s3,
            staging_root=settings.storage_path / "tmp",
            signed_url_ttl=settings.signed_url_ttl,
        )
    if backend == "gcs":
        if settings.gcs is None:
            raise ConfigError("GCS_BUCKET must be set when NIXERY_STORAGE_BACKEND=gcs")
        from nixery.storage.gcs import GCSStorage

        return GCSStorage(
            settings.gcs,
            staging_root=settings.storage_path / "tmp",
            signed_url_ttl=settings.signed_url_ttl,
        )
    raise ConfigError(f"NIXERY_STORAGE_BACKEND={backend!r} must be one of filesystem, s3, gcs")
