"""Blobs and metadata in a local directory.

Layout under the root:

    blobs/sha256/ab/abcdef...   content-addressed blobs
    meta/<key>                  metadata documents
    tmp/<host>-<pid>/           this process's staging files

Every write goes to a staging file that is fsync'd and then renamed into place,
and the parent directory is fsync'd, so a crash leaves either the old state or
the new one, never a partial file under a final name. Staging directories of
processes that are gone are removed at start-up.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from nixery.registry.digest import Digest
from nixery.storage.base import BlobNotFound, BlobSource, LocalFile, Storage, check_key

#: Staging directories of other hosts (shared storage) older than this are removed.
_FOREIGN_STAGING_MAX_AGE = 24 * 3600


class FilesystemStorage(Storage):
    name = "filesystem"

    def __init__(self, root: Path):
        self.root = root
        self._blobs = root / "blobs" / "sha256"
        self._meta = root / "meta"
        self._staging = root / "tmp" / f"{socket.gethostname()}-{os.getpid()}"
        for directory in (self._blobs, self._meta, self._staging):
            directory.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_staging(root / "tmp", keep=self._staging)

    def blob_path(self, digest: Digest) -> Path:
        return self._blobs / digest.hex[:2] / digest.hex

    def staging_dir(self) -> Path:
        return self._staging

    async def stat_blob(self, digest: Digest) -> int | None:
        try:
            return (await asyncio.to_thread(os.stat, self.blob_path(digest))).st_size
        except FileNotFoundError:
            return None

    async def blob_source(self, digest: Digest, *, allow_redirect: bool) -> BlobSource:
        size = await self.stat_blob(digest)
        if size is None:
            raise BlobNotFound(digest)
        return LocalFile(self.blob_path(digest), size)

    async def read_blob(self, digest: Digest) -> bytes:
        try:
            return await asyncio.to_thread(self.blob_path(digest).read_bytes)
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    async def put_blob(self, digest: Digest, staged: Path) -> None:
        await asyncio.to_thread(_publish, staged, self.blob_path(digest), replace=False)

    async def get_meta(self, key: str) -> bytes | None:
        try:
            return await asyncio.to_thread((self._meta / check_key(key)).read_bytes)
        except FileNotFoundError:
            return None

    async def put_meta(self, key: str, data: bytes) -> None:
        target = self._meta / check_key(key)
        await asyncio.to_thread(self._write_meta, target, data)

    def _write_meta(self, target: Path, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(dir=self._staging, delete=False, prefix="meta-") as handle:
            handle.write(data)
        _publish(Path(handle.name), target, replace=True)


def _publish(staged: Path, target: Path, *, replace: bool) -> None:
    """Make `staged` durable and move it to `target` in one atomic rename."""
    if not replace and target.exists():
        return
    with open(staged, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(staged, 0o644)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, target)
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_abandoned_staging(tmp_root: Path, *, keep: Path) -> None:
    host = socket.gethostname()
    for directory in tmp_root.iterdir():
        if directory == keep or not directory.is_dir():
            continue
        owner, _, pid = directory.name.rpartition("-")
        if owner == host:
            abandoned = not (pid.isdigit() and _process_alive(int(pid)))
        else:
            abandoned = time.time() - directory.stat().st_mtime > _FOREIGN_STAGING_MAX_AGE
        if abandoned:
            shutil.rmtree(directory, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
