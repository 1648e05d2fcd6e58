"""The one storage interface every backend implements.

Storage holds two kinds of things:

* **blobs**: immutable, content-addressed bytes (layers, configs, manifests)
  stored under their sha256 digest. A blob under a digest always has exactly
  those bytes: writers stage a complete file, verify it, then publish it with
  one atomic step (rename, or an object PUT that is all-or-nothing).
* **metadata**: small documents under string keys (the manifest cache, the
  layer cache, the layering history). Replaced atomically; last writer wins,
  except where a document is created only if absent (`create_meta`, image
  records): then the first writer wins, across every process on the storage,
  and where one is replaced only if it is still the version read
  (`replace_meta`, a damaged image record): then one writer of those that read
  that version wins.

Backends know nothing of HTTP. When asked how a client should get a blob they
answer with a `BlobSource`: a local file to send, a URL to redirect to, or a
stream of bytes. The HTTP layer decides how to put that on the wire.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nixery.processes import process_alive
from nixery.registry.digest import Digest


class StorageError(Exception):
    """Base of the errors a storage backend raises."""


class BlobNotFound(StorageError):
    def __init__(self, digest: Digest):
        super().__init__(f"blob {digest} is not stored")
        self.digest = digest


class BackendUnavailable(StorageError):
    """The backend could not be reached or failed; the request may succeed later."""

    def __init__(self, backend: str, reason: str):
        super().__init__(f"storage backend {backend} is unavailable: {reason}")
        self.backend = backend


class StorageInaccessible(BackendUnavailable):
    """The store cannot be used as configured: its bucket does not exist, it rejects
    the credentials or refuses them a permission, or nothing answers at its address.
    Raised by `check_access`; the message names the problem in one line and keeps
    the store's own error code (NoSuchBucket, AccessDenied, ...)."""

    def __init__(self, backend: str, problem: str):
        StorageError.__init__(self, problem)
        self.backend = backend


class StorageSettingsInvalid(ValueError):
    """A setting that only opening the store can check (a signing key, credentials) is
    unusable; the message names the setting. The registry reports it as a configuration error."""


class StorageFull(StorageError):
    """No space (or quota) is left where the storage writes; nothing partial was kept.

    `where` names the place: a backend's directory, or the local staging directory.
    """

    def __init__(self, where: str, reason: str):
        super().__init__(where, reason)  # both in args: raised in layer writer processes too, so it must pickle
        self.where = where
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.where} is full: {self.reason}"


#: The errors of a write that found no space, or no quota, left.
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def raising_storage_full(where: str) -> Iterator[None]:
    """Inside, a full disk or quota (FULL_DISK_ERRNOS) raises StorageFull naming `where`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FULL_DISK_ERRNOS:
            raise
        raise StorageFull(where, exc.strerror or os.strerror(exc.errno)) from exc


class CorruptBlob(BlobNotFound):
    """A stored blob's bytes do not hash to its digest; it has been taken out of service."""

    def __init__(self, digest: Digest):
        StorageError.__init__(self, f"blob {digest} was corrupt and has been removed; pull the image again")
        self.digest = digest


class InvalidKey(StorageError):
    """A metadata key outside the allowed alphabet (never built from raw client input)."""


@dataclass(frozen=True, slots=True)
class LocalFile:
    """Send this file (the HTTP layer may use sendfile, or hand it to a proxy in front)."""

    path: Path
    size: int
    relative_path: str = ""  # below the storage's blob directory, e.g. `sha256/ab/abcd…`


@dataclass(frozen=True, slots=True)
class Redirect:
    """Send the client to this short-lived URL instead."""

    url: str


@dataclass(frozen=True, slots=True)
class ByteStream:
    """Relay these bytes: `chunks` is the whole blob, already asked for; a client that
    wants part of it gets `await read_range(start, count)`, which asks the store for
    those bytes only (`chunks` is then dropped unread). Both raise BlobNotFound."""

    chunks: AsyncIterator[bytes]
    size: int
    read_range: Callable[[int, int], Awaitable[AsyncIterator[bytes]]]


BlobSource = LocalFile | Redirect | ByteStream


@dataclass(frozen=True, slots=True)
class VersionedMeta:
    """A document as read, with the version `replace_meta` compares: an S3 ETag, a GCS
    generation, on the filesystem the sha256 of its bytes (opaque to callers; two writes of
    the same bytes may be one version, which changes nothing: the document is the same)."""

    data: bytes
    version: str


@dataclass(frozen=True, slots=True)
class BlobStat:
    digest: Digest
    size: int
    modified: float  # seconds since the epoch of the last write or touch

_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*")


def is_key(key: str) -> bool:
    """Whether `key` is one a metadata document may have."""
    return len(key) <= 512 and _KEY.fullmatch(key) is not None


def check_key(key: str) -> str:
    if not is_key(key):
        raise InvalidKey(f"invalid metadata key {key!r:.100}")
    return key


class Storage(ABC):
    """Where blobs and metadata live. All methods are safe to call concurrently."""

    #: Short backend name used in logs and error messages ("filesystem", "s3", "gcs").
    name: str
    #: Whether `blob_servable` costs no request (a local stat; bytes hashed once per process),
    #: so that a registry may ask it again every few seconds about the images it holds in memory.
    checks_blobs_locally: bool = False

    def __init__(self) -> None:
        self._corruption_listeners: list[Callable[[Digest], None]] = []
        self._staging_released = False

    def _release_staging(self, staging: Path) -> None:
        """On close, once: this storage no longer uses its staging directory (`make_staging_dir`)."""
        if not self._staging_released:
            self._staging_released = True
            release_staging_dir(staging)

    @abstractmethod
    async def stat_blob(self, digest: Digest) -> int | None:
        """The blob's size in bytes, or None when it is not stored."""

    @abstractmethod
    async def blob_source(self, digest: Digest, *, allow_redirect: bool) -> BlobSource:
        """How a client gets the blob's bytes. Raises BlobNotFound."""

    @abstractmethod
    async def read_blob(self, digest: Digest) -> bytes:
        """The whole blob in memory: only for small blobs (manifests, configs). Raises
        BlobNotFound, or CorruptBlob when the backend finds the bytes do not hash to `digest`
        (the filesystem: then set aside, as `blob_source` does)."""

    @abstractmethod
    async def put_blob(self, digest: Digest, staged: Path) -> None:
        """Publish a staged file, whose bytes the caller has hashed to `digest`.

        Atomic: the blob either appears complete or not at all. A blob that is
        already stored is not written again, but marked in use (`touch_blob`, whose
        answer decides: one gc deletes meanwhile is written again), so that a
        concurrent garbage collection keeps it (the filesystem replaces
        one of another size that does not hash to `digest`: cut short by a crash). The staged file may be
        consumed (moved) by the call; the caller removes it if it still exists.
        """

    @abstractmethod
    async def get_meta(self, key: str) -> bytes | None:
        """The document under `key`, or None."""

    @abstractmethod
    async def put_meta(self, key: str, data: bytes) -> None:
        """Replace the document under `key` atomically."""

    @abstractmethod
    async def create_meta(self, key: str, data: bytes) -> bool:
        """Write the document under `key` only if there is none: whether it was written.

        Atomic and conditional in the store itself (a hard link, S3 `If-None-Match: *`,
        GCS `ifGenerationMatch=0`): of writers racing for one key, in any processes,
        exactly one wins, and a document that is there is never replaced nor seen
        half-written. A write retried after its answer was lost may find its own
        document and say False: the caller compares what is there.
        """

    @abstractmethod
    async def get_versioned_meta(self, key: str) -> VersionedMeta | None:
        """The document under `key` with its version (for `replace_meta`), or None."""

    @abstractmethod
    async def replace_meta(self, key: str, data: bytes, version: str) -> bool:
        """Replace the document under `key` only if it is still the one `get_versioned_meta`
        read as `version`: whether it was replaced.

        Atomic and conditional in the store itself (S3 `If-Match`, GCS `ifGenerationMatch`,
        a rename under a lock on the filesystem): of writers racing to replace one version,
        in any processes, exactly one wins; a document written since, or removed, stays as
        it is. A write retried after its answer was lost may find its own document and say
        False: the caller reads what is there.
        """

    @abstractmethod
    def staging_dir(self) -> Path:
        """A local directory for the files that builders write before put_blob."""

    async def put_blob_bytes(self, data: bytes) -> Digest:
        """Store a small in-memory blob (configs, manifests); returns its digest."""
        digest = Digest.of(data)
        # Touched first, so that a concurrent gc keeps it, and only then believed stored: gone
        # (gc deleted it meanwhile) it is written again. Of another size, the stored one is
        # damaged: put_blob decides (the filesystem replaces it).
        if await self.touch_blob(digest) == len(data):
            return digest
        with raising_storage_full(f"the {self.name} storage's staging directory {self.staging_dir()}"):
            staged = await asyncio.to_thread(stage_bytes, self.staging_dir(), data)
        try:
            await self.put_blob(digest, staged)
        finally:
            staged.unlink(missing_ok=True)
        return digest

    async def put_meta_after(self, key: str, data: bytes, stored: Awaitable[object]) -> None:
        """Put the document under `key` once `stored` has finished (say, the blobs it names):
        until then, and if `stored` fails, the key keeps its old document.

        A backend that must first make the bytes durable (a local disk) does that
        while `stored` runs. Default: one after the other.
        """
        await stored
        await self.put_meta(key, data)

    async def create_meta_after(self, key: str, data: bytes, stored: Awaitable[object]) -> bool:
        """`create_meta` once `stored` has finished, as `put_meta_after` puts: whether it was written."""
        await stored
        return await self.create_meta(key, data)

    async def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release connections. Default: nothing to release."""

    async def check_access(self, *, write: bool = True) -> None:  # noqa: B027 (optional hook)
        """Raise StorageInaccessible unless this process can list and read its storage
        and, with `write`, write and delete in it (S3, GCS: an object under `probes/`;
        the filesystem: a file in each of its directories; both removed again).

        Asked at start-up (with `write`) and by the readiness endpoint (without: one
        cheap request). Default: nothing to check.
        """

    def on_corrupt_blob(self, listener: Callable[[Digest], None]) -> None:
        """Call `listener` with the digest of any blob found corrupt and removed."""
        self._corruption_listeners.append(listener)

    def _report_corrupt_blob(self, digest: Digest) -> None:
        for listener in self._corruption_listeners:
            listener(digest)

    # ---- optional capabilities (a backend without them still serves) ----

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        """Hold a lock on `key` shared by every process using this storage.

        A holder that dies loses the lock. The default excludes nobody: on
        backends without it, replicas may build the same image twice (each
        image record is created only if absent, so all serve the first one
        stored: this costs time, not correctness).
        """
        yield

    async def remove_abandoned_locks(self) -> int:
        """Remove the locks (`exclusive`) that holders which died left behind (a process killed
        mid-build leaves one per image); how many. For `nixery gc`. Default: none to remove."""
        return 0

    async def blob_servable(self, digest: Digest, size: int | None = None) -> bool:
        """Whether `blob_source` would serve the blob: it is stored (with `size` bytes, when
        given) and, on a backend that checks a blob's bytes before it first serves them (the
        filesystem), they hash to `digest`. Asked before a manifest naming it is handed out, so
        that an image with a damaged blob is built again before a client pulls it, not after.
        The filesystem hashes a blob once per process (again when its file changes), sharing
        that hash with `blob_source`, and sets a damaged one aside as `blob_source` does.
        Default: stored with that size (one stat)."""
        stored = await self.stat_blob(digest)
        return stored is not None and (size is None or stored == size)

    async def remove_quarantined(self, older_than: float, *, dry_run: bool = False) -> int:
        """Remove the blobs set aside as damaged (quarantined) more than `older_than` seconds
        ago: how many (with `dry_run`, how many would go). For `nixery gc`. Default: none (a
        backend that sets nothing aside)."""
        return 0

    async def touch_blob(self, digest: Digest) -> int | None:
        """Mark a blob as in use now, so a concurrent garbage collection keeps it: its size, or
        None when it is not stored (then write it again before naming it anywhere).

        The answer comes from the touch itself, not from a check before it: a blob that
        `delete_unused_blob` removes around the touch is either kept (the touch landed before
        gc's decisive read of its date) or reported gone here (the filesystem: the touch fails
        on the missing file; GCS: the patch gets NotFound, and gc's delete is conditional on
        the metadata it read; S3: gc reads the touch marker again after its DELETE and puts
        a touched blob back, see S3Storage.delete_unused_blob).
        Default (a backend without gc): its size."""
        return await self.stat_blob(digest)

    async def verify_blob(self, digest: Digest) -> bool | None:
        """Whether the stored bytes hash to `digest`; None when this backend cannot tell cheaply."""
        return None

    async def set_aside_damaged_blob(self, digest: Digest) -> bool:
        """Take a blob found damaged (`verify_blob` False) out of service, as the registry does with
        one it finds damaged before serving it, if its bytes still do not hash to `digest`: whether
        it was set aside. Registries sharing the storage then find it gone, and rebuild the images
        that need it. For `nixery check`. Default: nothing set aside (a backend that cannot hash
        its blobs cheaply finds none damaged)."""
        return False

    async def list_blobs(self) -> AsyncIterator[BlobStat]:
        """Every stored blob (for garbage collection and checks)."""
        raise NotImplementedError(f"the {self.name} backend cannot list blobs")
        yield  # pragma: no cover (makes this an async generator)

    async def delete_blob(self, digest: Digest) -> None:
        raise NotImplementedError(f"the {self.name} backend cannot delete blobs")

    async def delete_unused_blob(self, digest: Digest, cutoff: float) -> bool:
        """Delete the blob unless it was written or touched (`touch_blob`) at or after
        `cutoff` (seconds since the epoch); whether it was deleted.

        Its dates are read by this call, not taken from an earlier `list_blobs`: a
        sweep that lists first and deletes later must not delete a blob that a build
        reused in between (that build's image record, written next, names it). A
        `touch_blob` that lands while this call runs either keeps the blob (on S3 and the
        filesystem gc may find the touch only after taking the blob away, and puts it back)
        or learns that it is gone (S3: see S3Storage.delete_unused_blob).
        """
        raise NotImplementedError(f"the {self.name} backend cannot delete blobs")

    async def restore_parked_blobs(self) -> int:
        """Tidy up after a garbage collection that died in the middle of `delete_unused_blob`:
        a blob it had set aside (S3: `parked/`) and deleted is put back, so that a build told
        the blob is there finds it again; how many were put back. Default (nothing is ever
        set aside where a later gc could find it): 0."""
        return 0

    async def list_meta(self, prefix: str) -> list[str]:
        """Keys of the metadata documents under `prefix` (e.g. "images/")."""
        raise NotImplementedError(f"the {self.name} backend cannot list metadata")

    async def delete_meta(self, key: str) -> None:
        raise NotImplementedError(f"the {self.name} backend cannot delete metadata")


def stage_bytes(directory: Path, data: bytes, *, prefix: str = "bytes-", durable: bool = False) -> Path:
    """A new file in `directory` holding `data` (made readable by all and fsync'd if `durable`);
    nothing is left behind when writing it fails."""
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, prefix=prefix) as handle:
        try:
            handle.write(data)
            handle.flush()  # here, so that a full disk fails this write, not the close
            if durable:
                os.fchmod(handle.fileno(), 0o644)
                os.fsync(handle.fileno())
        except BaseException:
            os.unlink(handle.name)
            raise
    return Path(handle.name)


# ---- staging directories --------------------------------------------------

#: Staging directories of other hosts (shared storage) untouched this long are removed.
FOREIGN_STAGING_MAX_AGE = 24 * 3600


def make_staging_dir(root: Path) -> Path:
    """This process's staging directory, `root/<host>-<pid>`, created if needed.

    Staging directories that processes left behind are removed on the way:
    those of this host whose process is gone (and whose lock nobody holds: a
    process in another pid namespace may have that pid), and other hosts' (a
    shared STORAGE_PATH) once untouched for a day; what a gone process of this one's
    name left in its directory is removed too (`_claim`). So a process killed
    mid-build leaves its staged layers only until the next start.
    """
    host = socket.gethostname()
    own = root / f"{host}-{os.getpid()}"
    try:
        own.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a full disk: `ensure_staging_dir` makes it once there is space
        if exc.errno not in FULL_DISK_ERRNOS:
            raise
    else:
        _claim(own)
    _users[own] += 1
    for directory in root.iterdir():
        if directory == own:
            continue
        owner, _, pid = directory.name.rpartition("-")
        try:
            if not directory.is_dir():
                continue
            if owner == host:
                # A pid means something only in its pid namespace: a live process of another
                # (a container with this host name) holds its directory's lock.
                abandoned = not (pid.isdigit() and process_alive(int(pid))) and not _locked(directory)
            else:
                abandoned = time.time() - directory.stat().st_mtime > FOREIGN_STAGING_MAX_AGE
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        if abandoned:
            shutil.rmtree(directory, ignore_errors=True)
    return own


#: Staging directories this process holds locked, with the descriptor that holds each.
_claimed: dict[Path, int] = {}
#: How many open storages of this process use each staging directory.
_users: collections.Counter[Path] = collections.Counter()


def release_staging_dir(own: Path) -> None:
    """A storage of this process is closed: once none uses its staging directory, the directory
    goes (a finished, failed or interrupted `nixery build --local`, a stopped registry). One
    whose lock another process holds (`_claim`) is left to it."""
    _users[own] -= 1
    if _users[own] > 0:
        return
    del _users[own]
    if own in _claimed:
        shutil.rmtree(own, ignore_errors=True)
        os.close(_claimed.pop(own))


def _claim(own: Path) -> None:
    """Lock `own` for as long as this process lives; if nobody held it, empty it first.

    A restarted container has the host name and pid its crashed predecessor had
    (pid 1, say), so its staging directory has the same name, and the files left
    in it were kept for ever. No process holds the lock of a directory whose
    owner is gone (the kernel drops a flock with its last descriptor). A lock held
    elsewhere (a process of the same name in another pid namespace, on a shared
    STORAGE_PATH) leaves the directory shared, as it was before.
    """
    if own in _claimed:  # a second storage opened by this process
        return
    try:
        fd = os.open(own, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live process, or a file system without flock: leave it as it is
        os.close(fd)
        return
    _claimed[own] = fd
    for entry in own.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _locked(directory: Path) -> bool:
    """Whether a process holds the lock of a staging directory (`_claim`)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def ensure_staging_dir(directory: Path) -> Path:
    """A staging directory, made now if a full disk kept `make_staging_dir` from making it
    (so that maintenance commands and stored images work on a full disk)."""
    if not directory.is_dir():
        with raising_storage_full(f"the staging directory {directory}"):
            directory.mkdir(parents=True, exist_ok=True)
    return directory

