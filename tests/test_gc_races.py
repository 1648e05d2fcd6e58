"""`nixery gc` against builds that run meanwhile, on real filesystem storage: what a
build reuses while gc sweeps stays stored (nixery/maintenance.py).

gc runs as a whole here; the concurrent build is what a build does to a blob it
reuses (`touch_blob`), made to happen at the moment that matters: after gc
listed the blobs, before it deletes them. Likewise a pull that registries record
just before gc takes the lock of an image it found unused. And the staging files
of a live process that `nixery gc` (any process that starts) must leave alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nixery import maintenance
from nixery.images import IMAGE_PREFIX, USAGE_PREFIX, ImageRecord, ManifestRef
from nixery.layers.store import LAYER_PREFIX, LayerStore, layer_key
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor, canonical_json
from nixery.registry.mediatypes import Compression, ManifestFormat
from nixery.storage.base import BlobStat, make_staging_dir
from nixery.storage.filesystem import FilesystemStorage

FOUR_HOURS = 4 * 3600
REPO = Path(__file__).resolve().parents[1]


async def old_blob(storage: FilesystemStorage, data: bytes) -> Digest:
    """A blob written four hours ago, named by no image (a collected image's layer, say)."""
    digest = await storage.put_blob_bytes(data)
    then = time.time() - FOUR_HOURS
    os.utime(storage.blob_path(digest), (then, then))
    return digest


async def test_a_blob_reused_after_gc_listed_it_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FilesystemStorage(tmp_path / "storage")
    unused = await old_blob(storage, b"a layer no build wants")
    reused = await old_blob(storage, b"a layer a running build finds in the layer cache")
    listing = storage.list_blobs

    async def listed_before_the_build_reused_one() -> AsyncIterator[BlobStat]:
        blobs = [blob async for blob in listing()]  # gc's listing (on S3: its touched/ markers first)
        await storage.touch_blob(reused)  # a build reuses it: its record, written next, will name it
        for blob in blobs:
            yield blob

    monkeypatch.setattr(storage, "list_blobs", listed_before_the_build_reused_one)
    report = await maintenance.collect_garbage(storage, older_than=3 * 3600)

    assert await storage.stat_blob(unused) is None
    assert await storage.stat_blob(reused) is not None, "gc deleted a blob a build had just reused"
    assert (report.blobs_removed, report.bytes_freed) == (1, len(b"a layer no build wants"))


async def test_an_image_pulled_just_before_gc_takes_its_lock_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FilesystemStorage(tmp_path / "storage")
    layer, config, manifest = [await old_blob(storage, f"{part} of the image".encode()) for part in
                               ("layer", "config", "manifest")]
    record = ImageRecord(
        key="k" * 64, name="hello", source="test", revision="r", packages=("hello",), architecture="amd64",
        config=config, manifests={ManifestFormat.DOCKER: ManifestRef(manifest, 20)},
        layers=(LayerDescriptor(layer, layer, 17, "hello"),), built_at=time.time() - FOUR_HOURS,
    )  # fmt: skip
    await storage.put_meta(f"{IMAGE_PREFIX}{record.key}", record.to_json())
    usage = f"{USAGE_PREFIX}{record.key}"
    await storage.put_meta(usage, json.dumps({"last_used": time.time() - FOUR_HOURS}).encode())
    exclusive = storage.exclusive

    @contextlib.asynccontextmanager
    async def pulled_first(key: str) -> AsyncIterator[None]:
        # gc read the image's use and found it old; a registry serves it now and says so.
        await storage.put_meta(usage, json.dumps({"last_used": time.time()}).encode())
        async with exclusive(key):
            yield

    monkeypatch.setattr(storage, "exclusive", pulled_first)
    report = await maintenance.collect_garbage(storage, older_than=3 * 3600)

    assert await storage.get_meta(f"{IMAGE_PREFIX}{record.key}") is not None, "an image in use was collected"
    assert (report.images_removed, report.images_kept, report.blobs_removed) == (0, 1, 0)
    assert all([await storage.stat_blob(digest) is not None for digest in (layer, config, manifest)])


def _free_pid() -> int:
    """A pid no process of this pid namespace has."""
    return next(pid for pid in range(50, 1 << 22) if not Path(f"/proc/{pid}").exists())


def test_a_staging_directory_of_a_live_process_in_another_pid_namespace_is_kept(tmp_path: Path) -> None:
    """Containers sharing STORAGE_PATH and a host name (host networking) but not pids:
    a starting process (`nixery gc` in a CronJob, a replica) must not take another's
    staging directory, whose pid means nothing in its own namespace."""
    root = tmp_path / "tmp"
    pid = _free_pid()
    ready = tmp_path / "ready"
    # In a new pid namespace: use up pids 2 .. pid-1, so that the registry stand-in gets `pid`.
    script = (
        f"i=2; while [ $i -lt {pid} ]; do /bin/true; i=$((i+1)); done; "
        f"{sys.executable} -c 'import sys, time, pathlib; from nixery.storage.base import make_staging_dir; "
        f"staging = make_staging_dir(pathlib.Path(sys.argv[1])); "
        f"(staging / \"layer-being-written\").touch(); pathlib.Path(sys.argv[2]).write_text(str(staging)); "
        f"time.sleep(60)' {root} {ready}"
    )
    other = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sh", "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert other.poll() is None and time.monotonic() < deadline, "the other namespace's process did not start"
            time.sleep(0.05)
        theirs = Path(ready.read_text())
        assert theirs.name.endswith(f"-{pid}") and not Path(f"/proc/{pid}").exists()

        ours = make_staging_dir(root)

        assert ours != theirs
        assert (theirs / "layer-being-written").exists(), "a live process's staging files were removed"
    finally:
        other.kill()
        other.wait()


async def test_a_pointer_written_while_gc_removes_its_directory_s_last_one_is_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc removes a directory with its last document (`manifests/<hex>/`): a build writing a
    document into it at that moment (another image naming the same manifest) makes it again,
    and a listing under way skips it, rather than failing either with 'No such file'."""
    storage = FilesystemStorage(tmp_path / "storage")
    directory = tmp_path / "storage" / "meta" / "manifests" / ("0" * 64)
    await storage.put_meta(f"manifests/{'0' * 64}/{'a' * 64}", b"{}")
    real_replace, real_link = os.replace, os.link

    def gc_deletes_first(place):  # gc removes the last document just after the writer made the directory
        def placed(source, target, *args, **kwargs):
            if Path(target).parent == directory and not gc_deletes_first.done:
                gc_deletes_first.done = True
                asyncio.run(storage.delete_meta(f"manifests/{'0' * 64}/{'a' * 64}"))
                assert not directory.exists()
            return place(source, target, *args, **kwargs)
        return placed

    for name, real in [("replace", real_replace), ("link", real_link)]:
        gc_deletes_first.done = False
        monkeypatch.setattr(os, name, gc_deletes_first(real))
        key = f"manifests/{'0' * 64}/{name * 8}"
        if name == "replace":
            await storage.put_meta(key, b"{}")
        else:
            assert await storage.create_meta(key, b"{}")
        assert gc_deletes_first.done
        assert await storage.get_meta(key) == b"{}"
        monkeypatch.setattr(os, name, real)
        await storage.delete_meta(key)
        await storage.put_meta(f"manifests/{'0' * 64}/{'a' * 64}", b"{}")

    listing = os.scandir

    def removed_while_listed(path):  # gc empties and removes a directory the listing found
        if Path(path) == directory:
            asyncio.run(storage.delete_meta(f"manifests/{'0' * 64}/{'a' * 64}"))
        return listing(path)

    await storage.put_meta(f"manifests/{'1' * 64}/{'b' * 64}", b"{}")
    monkeypatch.setattr(os, "scandir", removed_while_listed)
    assert await storage.list_meta("manifests") == [f"manifests/{'1' * 64}/{'b' * 64}"]
    monkeypatch.setattr(os, "scandir", listing)
    await storage.delete_meta(f"manifests/{'1' * 64}/{'b' * 64}")
    assert list((tmp_path / "storage" / "meta" / "manifests").iterdir()) == []


async def test_a_pull_record_that_failed_to_be_written_is_written_by_a_later_pull(tmp_path: Path) -> None:
    """gc keeps what was pulled in its last hours by the records pulls write, one per hour and
    digest. A write that failed (a store refusing writes while it served reads) was not tried
    again for an hour, so two hours of such failures let gc take an image in use. A later pull
    now writes it after a minute (here, a tenth of a second)."""
    from nixery.pulls import PullLog, pull_key
    from nixery.storage.base import BackendUnavailable

    class RefusesOnce(FilesystemStorage):
        refused = False

        async def put_meta(self, key: str, data: bytes) -> None:
            if not self.refused:
                self.refused = True
                raise BackendUnavailable("filesystem", "refusing writes for a while")
            await super().put_meta(key, data)

    storage = RefusesOnce(tmp_path / "storage")
    pulls = PullLog(storage, interval=3600.0, retry=0.1)
    digest = Digest.of(b"a manifest pulled by its digest")
    pulls.note(digest)
    await asyncio.sleep(0.05)  # the write failed
    assert storage.refused and await storage.get_meta(pull_key(digest)) is None
    pulls.note(digest)  # within the retry: no write yet
    await asyncio.sleep(0.15)
    pulls.note(digest)
    await pulls.close()
    assert json.loads(await storage.get_meta(pull_key(digest)) or b"{}").get("last_used")


async def test_a_layer_gc_deletes_as_a_build_finds_it_is_made_again(tmp_path: Path) -> None:
    """A build finds a layer in the layer cache (its record, its blob) while `nixery gc`, another
    process, deletes the blob (its image was collected): the build must not use the layer as
    stored, or the image it publishes names a blob that is gone (pulls: 404 BLOB_UNKNOWN)."""
    build, gc = FilesystemStorage(tmp_path / "storage"), FilesystemStorage(tmp_path / "storage")
    blob = os.urandom(4096)
    digest = await old_blob(build, blob)
    key = layer_key(["/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-libfoo-1.0"], Compression.GZIP)
    descriptor = LayerDescriptor(digest, digest, len(blob), "libfoo")
    await build.put_meta(f"{LAYER_PREFIX}{key}", canonical_json(descriptor.to_json()))
    gc_deleted: list[bool] = []
    touch = build.touch_blob

    async def gc_deletes_it_first(digest: Digest) -> int | None:
        gc_deleted.append(await gc.delete_unused_blob(digest, time.time() - 3600))
        return await touch(digest)

    # The build's first step on the blob: before it, gc deletes (the old code's check came first).
    stat = build.stat_blob

    async def gc_deletes_after_a_check(digest: Digest) -> int | None:
        size = await stat(digest)
        if not gc_deleted:
            gc_deleted.append(await gc.delete_unused_blob(digest, time.time() - 3600))
        return size

    build.stat_blob = gc_deletes_after_a_check  # type: ignore[method-assign]
    build.touch_blob = gc_deletes_it_first  # type: ignore[method-assign]
    layers = LayerStore(build, compression=Compression.GZIP, workers=1)
    try:
        known = await layers._known_layer(key)
    finally:
        await layers.close()
    assert gc_deleted[0] is True
    assert known is None, "the layer is used as stored (no write pending), but gc deleted its blob"


async def test_a_blob_gc_deletes_as_put_blob_finds_it_is_stored_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filesystem's put_blob finds the blob stored and marks it in use (its mtime) in one
    thread; gc deleting it between the two must not leave it gone."""
    storage = FilesystemStorage(tmp_path / "storage")
    data = os.urandom(3000)
    digest = await old_blob(storage, data)
    target = storage.blob_path(digest)
    utime = os.utime

    def gc_deletes_it_first(path: object, *args: object, **kwargs: object) -> None:
        if path == target and target.exists():
            target.unlink()  # gc, in another process, at this moment
        utime(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "utime", gc_deletes_it_first)
    staged = storage.staging_dir() / "staged"
    staged.write_bytes(data)
    await storage.put_blob(digest, staged)
    monkeypatch.undo()
    assert await storage.read_blob(digest) == data, "put_blob returned, but the blob is gone"
