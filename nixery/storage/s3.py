"""Blobs and metadata in an S3 bucket (AWS or any S3-compatible store), via obstore.

Layout in the bucket:

    blobs/sha256/<hex>     content-addressed blobs
    meta/<key>             metadata documents
    locks/<key>            leases held by `exclusive` (see lease.LeasedStorage)
    touched/sha256/<hex>   empty markers: when a blob was last reused (for GC)
    parked/sha256/<hex>/…  copies of blobs gc is deleting, until it knows no build reused them
    probes/<host>-<pid>-…  written and removed again by the start-up check

Every request names S3_BUCKET: with an explicit endpoint (an S3-compatible
store) requests are path-style (`endpoint/bucket/key`) unless S3_PATH_STYLE=false
asks for virtual-hosted ones, which then carry the bucket in the host name
(`bucket.endpoint/key`), as the AWS SDKs do. (An endpoint used as it is for
virtual-hosted requests would make the first path segment, `blobs`, the bucket.)

Timeouts (see stalls.py): small requests and every read give up when the store
has not answered for STALL_TIMEOUT seconds, retried within RETRY_WINDOW, so a
stalled store answers 503 within about ten seconds; uploads are bounded per
part and watched by probes instead, so a slow upload that moves is never cut.

Atomicity comes from S3 itself: a single PUT and the completion of a multipart
upload both make an object appear whole or not at all. A document created only
if absent (`create_meta`) is one PUT with `If-None-Match: *`, one replaced only if
it is still the version read (`replace_meta`) one PUT with `If-Match: <ETag>`.
Big blobs go up as a multipart upload read from the staged file a few chunks at
a time, so memory stays flat whatever the layer size. When an upload fails, obstore aborts the
multipart upload; when the process dies mid-upload, the parts stay invisible
(no object exists under the key) until the bucket's lifecycle rule
"AbortIncompleteMultipartUpload" removes them, which operators should set.

Clients get blobs through presigned GET URLs (signed locally, no request to
the store), or, when redirects are off, as a stream relayed by the registry.
"""

from __future__ import annotations

import asyncio
import functools
import html
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import obstore
import structlog
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import S3Store

if TYPE_CHECKING:  # the option types exist in obstore's stubs only
    from obstore import ObjectMeta, PutResult
    from obstore.store import ClientConfig, RetryConfig

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
    VersionedMeta,
    check_key,
    ensure_staging_dir,
    make_staging_dir,
)
from nixery.storage.lease import LeasedStorage
from nixery.storage.stalls import unless_store_stalls

log = structlog.get_logger(__name__)


class S3Settings(Protocol):
    """What this driver reads of the S3 settings (the configuration's S3Settings has it)."""

    @property
    def bucket(self) -> str: ...
    @property
    def endpoint(self) -> str | None: ...
    @property
    def region(self) -> str: ...
    @property
    def access_key_id(self) -> str | None: ...
    @property
    def secret_access_key(self) -> str | None: ...
    @property
    def uses_path_style(self) -> bool: ...

#: Part size of multipart uploads; S3 needs at least 5 MiB per part.
UPLOAD_CHUNK = 6 * 1024 * 1024
#: Parts in flight per upload: memory per upload is about (this + 1) parts.
UPLOAD_CONCURRENCY = 2
#: Chunks handed to the HTTP layer when relaying a blob.
RELAY_CHUNK = 1024 * 1024
#: Seconds to open a connection.
CONNECT_TIMEOUT = 3.0
#: Seconds the store may take to answer a small request, or between two reads of an answer.
STALL_TIMEOUT = 4.0
#: Failed requests are retried while less than this many seconds have passed since the first try.
RETRY_WINDOW = 5.0
#: Seconds one upload request (a part, or a whole small blob) may take: at least 20 KiB/s for a part.
UPLOAD_REQUEST_TIMEOUT = 300.0
#: Bodies up to this size go up as small requests; bigger ones as watched uploads.
SMALL_BODY = 1024 * 1024
#: Seconds after which a parked copy (`delete_unused_blob`) is a dead gc's leftover: a live gc
#: holds one for a few requests. Compared with the store's dates, as leases are.
PARKED_AGE = 3600.0
#: The biggest object one CopyObject request copies (S3's limit); a bigger blob is not parked.
COPY_LIMIT = 5 * 1024**3


class S3Storage(LeasedStorage):
    name = "s3"

    def __init__(
        self,
        config: S3Settings,
        *,
        staging_root: Path,
        signed_url_ttl: int = 300,
    ):
        super().__init__()
        self.config = config
        self.signed_url_ttl = signed_url_ttl
        virtual_hosted, endpoint = _addressing(config)
        options: dict[str, Any] = {"region": config.region, "virtual_hosted_style_request": virtual_hosted}
        if endpoint:
            options["endpoint"] = endpoint
        if config.access_key_id and config.secret_access_key:
            options["access_key_id"] = config.access_key_id
            options["secret_access_key"] = config.secret_access_key
        client: ClientConfig = {"connect_timeout": timedelta(seconds=CONNECT_TIMEOUT)}
        if endpoint and endpoint.startswith("http://"):
            client["allow_http"] = True
        retry: RetryConfig = {
            "max_retries": 3,
            "retry_timeout": timedelta(seconds=RETRY_WINDOW),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
        }
        # Small requests and all reads: bounded while nothing comes back (a read
        # timeout restarts with every piece received), so that relaying a
        # multi-gigabyte layer to a slow client is bounded only loosely in total.
        reads: ClientConfig = {
            **client, "read_timeout": timedelta(seconds=STALL_TIMEOUT), "timeout": timedelta(hours=6)
        }
        self._store = S3Store(config.bucket, client_options=reads, retry_config=retry, **options)
        # Uploads: a request body is timed as a whole (a read timeout would cut
        # off a part still being sent), so each request gets a generous bound
        # and `unless_store_stalls` notices a stalled store meanwhile.
        uploads: ClientConfig = {**client, "timeout": timedelta(seconds=UPLOAD_REQUEST_TIMEOUT)}
        self._upload_store = S3Store(config.bucket, client_options=uploads, retry_config=retry, **options)
        self._where = f"{endpoint or f'AWS region {config.region}'}"
        # Same layout as the filesystem driver: one directory per process, so
        # that a restarted process removes what a crashed one left behind. Made
        # last: settings refused above leave none behind.
        self._staging = make_staging_dir(staging_root)

    def staging_dir(self) -> Path:
        return ensure_staging_dir(self._staging)

    async def close(self) -> None:
        await super().close()
        self._release_staging(self._staging)

    @staticmethod
    def _blob_key(digest: Digest) -> str:
        return f"blobs/sha256/{digest.hex}"

    def _unavailable(self, error: Exception) -> BackendUnavailable:
        return BackendUnavailable(self.name, f"bucket {self.config.bucket}: {_describe(error)}")

    # ---- the start-up check and readiness ----

    async def check_access(self, *, write: bool = True) -> None:
        # A listing first: it names the bucket alone, so a missing bucket is
        # reported as such (a PUT would create it on some stores).
        try:
            await obstore.list_with_delimiter_async(self._store, prefix=f"{_PROBES}/")
        except ObstoreError as error:
            raise self._inaccessible("list objects", error) from error
        if not write:
            return
        key = f"{_PROBES}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

        async def read() -> None:
            await (await obstore.get_async(self._store, key)).bytes_async()

        steps = [
            ("write an object", lambda: obstore.put_async(self._store, key, b"nixery", use_multipart=False)),
            ("read an object", read),
            ("delete an object", lambda: obstore.delete_async(self._store, key)),
        ]
        for action, step in steps:
            try:
                await step()
            except ObstoreError as error:
                raise self._inaccessible(action, error) from error

    def _inaccessible(self, action: str, error: Exception) -> StorageInaccessible:
        bucket, where = self.config.bucket, self._where
        code = _error_code(error)
        problems = {
            "NoSuchBucket": f'S3 bucket "{bucket}" does not exist at {where} (NoSuchBucket)',
            "InvalidAccessKeyId": f"S3 at {where} does not know the access key (InvalidAccessKeyId): "
            "check AWS_ACCESS_KEY_ID",
            "SignatureDoesNotMatch": f"S3 at {where} rejects the secret key (SignatureDoesNotMatch): "
            "check AWS_SECRET_ACCESS_KEY",
            "AccessDenied": f'S3 at {where} denies the credentials to {action} in bucket "{bucket}" '
            "(AccessDenied): see docs/storage.md#permissions",
        }
        if code in problems:
            return StorageInaccessible(self.name, problems[code])
        if not (self.config.access_key_id and self.config.secret_access_key) and _CREDENTIAL_SOURCES.search(
            str(error)
        ):
            # No keys, and none of AWS's other sources answered: what failed was the last of them
            # (the metadata service at 169.254.169.254), which named no setting.
            return StorageInaccessible(
                self.name,
                f'no S3 credentials for bucket "{bucket}" at {where}: set AWS_ACCESS_KEY_ID and '
                "AWS_SECRET_ACCESS_KEY (or run where AWS provides credentials: an instance profile, "
                "web identity / IRSA, ECS)",
            )
        if code is None and _HTTP_STATUS.search(str(error)) is None:  # no answer at all
            return StorageInaccessible(self.name, f'cannot reach S3 bucket "{bucket}" at {where}: {_describe(error)}')
        return StorageInaccessible(
            self.name, f'S3 bucket "{bucket}" at {where}: could not {action}: {_describe(error)}'
        )

    async def stat_blob(self, digest: Digest) -> int | None:
        return await self._stat_key(self._blob_key(digest))

    async def _stat_key(self, key: str) -> int | None:
        meta = await self._head(key)
        return None if meta is None else meta["size"]

    async def _head(self, key: str) -> ObjectMeta | None:
        """The metadata of the object under `key`; None if there is none."""
        try:
            return await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return None
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def blob_source(self, digest: Digest, *, allow_redirect: bool) -> BlobSource:
        key = self._blob_key(digest)
        if allow_redirect:
            if await self.stat_blob(digest) is None:
                raise BlobNotFound(digest)
            try:
                url = await obstore.sign_async(self._store, "GET", key, timedelta(seconds=self.signed_url_ttl))
            except ObstoreError as error:
                raise self._unavailable(error) from error
            return Redirect(url)
        result = await self._get(digest)
        return ByteStream(self._relay(result), result.meta["size"], functools.partial(self._read_range, digest))

    async def _get(self, digest: Digest, byte_range: tuple[int, int] | None = None) -> Any:
        """The store's answer to a GET of the blob (or of `byte_range`: start, end exclusive), before its body."""
        try:
            if byte_range is None:
                return await obstore.get_async(self._store, self._blob_key(digest))
            return await obstore.get_async(self._store, self._blob_key(digest), options={"range": byte_range})
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def _read_range(self, digest: Digest, start: int, count: int) -> AsyncIterator[bytes]:
        return self._relay(await self._get(digest, (start, start + count)))

    async def _relay(self, result: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in result.stream(min_chunk_size=RELAY_CHUNK):
                yield chunk
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def read_blob(self, digest: Digest) -> bytes:
        try:
            result = await obstore.get_async(self._store, self._blob_key(digest))
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def put_blob(self, digest: Digest, staged: Path) -> None:
        if await self.touch_blob(digest) is not None:  # in use again: a concurrent gc keeps it
            return
        await self._upload(
            self._blob_key(digest),
            staged,
            attributes={"Content-Type": "application/octet-stream"},
            chunk_size=UPLOAD_CHUNK,
            max_concurrency=UPLOAD_CONCURRENCY,
        )

    async def _upload(self, key: str, source: Path | bytes, **options: Any) -> PutResult:
        """Put a big body or a conditional one, returning early with BackendUnavailable if the
        store stalls meanwhile.

        Conditional PUTs (If-None-Match, If-Match) come here whatever their size: a store may
        hold one back while another write to the key finishes (SeaweedFS waits in steps of a
        second), longer than a small request's STALL_TIMEOUT, while it answers other requests."""
        upload = asyncio.ensure_future(obstore.put_async(self._upload_store, key, source, **options))
        try:
            # Cancelling the upload would drop it without aborting it, leaving
            # invisible parts behind; it finishes (or fails and aborts) by itself.
            return await unless_store_stalls(upload, lambda: self._stat_key(key))
        except (asyncio.CancelledError, BackendUnavailable):
            detach(upload, failure_event="s3.upload_failed_after_giving_up", describe_error=_describe, key=key)
            raise
        except (AlreadyExistsError, PreconditionError, FileNotFoundError, NotFoundError) as error:
            if "mode" not in options:  # an unconditional write's 404 is the bucket's: NoSuchBucket
                raise self._unavailable(error) from error
            raise  # an answer to a conditional upload, handled by the caller
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def get_meta(self, key: str) -> bytes | None:
        path = f"meta/{check_key(key)}"
        try:
            result = await obstore.get_async(self._store, path)
            return bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def get_versioned_meta(self, key: str) -> VersionedMeta | None:
        found = await self._read_versioned(f"meta/{check_key(key)}")
        return None if found is None else VersionedMeta(found[1], found[0])

    async def put_meta(self, key: str, data: bytes) -> None:
        path = f"meta/{check_key(key)}"
        if len(data) > SMALL_BODY:  # a package catalog: may take longer than a small request
            await self._upload(path, data, use_multipart=False)
            return
        try:
            # One PUT (no multipart below the chunk size): atomic, last writer wins.
            await obstore.put_async(self._store, path, data, use_multipart=False)
        except (ObstoreError, FileNotFoundError) as error:  # obstore's 404 (NoSuchBucket) is no ObstoreError
            raise self._unavailable(error) from error

    async def create_meta(self, key: str, data: bytes) -> bool:
        path = f"meta/{check_key(key)}"
        # One PUT with If-None-Match: * (never multipart: its completion cannot be made conditional).
        try:
            await self._upload(path, data, use_multipart=False, mode="create")
        except (AlreadyExistsError, PreconditionError):
            return False
        return True

    async def replace_meta(self, key: str, data: bytes, version: str) -> bool:
        path = f"meta/{check_key(key)}"
        # One PUT with If-Match (never multipart, as create_meta); a document removed meanwhile: 404.
        try:
            await self._upload(path, data, use_multipart=False, mode={"e_tag": version})
        except (PreconditionError, FileNotFoundError, NotFoundError):
            return False
        return True

    # ---- optional capabilities: listing, deleting, touching, leases ----

    async def _list(self, prefix: str) -> AsyncIterator[Any]:
        try:
            async for batch in obstore.list(self._store, prefix=prefix, chunk_size=1000):
                for meta in batch:
                    yield meta
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def list_blobs(self) -> AsyncIterator[BlobStat]:
        touched = {
            meta["path"].rsplit("/", 1)[1]: meta["last_modified"].timestamp() async for meta in self._list(_TOUCHED)
        }
        async for meta in self._list("blobs/sha256"):
            hex_ = meta["path"].rsplit("/", 1)[1]
            try:
                digest = Digest.parse(f"sha256:{hex_}")
            except DigestInvalid:
                continue
            modified = max(meta["last_modified"].timestamp(), touched.get(hex_, 0.0))
            yield BlobStat(digest, meta["size"], modified)

    async def touch_blob(self, digest: Digest) -> int | None:
        """S3 cannot change an object's date without copying it onto itself
        (slow for big layers): a marker object records the touch instead, and then
        the blob is asked for (HEAD): one gc deleted before that is written again.
        gc reads the marker again after its DELETE and puts the blob back if it
        changed, so a touch that answers with a size leaves the blob stored
        (`delete_unused_blob` has the interleavings).
        Requests: one for a blob that is not stored, three for one that is."""
        if await self.stat_blob(digest) is None:
            return None  # no marker for a blob that is not there (one request, as for a new blob)
        # A body of its own (its ETag changes with every touch, even within a second of the last).
        marker = uuid.uuid4().hex.encode()
        try:
            await obstore.put_async(self._store, f"{_TOUCHED}/{digest.hex}", marker, use_multipart=False)
        except (ObstoreError, FileNotFoundError) as error:  # obstore's 404 (NoSuchBucket) is no ObstoreError
            raise self._unavailable(error) from error
        return await self.stat_blob(digest)

    async def delete_unused_blob(self, digest: Digest, cutoff: float) -> bool:
        """S3 has no DELETE conditional on another object (the touch marker), so the blob is
        parked first, as the filesystem driver moves it aside:

        1. read the blob's and its marker's dates (G1); a blob written or touched at or
           after `cutoff` is kept;
        2. copy the blob, server-side, to `parked/sha256/<hex>/<token>` (G2), then DELETE
           it (G3);
        3. HEAD the marker again (G4): if it is not the one G1 read, a build touched the
           blob meanwhile, and the parked copy goes back to the blob's key (G5, a restore;
           warning `storage.gc_race`) and the call answers False; otherwise the blob is
           gone for good. The parked copy is deleted either way, and the marker too when
           the blob went (before that the parked copy: a crash in between leaves a marker
           without a blob, which nothing counts).

        A touch (`touch_blob`) is T1: HEAD the blob, T2: PUT the marker, T3: HEAD the blob,
        answering with T3's size or None (its build then writes the blob again). S3 reads
        after writes consistently, so:

        * T2 before G1: G1 sees the new date, and the blob is kept.
        * T2 after G1, before G4 (whether before or after G2 or G3): G4 sees the new marker
          and the blob is restored. T3 before G3 or after G5 finds it (a size: the blob is
          there afterwards); T3 between G3 and G5 finds none, and the build writes the
          same bytes again alongside the restore.
        * T2 after G4: T3 comes after T2, so after G3: it finds no blob and the build
          writes it again (gc may delete the new marker; the new blob is dated now).
        * T1 after G3: no blob, no marker; the build writes it again.

        So no touch answers with a size for a blob that stays deleted, but for a blob over
        5 GiB (COPY_LIMIT: one CopyObject copies no more), which is deleted without parking
        as before: a touch between G1 and G3 that finds it is logged (`storage.gc_race`),
        and its image's pulls fail until a registry builds it again. What is left besides:
        between G3 and G5 (a few requests) the blob is missing, so a pull of an image
        that a build finished in that time gets 404 for it once, as of any blob gc
        deletes; and a gc that dies (or loses the store) between G2 and its cleanup
        leaves the parked copy, which the next gc's `restore_parked_blobs` puts back if
        the blob is missing: until then a build told the blob is there names a missing
        blob."""
        blob, marker = await self._blob_dates(digest)
        if blob is None or max(_written(blob), _written(marker) if marker else 0.0) >= cutoff:
            return False
        key = self._blob_key(digest)
        parked = f"{_PARKED}/{digest.hex}/{uuid.uuid4().hex[:16]}" if blob["size"] <= COPY_LIMIT else None
        if parked is not None:
            try:
                if not await self._copy(key, parked):
                    return False  # gone since the dates were read (another gc): nothing deleted here
            except BackendUnavailable as exc:
                # A copy of a big blob that outlasts UPLOAD_REQUEST_TIMEOUT on a slow store: this blob is kept
                # for now, and the sweep goes on (stopping here stopped every later gc at the same blob).
                log.warning("storage.gc_park_failed", digest=str(digest), size=blob["size"], error=str(exc)[:300],
                            note="the blob is kept this time; a dead parked copy goes in a later gc")
                return False
        await self._delete(key)
        # A build that touched the blob since the dates were read may have been told it is stored.
        after = await self._head(f"{_TOUCHED}/{digest.hex}")
        if after is not None and (marker is None or after["e_tag"] != marker["e_tag"]):
            if parked is None:
                log.warning(
                    "storage.gc_race",
                    digest=str(digest),
                    note="a build reused this blob while gc deleted it, too big to park (over 5 GiB): "
                    "if its image names the blob, pulls of the image fail until a registry builds it again",
                )
                return True  # the build's marker stays: it writes the blob again, or it is gone
            if not await self._copy(parked, key):  # the same bytes, whether or not the build wrote them again
                # The parked copy vanished (a lifecycle rule on parked/, another gc's clean-up with a clock an
                # hour ahead): the blob is gone as it was before parking existed.
                log.error(
                    "storage.gc_race",
                    digest=str(digest),
                    note="a build reused this blob while gc deleted it, and its parked copy is gone: if its image "
                    "names the blob, pulls of the image fail until a registry builds it again",
                )
                return True
            await self._delete(parked)
            log.warning(
                "storage.gc_race",
                digest=str(digest),
                note="a build reused this blob while gc deleted it: gc put it back, nothing is lost",
            )
            return False  # the build's marker stays
        if parked is not None:
            await self._delete(parked)
        await self._delete(f"{_TOUCHED}/{digest.hex}")
        return True

    async def restore_parked_blobs(self, older_than: float | None = None) -> int:
        """What a gc that died mid-way through `delete_unused_blob` left: a parked copy
        (dated `older_than` seconds ago or more, default PARKED_AGE: a running gc holds its
        own for a few requests) whose blob is missing is copied back, whatever the marker says (a build
        may have been told the blob is there; a blob nobody uses goes in a later gc, by its
        dates), then every such parked copy is deleted. Parked copies are never listed as
        blobs (`list_blobs`)."""
        age, now = PARKED_AGE if older_than is None else older_than, time.time()
        leftovers = [meta async for meta in self._list(f"{_PARKED}/")]
        restored = 0
        for meta in leftovers:
            try:
                digest = Digest.parse(f"sha256:{meta['path'].removeprefix(f'{_PARKED}/').split('/', 1)[0]}")
            except DigestInvalid:
                continue
            if now - _written(meta) < age:
                continue
            if await self.stat_blob(digest) is None and await self._copy(meta["path"], self._blob_key(digest)):
                restored += 1
                log.warning(
                    "storage.gc_parked_restored",
                    digest=str(digest),
                    note="a gc stopped while deleting this blob; it is back, and goes in a later gc if unused",
                )
            await self._delete(meta["path"])
        return restored

    async def _copy(self, source: str, target: str) -> bool:
        """Copy an object within the bucket (server-side, up to COPY_LIMIT); False if `source` is
        gone. Through the upload client: the store answers once the copy is done, which for a
        big blob takes longer than STALL_TIMEOUT."""
        try:
            await obstore.copy_async(self._upload_store, source, target)
        except FileNotFoundError as error:  # obstore's 404 is no ObstoreError
            if _error_code(error) != "NoSuchKey":  # no such bucket, a proxy's page: an outage
                raise self._unavailable(error) from error
            return False
        except ObstoreError as error:
            raise self._unavailable(error) from error
        return True

    async def _blob_dates(self, digest: Digest) -> tuple[ObjectMeta | None, ObjectMeta | None]:
        """The blob's metadata and its touched/ marker's, read now: a listing's are minutes old
        by the time a long sweep reaches the blob, and the marker listing is older still."""
        blob, marker = await asyncio.gather(
            self._head(self._blob_key(digest)), self._head(f"{_TOUCHED}/{digest.hex}")
        )
        return blob, marker

    async def delete_blob(self, digest: Digest) -> None:
        await self._delete(self._blob_key(digest))
        await self._delete(f"{_TOUCHED}/{digest.hex}")

    async def _delete(self, key: str) -> None:
        """Delete one object (one key per request: the bulk DeleteObjects call is missing from some
        S3-compatible stores). A key already gone is no error; a bucket gone is."""
        try:
            await obstore.delete_async(self._store, key)
        except FileNotFoundError as error:  # obstore's 404 is no ObstoreError
            # S3 answers 204 for a key already gone, GCS's XML API NoSuchKey; any other 404 (no such
            # bucket, a proxy's page) means nothing was deleted.
            if _error_code(error) != "NoSuchKey":
                raise self._unavailable(error) from error
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def list_meta(self, prefix: str) -> list[str]:
        base = f"meta/{check_key(prefix.rstrip('/'))}"
        return sorted([meta["path"].removeprefix("meta/") async for meta in self._list(base)])

    async def delete_meta(self, key: str) -> None:
        await self._delete(f"meta/{check_key(key)}")

    async def _lease_create(self, name: str, body: bytes) -> str | None:
        try:
            result = await self._upload(name, body, mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return None
        return result["e_tag"]

    async def _lease_version(self, name: str) -> str | None:
        try:
            return (await obstore.head_async(self._store, name))["e_tag"]
        except FileNotFoundError:
            return None
        except ObstoreError as error:
            raise self._unavailable(error) from error

    async def _lease_read(self, name: str) -> tuple[str, bytes] | None:
        return await self._read_versioned(name)

    async def _read_versioned(self, name: str) -> tuple[str, bytes] | None:
        """The ETag and body of the object `name`, or None when there is none."""
        try:
            result = await obstore.get_async(self._store, name)
            body = bytes(await result.bytes_async())
        except FileNotFoundError:
            return None
        except ObstoreError as error:
            raise self._unavailable(error) from error
        version = result.meta["e_tag"]
        if version is None:  # leases and replacements need versions: a store that gives none cannot serve them
            raise BackendUnavailable(self.name, f"bucket {self.config.bucket}: no ETag for {name}")
        return version, body

    async def _lease_replace(self, name: str, body: bytes, version: str) -> str | None:
        try:
            result = await self._upload(name, body, mode={"e_tag": version}, use_multipart=False)
        except (PreconditionError, FileNotFoundError, NotFoundError):
            return None
        return result["e_tag"]

    async def _lease_names(self) -> list[tuple[str, float]]:
        return [(meta["path"], _written(meta)) async for meta in self._list("locks/")]

    async def _lease_delete(self, name: str, version: str) -> None:
        # S3 has no conditional delete (widely): check, then delete. The gap
        # matters only if this holder's lease was taken over in between, which
        # needs it to have gone unrenewed for lease_ttl.
        if await self._lease_version(name) == version:
            await self._delete(name)


#: Empty marker objects recording `touch_blob` (see there).
_TOUCHED = "touched/sha256"
#: Copies of blobs that `delete_unused_blob` is deleting (see there), one key per attempt.
_PARKED = "parked/sha256"
#: Where the start-up check writes (and removes) its probe object.
_PROBES = "probes"


def _addressing(config: S3Settings) -> tuple[bool, str | None]:
    """(virtual-hosted?, endpoint) for obstore, such that every request names the bucket.

    obstore uses an explicit endpoint as it is for virtual-hosted requests: the
    bucket must be in its host name, so it is put there unless already present.
    """
    endpoint = config.endpoint.rstrip("/") if config.endpoint else None
    if config.uses_path_style or endpoint is None:
        return not config.uses_path_style, endpoint
    parts = urlsplit(endpoint)
    if not (parts.hostname or "").startswith(f"{config.bucket}."):
        parts = parts._replace(netloc=f"{config.bucket}.{parts.netloc.rpartition('@')[2]}")
    return True, urlunsplit(parts)


_XML_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]{0,300})</Message>")
_HTTP_STATUS = re.compile(r"status code: (\d{3}[^:\n]*)")
#: What an error of the client's search for credentials names when it found none: the metadata
#: services of EC2 (IPv4, IPv6) and ECS, the STS call of web identity, or credentials as such.
_CREDENTIAL_SOURCES = re.compile(
    r"169\.254\.169\.254|169\.254\.170\.2|fd00:ec2::254|sts\.[a-z0-9.-]*amazonaws\.com|credential", re.IGNORECASE
)
_FAILURE_KIND = re.compile(r"kind: (Timeout|Connect)\b")
_OS_MESSAGE = re.compile(r'message: "([^"]{1,200})"')


def _error_code(error: Exception) -> str | None:
    found = _XML_CODE.search(str(error))
    return found[1] if found else None


def _written(meta: ObjectMeta) -> float:
    """When an object was last written, in seconds since the epoch."""
    return float(meta["last_modified"].timestamp())


def _describe(error: Exception) -> str:
    """One line on what went wrong, keeping what matters: the store's error code
    and message (S3 puts them in an XML body, after the first line of obstore's
    message), or why nothing answered (in obstore's debug dump)."""
    text = str(error)
    first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
    status = _HTTP_STATUS.search(text)
    if code := _error_code(error):
        message = _XML_MESSAGE.search(text)
        said = html.unescape(message[1]) if message else first  # XML text: `server&#39;s` is `server's`
        return f"{code} ({status[1].strip() if status else 'error'}): {said}"
    if status:
        return f"HTTP {status[1].strip()}: {first}"
    kind = _FAILURE_KIND.search(text)
    if kind and kind[1] == "Timeout":
        return f"no answer in time (timed out): {first}"
    if kind and (cause := _OS_MESSAGE.search(text)):
        return f"cannot connect ({cause[1]}): {first}"
    return first
