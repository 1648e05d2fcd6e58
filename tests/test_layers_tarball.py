"""Layer tarballs: deterministic bytes, correct digests, the store's content."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from nixery.layers.tarball import Entry, write_entry_layer, write_store_layer
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
