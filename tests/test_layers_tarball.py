"""Layer tarballs: deterministic bytes, correct digests, the store's content."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import stat
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from isal import isal_zlib

from nixery.layers.tarball import Entry, LayerBlob, _header, write_entry_layer, write_store_layer
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import Compression

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture
def fake_store(tmp_path: Path) -> list[str]:
    """Two 'store paths' with files, an executable, a symlink, a hard link and nested dirs."""
    first = tmp_path / "nix" / "store" / "aaaa-first"
    (first / "bin").mkdir(parents=True)
    (first / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    (first / "bin" / "tool").chmod(0o555)
    (first / "share").mkdir()
    (first / "share" / "data").write_bytes(os.urandom(300_000))
    os.link(first / "share" / "data", first / "share" / "same-data")
    (first / "bin" / "alias").symlink_to("tool")
    second = tmp_path / "nix" / "store" / "bbbb-second"
    second.mkdir()
    (second / "README").write_text("second\n")
    return [str(second), str(first)]


def test_same_input_same_bytes_and_digests(fake_store: list[str]) -> None:
    a, b = io.BytesIO(), io.BytesIO()
    first = write_store_layer(fake_store, a)
    second = write_store_layer(list(reversed(fake_store)), b)
    assert a.getvalue() == b.getvalue()
    assert first == second
    assert first.digest.hex == hashlib.sha256(a.getvalue()).hexdigest()
    assert first.diff_id.hex == hashlib.sha256(gzip.decompress(a.getvalue())).hexdigest()
    assert first.size == len(a.getvalue())


def test_mtime_changes_do_not_change_the_layer(fake_store: list[str]) -> None:
    before = io.BytesIO()
    write_store_layer(fake_store, before)
    os.utime(Path(fake_store[1]) / "bin" / "tool", (12345, 12345))
    after = io.BytesIO()
    write_store_layer(fake_store, after)
    assert before.getvalue() == after.getvalue()


def test_gzip_header_has_no_name_or_time(fake_store: list[str]) -> None:
    out = io.BytesIO()
    write_store_layer(fake_store, out)
    header = out.getvalue()[:10]
    assert header[:3] == b"\x1f\x8b\x08"
    assert header[3] == 0, "no FNAME/FCOMMENT/FEXTRA flags"
    assert header[4:8] == b"\0\0\0\0", "mtime is zero"


def test_entries_sorted_owned_by_root_with_store_modes(fake_store: list[str]) -> None:
    out = io.BytesIO()
    write_store_layer(fake_store, out)
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    prefix = fake_store[1].lstrip("/")
    assert names[0] == "nix"
    assert f"{prefix}/bin/tool" in names
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" and m.mtime == 1 for m in members)
    by_name = {m.name: m for m in members}
    assert by_name[f"{prefix}/bin/tool"].mode == 0o555
    assert by_name[f"{prefix}/bin/alias"].issym() and by_name[f"{prefix}/bin/alias"].linkname == "tool"
    # A hard link in the store is stored as a plain file: the layer does not depend on store optimisation.
    assert by_name[f"{prefix}/share/same-data"].isfile()
    store_names = [n for n in names if n.startswith(prefix)]
    assert store_names == sorted(store_names, key=lambda n: n.split("/"))


def test_layer_unpacks_with_gnu_tar(fake_store: list[str], tmp_path: Path) -> None:
    out = tmp_path / "layer.tar.gz"
    with open(out, "wb") as handle:
        write_store_layer(fake_store, handle)
    target = tmp_path / "unpacked"
    target.mkdir()
    subprocess.run(["tar", "-xzf", str(out), "-C", str(target)], check=True)
    tool = target / fake_store[1].lstrip("/") / "bin" / "tool"
    assert tool.read_bytes() == b"#!/bin/sh\necho tool\n"


ENTRIES = [
    Entry("tmp", "dir", 0o1777),
    Entry("bin", "dir", 0o755),
    Entry("bin/sh", "symlink", target="/nix/store/x-busybox/bin/sh"),
    Entry("etc/passwd", "file", 0o644, content=b"root:x:0:0::/root:/bin/sh\n"),
]


def test_entry_layer(tmp_path: Path) -> None:
    entries = ENTRIES
    out = io.BytesIO()
    blob = write_entry_layer(entries, out)
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("etc/passwd").read() == b"root:x:0:0::/root:/bin/sh\n"
    assert list(members) == ["bin", "bin/sh", "etc/passwd", "tmp"]
    assert members["tmp"].mode == 0o1777
    assert members["bin/sh"].linkname == "/nix/store/x-busybox/bin/sh"
    again = io.BytesIO()
    assert write_entry_layer(list(reversed(entries)), again) == blob


def unzstd(data: bytes) -> bytes:
    # A streamed frame does not state its size, so decompress as a stream.
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@pytest.fixture
def large_store(fake_store: list[str], tmp_path: Path) -> list[str]:
    """The fake store plus a path larger than the compressor's 1 MiB chunks."""
    big = tmp_path / "nix" / "store" / "cccc-big"
    big.mkdir()
    (big / "random").write_bytes(os.urandom(1_500_000))
    (big / "text").write_bytes(b"the same line again\n" * 200_000)
    return [*fake_store, str(big)]


def test_zstd_layer_is_deterministic(large_store: list[str]) -> None:
    a, b = io.BytesIO(), io.BytesIO()
    first = write_store_layer(large_store, a, compression=Compression.ZSTD)
    second = write_store_layer(list(reversed(large_store)), b, compression=Compression.ZSTD)
    assert a.getvalue() == b.getvalue()
    assert first == second
    assert a.getvalue()[:4] == ZSTD_MAGIC


def test_zstd_layer_holds_the_same_tar_as_the_gzip_layer(large_store: list[str]) -> None:
    gz, zst = io.BytesIO(), io.BytesIO()
    gzip_blob = write_store_layer(large_store, gz)
    zstd_blob = write_store_layer(large_store, zst, compression=Compression.ZSTD)
    tar = unzstd(zst.getvalue())
    assert tar == gzip.decompress(gz.getvalue())
    assert zstd_blob.diff_id == gzip_blob.diff_id  # one image config serves either compression
    assert zstd_blob.diff_id.hex == hashlib.sha256(tar).hexdigest()
    assert zstd_blob.digest.hex == hashlib.sha256(zst.getvalue()).hexdigest()
    assert zstd_blob.size == len(zst.getvalue())
    assert zstd_blob.digest != gzip_blob.digest


def test_zstd_layer_unpacks_with_gnu_tar(fake_store: list[str], tmp_path: Path) -> None:
    out = tmp_path / "layer.tar.zst"
    with open(out, "wb") as handle:
        write_store_layer(fake_store, handle, compression=Compression.ZSTD)
    target = tmp_path / "unpacked"
    target.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", str(out), "-C", str(target)], check=True)
    assert (target / fake_store[1].lstrip("/") / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho tool\n"


def test_zstd_entry_layer() -> None:
    gz, zst, again = io.BytesIO(), io.BytesIO(), io.BytesIO()
    gzip_blob = write_entry_layer(ENTRIES, gz)
    zstd_blob = write_entry_layer(ENTRIES, zst, compression=Compression.ZSTD)
    assert write_entry_layer(list(reversed(ENTRIES)), again, compression=Compression.ZSTD) == zstd_blob
    assert again.getvalue() == zst.getvalue()
    assert unzstd(zst.getvalue()) == gzip.decompress(gz.getvalue())
    assert zstd_blob.diff_id == gzip_blob.diff_id
    assert zstd_blob.digest.hex == hashlib.sha256(zst.getvalue()).hexdigest()


# --- The reference writer --------------------------------------------------
# The layer writer as it was while it used `tarfile` for every entry (nixery/layers/tarball.py
# at 4989fca): tarfile's stream mode, PAX_FORMAT, a sink compressing once it holds 1 MiB.
# The writer in use must give exactly these bytes, compressed and uncompressed, or every
# stored layer digest changes. Kept here, whole, so the comparison does not depend on the code
# it checks.

_REF_CODECS = {
    Compression.GZIP: lambda: isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31),
    Compression.ZSTD: lambda: zstandard.ZstdCompressor(level=3, threads=0, write_checksum=True).compressobj(),
}


class _RefSink:
    def __init__(self, dest: BinaryIO, compression: Compression):
        self._dest = dest
        self._compressor = _REF_CODECS[compression]()
        self._tar_hash = hashlib.sha256()
        self._blob_hash = hashlib.sha256()
        self._pending = bytearray()
        self.compressed_size = 0

    def write(self, data: bytes) -> int:
        self._pending += data
        if len(self._pending) >= 1 << 20:
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


def _ref_tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _ref_store_entries(store_path: str) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
    root = Path(store_path)
    arcname = store_path.lstrip("/")

    def visit(path: Path, name: str) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            info = _ref_tarinfo(name, tarfile.SYMTYPE, 0o777)
            info.linkname = os.readlink(path)
            yield info, None
        elif stat.S_ISDIR(st.st_mode):
            yield _ref_tarinfo(name, tarfile.DIRTYPE, mode), None
            for child in sorted(os.listdir(path)):
                yield from visit(path / child, f"{name}/{child}")
        elif stat.S_ISREG(st.st_mode):
            info = _ref_tarinfo(name, tarfile.REGTYPE, mode)
            info.size = st.st_size
            yield info, str(path)
        else:
            raise ValueError(f"unsupported file type in the store: {path}")

    yield from visit(root, arcname)


def ref_store_layer(store_paths: Iterable[str], dest: BinaryIO, compression: Compression) -> LayerBlob:
    sink = _RefSink(dest, compression)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        tar.addfile(_ref_tarinfo("nix", tarfile.DIRTYPE, 0o555))
        tar.addfile(_ref_tarinfo("nix/store", tarfile.DIRTYPE, 0o555))
        for store_path in sorted(store_paths):
            for info, source in _ref_store_entries(store_path):
                if source is None:
                    tar.addfile(info)
                else:
                    with open(source, "rb") as handle:
                        tar.addfile(info, handle)
    return sink.finish()


def ref_entry_layer(entries: Iterable[Entry], dest: BinaryIO, compression: Compression) -> LayerBlob:
    sink = _RefSink(dest, compression)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.kind == "dir":
                tar.addfile(_ref_tarinfo(entry.name, tarfile.DIRTYPE, entry.mode))
            elif entry.kind == "symlink":
                info = _ref_tarinfo(entry.name, tarfile.SYMTYPE, 0o777)
                info.linkname = entry.target
                tar.addfile(info)
            else:
                info = _ref_tarinfo(entry.name, tarfile.REGTYPE, entry.mode)
                info.size = len(entry.content)
                tar.addfile(info, io.BytesIO(entry.content))
    return sink.finish()


# --- The layer writer gives the reference's bytes --------------------------

BOTH = pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD], ids=["gzip", "zstd"])


def decompress(data: bytes, compression: Compression) -> bytes:
    return gzip.decompress(data) if compression is Compression.GZIP else unzstd(data)


def same_outcome(new: Callable[[], LayerBlob], ref: Callable[[], LayerBlob]) -> tuple[LayerBlob, LayerBlob] | None:
    """Both blobs, or None when the reference fails and the writer fails the same way
    (tarfile refuses names it cannot encode, such as lone surrogates)."""
    try:
        ref_blob = ref()
    except (ValueError, OSError) as exc:
        with pytest.raises(type(exc)):
            new()
        return None
    return new(), ref_blob


def assert_same_layer(
    write: Callable[[BinaryIO], LayerBlob], reference: Callable[[BinaryIO], LayerBlob], compression: Compression
) -> None:
    """`write` and the tarfile-only `reference` give the same bytes and digests (or fail alike)."""
    new, ref = io.BytesIO(), io.BytesIO()
    blobs = same_outcome(lambda: write(new), lambda: reference(ref))
    if blobs is None:
        return
    new_blob, ref_blob = blobs
    # The tar streams first: where they differ is readable, where the compressed bytes differ is not.
    tar = decompress(new.getvalue(), compression)
    assert tar == decompress(ref.getvalue(), compression)
    assert new.getvalue() == ref.getvalue()
    assert new_blob == ref_blob
    assert new_blob.diff_id.hex == hashlib.sha256(tar).hexdigest()


def assert_same_store_layer(store_paths: list[str], compression: Compression) -> None:
    assert_same_layer(
        lambda dest: write_store_layer(store_paths, dest, compression=compression),
        lambda dest: ref_store_layer(store_paths, dest, compression),
        compression,
    )


def assert_same_entry_layer(entries: list[Entry], compression: Compression) -> None:
    assert_same_layer(
        lambda dest: write_entry_layer(entries, dest, compression=compression),
        lambda dest: ref_entry_layer(entries, dest, compression),
        compression,
    )


@BOTH
def test_fake_store_gives_the_reference_bytes(large_store: list[str], compression: Compression) -> None:
    assert_same_store_layer(large_store[:2], compression)
    assert_same_store_layer(large_store, compression)  # more than one compressed chunk


def _name_of_length(parent: Path, arc_parent: str, total: int, char: str = "n") -> str:
    """A child name that makes the entry's name in the tar exactly `total` characters long."""
    length = total - len(arc_parent) - 1
    assert 0 < length < 256, "the temporary directory's name is too long for this test"
    return char * length


@pytest.fixture
def edge_store(tmp_path: Path) -> list[str]:
    """Store paths at the edges of tar's header: name and link lengths, odd modes, sizes."""
    root = tmp_path / "nix" / "store" / "eeee-edges"
    root.mkdir(parents=True)
    arc = str(root).lstrip("/")
    for total in (98, 99, 100, 101, 102):
        (root / _name_of_length(root, arc, total, "f")).write_bytes(b"x" * total)
        # A directory's name gets a trailing slash in the tar: 99 fits the header, 100 does not.
        (root / _name_of_length(root, arc, total, "d")).mkdir()
        (root / _name_of_length(root, arc, total, "l")).symlink_to("f" * total)
    for length in (99, 100, 101, 300, 1000):
        (root / f"link-{length}").symlink_to("t" * length)
    (root / "link-unicode").symlink_to("/nix/store/ßßß-ünïcödé/bin/tool")
    for name in ("café", "日本語", "emoji-🙂", "ascii-but-" + "é" * 60, "ñ" * 50):
        (root / name).write_bytes(name.encode())
    os.close(os.open(bytes(root) + b"/not-utf8-\xff\xfe", os.O_CREAT | os.O_WRONLY, 0o644))
    os.symlink(b"target-\xff", bytes(root) + b"/link-not-utf8")
    sizes = root / "sizes"
    sizes.mkdir()
    for size in (0, 1, 511, 512, 513, 1023, 1024, 1025, 10240, 10241, 65536 + 7):
        (sizes / f"s{size:06d}").write_bytes(os.urandom(size))
    modes = root / "modes"
    modes.mkdir()
    for mode in (0o4755, 0o2555, 0o6555, 0o1755, 0o7777, 0o400, 0o644, 0o000):
        path = modes / f"file-{mode:04o}"
        path.write_bytes(b"mode\n")
        path.chmod(mode)
    for mode in (0o1777, 0o2755, 0o700):
        (modes / f"dir-{mode:04o}").mkdir()
        (modes / f"dir-{mode:04o}").chmod(mode)
    deep = root / "deep"
    for level in range(40):
        deep = deep / f"level-{level:02d}"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(b"deep\n")
    (deep / "up").symlink_to("../" * 40 + "sizes/s000512")
    os.link(sizes / "s000513", root / "hard-link-513")
    empty = tmp_path / "nix" / "store" / "dddd-empty-dir"
    empty.mkdir()
    single = tmp_path / "nix" / "store" / "ffff-single-file"
    single.write_bytes(b"a store path that is one file\n")
    link = tmp_path / "nix" / "store" / "gggg-symlink"
    link.symlink_to(str(single))
    return [str(root), str(empty), str(single), str(link)]


@BOTH
def test_header_edges_give_the_reference_bytes(edge_store: list[str], compression: Compression) -> None:
    assert_same_store_layer(edge_store, compression)


def test_edges_use_pax_headers_where_tarfile_does(edge_store: list[str]) -> None:
    """The long and non-ASCII names really are in the layer (not cut or replaced)."""
    out = io.BytesIO()
    write_store_layer(edge_store, out)
    out.seek(0)
    with tarfile.open(fileobj=out, mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    arc = edge_store[0].lstrip("/")
    assert f"{arc}/日本語" in members
    assert members[f"{arc}/link-1000"].linkname == "t" * 1000
    assert members[f"{arc}/modes/file-4755"].mode == 0o4755
    assert any(name.startswith(f"{arc}/deep/level-00/") and name.endswith("/leaf") for name in members)


def test_unsupported_file_type_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "nix" / "store" / "hhhh-fifo"
    path.mkdir(parents=True)
    os.mkfifo(path / "fifo")
    with pytest.raises(ValueError, match="unsupported file type in the store: .*/fifo"):
        write_store_layer([str(path)], io.BytesIO())


def _sized(name: str, size: int) -> Entry:
    return Entry(name, "file", 0o644, content=bytes(range(256)) * (size // 256) + b"z" * (size % 256))


EDGE_ENTRIES = [
    *ENTRIES,
    *(Entry("d" * length, "dir", 0o755) for length in (98, 99, 100, 101)),
    *(Entry("f" * length, "file", 0o444, content=b"x") for length in (99, 100, 101, 300)),
    *(Entry("l" * length, "symlink", target="t" * length) for length in (99, 100, 101, 300)),
    Entry("already/slashed/", "dir", 0o700),
    Entry("modes/setuid", "file", 0o4755, content=b"#!/bin/sh\n"),
    Entry("modes/all-bits", "file", 0o7777),
    Entry("modes/wider-than-12-bits", "file", 0o170644),
    Entry("unicode/café", "file", 0o644, content="é".encode()),
    Entry("unicode/link", "symlink", target="/nix/store/ßßß-ünïcödé"),
    Entry("surrogate-\udcff", "file", 0o644, content=b"not utf-8"),
    Entry("empty", "file", 0o644),
    *(_sized(f"sizes/{size}", size) for size in (511, 512, 513, 1024, 1025)),
]


@BOTH
def test_entry_layer_edges_give_the_reference_bytes(compression: Compression) -> None:
    assert_same_entry_layer(EDGE_ENTRIES, compression)
    assert_same_entry_layer([], compression)


@BOTH
@pytest.mark.parametrize(
    "size",
    [
        10240 - 512 - 1024,  # header, content and end blocks fill one record exactly
        10240 - 512 - 1024 + 1,
        1_054_720 - 512 - 1024,  # the tar is exactly one compressed chunk (103 records)
        1_054_720 - 512 - 1024 + 1,
        2 * 1_054_720 - 512 - 1024,
        1 << 20,
    ],
)
def test_record_and_chunk_boundaries_give_the_reference_bytes(size: int, compression: Compression) -> None:
    assert_same_entry_layer([_sized("file", size)], compression)


# --- Real store paths -------------------------------------------------------

NIX_STORE = Path("/nix/store")
_BIGGEST_LAYER = 256 << 20  # leave out giant paths (CUDA, TeX) some machines have


class _Digests:
    """A layer destination keeping only the sha256 of the layer and of the tar inside it."""

    def __init__(self, compression: Compression):
        self.blob = hashlib.sha256()
        self.tar = hashlib.sha256()
        gz = compression is Compression.GZIP
        self._decompressor = zlib.decompressobj(31) if gz else zstandard.ZstdDecompressor().decompressobj()

    def write(self, data: bytes) -> int:
        self.blob.update(data)
        self.tar.update(self._decompressor.decompress(data))
        return len(data)


def _tree_size(path: Path) -> tuple[int, int]:
    """(entries, bytes) of a store path."""
    if path.is_symlink() or not path.is_dir():
        return 1, path.lstat().st_size
    entries, size = 1, 0
    for parent, dirs, files in os.walk(path):
        entries += len(dirs) + len(files)
        size += sum(os.lstat(os.path.join(parent, name)).st_size for name in files)
    return entries, size


@pytest.fixture(scope="module")
def store_picks(built_store_paths: dict[str, str]) -> dict[str, list[str]]:
    """Store paths of this machine (at least those the tests build): those with the most
    entries, the largest, busybox, a sample."""
    sizes = {str(p): _tree_size(p) for p in NIX_STORE.iterdir() if not p.name.endswith((".drv", ".lock"))}
    fitting = {p: s for p, s in sizes.items() if s[1] <= _BIGGEST_LAYER}

    def distinct(paths: list[str]) -> list[str]:
        # The same package built twice has the same files: one of each name is enough.
        seen: dict[str, str] = {}
        for path in paths:
            seen.setdefault(path.split("-", 1)[-1], path)
        return list(seen.values())

    most = distinct(sorted(fitting, key=lambda p: (-fitting[p][0], p)))[:3]
    largest = [p for p in distinct(sorted(fitting, key=lambda p: (-fitting[p][1], p))) if p not in most][:2]
    sample = random.Random(7).sample(sorted(fitting), min(30, len(fitting)))
    picks = {f"most-entries-{i}": [p] for i, p in enumerate(most, 1)}
    picks |= {f"largest-{i}": [p] for i, p in enumerate(largest, 1)}
    picks["busybox"] = [p for p in fitting if p.split("-", 1)[-1].startswith("busybox-")][:1]
    picks["sample-of-30-in-one-layer"] = sample
    return picks


@BOTH
@pytest.mark.parametrize(
    "pick",
    [
        "most-entries-1",
        "most-entries-2",
        "most-entries-3",
        "largest-1",
        "largest-2",
        "busybox",
        "sample-of-30-in-one-layer",
    ],
)
def test_real_store_paths_give_the_reference_bytes(
    store_picks: dict[str, list[str]], pick: str, compression: Compression
) -> None:
    paths = store_picks[pick]
    assert paths, f"no store path for {pick}"
    new, ref = _Digests(compression), _Digests(compression)
    new_blob = write_store_layer(paths, new, compression=compression)  # type: ignore[arg-type]
    ref_blob = ref_store_layer(paths, ref, compression)  # type: ignore[arg-type]
    assert new.tar.hexdigest() == ref.tar.hexdigest(), paths
    assert new.blob.hexdigest() == ref.blob.hexdigest(), paths
    assert new_blob == ref_blob
    assert new_blob.diff_id.hex == new.tar.hexdigest()
    assert new_blob.digest.hex == new.blob.hexdigest()


# --- Generated trees ----------------------------------------------------------

# Names as the kernel stores them: any bytes but "/" and NUL, UTF-8 or not.
_name_bytes = st.one_of(
    st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40).map(
        str.encode
    ),
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")),
    st.integers(1, 120).map(lambda n: b"n" * n),
).filter(lambda b: b not in (b".", b"..") and len(b) <= 255)
_sizes = st.one_of(st.sampled_from([0, 1, 511, 512, 513, 1024, 1025, 10240]), st.integers(0, 5000))
_file_modes = st.sampled_from([0o444, 0o555, 0o644, 0o755, 0o400, 0o4755, 0o2555, 0o6755, 0o1755, 0o7777])
_dir_modes = st.sampled_from([0o755, 0o555, 0o700, 0o1777, 0o2755])
_targets = st.one_of(
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=150).map(
        str.encode
    ),
    st.integers(1, 300).map(lambda n: b"t" * n),
    st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\0", b"_")),
)
_trees = st.recursive(
    st.one_of(st.tuples(st.just("file"), _sizes, _file_modes), st.tuples(st.just("link"), _targets)),
    lambda children: st.tuples(st.just("dir"), st.dictionaries(_name_bytes, children, max_size=6), _dir_modes),
    max_leaves=25,
)


def _make(path: bytes, node: tuple, rng: random.Random) -> None:
    kind = node[0]
    if kind == "file":
        with open(path, "wb") as handle:
            handle.write(rng.randbytes(node[1]))
        os.chmod(path, node[2])
    elif kind == "link":
        os.symlink(node[1], path)
    else:
        os.mkdir(path)
        for name, child in node[1].items():
            _make(path + b"/" + name, child, rng)
        os.chmod(path, node[2])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trees=st.lists(_trees, min_size=1, max_size=3),
    nesting=st.lists(st.integers(1, 60), max_size=3),
    seed=st.integers(0, 1000),
)
def test_generated_trees_give_the_reference_bytes(trees: list[tuple], nesting: list[int], seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as base:
        # Nested directories put the entries' names around tar's 100-character field.
        store = os.fsencode(base) + b"/" + b"/".join(b"p" * n for n in nesting)
        os.makedirs(store, exist_ok=True)
        paths = []
        for i, tree in enumerate(trees):
            path = store + b"/%d-path" % i
            _make(path, tree, rng)
            paths.append(os.fsdecode(path))
        for compression in (Compression.GZIP, Compression.ZSTD):
            assert_same_store_layer(paths, compression)


_entry_names = st.lists(
    st.one_of(
        st.text(st.characters(blacklist_characters="\0"), min_size=1, max_size=30),
        st.integers(1, 120).map(lambda n: "n" * n),
    ),
    min_size=1,
    max_size=4,
).map("/".join)
_entries = st.one_of(
    st.builds(Entry, _entry_names, st.just("dir"), st.integers(0, 0o7777)),
    st.builds(Entry, _entry_names, st.just("symlink"), target=st.text(max_size=200)),
    st.builds(Entry, _entry_names, st.just("file"), st.integers(0, 0o7777), content=st.binary(max_size=3000)),
)


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(_entries, max_size=12))
def test_generated_entry_layers_give_the_reference_bytes(entries: list[Entry]) -> None:
    for compression in (Compression.GZIP, Compression.ZSTD):
        assert_same_entry_layer(entries, compression)


_kinds = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE])
_header_text = st.one_of(
    st.text(max_size=130),
    st.text(st.characters(max_codepoint=127), min_size=95, max_size=105),
    st.integers(0, 300).map(lambda n: "a" * n),
    st.binary(max_size=40).map(os.fsdecode),  # undecodable bytes, as os.listdir gives them
)
_header_sizes = st.one_of(st.integers(0, 2**40), st.sampled_from([0, 8**11 - 1, 8**11, 8**11 + 1, 2**70]))


@settings(max_examples=1000, deadline=None)
@given(name=_header_text, kind=_kinds, mode=st.integers(0, 0o177777), size=_header_sizes, linkname=_header_text)
def test_headers_are_those_of_tarfile(name: str, kind: bytes, mode: int, size: int, linkname: str) -> None:
    """Every header, with a pax extension or not, is the one TarFile.addfile writes in PAX_FORMAT."""
    info = _ref_tarinfo(name, kind, mode)
    info.size, info.linkname = size, linkname
    try:
        expected = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            _header(name, kind, mode, size, linkname)
        return
    assert _header(name, kind, mode, size, linkname) == expected
