"""`nixery gc` against the storage of registries that keep serving: real registry
processes, `nixery gc` and `nixery check` as the operator runs them, real Nix
(the busybox set), filesystem storage and S3 (SeaweedFS).

What must hold (docs/storage.md, nixery/collected.py): a manifest a registry
answers names only blobs that are stored. An image gc collected is rebuilt on
its next pull by tag, by every process on the storage; its manifest by digest
is `MANIFEST_UNKNOWN` (gc removed its record: no one wants it); a blob found
missing makes the images naming it be looked up (and rebuilt) again, also by a
pull by digest while the record is there; and no lock file of a collected image
is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest

from nixery import collected, maintenance
from nixery.app import open_storage
from nixery.config import load
from nixery.images import ImageRecord
from nixery.registry.digest import Digest
from tests.registry import RegistryProcess, run
from tests.storage.servers import seaweedfs

pytestmark = pytest.mark.nix

FOUR_HOURS = 4 * 3600


def pull(registry: RegistryProcess, name: str, reference: str = "latest") -> tuple[str, dict]:
    """As a client pulls: the manifest by tag (or digest), then the config and every layer (all must be there)."""
    digest, manifest = registry.manifest(name, reference)
    for blob in [manifest["config"], *manifest["layers"]]:
        status, _, body = registry.request(f"/v2/{name}/blobs/{blob['digest']}", accept=None)
        assert status == 200, (blob["digest"], status, body[:300])
        assert Digest.of(body) == Digest.parse(blob["digest"])
    return digest, manifest


def error_code(body: bytes) -> str | None:
    """The registry error's code; None for anything else (a manifest, say)."""
    errors = json.loads(body).get("errors") if body.startswith(b"{") else None
    return errors[0]["code"] if errors else None


def blob_file(storage: Path, digest: str) -> Path:
    hex_ = Digest.parse(digest).hex
    return storage / "blobs" / "sha256" / hex_[:2] / hex_


def record_key(storage: Path, manifest_digest: str) -> str:
    """The key of the image record whose manifest has this digest."""
    for path in (storage / "meta" / "images").iterdir():
        record = ImageRecord.from_json(path.read_bytes())
        if any(str(ref.digest) == manifest_digest for ref in record.manifests.values()):
            return path.name
    raise AssertionError(f"no record names {manifest_digest}")


def age_everything(storage: Path, seconds: float = FOUR_HOURS) -> None:
    """Make every image look built and last pulled, and every blob written, `seconds` ago."""
    then = time.time() - seconds
    for path in (storage / "meta" / "images").iterdir():
        document = json.loads(path.read_bytes())
        document["built_at"] = then
        path.write_text(json.dumps(document))
    for path in (storage / "meta").glob("usage/*"):
        path.write_text(json.dumps({"last_used": then}))
    for path in (storage / "blobs" / "sha256").glob("*/*"):
        os.utime(path, (then, then))


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def collect(storage: Path) -> str:
    result = run([sys.executable, "-m", "nixery", "gc", "--older-than", "3h"],
                 env_extra={"STORAGE_PATH": str(storage), "NIXERY_BUNDLED_SET": "busybox"})
    return result.stdout


def check_storage(storage: Path, **env: str) -> str:
    result = run([sys.executable, "-m", "nixery", "check"], env_extra={"STORAGE_PATH": str(storage), **env},
                 check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_registries_rebuild_what_gc_collected_while_they_served_it(start_registry, tmp_path: Path) -> None:
    storage = tmp_path / "shared-storage"
    first = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    second = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    name = "figlet/fortune"
    digest, manifest = pull(first, name)
    assert pull(second, name)[0] == digest  # both now hold the image in memory
    key = record_key(storage, digest)
    wait_for(storage / "meta" / "usage" / key)  # the second pull's use, written in the background
    age_everything(storage)
    # A holder killed in the middle of a build leaves its lock file: gc takes that one away too.
    (storage / "locks" / f"builds_{key}.lock").touch()

    assert "removed 1 image and" in collect(storage)
    assert not blob_file(storage, manifest["config"]["digest"]).exists()
    assert not blob_file(storage, digest).exists()
    assert list((storage / "locks").iterdir()) == [], "no lock file of the collected image is left"

    # Its manifest by digest is no longer answered, by either process (within the bound
    # nixery/collected.py promises: one poll of gc's note after gc ends) ...
    for registry in (first, second):
        deadline = time.monotonic() + collected.POLL_INTERVAL + 1
        while (answer := registry.request(f"/v2/{name}/manifests/{digest}"))[0] == 200:
            assert time.monotonic() < deadline, "the manifest of a collected image is still answered"
            time.sleep(0.1)
        assert (answer[0], error_code(answer[2])) == (404, "MANIFEST_UNKNOWN"), answer[2]
    # ... and a pull by tag rebuilds it (the same bytes: same revision, and the layering history,
    # which gc leaves, still holds its layers), with every blob there, from either process.
    assert pull(second, name)[0] == digest
    assert pull(first, name)[0] == digest
    status, _, _ = first.request(f"/v2/{name}/manifests/{digest}")
    assert status == 200
    assert "ok" in check_storage(storage)
    assert not (storage / "locks" / f"builds_{key}.lock").exists()


def two_images_aged(start_registry, storage: Path) -> tuple[str, dict]:
    """`fortune` and `shell/hello` built into `storage`, the registry stopped, everything dated
    hours back (past `--older-than 3h`); shell/hello's manifest digest and manifest."""
    registry = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    pull(registry, "fortune")
    digest, manifest = pull(registry, "shell/hello")
    registry.stop()
    age_everything(storage)
    return digest, manifest


def test_the_records_of_collected_layers_go_with_their_blobs(start_registry, tmp_path: Path) -> None:
    """A layer's record (`meta/layers/`, how builds find a stored layer) goes when gc removes its
    blob: they used to stay, one for every layer ever made. A kept image's layers keep theirs."""
    storage = tmp_path / "storage"
    kept_digest, kept = two_images_aged(start_registry, storage)
    used = storage / "meta" / "usage" / record_key(storage, kept_digest)
    used.parent.mkdir(exist_ok=True)
    used.write_text(json.dumps({"last_used": time.time()}))

    assert "removed 1 image and" in collect(storage)
    records = [json.loads(path.read_bytes())["digest"] for path in (storage / "meta" / "layers").iterdir()]
    assert sorted(records) == sorted(layer["digest"] for layer in kept["layers"])
    assert all(blob_file(storage, digest).exists() for digest in records)


def test_gc_leaves_no_directories_of_what_it_removed(start_registry, tmp_path: Path) -> None:
    """Each image keeps its pointers one directory each (`meta/manifests/<hex>/`, `meta/referrers/<hex>/`,
    a dozen per image): gc removed the files and left the directories, so a storage that builds and
    collects images for months piled up empty directories (an inode and a block each) without end.
    And a dry run says what the run then does, the layer records included."""
    storage = tmp_path / "storage"
    two_images_aged(start_registry, storage)

    dry = run([sys.executable, "-m", "nixery", "gc", "--older-than", "3h", "--dry-run"],
              env_extra={"STORAGE_PATH": str(storage), "NIXERY_BUNDLED_SET": "busybox"}).stdout
    done = collect(storage)
    assert "removed 2 images and" in done
    assert dry.replace("would remove", "removed") == done, (dry, done)
    empty = [str(path.relative_to(storage)) for path in (storage / "meta").glob("*/**/*")  # below meta/<kind>/
             if path.is_dir() and not any(path.iterdir())]
    assert empty == [], empty
    # Building again after gc writes its pointers into directories made anew.
    registry = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    digest, _ = pull(registry, "fortune")
    assert registry.request(f"/v2/fortune/manifests/{digest}")[0] == 200
    assert "ok" in check_storage(storage)


def test_gc_says_what_it_keeps_because_a_clock_was_ahead(start_registry, tmp_path: Path) -> None:
    """A registry whose clock ran a month ahead (a VM restored, a wrong hardware clock) dates its
    pulls and blobs a month ahead: gc keeps them until then. It did so without a word, so the
    storage an operator expected gc to free stayed full; now it says what it keeps, and why."""
    storage = tmp_path / "storage"
    kept_digest, _ = two_images_aged(start_registry, storage)
    month_ahead = time.time() + 30 * 86400
    used = storage / "meta" / "usage" / record_key(storage, kept_digest)
    used.parent.mkdir(exist_ok=True)
    used.write_text(json.dumps({"last_used": month_ahead}))
    stray = blob_file(storage, str(Digest.of(b"")))  # a blob of no image, written a month ahead
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"")
    os.utime(stray, (month_ahead, month_ahead))

    done = collect(storage)
    assert "removed 1 image and" in done
    assert "kept 1 image and 1 blob dated up to 30 days ahead of this machine's clock" in done, done
    assert stray.exists()


def test_a_gc_that_finishes_what_a_stopped_one_began_lets_registries_rebuild(start_registry, tmp_path: Path) -> None:
    """A gc stopped (Ctrl-C, killed) after removing an image's record, before telling registries,
    left the blobs to the next run, which removed them without a word first: a registry still
    holding the image answered its manifest by tag, and the pull failed on a missing blob."""
    storage = tmp_path / "shared-storage"
    serving = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    name = "figlet/fortune"
    digest, _ = pull(serving, name)  # the registry now holds the image in memory
    key = record_key(storage, digest)
    age_everything(storage)
    (storage / "meta" / "images" / key).unlink()  # what the stopped gc had done, and nothing else

    assert "removed 0 images" in collect(storage)
    assert pull(serving, name)[0] == digest  # rebuilt, every blob there
    assert "ok" in check_storage(storage)


def test_a_blob_found_missing_gets_its_image_rebuilt(start_registry, tmp_path: Path) -> None:
    """A blob gone without a word from gc (deleted by hand, or before a registry heard of it)."""
    storage = tmp_path / "shared-storage"
    serving = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    name = "cowsay/hello"
    digest, manifest = pull(serving, name)
    layer = manifest["layers"][0]["digest"]
    blob_file(storage, layer).unlink()

    # Another process, which never served the image: its manifest by digest names a missing blob,
    # and the image is built again before the answer (a pinned pull by digest got 404 until a pull by tag).
    other = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    status, _, body = other.request(f"/v2/{name}/manifests/{digest}")
    assert status == 200, body
    assert blob_file(storage, layer).exists()
    blob_file(storage, layer).unlink()

    status, _, body = serving.request(f"/v2/{name}/blobs/{layer}", accept=None)
    assert (status, error_code(body)) == (404, "BLOB_UNKNOWN")
    # The process that found it missing looks the image up again, and rebuilds it.
    assert pull(serving, name)[0] == digest
    assert other.request(f"/v2/{name}/manifests/{digest}")[0] == 200
    assert "ok" in check_storage(storage)


def test_replicas_on_s3_rebuild_what_gc_collected(
    start_registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three replicas on one bucket: all held the image in memory when gc removed it."""
    (tmp_path / "seaweedfs").mkdir()
    with seaweedfs(tmp_path / "seaweedfs") as server:
        env = {
            "NIXERY_STORAGE_BACKEND": "s3", "S3_BUCKET": server.bucket, "S3_ENDPOINT": server.endpoint,
            "S3_PATH_STYLE": "true", "S3_REGION": server.region, "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key, "NIXERY_BUNDLED_SET": "busybox",
        }  # fmt: skip
        replicas = [start_registry(**env) for _ in range(3)]
        name = "greet/hello"
        digest, manifest = replicas[0].manifest(name)
        for replica in replicas[1:]:
            assert replica.manifest(name)[0] == digest
        blobs = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]

        later = time.time() + 40 * 86400  # S3 objects cannot be made older: gc runs in the future instead
        monkeypatch.setattr(maintenance.time, "time", lambda: later)
        cli_env = {**env, "STORAGE_PATH": str(tmp_path / "cli")}

        async def collect_on_s3() -> maintenance.GarbageReport:
            storage = open_storage(load(cli_env))
            try:
                return await maintenance.collect_garbage(storage, older_than=30 * 86400)
            finally:
                await storage.close()

        report = asyncio.run(collect_on_s3())
        assert report.images_removed == 1 and report.blobs_removed >= len(blobs)
        for replica in replicas:
            assert replica.manifest(name)[0] == digest
            for blob in blobs:
                status, _, _ = replica.request(f"/v2/{name}/blobs/{blob}", method="HEAD", accept=None)
                assert status == 200, (replica.port, blob)
        assert "and 1 image: ok" in check_storage(tmp_path / "cli", **env)


def test_an_image_pulled_only_by_digest_is_in_use(start_registry, tmp_path: Path) -> None:
    """A Kubernetes pod pinned to `name@sha256:...` pulls by digest only, from a process
    that may never have looked its image up by tag (a replica, or one restarted since)."""
    storage = tmp_path / "shared-storage"
    builder = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    name = "hello/greet"
    digest, manifest = pull(builder, name)
    builder.stop()
    age_everything(storage)  # built, and last pulled by tag, four hours ago

    pinned = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    pull(pinned, name, digest)
    pulls = storage / "meta" / "pulls"
    deadline = time.monotonic() + 10  # the pull's use is written in the background
    while not pulls.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert "removed 0 images" in collect(storage)
    status, _, body = pinned.request(f"/v2/{name}/manifests/{digest}")
    assert status == 200, body[:300]
    for blob in [manifest["config"], *manifest["layers"]]:
        assert blob_file(storage, blob["digest"]).exists()

    pinned.stop()
    age_everything(storage)
    pulled = pulls / Digest.parse(digest).hex
    pulled.write_text(json.dumps({"last_used": time.time() - FOUR_HOURS}))
    assert "removed 1 image and" in collect(storage)
    assert not pulled.exists(), "the collected image's pulls go with it"


def test_the_manifest_cache_forgets_what_names_a_missing_blob() -> None:
    from nixery.http.routes import ManifestCache

    def digest(text: str) -> Digest:
        return Digest.of(text.encode())

    cache = ManifestCache(capacity=3)
    shared, own_a, own_b = digest("shared layer"), digest("a's layer"), digest("b's layer")
    cache.put(digest("manifest a"), b"a", "type", [digest("config a"), shared, own_a])
    cache.put(digest("manifest b"), b"b", "type", [digest("config b"), shared, own_b])
    cache.forget_naming(digest("named by nothing"))
    assert cache.get(digest("manifest a")) == (b"a", "type") and cache.get(digest("manifest b")) is not None
    cache.forget_naming(own_a)
    assert cache.get(digest("manifest a")) is None and cache.get(digest("manifest b")) is not None
    cache.forget_naming(digest("manifest b"))  # a manifest is a blob too
    assert cache.get(digest("manifest b")) is None
    for n in range(5):  # evicted ones are no longer counted
        cache.put(digest(f"manifest {n}"), b"x", "type", [shared])
    cache.forget_naming(shared)
    assert all(cache.get(digest(f"manifest {n}")) is None for n in range(5))
    cache.put(digest("manifest c"), b"c", "type", [shared])
    cache.clear()
    assert cache.get(digest("manifest c")) is None
