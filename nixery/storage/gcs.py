"""Blobs and metadata in a Google Cloud Storage bucket, via google-cloud-storage.

Layout in the bucket:

    blobs/sha256/<hex>     content-addressed blobs (Custom-Time: when last reused, for GC)
    meta/<key>             metadata documents
    locks/<key>            leases held by `exclusive` (see lease.LeasedStorage)
    probes/<host>-<pid>-…  written and removed again by the start-up check

A GCS object upload is all-or-nothing: the object exists only once the last
byte of a (resumable) upload has arrived, so a crash mid-upload leaves no
object. Blobs, and documents created only if absent (`create_meta`), are
written with `ifGenerationMatch=0`, so an existing one is never replaced (a
document replaced only if it is still the version read, `replace_meta`, with
`ifGenerationMatch=<that generation>`); big
blobs go up as a resumable upload in fixed chunks, so memory stays flat
whatever the layer size.

The google client is synchronous: every call runs in a worker thread, with
short connect and read timeouts (the read timeout bounds each wait for the
store: a moving download is never cut) and a bounded retry deadline, so that
an unreachable or stalled bucket turns into `BackendUnavailable` within
seconds. Uploads send each chunk with one socket call, which the read timeout
would bound as a whole: they get a longer one, and `unless_store_stalls`
notices a stalled store meanwhile (see stalls.py).

Credentials come from the usual Google environment (Application Default
Credentials, e.g. GOOGLE_APPLICATION_CREDENTIALS). With STORAGE_EMULATOR_HOST
set, the client talks to that emulator anonymously.

Signed URLs are V4 and short-lived. They are signed with GCS_SIGNING_KEY (a PEM
private key, with GCS_SIGNING_ACCOUNT naming its service account; a JSON
service-account key file works too) when given; otherwise with the service
account's own credentials: a key file signs locally, other credentials (e.g.
on Compute Engine) sign through the IAM signBlob API. With nothing to sign
with (an emulator without a key, a user's own credentials) blobs are relayed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import google.auth
import google.auth.exceptions
import google.auth.transport.requests
import requests
import structlog
from google.api_core import exceptions as api_exceptions
from google.api_core.client_options import ClientOptions
from google.auth import crypt
from google.auth.credentials import AnonymousCredentials, Credentials, Signing
from google.cloud import storage
from google.cloud.storage import exceptions as media_exceptions
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from nixery.background import detach
from nixery.errors import DigestInvalid
from nixery.registry.digest import Digest
from nixery.storage.base import (
    BackendUnavailable,
    BlobNotFound,
    BlobSource,
    BlobStat,
    ByteStream,
    Redirect,
    StorageInaccessible,
    StorageSettingsInvalid,
    VersionedMeta,
    check_key,
    ensure_staging_dir,
    make_staging_dir,
)
from nixery.storage.lease import LeasedStorage
from nixery.storage.stalls import unless_store_stalls

#: Resumable upload chunk (a multiple of 256 KiB); files up to 8 MiB go in one request.
UPLOAD_CHUNK = 8 * 1024 * 1024
#: Range size when relaying a blob through the registry.
RELAY_CHUNK = 4 * 1024 * 1024
#: Seconds to open a connection.
CONNECT_TIMEOUT = 3.0
#: Seconds the store may leave a request unanswered (each wait for bytes; a whole small upload).
STALL_TIMEOUT = 4.0
#: Seconds an upload may take to send one chunk and hear back (at least 80 KiB/s for a full chunk).
UPLOAD_TIMEOUT = 100.0
#: Seconds within which failed requests are retried.
RETRY_WINDOW = 5.0
#: Metadata documents bigger than this go up as watched uploads.
SMALL_BODY = 1024 * 1024

_SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
_TOKEN_URI = "https://oauth2.googleapis.com/token"

_UNAVAILABLE = (
    api_exceptions.GoogleAPICallError,
    api_exceptions.RetryError,
    requests.exceptions.RequestException,
    google.auth.exceptions.GoogleAuthError,
    media_exceptions.InvalidResponse,
    media_exceptions.DataCorruption,
    ConnectionError,
    TimeoutError,
)

T = TypeVar("T")

log = structlog.get_logger(__name__)


class GCSSettings(Protocol):
    """What this driver reads of the GCS settings (the configuration's GCSSettings has it)."""

    @property
    def bucket(self) -> str: ...
    @property
    def signing_key(self) -> Path | None: ...
    @property
    def signing_account(self) -> str | None: ...


class GCSStorage(LeasedStorage):
    name = "gcs"

    def __init__(
        self,
        config: GCSSettings,
        *,
        staging_root: Path,
        signed_url_ttl: int = 300,
        emulator_host: str | None = None,
    ):
        super().__init__()
        self.config = config
        self.signed_url_ttl = signed_url_ttl

        emulator_host = emulator_host or os.environ.get("STORAGE_EMULATOR_HOST") or None
        if emulator_host:
            if "://" not in emulator_host:
                emulator_host = f"http://{emulator_host}"
            self._client = storage.Client(
                project="nixery-emulated",
                credentials=AnonymousCredentials(),
                client_options=ClientOptions(api_endpoint=emulator_host),
            )
            own: Credentials | None = _key_file_credentials(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"))
        else:
            try:
                own, project = google.auth.default(scopes=_SCOPES)
            except google.auth.exceptions.DefaultCredentialsError as error:
                # google-auth names the file it could not read, not the setting that named it.
                named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
                source = f" (GOOGLE_APPLICATION_CREDENTIALS={named!r})" if named else ""
                problem = f"no Google credentials for GCS bucket {config.bucket!r}{source}: {error}"
                raise StorageSettingsInvalid(problem) from None
            self._client = storage.Client(project=project, credentials=own)
        self._signer = _signing_key_credentials(config) if config.signing_key else own
        if not isinstance(self._signer, Signing) and not hasattr(self._signer, "service_account_email"):
            # An emulator without a key, or a user's `gcloud auth
            # application-default login`: nothing can sign. Said once the start-up
            # check has passed: a bucket the registry cannot use is its one line.
            self._signer = None
        self._say_no_signer = self._signer is None

        self._bucket = self._client.bucket(config.bucket)
        self._where = f"at {emulator_host}" if emulator_host else f"in project {self._client.project}"
        self._timeout = (CONNECT_TIMEOUT, STALL_TIMEOUT)
        self._upload_timeout = (CONNECT_TIMEOUT, UPLOAD_TIMEOUT)
        self._retry = DEFAULT_RETRY.with_delay(initial=0.2, maximum=2.0, multiplier=2.0).with_timeout(RETRY_WINDOW)
        # Made last: credentials refused above leave no staging directory behind (STORAGE_PATH/tmp).
        self._staging = make_staging_dir(staging_root)

    def staging_dir(self) -> Path:
        return ensure_staging_dir(self._staging)

    async def close(self) -> None:
        await super().close()
        await asyncio.to_thread(self._client.close)
        self._release_staging(self._staging)

    @staticmethod
    def _blob_name(digest: Digest) -> str:
        return f"blobs/sha256/{digest.hex}"

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(function, *args, **kwargs)
        except (api_exceptions.NotFound, api_exceptions.PreconditionFailed):
            raise  # answers, handled by the caller
        except _UNAVAILABLE as error:
            raise BackendUnavailable(self.name, f"bucket {self.config.bucket}: {_describe(error)}") from error

    # ---- the start-up check and readiness ----

    async def check_access(self, *, write: bool = True) -> None:
        # A listing first: it names the bucket alone, so a missing bucket is reported as such.
        bounded = {"timeout": self._timeout, "retry": self._retry}
        probes = self._client.list_blobs(self._bucket, prefix=f"{_PROBES}/", max_results=1, **bounded)
        steps: list[tuple[str, Callable[[], Any]]] = [("list objects", lambda: list(probes))]
        if write:
            blob = self._bucket.blob(f"{_PROBES}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            steps += [
                ("write an object", lambda: blob.upload_from_string(b"nixery", **bounded)),
                ("read an object", lambda: blob.download_as_bytes(**bounded)),
                ("delete an object", lambda: blob.delete(**bounded)),
            ]
        for action, step in steps:
            try:
                await asyncio.to_thread(step)
            except _UNAVAILABLE as error:
                raise self._inaccessible(action, error) from error
        if write and self._say_no_signer:
            self._say_no_signer = False
            log.warning(
                "gcs.no_signer", problem="no service account to sign URLs with",
                action="blobs are relayed by the registry",
            )

    def _inaccessible(self, action: str, error: Exception) -> StorageInaccessible:
        bucket, where = self.config.bucket, self._where
        match error:
            case api_exceptions.NotFound() if action == "list objects":
                problem = f'GCS bucket "{bucket}" does not exist {where} ({_describe(error)})'
            case api_exceptions.Unauthorized() | google.auth.exceptions.GoogleAuthError():
                problem = f"GCS {where} rejects the credentials: {_describe(error)}"
            case api_exceptions.Forbidden():
                problem = f'GCS {where} denies the credentials to {action} in bucket "{bucket}": {_describe(error)}'
            case api_exceptions.GoogleAPICallError():
                problem = f'GCS bucket "{bucket}" {where}: could not {action}: {_describe(error)}'
            case _:
                problem = f'cannot reach GCS bucket "{bucket}" {where}: {_describe(error)}'
        return StorageInaccessible(self.name, problem)

    async def _stat(self, digest: Digest) -> storage.Blob | None:
        return await self._call(
            self._bucket.get_blob, self._blob_name(digest), timeout=self._timeout, retry=self._retry
        )

    async def stat_blob(self, digest: Digest) -> int | None:
        blob = await self._stat(digest)
        return None if blob is None else blob.size

    async def blob_source(self, digest: Digest, *, allow_redirect: bool) -> BlobSource:
        blob = await self._stat(digest)
        if blob is None:
            raise BlobNotFound(digest)
        if allow_redirect and self._signer is not None:
            return Redirect(await self._call(self._sign, blob))
        return ByteStream(self._relay(blob, 0, blob.size), blob.size, functools.partial(self._read_range, blob))

    def _sign(self, blob: storage.Blob) -> str:
        signer = self._signer
        expiration = timedelta(seconds=self.signed_url_ttl)
        if isinstance(signer, Signing):
            return blob.generate_signed_url(version="v4", expiration=expiration, method="GET", credentials=signer)
        # No local key (Compute Engine, workload identity): IAM signs for us.
        assert signer is not None and hasattr(signer, "service_account_email")
        if not signer.valid:
            signer.refresh(google.auth.transport.requests.Request())
        return blob.generate_signed_url(
            version="v4",
            expiration=expiration,
            method="GET",
            service_account_email=getattr(signer, "service_account_email", None),
            access_token=signer.token,
        )

    async def _read_range(self, blob: storage.Blob, start: int, count: int) -> AsyncIterator[bytes]:
        return self._relay(blob, start, start + count)

    async def _relay(self, blob: storage.Blob, start: int, stop: int) -> AsyncIterator[bytes]:
        """The blob's bytes from `start` up to `stop` (exclusive), a chunk per request."""
        while start < stop:
            end = min(start + RELAY_CHUNK, stop) - 1
            try:
                chunk = await self._call(
                    blob.download_as_bytes,
                    start=start,
                    end=end,
                    raw_download=True,
                    checksum=None,
                    if_generation_match=blob.generation,
                    timeout=self._timeout,
                    retry=self._retry,
                )
            except api_exceptions.NotFound as error:
                raise BackendUnavailable(self.name, f"blob vanished while relaying: {error}") from error
            if not chunk:
                raise BackendUnavailable(self.name, f"short read of {blob.name} at byte {start}")
            yield chunk
            start += len(chunk)

    async def read_blob(self, digest: Digest) -> bytes:
        blob = self._bucket.blob(self._blob_name(digest))
        try:
            return await self._call(blob.download_as_bytes, timeout=self._timeout, retry=self._retry)
        except api_exceptions.NotFound:
            raise BlobNotFound(digest) from None

    async def put_blob(self, digest: Digest, staged: Path) -> None:
        if await self.touch_blob(digest) is not None:  # in use again: a concurrent gc keeps it
            return
        blob = self._bucket.blob(self._blob_name(digest), chunk_size=UPLOAD_CHUNK)
        try:
            await self._upload(
                blob,
                blob.upload_from_filename,
                str(staged),
                content_type="application/octet-stream",
                if_generation_match=0,
            )
        except api_exceptions.PreconditionFailed:
            return  # another writer stored it first: same digest, same bytes

    async def _upload(self, blob: storage.Blob, upload: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """Run `upload` (a method of `blob`), returning early with BackendUnavailable if the store stalls."""
        running = asyncio.ensure_future(
            self._call(upload, *args, timeout=self._upload_timeout, retry=self._retry, **kwargs)
        )
        try:
            await unless_store_stalls(
                running, lambda: self._call(self._bucket.get_blob, blob.name, timeout=self._timeout, retry=self._retry)
            )
        except (asyncio.CancelledError, BackendUnavailable):
            # The thread cannot be stopped: the upload finishes or fails by itself.
            detach(running, failure_event="gcs.upload_failed_after_giving_up", describe_error=_describe, key=blob.name)
            raise
        except api_exceptions.NotFound as error:
            raise BackendUnavailable(self.name, f"bucket {self.config.bucket}: {_describe(error)}") from error

    async def get_meta(self, key: str) -> bytes | None:
        blob = self._bucket.blob(f"meta/{check_key(key)}")
        try:
            return await self._call(blob.download_as_bytes, timeout=self._timeout, retry=self._retry)
        except api_exceptions.NotFound:
            return None

    async def get_versioned_meta(self, key: str) -> VersionedMeta | None:
        found = await self._read_versioned(f"meta/{check_key(key)}")
        return None if found is None else VersionedMeta(found[1], found[0])

    async def put_meta(self, key: str, data: bytes) -> None:
        blob = self._bucket.blob(f"meta/{check_key(key)}")
        if len(data) > SMALL_BODY:  # a package catalog: may take longer than a small request
            await self._upload(blob, blob.upload_from_string, data, content_type="application/octet-stream")
            return
        try:
            await self._call(
                blob.upload_from_string,
                data,
                content_type="application/octet-stream",
                timeout=self._timeout,
                retry=self._retry,
            )
        except api_exceptions.NotFound as error:
            raise BackendUnavailable(self.name, f"bucket {self.config.bucket}: {_describe(error)}") from error

    async def create_meta(self, key: str, data: bytes) -> bool:
        try:
            await self._put_meta_if(key, data, if_generation_match=0)
        except api_exceptions.PreconditionFailed:
            return False
        except api_exceptions.NotFound as error:
            raise BackendUnavailable(self.name, f"bucket {self.config.bucket}: {_describe(error)}") from error
        return True

    async def replace_meta(self, key: str, data: bytes, version: str) -> bool:
        try:
            await self._put_meta_if(key, data, if_generation_match=int(version))
        except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
            # Another generation, or none (removed meanwhile); with the bucket gone, reading says so.
            return False
        return True

    async def _put_meta_if(self, key: str, data: bytes, *, if_generation_match: int) -> None:
        """Write the document `key` if its generation is `if_generation_match` (0: there is none)."""
        blob = self._bucket.blob(f"meta/{check_key(key)}")
        conditions = {"content_type": "application/octet-stream", "if_generation_match": if_generation_match}
        if len(data) > SMALL_BODY:
            await self._upload(blob, blob.upload_from_string, data, **conditions)
        else:
            await self._call(blob.upload_from_string, data, timeout=self._timeout, retry=self._retry, **conditions)

    # ---- optional capabilities: listing, deleting, touching, leases ----

    async def _list(self, prefix: str) -> AsyncIterator[storage.Blob]:
        """Objects under `prefix`, a page (up to 1000) at a time from a worker thread."""
        pages = self._client.list_blobs(
            self._bucket, prefix=prefix, page_size=1000, timeout=self._timeout, retry=self._retry
        ).pages
        while (page := await self._call(next, pages, None)) is not None:
            blobs: list[storage.Blob] = await self._call(list, page)
            for blob in blobs:
                yield blob

    async def list_blobs(self) -> AsyncIterator[BlobStat]:
        async for blob in self._list("blobs/sha256/"):
            try:
                digest = Digest.parse(f"sha256:{blob.name.rsplit('/', 1)[1]}")
            except DigestInvalid:
                continue
            yield BlobStat(digest, blob.size or 0, _last_used(blob))

    async def touch_blob(self, digest: Digest) -> int | None:
        """Sets the blob's Custom-Time (a metadata patch: the bytes are not rewritten). The patch
        makes a new metageneration, so a gc that read the blob before it no longer deletes it
        (`delete_unused_blob`); a blob gc deleted first answers NotFound."""
        blob = self._bucket.blob(self._blob_name(digest))
        blob.custom_time = datetime.now(UTC)
        try:
            await self._call(blob.patch, timeout=self._timeout, retry=self._retry)
        except api_exceptions.NotFound:
            return None  # gone: written again by the caller
        except api_exceptions.PreconditionFailed:
            # Custom-Time cannot go back: a later touch was stored meanwhile (the blob was there then).
            return await self.stat_blob(digest)
        return blob.size

    async def _delete(self, name: str, **conditions: Any) -> None:
        try:
            await self._call(self._bucket.delete_blob, name, timeout=self._timeout, retry=self._retry, **conditions)
        except (api_exceptions.NotFound, api_exceptions.PreconditionFailed):
            pass

    async def delete_blob(self, digest: Digest) -> None:
        await self._delete(self._blob_name(digest))

    async def delete_unused_blob(self, digest: Digest, cutoff: float) -> bool:
        blob = await self._stat(digest)  # its dates now, not a listing's
        if blob is None or _last_used(blob) >= cutoff:
            return False
        # GCS deletes conditionally (below); this second read is for emulators that ignore the
        # condition (fake-gcs-server does), so that only a touch within one request slips through.
        blob = await self._stat(digest)
        if blob is None or _last_used(blob) >= cutoff:
            return False
        try:
            # Only the version read: a touch since (a metadata patch) makes a new metageneration.
            await self._call(
                self._bucket.delete_blob, blob.name, if_metageneration_match=blob.metageneration,
                timeout=self._timeout, retry=self._retry,
            )
        except (api_exceptions.NotFound, api_exceptions.PreconditionFailed):
            return False
        return True

    async def list_meta(self, prefix: str) -> list[str]:
        base = f"meta/{check_key(prefix.rstrip('/'))}/"
        return sorted([blob.name.removeprefix("meta/") async for blob in self._list(base)])

    async def delete_meta(self, key: str) -> None:
        await self._delete(f"meta/{check_key(key)}")

    async def _lease_upload(self, name: str, body: bytes, generation: int) -> str | None:
        blob = self._bucket.blob(name)
        try:
            await self._call(
                blob.upload_from_string,
                body,
                content_type="application/json",
                if_generation_match=generation,
                timeout=self._timeout,
                retry=self._retry,
            )
        except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
            return None
        return str(blob.generation)

    async def _lease_create(self, name: str, body: bytes) -> str | None:
        return await self._lease_upload(name, body, 0)

    async def _lease_version(self, name: str) -> str | None:
        blob = await self._call(self._bucket.get_blob, name, timeout=self._timeout, retry=self._retry)
        return None if blob is None else str(blob.generation)

    async def _lease_read(self, name: str) -> tuple[str, bytes] | None:
        return await self._read_versioned(name)

    async def _read_versioned(self, name: str) -> tuple[str, bytes] | None:
        """The generation and body of the object `name`, or None when there is none."""
        blob = self._bucket.blob(name)
        try:
            body = await self._call(blob.download_as_bytes, timeout=self._timeout, retry=self._retry)
        except api_exceptions.NotFound:
            return None
        return str(blob.generation), body  # the download reports the generation it read

    async def _lease_replace(self, name: str, body: bytes, version: str) -> str | None:
        return await self._lease_upload(name, body, int(version))

    async def _lease_names(self) -> list[tuple[str, float]]:
        return [(blob.name, _last_used(blob)) async for blob in self._list("locks/")]

    async def _lease_delete(self, name: str, version: str) -> None:
        # GCS deletes conditionally; the check first is for emulators that ignore the condition.
        if await self._lease_version(name) == version:
            await self._delete(name, if_generation_match=int(version))


#: Where the start-up check writes (and removes) its probe object.
_PROBES = "probes"


def _last_used(blob: storage.Blob) -> float:
    """When a blob was last written or reused (its Custom-Time, set by `touch_blob`)."""
    times = [t.timestamp() for t in (blob.updated, blob.time_created, blob.custom_time) if t is not None]
    return max(times, default=0.0)


def _describe(error: BaseException) -> str:
    """One line on what went wrong, the store's status code first (never cut off)."""
    if isinstance(error, api_exceptions.GoogleAPICallError):
        return f"{error.code} {type(error).__name__}: {error.message}"[:400]
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _signing_key_credentials(config: GCSSettings) -> service_account.Credentials:
    assert config.signing_key is not None
    text = config.signing_key.read_text()
    if text.lstrip().startswith("{"):
        return service_account.Credentials.from_service_account_info(json.loads(text))
    if not config.signing_account:
        raise StorageSettingsInvalid("GCS_SIGNING_ACCOUNT must name the service account of the PEM GCS_SIGNING_KEY")
    try:
        signer = crypt.RSASigner.from_string(text)
    except ValueError as error:
        raise StorageSettingsInvalid(
            f"GCS_SIGNING_KEY={str(config.signing_key)!r} is not a PEM private key: {error}"
        ) from None
    return service_account.Credentials(signer, config.signing_account, _TOKEN_URI)


def _key_file_credentials(path: str | None) -> Credentials | None:
    """A service-account key file's credentials (used to sign when emulated)."""
    if not path:
        return None
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise StorageSettingsInvalid(f"GOOGLE_APPLICATION_CREDENTIALS={path!r} is not readable JSON: {error}") from None
    if info.get("type") != "service_account":
        return None
    return service_account.Credentials.from_service_account_info(info, scopes=_SCOPES)
