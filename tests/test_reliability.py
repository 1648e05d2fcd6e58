"""Concurrency, crashes, corruption, garbage collection and shutdown, with real processes."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pytest

from nixery import collected, images, maintenance
from nixery.images import ImageRecord
from nixery.registry.digest import Digest
from nixery.storage import filesystem
from nixery.storage.base import BlobNotFound, CorruptBlob, StorageFull, stage_bytes
from nixery.storage.filesystem import FilesystemStorage
from tests.daemons import process_tree
from tests.registry import BASELINE_EVALUATIONS, RegistryProcess, have, nix_calls_of, run

if TYPE_CHECKING:
    from nixery.builder import ImageBuilder


def evaluations(calls: Path) -> int:
    """Image builds started: each evaluates its names once (realising is skipped when all is built),
    and a process's first build the baseline's (BASELINE_EVALUATIONS)."""
    return len(nix_calls_of(calls, "nix-instantiate --eval"))


def check_storage(storage: Path) -> str:
    result = run([sys.executable, "-m", "nixery", "check"], env_extra={"STORAGE_PATH": str(storage)}, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_fifty_concurrent_pulls_share_one_build(start_registry, nix_calls) -> None:
    path, calls = nix_calls
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", PATH=path)
    before = evaluations(calls)
    with ThreadPoolExecutor(50) as pool:
        digests = list(pool.map(lambda _: registry.manifest("shell/greet/figlet/scale-77")[0], range(50)))
    assert len(set(digests)) == 1
    assert evaluations(calls) - before == 1 + BASELINE_EVALUATIONS


def test_two_processes_on_one_storage_build_once(start_registry, nix_calls, tmp_path: Path) -> None:
    path, calls = nix_calls
    storage = tmp_path / "shared-storage"
    first = start_registry(storage, NIXERY_BUNDLED_SET="busybox", PATH=path)
    second = start_registry(storage, NIXERY_BUNDLED_SET="busybox", PATH=path)
    before = evaluations(calls)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(r.manifest, "cowsay/scale-123/scale-200") for r in (first, second) * 4]
        digests = {f.result()[0] for f in futures}
    assert len(digests) == 1
    assert evaluations(calls) - before == 1 + BASELINE_EVALUATIONS


def test_kill_9_during_builds_leaves_storage_consistent(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    rng = random.Random(7)
    images = [f"scale-{n}/scale-{n + 100}/bigdata" for n in range(150, 170)]
    def pull_until_killed(registry: RegistryProcess, image: str) -> None:
        try:
            registry.request(f"/v2/{image}/manifests/latest", timeout=60)
        except OSError:
            pass  # the server was killed mid-request, as intended

    # One finished image first: on a loaded machine every kill may land before a blob is written,
    # and the check must then still find the earlier image whole (an empty storage is refused by check).
    registry = RegistryProcess(storage=storage, env={"NIXERY_BUNDLED_SET": "busybox"}).start()
    try:
        registry.manifest("shell/hello")
    finally:
        registry.stop()
    for image in images:
        registry = RegistryProcess(storage=storage, env={"NIXERY_BUNDLED_SET": "busybox"}).start()
        worker = threading.Thread(target=pull_until_killed, args=(registry, image))
        worker.start()
        time.sleep(rng.uniform(0.0, 0.6))
        registry.process.send_signal(signal.SIGKILL)
        registry.process.wait()
        worker.join()
    finished = len(list((storage / "meta" / "images").glob("*"))) - 1
    assert finished < len(images), "no kill landed during a build"
    assert "ok" in check_storage(storage)
    # The next start removes the dead processes' staging files, and every image still builds.
    registry = RegistryProcess(storage=storage, env={"NIXERY_BUNDLED_SET": "busybox"}).start()
    try:
        staging = [p.name for p in (storage / "tmp").iterdir()]
        assert staging == [p for p in staging if p.endswith(f"-{registry.process.pid}")]
        for image in images[:5]:
            registry.manifest(image)
    finally:
        registry.stop()
    assert "ok" in check_storage(storage)


def test_a_restarted_process_of_the_same_name_removes_what_its_predecessor_staged(tmp_path: Path) -> None:
    """A container restarted after a crash has its predecessor's host name and pid (pid 1, say),
    so its staging directory has the same name: the files the crashed one left there are removed
    at start, as a gone process's are. A process of that name that still runs (a shared storage
    seen from another pid namespace: here, one holding the directory's lock) keeps its files, and
    so does a second storage this process opens."""
    root = tmp_path / "storage"
    own = root / "tmp" / f"{socket.gethostname()}-{os.getpid()}"
    own.mkdir(parents=True)
    (own / "layer-left-by-a-crash").write_bytes(b"half a layer")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY);"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(own)],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        FilesystemStorage(root)
        assert (own / "layer-left-by-a-crash").exists(), "a live holder's files were removed"
    finally:
        holder.kill()
        holder.wait()

    storage = FilesystemStorage(root)
    assert list(own.iterdir()) == []
    staged = stage_bytes(storage.staging_dir(), b"staged by this process")
    FilesystemStorage(root)
    assert staged.exists()


_HOLD_LOCK = """
import asyncio, sys
from pathlib import Path
from typing import BinaryIO
from nixery.storage.filesystem import FilesystemStorage

async def hold() -> None:
    async with FilesystemStorage(Path(sys.argv[1])).exclusive(sys.argv[2]):
        print("held", flush=True)
        await asyncio.sleep(60)

asyncio.run(hold())
"""


def test_lock_files_of_processes_killed_mid_build_do_not_pile_up(tmp_path: Path) -> None:
    """A registry killed while it built an image (kill -9, OOM) left that image's lock file in
    locks/ for ever unless the image was built again: one empty file per crash. Opening the
    storage now removes the lock files that no live process holds, and keeps a held one."""
    root = tmp_path / "storage"

    def holder(key: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(root), key], stdout=subprocess.PIPE)
        assert process.stdout is not None and process.stdout.readline() == b"held\n"
        return process

    killed = [holder(f"builds/{n:064x}") for n in range(3)]
    live = holder("builds/still-building")
    try:
        for process in killed:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert len(list((root / "locks").iterdir())) == 4
        FilesystemStorage(root)
        assert [p.name for p in (root / "locks").iterdir()] == ["builds_still-building.lock"]
    finally:
        live.kill()
        live.wait()


def test_opening_the_storage_leaves_another_process_s_access_probe_alone(tmp_path: Path) -> None:
    """Two workers (NIXERY_WORKERS=2) starting at once: one checks that it may write in locks/
    with a probe file while the other, opening the storage, removed every file in locks/ that no
    process held as a lock, the probe too; the first then failed to start with "storage: cannot
    write in .../locks: No such file or directory". Only lock files are removed now."""
    root = tmp_path / "storage"
    FilesystemStorage(root)
    probe = stage_bytes(root / "locks", b"nixery", prefix=".probe-")
    FilesystemStorage(root)
    assert probe.exists(), "opening the storage removed another process's probe file"


def damage_largest_layer(registry: RegistryProcess, manifest: dict) -> tuple[dict, bytes]:
    """Flip a byte in the middle of the image's largest layer on disk; its descriptor and new bytes."""
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    blob_file = registry.storage / "blobs" / "sha256" / layer["digest"][7:9] / layer["digest"][7:]
    data = bytearray(blob_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob_file.write_bytes(data)
    return layer, bytes(data)


def test_corrupt_blob_is_not_served_and_the_image_is_rebuilt(registry: RegistryProcess) -> None:
    digest, manifest = registry.manifest("fortune/bigdata")
    layer, _ = damage_largest_layer(registry, manifest)

    status, _, body = registry.request(f"/v2/fortune/bigdata/blobs/{layer['digest']}")
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"

    again, _ = registry.manifest("fortune/bigdata")
    assert again == digest, "the rebuilt image is byte-for-byte the same"
    status, _, body = registry.request(f"/v2/fortune/bigdata/blobs/{layer['digest']}")
    assert status == 200 and Digest.of(body) == Digest.parse(layer["digest"])


def test_a_blob_the_registry_sets_aside_as_damaged_is_logged(registry: RegistryProcess) -> None:
    """A layer whose bytes no longer hash to its digest (a disk's fault) was moved to quarantine/
    without a word: the log said only `build.record_incomplete` for each image that used it, as
    for a registry killed mid-build, and nothing told an operator that the disk damaged a blob
    (quarantine/ keeps it "for an operator to look at"). Now the registry logs which blob it set
    aside and where it went."""
    _, manifest = registry.manifest("fortune/bigdata")
    layer, data = damage_largest_layer(registry, manifest)

    status, _, _ = registry.request(f"/v2/fortune/bigdata/blobs/{layer['digest']}")
    assert status == 404
    [set_aside] = [e for e in registry.log_events("storage.damaged_blob_set_aside") if e["digest"] == layer["digest"]]
    assert set_aside["level"] == "warning"
    moved_to = Path(set_aside["moved_to"])
    assert moved_to.parent == registry.storage / "quarantine" and moved_to.read_bytes() == data


@pytest.mark.clients
@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
@pytest.mark.parametrize("restarted", [False, True], ids=["while-serving", "after-a-restart"])
def test_the_first_pull_after_a_layer_is_damaged_succeeds(
    registry: RegistryProcess, tmp_path: Path, restarted: bool
) -> None:
    """A layer damaged on disk behind an intact image record: the first pull got its manifest,
    then a 404 for the layer (which set it aside), and failed; only the next pull rebuilt the
    image. Now the registry checks an image's blobs before it hands out its manifest (a stat;
    a hash once per process, or when the file changed; again every RECHECK_INTERVAL for an
    image held in memory) and rebuilds first, so that first pull succeeds."""

    def pull(layout: str) -> None:
        run(["flock", "/tmp/clients.lock", "skopeo", "copy", "--src-tls-verify=false",
             f"docker://{registry.host}/fortune/bigdata", f"oci:{tmp_path / layout}:img"])

    digest, manifest = registry.manifest("fortune/bigdata")
    pull("before")  # every blob served (so hashed and found intact) by this process
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    blob_file = registry.storage / "blobs" / "sha256" / layer["digest"][7:9] / layer["digest"][7:]
    if restarted:
        registry.stop()
    data = bytearray(blob_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: only a hash tells
    blob_file.write_bytes(data)
    if restarted:
        registry.start()
    else:
        time.sleep(images.RECHECK_INTERVAL)  # an image held in memory is checked again this often

    pull("after")  # skopeo checks every blob's digest
    again, _ = registry.manifest("fortune/bigdata")
    assert again == digest, "the rebuilt image is byte-for-byte the same"
    assert Digest.of(blob_file.read_bytes()) == Digest.parse(layer["digest"])
    assert len(list((registry.storage / "quarantine").iterdir())) == 1, "the damaged layer was not set aside"
    assert registry.log_events("build.record_incomplete")


@pytest.mark.clients
@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_nixery_check_sets_aside_a_layer_rotted_in_place_and_the_next_pull_rebuilds(
    registry: RegistryProcess, tmp_path: Path
) -> None:
    """Bit rot: a layer's bytes changed in place, its size and modification time as they were. A
    running registry hashed the layer once and trusts it while the file looks the same, so it
    kept serving the damaged bytes and every pull failed on the digest. `nixery check` found the
    damage but only reported it (and unlinked nginx's copy): pulls kept failing until a restart.
    Now check sets the blob aside (quarantine/) as the registry itself does, tells the running
    registries, and the next pull rebuilds the image."""

    def pull(layout: str) -> subprocess.CompletedProcess[str]:
        return run(["flock", "/tmp/clients.lock", "skopeo", "copy", "--src-tls-verify=false",
                    f"docker://{registry.host}/fortune/bigdata", f"oci:{tmp_path / layout}:img"], check=False)

    digest, manifest = registry.manifest("fortune/bigdata")
    assert pull("before").returncode == 0  # every blob served, so hashed and trusted by this process
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    blob_file = registry.storage / "blobs" / "sha256" / layer["digest"][7:9] / layer["digest"][7:]
    looks = blob_file.stat()
    with open(blob_file, "r+b") as blob:  # in place: the same inode and size
        blob.seek(layer["size"] // 2)
        byte = blob.read(1)
        blob.seek(layer["size"] // 2)
        blob.write(bytes([byte[0] ^ 0xFF]))
    os.utime(blob_file, ns=(looks.st_atime_ns, looks.st_mtime_ns))
    time.sleep(images.RECHECK_INTERVAL)
    damaged = pull("damaged")
    assert damaged.returncode != 0 and "digest" in damaged.stderr.lower(), damaged.stderr

    result = run([sys.executable, "-m", "nixery", "check"], env_extra={"STORAGE_PATH": str(registry.storage)},
                 check=False)
    assert result.returncode == 1, result.stdout + result.stderr  # damage found: an operator's timer alerts
    assert f"blob {layer['digest']} does not match its digest" in result.stdout, result.stdout
    assert "set aside 1 damaged blob" in result.stdout, result.stdout
    assert not blob_file.exists()
    assert len(list((registry.storage / "quarantine").iterdir())) == 1

    time.sleep(images.RECHECK_INTERVAL)
    again = pull("after")  # skopeo checks every blob's digest
    assert again.returncode == 0, again.stderr
    assert registry.manifest("fortune/bigdata")[0] == digest, "the rebuilt image is byte-for-byte the same"
    assert Digest.of(blob_file.read_bytes()) == Digest.parse(layer["digest"])
    assert "ok" in check_storage(registry.storage)


@pytest.mark.clients
@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
@pytest.mark.parametrize("harm", ["damaged-while-serving", "set-aside-by-check", "removed-after-a-restart"])
def test_a_pull_by_digest_rebuilds_an_image_that_lost_a_layer(
    registry: RegistryProcess, tmp_path: Path, harm: str
) -> None:
    """Pinned deployments (Kubernetes, `NAME@sha256:...`) pull by digest. When a layer of the
    image was set aside as damaged (by the registry's own hash check, or by `nixery check`) or
    was gone, a pull by tag rebuilt the image, but a pull by digest got 404 MANIFEST_UNKNOWN
    until someone pulled the image by tag. Now it rebuilds the image (the same digests: builds
    are deterministic) and the pull succeeds."""

    def pull(layout: str) -> subprocess.CompletedProcess[str]:
        return run(["flock", "/tmp/clients.lock", "skopeo", "copy", "--src-tls-verify=false",
                    f"docker://{registry.host}/fortune/bigdata@{digest}", f"oci:{tmp_path / layout}:img"],
                   check=False)

    digest, manifest = registry.manifest("fortune/bigdata")
    assert pull("before").returncode == 0  # every blob served, so hashed and trusted by this process
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    blob_file = registry.storage / "blobs" / "sha256" / layer["digest"][7:9] / layer["digest"][7:]
    if harm == "removed-after-a-restart":
        registry.stop()
        blob_file.unlink()
        registry.start()
    else:
        data = bytearray(blob_file.read_bytes())
        data[len(data) // 2] ^= 0xFF  # the same size: only a hash tells
        blob_file.write_bytes(data)
        if harm == "set-aside-by-check":
            result = run([sys.executable, "-m", "nixery", "check"],
                         env_extra={"STORAGE_PATH": str(registry.storage)}, check=False)
            assert "set aside 1 damaged blob" in result.stdout, result.stdout + result.stderr
            assert not blob_file.exists()
        time.sleep(images.RECHECK_INTERVAL)  # an image held in memory is checked again this often

    after = pull("after")  # skopeo checks every blob's digest
    assert after.returncode == 0, after.stderr
    assert Digest.of(blob_file.read_bytes()) == Digest.parse(layer["digest"])
    assert registry.log_events("build.rebuilding_for_digest")
    if harm != "removed-after-a-restart":
        assert len(list((registry.storage / "quarantine").iterdir())) == 1, "the damaged layer was not set aside"
    assert registry.manifest("fortune/bigdata")[0] == digest, "the rebuilt image is byte-for-byte the same"
    assert "ok" in check_storage(registry.storage)


def test_a_pull_by_digest_of_an_image_removed_by_gc_is_404(registry: RegistryProcess) -> None:
    """An image whose record is gone too (`nixery gc` removed it) is not built again by digest:
    404 MANIFEST_UNKNOWN, as before."""
    digest, manifest = registry.manifest("shell")
    registry.stop()
    for record in (registry.storage / "meta" / "images").iterdir():
        record.unlink()
    layer = manifest["layers"][0]["digest"]
    (registry.storage / "blobs" / "sha256" / layer[7:9] / layer[7:]).unlink()
    registry.start()
    status, _, body = registry.request(f"/v2/shell/manifests/{digest}")
    assert status == 404 and b"MANIFEST_UNKNOWN" in body, body
    assert not registry.log_events("build.rebuilding_for_digest")


def test_a_manifest_cut_short_on_disk_is_built_again_not_refused_for_ever(registry: RegistryProcess) -> None:
    """A manifest blob cut short (what a crash on a file system that loses unsynced writes can
    leave, or a disk's fault) is taken out of service and the image built again on the next pull.
    Before, every pull of the tag answered 404 "is not a manifest", for as long as the file stayed."""
    digest, _ = registry.manifest("shell/fortune")
    registry.stop()
    manifest_file = registry.storage / "blobs" / "sha256" / digest[7:9] / digest[7:]
    manifest_file.write_bytes(manifest_file.read_bytes()[:50])

    registry.start()
    again, _ = registry.manifest("shell/fortune")
    assert again == digest, "the rebuilt image is byte-for-byte the same"
    status, _, body = registry.request(f"/v2/shell/fortune/manifests/{digest}")
    assert status == 200 and Digest.of(body) == Digest.parse(digest)
    assert list((registry.storage / "quarantine").iterdir()), "the damaged manifest was not set aside"


def test_a_rebuild_replaces_a_layer_cut_short_on_disk(registry: RegistryProcess) -> None:
    """A crash on a file system that loses unsynced writes can leave both an image's record and
    one of its layers cut short. The next pull rebuilds the image, and the layer with it; the
    layer's blob was kept as it was (a blob under a digest "is not written again"), so the
    rebuilt manifest named a blob that then failed to download (404); so did a config. Now a
    stored blob of another size than the one being put, which does not hash to its digest, is
    replaced."""
    digest, manifest = registry.manifest("shell/fortune")
    registry.stop()
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    blob_file = registry.storage / "blobs" / "sha256" / layer["digest"][7:9] / layer["digest"][7:]
    blob_file.write_bytes(blob_file.read_bytes()[: layer["size"] // 2])
    config = manifest["config"]["digest"]
    (registry.storage / "blobs" / "sha256" / config[7:9] / config[7:]).write_bytes(b"")
    [record] = (registry.storage / "meta" / "images").iterdir()
    record.write_bytes(b"")

    registry.start()
    again, _ = registry.manifest("shell/fortune")
    assert again == digest
    for blob in (layer["digest"], config):
        status, _, body = registry.request(f"/v2/shell/fortune/blobs/{blob}")
        assert status == 200, (blob, status, body[:300])
        assert Digest.of(body) == Digest.parse(blob)


def test_a_damaged_record_is_reported_and_its_image_built_again(registry: RegistryProcess) -> None:
    """Image and layer records cut short (a disk's fault, a hand's edit): `nixery check` names
    the image record instead of failing with a traceback, and a registry builds the image again
    over both instead of answering 500 on every pull."""
    digest, _ = registry.manifest("shell/fortune")
    registry.stop()
    meta = registry.storage / "meta"
    [record] = (meta / "images").iterdir()
    for damaged in [record, *(meta / "layers").iterdir()]:
        damaged.write_bytes(damaged.read_bytes()[:40])

    result = run([sys.executable, "-m", "nixery", "check"], env_extra={"STORAGE_PATH": str(registry.storage)},
                 check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"problem: images/{record.name} cannot be read" in result.stdout, result.stdout + result.stderr

    registry.start()
    again, _ = registry.manifest("shell/fortune")
    assert again == digest
    assert {event["key"] for event in registry.log_events("build.record_unreadable")} == {record.name[:12]}
    assert "ok" in check_storage(registry.storage)


async def test_garbage_collection_removes_a_damaged_record(tmp_path: Path) -> None:
    """A record that cannot be read vouches for no blob: gc removes it (and its blobs), where it
    failed on it before and collected nothing; a damaged usage note keeps its image."""
    storage = FilesystemStorage(tmp_path / "storage")
    old_blob = await storage.put_blob_bytes(b"a config of long ago")
    await storage.put_meta("images/damaged", b'{"key": "damaged", "name": "shell/hel')
    await storage.put_meta("usage/kept", b"{")
    kept = ImageRecord(
        key="kept", name="shell", source="test", revision="r1", packages=("shell",), architecture="amd64",
        config=await storage.put_blob_bytes(b"a config"), manifests={}, layers=(), built_at=0.0,
    )
    await storage.put_meta("images/kept", kept.to_json())
    old = time.time() - 2 * maintenance.BLOB_GRACE
    os.utime(storage.blob_path(old_blob), (old, old))

    report = await maintenance.collect_garbage(storage, older_than=maintenance.MIN_AGE)
    assert (report.unreadable_removed, report.images_removed, report.images_kept) == (1, 0, 1)
    assert await storage.list_meta("images") == ["images/kept"]
    assert await storage.stat_blob(old_blob) is None
    assert await storage.stat_blob(kept.config) is not None


async def test_a_blob_damaged_at_its_size_is_not_servable_and_is_hashed_once(tmp_path: Path) -> None:
    """`blob_servable` (asked before a manifest is handed out) hashes a blob once per process, as
    its first serve would (and shares that hash with it), and again only when its file changes."""
    storage = FilesystemStorage(tmp_path / "storage")
    reported: list[Digest] = []
    storage.on_corrupt_blob(reported.append)
    digest = await storage.put_blob_bytes(b"a layer of eleven bytes and more")
    hashes: list[Path] = []
    real_hash = filesystem._hashes_to

    def counted(path: Path, wanted: Digest) -> bool:
        hashes.append(path)
        return real_hash(path, wanted)

    filesystem._hashes_to = counted
    try:
        assert await storage.blob_servable(digest, 32)
        assert await storage.blob_servable(digest, 32)
        await storage.blob_source(digest, allow_redirect=False)
        assert len(hashes) == 1, "hashed again though its file did not change"
        storage.blob_path(digest).write_bytes(b"a layer of eleven bytes and MORE")
        assert not await storage.blob_servable(digest, 32)
    finally:
        filesystem._hashes_to = real_hash
        await storage.close()
    assert len(hashes) == 2 and reported == [digest]
    assert not storage.blob_path(digest).exists() and len(list((tmp_path / "storage" / "quarantine").iterdir())) == 1


async def test_check_sets_aside_what_does_not_match_and_only_that(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nixery check` sets a damaged blob aside (and tells running registries), keeps intact ones,
    and leaves a blob that another file replaced after its hash (a rebuild that stored it anew)."""
    storage = FilesystemStorage(tmp_path / "storage", verified_links=True)
    intact = await storage.put_blob_bytes(b"an intact layer")
    damaged = await storage.put_blob_bytes(b"a layer that rots")
    await storage.blob_source(damaged, allow_redirect=False)  # linked for nginx
    storage.blob_path(damaged).write_bytes(b"a layer that ROTS")

    report = await maintenance.check(storage)
    assert report.set_aside == 1 and report.problems == [f"blob {damaged} does not match its digest: set aside"]
    assert storage.blob_path(intact).exists() and not storage.blob_path(damaged).exists()
    assert not storage.verified_link(damaged).exists()
    assert len(list((tmp_path / "storage" / "quarantine").iterdir())) == 1
    assert await storage.get_meta(collected.MARKER) is not None, "running registries are not told"

    replaced = await storage.put_blob_bytes(b"a layer stored anew meanwhile")
    storage.blob_path(replaced).write_bytes(b"a layer stored anew MEANWHILE")
    real_hash = filesystem._hashes_to_file

    def hash_then_replaced(handle: BinaryIO, digest: Digest) -> bool:
        intact_bytes = real_hash(handle, digest)
        stage = storage.blob_path(replaced).with_name("rebuilt")
        stage.write_bytes(b"a layer stored anew meanwhile")
        os.replace(stage, storage.blob_path(replaced))
        return intact_bytes

    monkeypatch.setattr(filesystem, "_hashes_to_file", hash_then_replaced)
    assert not await storage.set_aside_damaged_blob(replaced)
    assert Digest.of(storage.blob_path(replaced).read_bytes()) == replaced
    await storage.close()


async def test_check_on_a_full_disk_still_sets_aside_and_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk stops only the note to running registries (a rename needs no space): check
    reports that, not a storage error that would hide what it found and did."""
    storage = FilesystemStorage(tmp_path / "storage")
    damaged = await storage.put_blob_bytes(b"a layer that rots")
    storage.blob_path(damaged).write_bytes(b"a layer that ROTS")

    async def full(key: str, data: bytes) -> None:
        raise StorageFull("the filesystem storage", "No space left on device")

    monkeypatch.setattr(storage, "put_meta", full)
    report = await maintenance.check(storage)
    assert report.set_aside == 1 and not storage.blob_path(damaged).exists()
    assert "could not leave the note that tells running registries" in report.problems[-1]
    await storage.close()


async def test_gc_empties_the_quarantine_of_blobs_set_aside_longer_than_a_week(tmp_path: Path) -> None:
    """Blobs found damaged are moved to quarantine/, and nothing ever removed them: a disk that
    kept damaging blobs filled up. Now `nixery gc` removes those set aside more than 7 days ago
    (--quarantine-older-than) and says how many; those of the last days stay for an operator."""
    root = tmp_path / "storage"
    storage = FilesystemStorage(root)
    kept = await storage.put_blob_bytes(b"a config a record names")
    await storage.put_meta("images/kept", ImageRecord(
        key="kept", name="shell", source="test", revision="r1", packages=("shell",), architecture="amd64",
        config=kept, manifests={}, layers=(), built_at=time.time(),
    ).to_json())
    damaged = await storage.put_blob_bytes(b"a layer the disk damages today")
    storage.blob_path(damaged).write_bytes(b"a layer the disk damaged today")
    with pytest.raises(CorruptBlob):  # set aside as a registry would, when it was first served
        await storage.blob_source(damaged, allow_redirect=False)
    await storage.close()
    [recent] = list((root / "quarantine").iterdir())
    # As the registry names them, set aside 8 days ago: its modification time is older still (a
    # rename keeps the blob's own).
    eight_days_ago = time.time() - 8 * 86400
    old = root / "quarantine" / f"{'ab' * 32}-{int(eight_days_ago * 1e9)}"
    old.write_bytes(b"a layer damaged last week")
    os.utime(old, (eight_days_ago - 86400, eight_days_ago - 86400))

    def gc(*args: str) -> str:
        result = run([sys.executable, "-m", "nixery", "gc", *args], env_extra={"STORAGE_PATH": str(root)})
        return result.stdout

    assert "would remove 1 damaged blob quarantined more than 7 days ago" in gc("--dry-run")
    assert old.exists()
    assert "removed 1 damaged blob quarantined more than 7 days ago" in gc()
    assert not old.exists() and recent.exists()
    assert "quarantined" not in gc(), "nothing more to remove"
    assert "removed 1 damaged blob quarantined more than 0 days ago" in gc("--quarantine-older-than", "0")
    assert not recent.exists()
    assert storage.blob_path(kept).exists()


async def test_garbage_collection_removes_the_notes_of_images_a_crash_left_without_record(tmp_path: Path) -> None:
    """A registry killed between writing an image's referrers pointers and its record, or a gc
    killed between removing a record and its usage note and pointers, left those documents for
    ever: no later gc removed them. Now gc removes the usage notes and pointers of images that
    have no record (under the image's build lock: a build writing them holds it), and keeps
    those of stored images."""
    storage = FilesystemStorage(tmp_path / "storage")
    kept = ImageRecord(
        key="kept", name="shell", source="test", revision="r1", packages=("shell",), architecture="amd64",
        config=await storage.put_blob_bytes(b"a config"), manifests={}, layers=(), built_at=time.time(),
    )
    await storage.put_meta("images/kept", kept.to_json())
    subject = "ab" * 32
    for key in ("kept", "crashed"):
        await storage.put_meta(f"usage/{key}", json.dumps({"last_used": time.time()}).encode())
        await storage.put_meta(f"referrers/{subject}/{key}", b"{}")
        await storage.put_meta(f"manifests/{subject}/{key}", b"{}")  # how a pull by digest finds it

    dry = await maintenance.collect_garbage(storage, older_than=maintenance.MIN_AGE, dry_run=True)
    assert dry.orphan_notes_removed == 3
    assert len(await storage.list_meta("usage")) == 2, "a dry run removed something"
    report = await maintenance.collect_garbage(storage, older_than=maintenance.MIN_AGE)
    assert (report.orphan_notes_removed, report.images_kept) == (3, 1)
    assert await storage.list_meta("usage") == ["usage/kept"]
    assert await storage.list_meta("referrers") == [f"referrers/{subject}/kept"]
    assert await storage.list_meta("manifests") == [f"manifests/{subject}/kept"]


def test_garbage_collection_keeps_used_images(registry: RegistryProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    _, kept = registry.manifest("shell/hello")
    _, dropped = registry.manifest("bigdata")
    registry.stop()

    storage = FilesystemStorage(registry.storage)
    later = time.time() + 40 * 86400
    monkeypatch.setattr(maintenance.time, "time", lambda: later)

    async def collect() -> maintenance.GarbageReport:
        records, _ = await maintenance._records(storage)
        kept_key = next(k for k, r in records.items() if r.name == "shell/hello")
        usage_key = maintenance.USAGE_PREFIX + kept_key.removeprefix("images/")
        await storage.put_meta(usage_key, json.dumps({"last_used": later - 3600}).encode())
        return await maintenance.collect_garbage(storage, older_than=30 * 86400)

    report = asyncio.run(collect())
    assert report.images_removed == 1 and report.images_kept == 1
    big = max(dropped["layers"], key=lambda layer: layer["size"])
    assert report.bytes_freed >= big["size"]
    assert asyncio.run(storage.stat_blob(Digest.parse(big["digest"]))) is None
    for layer in kept["layers"]:
        assert asyncio.run(storage.stat_blob(Digest.parse(layer["digest"]))) is not None
    assert "ok" in check_storage(registry.storage)

    registry.start()
    again, _ = registry.manifest("bigdata")
    assert registry.request(f"/v2/bigdata/blobs/{big['digest']}", method="HEAD")[0] == 200


def test_sigterm_finishes_inflight_downloads(registry: RegistryProcess) -> None:
    _, manifest = registry.manifest("bigdata")
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
    connection.request("GET", f"/v2/bigdata/blobs/{layer['digest']}")
    response = connection.getresponse()
    first = response.read(4096)
    registry.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    rest = response.read()
    assert Digest.of(first + rest) == Digest.parse(layer["digest"])
    assert registry.process.wait(30) == 0
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", registry.port, timeout=2).request("GET", "/v2/")
    # The log says what the shutdown waited for, and that the download was drained.
    [stopping] = registry.log_events("registry.stopping")
    assert (stopping["signal"], stopping["in_flight"]) == ("SIGTERM", 1)
    [stopped] = registry.log_events("registry.stopped")
    assert (stopped["drained"], stopped["cut_off"]) == (1, 0)


def _descendant_commands(root: int) -> list[str]:
    """The command lines of the processes below `root`."""
    commands = []
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            if pid != root:
                commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return commands


async def test_closing_the_builder_stops_its_builds_and_their_nix_processes(tmp_path: Path) -> None:
    """Closing the builder (a stopped registry, Ctrl-C in `nixery build --local`) returned while
    its builds went on: Nix kept building with the storage and package source closed, and the
    builds were only cancelled by asyncio's shutdown, which could then wait for a process for
    ever. Now close() cancels them and returns once each has killed and reaped its Nix processes."""
    from nixery import config
    from nixery.app import open_builder, open_storage
    from nixery.progress import Stage
    from nixery.registry.names import parse_image_name
    from tests.registry import slow_package_set

    settings = config.load({"NIXERY_PKGS_PATH": str(slow_package_set(tmp_path / "pkgs", seconds=60)),
                            "STORAGE_PATH": str(tmp_path / "storage")})
    storage = open_storage(settings)
    builder = open_builder(settings, storage)
    try:
        build = await builder.start(parse_image_name("shell/slowpoke"), "latest")

        def nix_building() -> bool:
            return any("nix-store" in command for command in _descendant_commands(os.getpid()))

        for _ in range(600):  # until Nix builds slowpoke (60 s)
            if nix_building():
                break
            await asyncio.sleep(0.1)
        assert nix_building(), build.events
        await asyncio.wait_for(builder.close(), 30)
        left = [command for command in _descendant_commands(os.getpid())
                if "nix-store" in command or "/nix/store/" in command]  # Nix, or slowpoke's builder
        assert left == [], "Nix processes outlived the builder"
        assert build.stage == Stage.FAILED
    finally:
        await builder.close()
        await storage.close()


async def test_a_build_stopped_by_closing_the_builder_is_said_to_be_stopped(tmp_path: Path) -> None:
    """A build that closing the builder stopped (a registry shutting down) was logged as
    `build.failed` with `error=""` (a cancellation has no message), and its progress page and
    events said it failed with `CancelledError`. Now it is logged as `build.stopped`, and its last
    event says it was stopped, and why; the build metrics count it as `stopped`, not `failed`, so
    that every restart does not trip an alert on failed builds. (A stand-in for Nix, by design: what
    is tested is how the builder reports a stop, wherever the build was.)"""
    import structlog
    from prometheus_client import REGISTRY

    from nixery.builder import STOPPED_MESSAGE
    from nixery.progress import Stage
    from nixery.registry.names import parse_image_name


    def counted(result: str) -> float:
        return REGISTRY.get_sample_value("nixery_builds_total", {"result": result}) or 0.0

    failed, stopped = counted("failed"), counted("stopped")
    builder, evaluating = _builder_whose_evaluations_never_end(tmp_path)
    try:
        build = await builder.start(parse_image_name("shell/hello"), "latest")
        await asyncio.wait_for(evaluating.wait(), 30)
        with structlog.testing.capture_logs() as logged:
            await asyncio.wait_for(builder.close(), 30)
    finally:
        await builder.close()
    last = build.events[-1].to_json()
    assert (last["stage"], last["message"], last["error"]) == (Stage.FAILED, STOPPED_MESSAGE, "stopped")
    assert STOPPED_MESSAGE == "stopped: the registry is shutting down"
    said = [(entry["event"], entry["log_level"]) for entry in logged if entry["event"].startswith("build.")]
    assert said == [("build.stopped", "info")], logged
    assert (counted("failed") - failed, counted("stopped") - stopped) == (0, 1)


async def test_a_build_stopped_before_the_grace_ends_answers_its_waiters_and_its_page_builds_it_again(
    tmp_path: Path, aiohttp_client
) -> None:
    """`stop_builds` (just before NIXERY_SHUTDOWN_GRACE ends): a pull waiting for the build gets
    WorkStopped (503 BUILD_STOPPED) at once, and the build's page, drawn by the server (another
    worker of the registry draws it from the shared directory), says the registry stopped it and
    offers to build it again, instead of "The build failed". (The evaluation is a stand-in that
    never ends, as in the test above.)"""
    from aiohttp import web

    from nixery.http.errors import error_middleware
    from nixery.http.routes import BUILDER
    from nixery.http.web import add_web_routes
    from nixery.registry.names import parse_image_name
    from nixery.singleflight import WorkStopped


    builder, evaluating = _builder_whose_evaluations_never_end(tmp_path)
    try:
        request = parse_image_name("shell/hello")
        build = await builder.start(request, "v1")
        pull = asyncio.ensure_future(builder.image(request, "v1"))
        await asyncio.wait_for(evaluating.wait(), 30)
        await builder.stop_unwaited_builds()  # the pull waits for it: it goes on
        assert not pull.done() and not build.finished
        builder.stop_builds()
        with pytest.raises(WorkStopped, match="stopped building shell/hello; pull again"):
            await pull
        app = web.Application(middlewares=[error_middleware])
        app[BUILDER] = builder
        add_web_routes(app)
        client = await aiohttp_client(app)
        response = await client.get(f"/builds/{build.id}?image=shell/hello&tag=v1", headers={"Accept": "text/html"})
        text = await response.text()
        assert response.status == 200 and "The registry stopped this build as it shut down." in text, text
        assert "The build failed" not in text
        assert 'name="image" value="shell/hello"' in text and 'name="tag" value="v1"' in text
        assert "Build shell/hello again</button>" in text
    finally:
        await builder.close()


async def test_a_build_that_fails_before_it_starts_is_ended_and_the_next_pull_builds(tmp_path: Path) -> None:
    """The builder registered a pull's build, then called the pull's `on_wait` (its log line),
    and only then started it: when that call raised (a malformed Host, before nixery.http.hosts),
    the build was neither started nor ended. Its page said "queued" for ever, the next pull of
    the image joined it, and the log of recent builds dropped no build after it. Now it ends as
    failed, saying why, and the next pull starts a build of its own. (The evaluation is a
    stand-in that never ends, as in the tests above: what matters is that a build starts.)"""
    from nixery.progress import Build, Stage
    from nixery.registry.names import parse_image_name


    def failing(build: Build) -> None:
        raise ValueError("Invalid URL: port can't be converted to integer")

    builder, evaluating = _builder_whose_evaluations_never_end(tmp_path)
    try:
        request = parse_image_name("shell/hello")
        waited: list[Build] = []
        with pytest.raises(ValueError):
            await builder.image(request, "latest", on_wait=lambda build: (waited.append(build), failing(build)))
        (failed,) = waited
        last = failed.events[-1].to_json()
        assert (failed.stage, last["error"]) == (Stage.FAILED, "ValueError"), failed.events
        assert last["message"] == "the build did not start: Invalid URL: port can't be converted to integer"
        assert not evaluating.is_set()
        pull = asyncio.ensure_future(builder.image(request, "latest", on_wait=waited.append))
        await asyncio.wait_for(evaluating.wait(), 30)
        assert len(waited) == 2 and waited[1] is not failed and not waited[1].finished
        pull.cancel()
    finally:
        await builder.close()


async def test_writes_that_cannot_be_made_durable_leave_the_old_record_and_no_staging_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk often shows only at fsync (delayed allocation): the write fails (as the
    typed StorageFull), the old record stays, no blob appears, and nothing is left in staging.
    (fsync fails by injection: a tmpfs, as in test_storage_full.py, fails at write instead.)"""
    storage = FilesystemStorage(tmp_path / "storage")
    await storage.put_meta("images/x", b"old")
    old = await storage.get_versioned_meta("images/x")
    assert old is not None

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr("nixery.storage.filesystem.os.fsync", full)
    with pytest.raises(StorageFull, match="No space left"):
        await storage.put_meta("images/x", b"new")
    with pytest.raises(StorageFull, match="No space left"):
        await storage.put_meta_after("images/x", b"newer", asyncio.ensure_future(asyncio.sleep(0)))
    with pytest.raises(StorageFull, match="No space left"):
        await storage.create_meta_after("images/y", b"first", asyncio.ensure_future(asyncio.sleep(0)))
    with pytest.raises(StorageFull, match="No space left"):
        await storage.replace_meta("images/x", b"a replacement", old.version)
    with pytest.raises(StorageFull, match="No space left"):
        await storage.put_blob_bytes(b"a config")
    monkeypatch.undo()
    assert await storage.get_meta("images/x") == b"old"
    assert await storage.get_meta("images/y") is None
    assert await storage.stat_blob(Digest.of(b"a config")) is None
    assert list(storage.staging_dir().iterdir()) == []


async def test_a_process_remembers_a_bounded_number_of_verified_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blobs are hashed before they are first served; the set of those found intact is bounded
    (memory stays flat however many blobs a process serves), and a blob that fell out of it is
    hashed again: corruption since then is still caught."""
    monkeypatch.setattr("nixery.storage.filesystem.VERIFIED_CAPACITY", 2)
    storage = FilesystemStorage(tmp_path / "storage")
    digests = [await storage.put_blob_bytes(f"blob {i}".encode()) for i in range(3)]
    for digest in digests:
        await storage.blob_source(digest, allow_redirect=False)
    assert len(storage._verified) == 2
    # The first blob fell out; its bytes change in place (same size, same inode, same time).
    path = storage.blob_path(digests[0])
    stat = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as handle:
        handle.write(b"B")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(CorruptBlob):
        await storage.blob_source(digests[0], allow_redirect=False)
    # The two most recent are still served without hashing them again.
    monkeypatch.setattr("nixery.storage.filesystem._hashes_to", lambda path, digest: pytest.fail("hashed again"))
    for digest in digests[1:]:
        await storage.blob_source(digest, allow_redirect=False)


async def test_requests_for_a_blob_being_hashed_wait_for_that_one_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart, many pulls of one layer at once hash it once (each hashed it, and the
    hashes held every worker thread); a corrupt one is quarantined and reported once, and every
    request for it is refused; one removed by gc while it is hashed is not stored (404), not a 500."""
    storage = FilesystemStorage(tmp_path / "storage")
    intact, corrupt, removed = [await storage.put_blob_bytes(f"blob {i}".encode()) for i in range(3)]
    path = storage.blob_path(corrupt)
    path.chmod(0o644)
    path.write_bytes(b"blob X")
    reported: list[Digest] = []
    storage.on_corrupt_blob(reported.append)
    hashed: list[str] = []
    real_hash = filesystem._hashes_to

    def counted(path: Path, digest: Digest) -> bool:
        hashed.append(path.name)
        if digest == removed:
            path.unlink()  # `nixery gc` removes it between the stat and the hash
        return real_hash(path, digest)

    monkeypatch.setattr("nixery.storage.filesystem._hashes_to", counted)
    sources = await asyncio.gather(*(storage.blob_source(intact, allow_redirect=False) for _ in range(8)))
    assert {source.size for source in sources} == {len(b"blob 0")}
    answers = await asyncio.gather(
        *(storage.blob_source(corrupt, allow_redirect=False) for _ in range(8)), return_exceptions=True
    )
    assert all(isinstance(answer, CorruptBlob) for answer in answers), answers
    assert reported == [corrupt] and len(list((tmp_path / "storage" / "quarantine").iterdir())) == 1
    answers = await asyncio.gather(
        *(storage.blob_source(removed, allow_redirect=False) for _ in range(8)), return_exceptions=True
    )
    assert all(type(answer) is BlobNotFound for answer in answers), answers
    assert hashed == [intact.hex, corrupt.hex, removed.hex]


async def test_reads_go_on_while_blobs_are_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """First serves of more blobs than asyncio has worker threads: their hashes held every one of
    those threads, so that a read of a manifest or an image record waited behind them."""
    storage = FilesystemStorage(tmp_path / "storage")
    count = (os.cpu_count() or 1) + 5  # asyncio's default pool: min(32, cpus + 4) threads
    blobs = [await storage.put_blob_bytes(f"layer {i}".encode()) for i in range(count)]
    manifest = await storage.put_blob_bytes(b"a manifest")
    release, lock, loop = threading.Event(), threading.Lock(), asyncio.get_running_loop()
    two_started, started = asyncio.Event(), [0]
    real_hash = filesystem._hashes_to

    def held(path: Path, digest: Digest) -> bool:
        with lock:
            started[0] += 1
            if started[0] == 2:  # by then every serve has handed its hash over (they run side by side)
                loop.call_soon_threadsafe(two_started.set)
        release.wait()
        return real_hash(path, digest)

    monkeypatch.setattr("nixery.storage.filesystem._hashes_to", held)
    loop.call_later(30, release.set)  # only if reads wait for the hashes (the old way)
    serves = [asyncio.ensure_future(storage.blob_source(blob, allow_redirect=False)) for blob in blobs]
    await two_started.wait()
    try:
        assert await storage.read_blob(manifest) == b"a manifest"
        assert not release.is_set(), "the read waited for the hashes"
    finally:
        release.set()
        await asyncio.gather(*serves)
        await storage.close()


def _builder_whose_evaluations_never_end(tmp_path: Path) -> tuple[ImageBuilder, asyncio.Event]:
    """A builder with one build slot whose package source never ends an evaluation, as a long one
    does until cancelled (a stand-in for Nix: these tests are of how the builder starts and stops
    builds); and the event set once an evaluation began."""
    from nixery.builder import ImageBuilder
    from tests.resolvers import StorePathsResolver

    evaluating = asyncio.Event()

    class EndlessEvaluation(StorePathsResolver):
        async def evaluate(self, revision, names, system, *, until):  # type: ignore[no-untyped-def]
            evaluating.set()
            await asyncio.Event().wait()
            raise AssertionError("not reached")

    builder = ImageBuilder(storage=FilesystemStorage(tmp_path / "storage"), source=EndlessEvaluation({}),
                           max_layers=10, max_concurrent_builds=1, layer_workers=1)
    return builder, evaluating
