"""Deterministic, streamed layer tarballs.

A layer is written in one pass: tar entries are generated from the store,
compressed (gzip or zstd), and both digests (of the tar, the `diff_id`, and of
the compressed stream, the blob digest) are computed as the bytes go by.
Memory stays flat whatever the layer's size. The same store paths with the
same contents give the same bytes on every run and every machine:

* entries sorted by name; directories before their contents
* owner 0:0 with empty user/group names, mtime 1 (as in the Nix store)
* permission bits as in the store (read-only), hard links stored as files
* gzip header without name or timestamp; zstd single-threaded at a fixed level
  (the compressors' versions are pinned in pyproject.toml)

The tar bytes are exactly those `tarfile` writes in PAX_FORMAT stream mode
(stored layer digests depend on them), but made here, for speed: a ustar
block per entry, after a pax extended header when a name or link target is
over 100 characters or not ASCII (most entries below a store path's top: its
name alone is some 70) or a size is 8 GiB or more. Only names with undecodable
bytes, which tarfile marks hdrcharset=BINARY, get tarfile's own header.
tests/test_layers_tarball.py compares all of it with a writer on tarfile alone.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard
from isal import isal_zlib

from nixery.registry.digest import Digest
from nixery.registry.mediatypes import Compression

MTIME = 1
_BLOCK = tarfile.BLOCKSIZE  # 512: headers and contents fill whole blocks
_RECORD = tarfile.RECORDSIZE  # 10240: tarfile pads the archive to whole records
# Compress in pieces of 103 records (1,054,720 bytes), the first record count over 1 MiB:
# the writer on tarfile handed over 10240-byte records and compressed once it held 1 MiB.
# isal's output depends on where its input is split, so the pieces must stay these.
_CHUNK = -(-(1 << 20) // _RECORD) * _RECORD
_GZIP_WBITS = 31  # a gzip wrapper with a fixed header (no name, mtime 0)


class _StreamCompressor(Protocol):
    def compress(self, data: bytes | memoryview, /) -> bytes: ...
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
    """Tar bytes in, compressed bytes out to `dest`, both hashed on the way.

    The tar goes through one buffer the size of a compressed piece: headers are copied
    into it, file contents read straight into it, so big files cost no copies or allocations.
    """

    def __init__(self, dest: BinaryIO, compression: Compression):
        self._dest = dest
        self._compressor = _CODECS[compression].new()
        self._tar_hash = hashlib.sha256()
        self._blob_hash = hashlib.sha256()
        self._piece = memoryview(bytearray(_CHUNK))
        self._filled = 0  # bytes of the piece written
        self.tar_size = 0
        self.compressed_size = 0

    def write(self, data: bytes) -> None:
        """Append `data` to the tar."""
        size = len(data)
        done = 0
        while done < size:
            take = min(size - done, _CHUNK - self._filled)
            self._piece[self._filled : self._filled + take] = data[done : done + take]
            self._filled += take
            done += take
            if self._filled == _CHUNK:
                self._compress_piece()
        self.tar_size += size

    def write_from(self, fd: int, size: int, path: str) -> None:
        """Append the next `size` bytes of the open file `fd`."""
        remaining = size
        while remaining:
            end = min(self._filled + remaining, _CHUNK)
            got = os.readv(fd, [self._piece[self._filled : end]])
            if not got:
                raise OSError(f"unexpected end of data: {path}")  # as tarfile: shorter than listed
            self._filled += got
            remaining -= got
            if self._filled == _CHUNK:
                self._compress_piece()
        self.tar_size += size

    def _compress_piece(self) -> None:
        # The compressors copy what they keep: the piece can be written over afterwards.
        piece = self._piece[: self._filled]
        self._tar_hash.update(piece)
        compressed = self._compressor.compress(piece)
        if compressed:
            self._emit(compressed)
        self._filled = 0

    def _emit(self, compressed: bytes) -> None:
        self._blob_hash.update(compressed)
        self._dest.write(compressed)
        self.compressed_size += len(compressed)

    def finish(self) -> LayerBlob:
        self._compress_piece()  # the last piece, compressed even when empty, as it always was
        self._emit(self._compressor.flush())
        return LayerBlob(
            digest=Digest.from_hasher(self._blob_hash),
            diff_id=Digest.from_hasher(self._tar_hash),
            size=self.compressed_size,
        )


# The parts of a ustar header that are the same for every entry, as tarfile writes them:
# uid and gid 0; after the link name the magic, empty user and group names, empty
# device numbers (tarfile writes numbers only for device files), no name prefix (a
# PAX_FORMAT archive puts long names in a pax header instead) and the block's padding.
# tarfile's own number encoder, so the fields are byte for byte what tarfile writes; it is
# not public API, hence missing from typeshed's tarfile stub.
_itn: Callable[[int, int, int], bytes] = tarfile.itn  # type: ignore[attr-defined]
_IDS = _itn(0, 8, tarfile.PAX_FORMAT) * 2
_AFTER_LINK = tarfile.POSIX_MAGIC + bytes(32 + 32 + 8 + 8 + 155 + 12)
# The checksum counts its own field as eight spaces.
_FIXED_SUM = sum(b" " * 8) + sum(_AFTER_LINK)
_ENTRY_MTIME = _itn(MTIME, 12, tarfile.PAX_FORMAT)
_PAX_MTIME = _itn(0, 12, tarfile.PAX_FORMAT)  # tarfile leaves the pax header's mtime at 0
_MAX_SIZE = 8**11  # sizes from here on do not fit the 12-byte field: a pax record holds them
_ZEROS = bytes(_RECORD)


def _byte_sum(name: bytes, numbers: bytes, linkname: bytes) -> int:
    """sum(name + numbers + linkname), at C speed: Adler-32's low half is 1 + the byte sum
    modulo 65521, and these fields (at most 100 + 48 + 100 bytes) sum to less than that."""
    return (zlib.adler32(linkname, zlib.adler32(numbers, zlib.adler32(name))) & 0xFFFF) - 1


def _ustar(name: bytes, kind: bytes, mode: int, size: int, linkname: bytes, mtime: bytes = _ENTRY_MTIME) -> bytes:
    """One header block as tarfile writes it; the name and link are ASCII, at most 100 bytes."""
    numbers = b"%07o\0" % mode + _IDS + b"%011o\0" % size + mtime
    chksum = _FIXED_SUM + kind[0] + _byte_sum(name, numbers, linkname)
    return b"".join(
        (
            name.ljust(100, b"\0"),
            numbers,
            b"%06o\0 " % chksum,  # tarfile keeps the field's last space
            kind,
            linkname.ljust(100, b"\0"),
            _AFTER_LINK,
        )
    )


def _pax_record(keyword: bytes, value: str) -> bytes:
    """A record `<length> <keyword>=<value>` and a newline."""
    encoded = value.encode("utf-8")  # surrogates raise: tarfile then writes hdrcharset=BINARY
    return b"%d %s=%s\n" % (_record_length(len(keyword) + len(encoded) + 3), keyword, encoded)


@functools.lru_cache(maxsize=4096)
def _record_length(length: int) -> int:
    """A record's length counting its own digits, found with tarfile's loop (lengths repeat)."""
    n = p = 0
    while True:
        n = length + len(str(p))
        if n == p:
            return p
        p = n


def _pax_header(full: str, linkname: str, size: int) -> bytes:
    """The pax extended header tarfile puts before the entry's block (b"" if none): the name,
    link and size that the block cannot hold, in tarfile's order."""
    records = b""
    if len(full) > 100 or not full.isascii():
        records += _pax_record(b"path", full)
    if len(linkname) > 100 or not linkname.isascii():
        records += _pax_record(b"linkpath", linkname)
    if size >= _MAX_SIZE:
        records += _pax_record(b"size", str(size))
    if not records:
        return b""
    return _pax_block(len(records)) + records + _ZEROS[: -len(records) % _BLOCK]


@functools.lru_cache(maxsize=4096)
def _pax_block(size: int) -> bytes:
    """The block before `size` bytes of pax records; it depends on nothing else, and sizes repeat."""
    return _ustar(b"././@PaxHeader", tarfile.XHDTYPE, 0, size, b"", _PAX_MTIME)


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _header(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> bytes:
    """The header of one entry, byte for byte as tarfile writes it in PAX_FORMAT."""
    # tarfile names a directory with a trailing slash, and checks the fields' lengths after adding it.
    full = name + "/" if kind == tarfile.DIRTYPE and not name.endswith("/") else name
    if len(full) <= 100 and len(linkname) <= 100 and full.isascii() and linkname.isascii() and size < _MAX_SIZE:
        return _ustar(full.encode("ascii"), kind, mode & 0o7777, size, linkname.encode("ascii"))
    try:
        pax = _pax_header(full, linkname, size)
    except UnicodeEncodeError:
        # Names with undecodable bytes (rare): tarfile's header, with TarFile's encoding and errors.
        return _tarinfo(name, kind, mode, size, linkname).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    # After a pax header, the block holds what fits: ASCII ("?" for the rest), cut at 100 bytes.
    fitting_name = full.encode("ascii", "replace")[:100]
    fitting_link = linkname.encode("ascii", "replace")[:100]
    return pax + _ustar(fitting_name, kind, mode & 0o7777, size if size < _MAX_SIZE else 0, fitting_link)


class _TarWriter:
    """A tar stream of entries written straight to the compressor, as tarfile's stream mode writes it."""

    def __init__(self, sink: _HashingCompressor):
        self._sink = sink
        self._write = sink.write

    def _pad(self, size: int) -> None:
        if size % _BLOCK:
            self._write(_ZEROS[: _BLOCK - size % _BLOCK])

    def directory(self, name: str, mode: int) -> None:
        self._write(_header(name, tarfile.DIRTYPE, mode))

    def symlink(self, name: str, target: str) -> None:
        self._write(_header(name, tarfile.SYMTYPE, 0o777, linkname=target))

    def file(self, name: str, mode: int, content: bytes) -> None:
        self._write(_header(name, tarfile.REGTYPE, mode, len(content)))
        self._write(content)
        self._pad(len(content))

    def file_from_disk(self, name: str, mode: int, size: int, path: str) -> None:
        """A file of `size` bytes (its size when it was listed)."""
        self._write(_header(name, tarfile.REGTYPE, mode, size))
        fd = os.open(path, os.O_RDONLY)
        try:
            self._sink.write_from(fd, size, path)
        finally:
            os.close(fd)
        self._pad(size)

    def close(self) -> None:
        """tarfile's end of archive: two zero blocks, then zeros up to a whole record."""
        self._write(_ZEROS[: 2 * _BLOCK])
        if self._sink.tar_size % _RECORD:
            self._write(_ZEROS[: _RECORD - self._sink.tar_size % _RECORD])


def _add_path(tar: _TarWriter, path: str, name: str, st: os.stat_result) -> bool:
    """Write the entry of one path (not following symlinks); True for a directory."""
    if stat.S_ISLNK(st.st_mode):
        tar.symlink(name, os.readlink(path))
        return False
    if stat.S_ISDIR(st.st_mode):
        tar.directory(name, stat.S_IMODE(st.st_mode))
        return True
    if stat.S_ISREG(st.st_mode):
        tar.file_from_disk(name, stat.S_IMODE(st.st_mode), st.st_size, path)
        return False
    raise ValueError(f"unsupported file type in the store: {path}")


def _sorted_children(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as children:
        return sorted(children, key=operator.attrgetter("name"))


def _write_store_path(tar: _TarWriter, store_path: str) -> None:
    """A store path and everything below it: each directory, then its children sorted by name."""
    root = str(Path(store_path))  # as always walked: without a trailing slash (which would follow a symlink)
    name = store_path.lstrip("/")
    if not _add_path(tar, root, name, os.lstat(root)):
        return
    # Depth first without recursion: a stack of the directories being written, and their children left.
    stack = [(name, iter(_sorted_children(root)))]
    while stack:
        parent, children = stack[-1]
        for child in children:
            name = f"{parent}/{child.name}"
            if child.is_symlink():  # known from the listing: no stat needed (store paths hold many)
                tar.symlink(name, os.readlink(child.path))
            elif _add_path(tar, child.path, name, child.stat(follow_symlinks=False)):
                stack.append((name, iter(_sorted_children(child.path))))
                break
        else:
            stack.pop()


def write_store_layer(
    store_paths: Iterable[str], dest: BinaryIO, *, compression: Compression = Compression.GZIP
) -> LayerBlob:
    """Write the compressed tar of these store paths (with /nix and /nix/store) to `dest`."""
    sink = _HashingCompressor(dest, compression)
    tar = _TarWriter(sink)
    tar.directory("nix", 0o555)
    tar.directory("nix/store", 0o555)
    for store_path in sorted(store_paths):
        _write_store_path(tar, store_path)
    tar.close()
    return sink.finish()


def write_entry_layer(
    entries: Iterable[Entry], dest: BinaryIO, *, compression: Compression = Compression.GZIP
) -> LayerBlob:
    """Write a small layer of synthetic entries (symlinks, directories, files)."""
    sink = _HashingCompressor(dest, compression)
    tar = _TarWriter(sink)
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.kind == "dir":
            tar.directory(entry.name, entry.mode)
        elif entry.kind == "symlink":
            tar.symlink(entry.name, entry.target)
        else:
            tar.file(entry.name, entry.mode, entry.content)
    tar.close()
    return sink.finish()
