"""Deterministic, streamed layer tarballs.

A layer is written in one pass: tar entries are generated from the store,
compressed (gzip or zstd), and both digests (of the tar, the `diff_id`, and of
the compressed stream, the blob digest) are computed as the bytes go by.
Memory stays flat whatever the layer's size. The same input gives the same
bytes on every run and every machine:

* entries sorted by name; directories before their contents
* owner 0:0 with empty user/group names, mtime 1 (as in the Nix store)
* permission bits as in the store (read-only), hard links stored as files
* gzip header without name or timestamp; zstd single-threaded at a fixed level
  (the compressors' versions are pinned in pyproject.toml)
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard
from isal import isal_zlib

from nixery.registry.digest import Digest
from nixery.registry.mediatypes import Compression

MTIME = 1
_CHUNK = 1 << 20  # compress in 1 MiB pieces: few calls, small buffers
_GZIP_WBITS = 31  # a gzip wrapper with a fixed header (no name, mtime 0)


class _StreamCompressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _Codec:
    #: Names the exact bytes this codec produces; part of the layer cache keys.
    cache_tag: str
    new: Callable[[], _StreamCompressor]


_CODECS = {
    # The bytes of every gzip layer served so far: changing them changes every stored digest.
    Compression.GZIP: _Codec("gzip-isal-1", lambda: isal_zlib.compressobj(1, isal_zlib.DEFLATED, _GZIP_WBITS)),
    # Single-threaded: layers are already compressed in parallel, and multithreaded
    # zstd writes other bytes than single-threaded zstd, so the parameters stay fixed.
    # Frames carry a checksum, as the zstd command writes them.
    Compression.ZSTD: _Codec(
        "zstd-3", lambda: zstandard.ZstdCompressor(level=3, threads=0, write_checksum=True).compressobj()
    ),
}


def cache_tag(compression: Compression) -> str:
    """What identifies the compressed bytes in cache keys (e.g. `gzip-isal-1`)."""
    return _CODECS[compression].cache_tag


@dataclass(frozen=True, slots=True)
class LayerBlob:
    digest: Digest  # sha256 of the compressed bytes (the blob)
    diff_id: Digest  # sha256 of the uncompressed tar
    size: int  # compressed bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """A synthetic tar entry (for the layer of entry-point symlinks)."""

    name: str  # relative, without a leading slash
    kind: str  # "dir", "symlink" or "file"
    mode: int = 0o555
    target: str = ""  # symlink target
    content: bytes = b""  # file content


class _HashingCompressor:
    """A write-only file object: tar bytes in, compressed bytes out to `dest`."""

    def __init__(self, dest: BinaryIO, compression: Compression):
        self._dest = dest
        self._compressor = _CODECS[compression].new()
        self._tar_hash = hashlib.sha256()
        self._blob_hash = hashlib.sha256()
        self._pending = bytearray()
        self.compressed_size = 0

    def write(self, data: bytes) -> int:
        self._pending += data
        if len(self._pending) >= _CHUNK:
            self._flush_pending()
        return len(data)

    def _emit(self, compressed: bytes) -> None:
        if compressed:
            self._blob_hash.update(compressed)
            self._dest.write(compressed)
            self.compressed_size += len(compressed)

    def _flush_pending(self) -> None:
        chunk = bytes(self._pending)
        self._pending.clear()
        self._tar_hash.update(chunk)
        self._emit(self._compressor.compress(chunk))

    def finish(self) -> LayerBlob:
        self._flush_pending()
        self._emit(self._compressor.flush())
        return LayerBlob(
            digest=Digest.from_hasher(self._blob_hash),
            diff_id=Digest.from_hasher(self._tar_hash),
            size=self.compressed_size,
        )


def _tarinfo(name: str, kind: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _store_entries(store_path: str) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
    """Tar headers for a store path and everything below it, sorted by name."""
    root = Path(store_path)
    arcname = store_path.lstrip("/")

    def visit(path: Path, name: str) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            info = _tarinfo(name, tarfile.SYMTYPE, 0o777)
            info.linkname = os.readlink(path)
            yield info, None
        elif stat.S_ISDIR(st.st_mode):
            yield _tarinfo(name, tarfile.DIRTYPE, mode), None
            for child in sorted(os.listdir(path)):
                yield from visit(path / child, f"{name}/{child}")
        elif stat.S_ISREG(st.st_mode):
            info = _tarinfo(name, tarfile.REGTYPE, mode)
            info.size = st.st_size
            yield info, str(path)
        else:
            raise ValueError(f"unsupported file type in the store: {path}")

    yield from visit(root, arcname)


def _synthetic_entries(entries: Iterable[Entry]) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.kind == "dir":
            yield _tarinfo(entry.name, tarfile.DIRTYPE, entry.mode), None
        elif entry.kind == "symlink":
            info = _tarinfo(entry.name, tarfile.SYMTYPE, 0o777)
            info.linkname = entry.target
            yield info, None
        else:
            info = _tarinfo(entry.name, tarfile.REGTYPE, entry.mode)
            info.size = len(entry.content)
            yield info, entry.content


def write_store_layer(
    store_paths: Iterable[str], dest: BinaryIO, *, compression: Compression = Compression.GZIP
) -> LayerBlob:
    """Write the compressed tar of these store paths (with /nix and /nix/store) to `dest`."""
    sink = _HashingCompressor(dest, compression)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tar.addfile(_tarinfo("nix", tarfile.DIRTYPE, 0o555))
        tar.addfile(_tarinfo("nix/store", tarfile.DIRTYPE, 0o555))
        for store_path in sorted(store_paths):
            for info, source in _store_entries(store_path):
                if source is None:
                    tar.addfile(info)
                else:
                    with open(source, "rb") as handle:
                        tar.addfile(info, handle)
    return sink.finish()


def write_entry_layer(
    entries: Iterable[Entry], dest: BinaryIO, *, compression: Compression = Compression.GZIP
) -> LayerBlob:
    """Write a small layer of synthetic entries (symlinks, directories, files)."""
    sink = _HashingCompressor(dest, compression)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for info, content in _synthetic_entries(entries):
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return sink.finish()
