"""Where blobs and metadata live: one interface (`Storage`), three drivers.

`nixery.app.open_storage(settings)` picks the driver named by
NIXERY_STORAGE_BACKEND (the drivers take their settings as arguments; none
reads the configuration itself):

* ``filesystem``: a local directory (STORAGE_PATH);
* ``s3``: an S3 bucket (AWS or S3-compatible, via obstore);
* ``gcs``: a Google Cloud Storage bucket (via google-cloud-storage).

The cloud drivers stage builder output under STORAGE_PATH/tmp before uploading.
Their modules are imported only when chosen, so a filesystem deployment does
not load the cloud client libraries.
"""

from __future__ import annotations

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
    StorageSettingsInvalid,
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
    "StorageSettingsInvalid",
]
