"""Blobs and metadata in a local directory.

Layout under the root:

    blobs/sha256/ab/abcdef...   content-addressed blobs
    meta/<key>                  metadata documents
    locks/<key>.lock            cross-process locks (flock: released when the holder dies;
                                the holder removes the file when done, opening the storage
                                those of dead holders); replacing_meta_<key>.lock
                                while a document is replaced (`replace_meta`)
    quarantine/                 blobs whose bytes did not match their digest, as
                                <hex>-<time set aside, ns>: kept for an operator to
                                look at, removed by `nixery gc` after a retention period
    tmp/<host>-<pid>/           this process's staging files
    verified/sha256/ab/abcd...  hard links of blobs found intact (only with
                                verified_links: for nginx to send them itself)

Every write goes to a staging file that is fsync'd and then renamed into place
(or, for a document created only if absent, hard-linked: a link never replaces;
for one replaced only if it is still the version read, renamed while holding
its lock, once the document there is found to be that version), and the parent
directory is fsync'd, so a crash leaves either the old state or the new one,
never a partial file under a final name. Staging directories of processes that
are gone are removed at start-up.

Before a blob is first served by this process its bytes are hashed: a blob
that no longer matches its digest (disk corruption, tampering) is moved to
quarantine instead of being served, so the image that needs it is rebuilt;
a small blob read whole (`read_blob`: manifests) is checked on every read.
The registry asks the same of an image's blobs before it hands out the
image's manifest (`blob_servable`: the same once-per-process hash), so an
image with a damaged layer is rebuilt before a client's pull, not after it
failed.
A process trusts a blob it hashed while its file's (inode, size, mtime) stay
the same, so damage that leaves them as they were (bit rot) is found by
`nixery check`, which hashes every blob and quarantines a damaged one the same
way: every process then finds it gone, and rebuilds the images that need it.
Requests that come for a blob while it is being hashed wait for that one
hash: after a restart, a fleet pulling the same 400 MB layer hashed it once
per request, and those hashes held every worker thread, so that other pulls'
reads of manifests and records waited seconds behind them. Hashes run in
threads of their own (HASH_THREADS) for the same reason: twelve layers of
100 MB pulled at once held a manifest read 0.7 s.

With `verified_links` (NIXERY_VERIFIED_BLOB_LINKS), a blob found intact is
also hard-linked under verified/, which nginx in front serves without asking
the registry (deploy/nginx/nixery.conf): 1 MB blobs at nginx's own speed
instead of half of it, for registries whose pulls need no credentials. A link
goes whenever its blob goes (deleted, or quarantined: by a registry, or by
`nixery check`), and opening the storage removes every link, so each process
hashes a blob again before the front may send it without asking.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import structlog

from nixery.errors import DigestInvalid
from nixery.lru import LRU
from nixery.registry.digest import Digest
from nixery.singleflight import SingleFlight
from nixery.storage.base import (
    FULL_DISK_ERRNOS,
    BlobNotFound,
    BlobSource,
    BlobStat,
    CorruptBlob,
    LocalFile,
    Storage,
    StorageFull,
    StorageInaccessible,
    VersionedMeta,
    check_key,
    ensure_staging_dir,
    is_key,
    make_staging_dir,
    raising_storage_full,
    stage_bytes,
)

T = TypeVar("T")

log = structlog.get_logger(__name__)

#: Blobs whose intact bytes a process remembers (about 200 bytes each).
VERIFIED_CAPACITY = 20_000
#: Threads that hash blobs before their first serve, apart from asyncio's (which reads and writes
#: files): hashing goes at 1.5 GB/s a thread, more than a network sends.
HASH_THREADS = 2


class FilesystemStorage(Storage):
    name = "filesystem"
    checks_blobs_locally = True

    def __init__(self, root: Path, *, verified_links: bool = False):
        super().__init__()
        self.root = root
        self._blobs = root / "blobs" / "sha256"
        self._meta = root / "meta"
        self._locks = root / "locks"
        self._quarantine = root / "quarantine"
        self._verified_links = root / "verified" / "sha256"
        self._links_enabled = verified_links
        #: Named in StorageFull errors (a full disk), which the registry answers with 507 STORAGE_FULL.
        self._place = f"the filesystem storage at {root}"
        for directory in (self._blobs, self._meta, self._locks, self._quarantine):
            directory.mkdir(parents=True, exist_ok=True)
        self._staging = make_staging_dir(root / "tmp")
        _remove_tree(root / "verified", self._staging)
        _remove_abandoned_locks(self._locks)
        # Blobs hashed and found intact, with the (inode, size, mtime) they had: verified once per
        # process while among the VERIFIED_CAPACITY served most recently (a blob dropped is hashed
        # again when next served), so memory stays flat however many blobs are stored.
        self._verified: LRU[Digest, tuple[int, int, int]] = LRU(VERIFIED_CAPACITY)
        self._verifying: SingleFlight[bool] = SingleFlight()  # by (digest, identity): one hash at a time
        self._hashing = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="nixery-hash")

    @staticmethod
    def exists(root: Path) -> bool:
        """Whether `root` holds a storage (opening one creates it; maintenance commands ask first)."""
        return (root / "meta").is_dir() or (root / "blobs").is_dir()

    def blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.hex[:2] / digest.hex

    def verified_link(self, digest: Digest) -> Path:
        return self._verified_links / digest.hex[:2] / digest.hex

    def staging_dir(self) -> Path:
        return ensure_staging_dir(self._staging)

    # Stats of blobs run on the event loop: a blob's directory entry is hot in the
    # kernel's cache (a few µs), while a hop to a worker thread and back costs
    # ~90 µs of CPU per request (docs/benchmarks/README.md). Reads and hashing
    # stay in threads.

    async def stat_blob(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.blob_path(digest)).st_size
        except FileNotFoundError:
            return None

    async def blob_source(self, digest: Digest, *, allow_redirect: bool) -> BlobSource:
        path = self.blob_path(digest)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        if not await self._intact(path, digest, st):
            raise CorruptBlob(digest)
        if self._links_enabled:  # on a full disk the blob stays unlinked: the registry sends it
            with contextlib.suppress(StorageFull), raising_storage_full(self._place):
                self._link_verified(path, digest)
        return LocalFile(path, st.st_size, f"sha256/{digest.hex[:2]}/{digest.hex}")

    async def blob_servable(self, digest: Digest, size: int | None = None) -> bool:
        try:
            st = os.stat(self.blob_path(digest))
        except FileNotFoundError:
            return False
        if size is not None and st.st_size != size:
            return False  # cut short (or grown): a rebuild stores it anew (`_publish` replaces it)
        try:
            return await self._intact(self.blob_path(digest), digest, st)
        except BlobNotFound:  # removed since the stat
            return False

    async def _intact(self, path: Path, digest: Digest, st: os.stat_result) -> bool:
        """Whether the blob stat'ed as `st` hashes to `digest`: hashed once per process while its
        file stays the same (one hash for every caller meanwhile); set aside if it does not."""
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._verified.get(digest) == identity:
            return True
        return await self._verifying.run((digest, identity), lambda: self._verify(path, digest, identity))

    async def _verify(self, path: Path, digest: Digest, identity: tuple[int, int, int]) -> bool:
        """Whether the blob at `path` hashes to `digest`; if not, it is taken out of service."""
        try:
            intact = await asyncio.get_running_loop().run_in_executor(self._hashing, _hashes_to, path, digest)
        except FileNotFoundError:  # removed since the stat (`nixery gc`)
            raise BlobNotFound(digest) from None
        if not intact:
            await self._set_aside(path, digest)
            self._report_corrupt_blob(digest)
            return False
        self._verified.put(digest, identity)
        return True

    async def close(self) -> None:
        self._hashing.shutdown(wait=False, cancel_futures=True)
        self._release_staging(self._staging)

    def _link_verified(self, path: Path, digest: Digest) -> None:
        """Let the front send this blob itself from now on (a no-op once linked: one syscall)."""
        link = self.verified_link(digest)
        try:
            os.link(path, link)
        except FileExistsError:
            pass
        except FileNotFoundError:  # first link under this prefix, or the blob went meanwhile
            link.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                os.link(path, link)

    def _unlink_verified(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.verified_link(digest))

    def _quarantine_blob(self, path: Path) -> Path | None:
        """Move a damaged blob to quarantine/: where it went (None: it was gone already)."""
        self._unlink_verified(Digest.parse(f"sha256:{path.name}"))
        target = self._quarantine / f"{path.name}-{time.time_ns()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        return target

    async def _set_aside(self, path: Path, digest: Digest) -> None:
        """Take a blob this process found damaged out of service, and say so: the images using it
        are rebuilt, but a disk that damages blobs wants a look (quarantine/ keeps the bytes)."""
        moved_to = await asyncio.to_thread(self._quarantine_blob, path)
        if moved_to is not None:
            log.warning("storage.damaged_blob_set_aside", digest=str(digest), moved_to=str(moved_to),
                        note="its bytes no longer hash to its digest: the images using it are built again")

    async def read_blob(self, digest: Digest) -> bytes:
        path = self.blob_path(digest)
        try:
            data, intact = await asyncio.to_thread(_read_checked, path, digest)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        if not intact:
            # A manifest cut short (a crash where writes were not synced, a disk's fault) would
            # otherwise be answered as "not a manifest" for ever: set aside, its image is rebuilt.
            await self._set_aside(path, digest)
            self._report_corrupt_blob(digest)
            raise CorruptBlob(digest)
        return data

    async def put_blob(self, digest: Digest, staged: Path) -> None:
        with raising_storage_full(self._place):
            replaced = await asyncio.to_thread(_publish, staged, self.blob_path(digest), digest)
        if replaced:
            self._verified.pop(digest)  # another file now: hashed again before it is served
            self._unlink_verified(digest)
            log.warning("storage.damaged_blob_replaced", digest=str(digest), note="it did not hash to its digest")

    async def get_meta(self, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread((self._meta / check_key(key)).read_bytes)
        except FileNotFoundError:
            return None

    async def put_meta(self, key: str, data: bytes) -> None:
        target = self._meta / check_key(key)
        with raising_storage_full(self._place):
            await asyncio.to_thread(self._write_meta, target, data)

    async def put_meta_after(self, key: str, data: bytes, stored: Awaitable[object]) -> None:
        await self._place_meta(key, data, stored, _move_into_place)

    async def create_meta(self, key: str, data: bytes) -> bool:
        return await self._place_meta(key, data, None, _link_into_place)

    async def create_meta_after(self, key: str, data: bytes, stored: Awaitable[object]) -> bool:
        return await self._place_meta(key, data, stored, _link_into_place)

    async def get_versioned_meta(self, key: str) -> VersionedMeta | None:
        data = await self.get_meta(key)
        return None if data is None else VersionedMeta(data, _version(data))

    async def replace_meta(self, key: str, data: bytes, version: str) -> bool:
        # Replacements of one document take turns (its lock); creating one (a link) never
        # replaces, so between the check and the rename only a plain put_meta or delete_meta
        # could change it, and image records are written by neither (gc removes one holding
        # its build lock).
        async with self.exclusive(f"replacing/meta/{key}"):
            return await self._place_meta(
                key, data, None, lambda staged, target: _replace_version(staged, target, version)
            )

    async def _place_meta(
        self, key: str, data: bytes, stored: Awaitable[object] | None, place: Callable[[Path, Path], T]
    ) -> T:
        """Stage `data` (written and fsync'd meanwhile), then, once `stored` (if any) is done,
        `place` it as the document `key`: only that last step waits."""
        target = self._meta / check_key(key)
        with raising_storage_full(self._place):
            staged = await asyncio.to_thread(self._stage_meta, data)
        try:
            if stored is not None:
                await stored
            with raising_storage_full(self._place):
                return await asyncio.to_thread(place, staged, target)
        finally:
            staged.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        lock_path = self._locks / f"{check_key(key).replace('/', '_')}.lock"
        with raising_storage_full(self._place):
            fd = await _lock_file(lock_path)
        try:
            yield
        finally:
            # Removed while still held, so that no lock file outlives its use (one per image
            # built, otherwise); a waiter that locks the removed file sees it and starts over.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            os.close(fd)  # releases the lock

    async def check_access(self, *, write: bool = True) -> None:
        def check() -> None:
            for directory in (self._blobs, self._meta, self._locks, self._staging):
                try:
                    if directory == self._staging and write:
                        self.staging_dir()
                    if not write:
                        os.listdir(directory)
                        continue
                    stage_bytes(directory, b"nixery", prefix=".probe-").unlink()
                except StorageFull:
                    continue  # the staging directory could not be made: as below
                except OSError as error:
                    if write and error.errno in FULL_DISK_ERRNOS:
                        continue  # usable: stored images are served, new ones refused (507) until space is made
                    doing = "write in" if write else "read"
                    problem = f"cannot {doing} {directory}: {error.strerror or error}"
                    raise StorageInaccessible(self.name, problem) from None

        await asyncio.to_thread(check)

    async def verify_blob(self, digest: Digest) -> bool | None:
        try:
            intact = await asyncio.to_thread(_hashes_to, self.blob_path(digest), digest)
        except FileNotFoundError:
            return None
        if not intact:  # the front must stop sending it at once, whatever becomes of the blob
            self._unlink_verified(digest)
        return intact

    async def set_aside_damaged_blob(self, digest: Digest) -> bool:
        # A process that hashed the blob before it rotted in place (same size and mtime) trusts it
        # for as long as it runs: moved away, every process's stat finds it gone.
        set_aside = await asyncio.to_thread(self._quarantine_if_damaged, self.blob_path(digest), digest)
        if set_aside:
            self._report_corrupt_blob(digest)
        return set_aside

    def _quarantine_if_damaged(self, path: Path, digest: Digest) -> bool:
        """Quarantine the blob at `path` if it does not hash to `digest`, unless another file took
        its place after the hash (a rebuild stored it anew): whether it was set aside."""
        try:
            with open(path, "rb") as handle:
                if _hashes_to_file(handle, digest) or not _is_file_at(handle.fileno(), path):
                    return False
        except FileNotFoundError:  # set aside or removed meanwhile (a registry, `nixery gc`)
            return False
        self._quarantine_blob(path)
        return True

    async def remove_quarantined(self, older_than: float, *, dry_run: bool = False) -> int:
        return await asyncio.to_thread(_remove_quarantined, self._quarantine, time.time() - older_than, dry_run)

    async def remove_abandoned_locks(self) -> int:
        return await asyncio.to_thread(_remove_abandoned_locks, self._locks)

    async def touch_blob(self, digest: Digest) -> int | None:
        return await asyncio.to_thread(_touch, self.blob_path(digest))

    async def list_blobs(self) -> AsyncIterator[BlobStat]:
        for path in await asyncio.to_thread(lambda: sorted(self._blobs.glob("*/*"))):
            try:
                st = path.stat()
                digest = Digest.parse(f"sha256:{path.name}")
            except (FileNotFoundError, DigestInvalid):
                continue
            if not stat.S_ISREG(st.st_mode):  # no blob the storage wrote: `check` hung reading a FIFO named as one
                continue
            yield BlobStat(digest, st.st_size, st.st_mtime)

    async def delete_blob(self, digest: Digest) -> None:
        await asyncio.to_thread(self._delete, digest)

    async def delete_unused_blob(self, digest: Digest, cutoff: float) -> bool:
        modified = await self._blob_modified(digest)
        if modified is None or modified >= cutoff:
            return False
        self._unlink_verified(digest)  # first: the front never sends a blob storage no longer has
        aside = self.staging_dir() / f"gc-{digest.hex}-{time.time_ns()}"
        return await asyncio.to_thread(_delete_unless_touched, self.blob_path(digest), aside, cutoff)

    async def _blob_modified(self, digest: Digest) -> float | None:
        """The blob's modification time (when it was written or last touched), or None."""
        try:
            return os.stat(self.blob_path(digest)).st_mtime
        except FileNotFoundError:
            return None

    def _delete(self, digest: Digest) -> None:
        self._unlink_verified(digest)  # first: the front never sends a blob storage no longer has
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blob_path(digest))

    async def list_meta(self, prefix: str) -> list[str]:
        base = self._meta / check_key(prefix.rstrip("/"))
        files = await asyncio.to_thread(_files_under, base)
        # The documents only: a file this storage never wrote (an editor's `.x.swp`, NFS's `.nfs...` for a
        # document deleted while open) has a name no key has, and reading it raised InvalidKey: gc and check
        # stopped at it (exit status 2), whatever else the storage held.
        return [key for path in files if is_key(key := str(path.relative_to(self._meta)))]

    async def delete_meta(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self._delete_meta, check_key(key))

    def _delete_meta(self, key: str) -> None:
        """Remove the document, then the directories it leaves empty below its kind's own
        (`manifests/<hex>/` goes with its last pointer, `manifests/` stays): one is made for
        each image's manifests and referrers, and months of builds and gc would pile them up.
        A write into a directory removed meanwhile makes it again (`_place_in`)."""
        target = self._meta / key
        os.unlink(target)
        top = self._meta / key.split("/", 1)[0]
        directory = target.parent
        while directory != top and top in directory.parents:
            try:
                os.rmdir(directory)
            except OSError:  # not empty (another document), or gone already
                return
            directory = directory.parent

    def _write_meta(self, target: Path, data: bytes) -> None:
        _move_into_place(self._stage_meta(data), target)

    def _stage_meta(self, data: bytes) -> Path:
        """A durable staged file holding `data`."""
        return stage_bytes(self.staging_dir(), data, prefix="meta-", durable=True)


async def _lock_file(path: Path) -> int:
    """A descriptor of the file at `path`, exclusively flock'ed.

    Holders remove the file before they let go: a lock taken on a file that is
    no longer the one at `path` is worthless, so it is dropped and the file now
    at `path` (created if need be) is locked instead.
    """
    while True:
        fd = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Poll without blocking a thread, so a cancelled waiter stops at once.
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.05)
            if _is_file_at(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _remove_abandoned_locks(locks: Path) -> int:
    """Remove the lock files whose holders died (killed mid-build: one per image, kept for
    ever unless that image was built again): how many. Safe beside live processes: a held lock
    is not taken here, and one that a waiter locks after it went is dropped by `_lock_file`."""
    try:
        names = os.listdir(locks)
    except OSError:
        return 0
    removed = 0
    for name in names:
        if not name.endswith(".lock"):
            continue  # not a lock: another process's access probe (`check_access`), which it removes itself
        path = locks / name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:  # removed meanwhile by its holder
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_file_at(fd, path):
                os.unlink(path)
                removed += 1
        except OSError:  # held by a live process (or no flock here): left to it
            pass
        finally:
            os.close(fd)
    return removed


def _remove_quarantined(quarantine: Path, cutoff: float, dry_run: bool) -> int:
    """Remove the files set aside in `quarantine` before `cutoff` (seconds since the epoch):
    how many. A disk that keeps damaging blobs filled it for ever otherwise."""
    try:
        entries = list(os.scandir(quarantine))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        try:
            # Only files: nixery puts nothing else there; anything else is left to whoever did.
            if not entry.is_file(follow_symlinks=False) or _quarantined_at(entry) >= cutoff:
                continue
            if not dry_run:
                os.unlink(entry.path)
        except FileNotFoundError:  # removed meanwhile (another gc)
            continue
        removed += 1
    return removed


def _quarantined_at(entry: os.DirEntry[str]) -> float:
    """When a file was set aside: the time in its name (`_quarantine_blob`: a rename keeps the
    blob's own, older, modification time); for a name without one, its modification time."""
    _, _, stamp = entry.name.rpartition("-")
    if stamp.isdigit():
        return int(stamp) / 1e9
    return entry.stat(follow_symlinks=False).st_mtime


def _touch(path: Path) -> int | None:
    """`touch_blob`: the touch (by path: it fails on a blob that gc moved away), then its size."""
    try:
        os.utime(path)
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _delete_unless_touched(path: Path, aside: Path, cutoff: float) -> bool:
    """Delete the blob at `path`, found unused before `cutoff`, unless a build touches it first:
    whether it was deleted.

    A stat then an unlink would delete a blob touched between the two, while the build that
    touched it names it in an image. So the blob is first moved out of the way (to `aside`, in the
    staging directory: same file system), and the date of the moved file is read again: newer
    than `cutoff`, a touch landed before the move and the blob goes back (unless a build stored it
    anew meanwhile: the same bytes); otherwise it is removed. A touch after the move fails on the
    missing file, and its build writes the blob again (`touch_blob`). While it is aside (µs), a
    pull of it gets 404, as of any blob gc deletes."""
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if os.stat(aside).st_mtime >= cutoff:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # stored anew meanwhile
        os.unlink(aside)
        log.info("storage.gc_kept_touched_blob", digest=f"sha256:{path.name}")
        return False
    os.unlink(aside)
    return True


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def _publish(staged: Path, target: Path, digest: Digest) -> bool:
    """Make `staged` (whose bytes hash to `digest`) durable and move it to `target` in one
    atomic rename, unless `target` is stored already: whether a damaged one was replaced.

    A blob stored already is kept, and marked in use. Unless it is of another size and does not
    hash to `digest` (cut short by a crash on a file system that lost unsynced writes, or by a
    disk's fault): then a rebuild would name it again and every pull of it fail, so the staged
    bytes take its place."""
    replaced = False
    try:
        stored_size = os.stat(target).st_size
    except FileNotFoundError:
        stored_size = None
    if stored_size is not None:
        try:
            intact = stored_size == os.stat(staged).st_size or _hashes_to(target, digest)
        except FileNotFoundError:  # removed meanwhile (`nixery gc`): stored anew
            intact = False
        if intact:
            try:
                os.utime(target)  # stored already, and in use again: as touch_blob, for a concurrent gc
                return False
            except FileNotFoundError:
                pass  # removed meanwhile (`nixery gc`): stored anew
        else:
            replaced = True
    _make_durable(staged)
    _move_into_place(staged, target)
    return replaced


def _make_durable(staged: Path) -> None:
    os.chmod(staged, 0o644)
    with open(staged, "rb") as handle:
        os.fsync(handle.fileno())


#: Tries to place a document in a directory that a deletion of its last document keeps removing.
_PLACE_ATTEMPTS = 5


def _place_in(target: Path, place: Callable[[], None]) -> None:
    """Run `place` (a rename or link to `target`) once `target`'s directory exists, then sync
    the directory. The directory may be removed between its making and the rename, by the
    deletion of the last document in it (`FilesystemStorage._delete_meta`): it is made again."""
    for attempt in range(_PLACE_ATTEMPTS):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            place()
            break
        except FileNotFoundError:
            if attempt == _PLACE_ATTEMPTS - 1 or target.parent.is_dir():  # not the directory's doing
                raise
    with contextlib.suppress(FileNotFoundError):  # deleted already, and its directory with it
        _fsync_dir(target.parent)


def _move_into_place(staged: Path, target: Path) -> None:
    """Rename a durable staged file to `target`, durably."""
    _place_in(target, lambda: os.replace(staged, target))


def _link_into_place(staged: Path, target: Path) -> bool:
    """Hard-link a durable staged file as `target` unless something is there already (a link,
    unlike a rename, never replaces), durably: whether it was linked. The caller removes `staged`."""
    try:
        _place_in(target, lambda: os.link(staged, target))
    except FileExistsError:
        return False
    return True


def _files_under(base: Path) -> list[Path]:
    """The files under `base`, sorted. Unlike Path.rglob, a directory removed during the walk
    (gc deleting its last document) is skipped, not an error."""
    found: list[Path] = []
    for directory, _, names in os.walk(base):
        found.extend(path for name in names if (path := Path(directory, name)).is_file())
    return sorted(found)


def _version(data: bytes) -> str:
    """A document's version (`VersionedMeta`): the same bytes are the same version."""
    return hashlib.sha256(data).hexdigest()


def _replace_version(staged: Path, target: Path, version: str) -> bool:
    """Rename a durable staged file to `target` if the document there is at `version`: whether
    it was. The caller holds the document's lock."""
    try:
        if _version(target.read_bytes()) != version:
            return False
    except FileNotFoundError:
        return False
    _move_into_place(staged, target)
    return True


def _remove_tree(tree: Path, staging: Path) -> None:
    """Remove a directory tree that other processes may be adding to: rename it away first."""
    doomed = staging / f"removing-{tree.name}"
    try:
        os.replace(tree, doomed)
    except FileNotFoundError:
        if tree.exists():  # no staging directory (a full disk): remove it where it is
            shutil.rmtree(tree, ignore_errors=True)
        return
    shutil.rmtree(doomed, ignore_errors=True)


def _read_checked(path: Path, digest: Digest) -> tuple[bytes, bool]:
    """A small blob's bytes, and whether they hash to `digest` (cheap: manifests, configs)."""
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest() == digest.hex


def _hashes_to(path: Path, digest: Digest) -> bool:
    with open(path, "rb") as handle:
        return _hashes_to_file(handle, digest)


def _hashes_to_file(handle: BinaryIO, digest: Digest) -> bool:
    hasher = hashlib.sha256()
    while chunk := handle.read(1 << 20):
        hasher.update(chunk)
    return hasher.hexdigest() == digest.hex


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
