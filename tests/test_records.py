"""The image records a process keeps in memory (nixery/images.py): bounded, least
recently used dropped first, found by the blobs they name, and the most recently
built listed without sorting them all. The last test builds images from real store
paths, handed to the builder by a stand-in for Nix (tests/resolvers.py): what it
tests is the builder's record cache, not how names are resolved."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from nixery import config, images
from nixery.builder import ImageBuilder
from nixery.images import RECENT, USAGE_PREFIX, ImageRecord, ImageStore, ManifestRef, RecordCache
from nixery.platforms import for_platforms
from nixery.pulls import pull_key
from nixery.recipes import build_recipe, read_recipe
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor
from nixery.registry.mediatypes import ManifestFormat
from nixery.registry.names import Arch, parse_image_name
from nixery.registry.runconfig import RunConfig
from nixery.resolver import Revision
from nixery.storage.filesystem import FilesystemStorage
from tests.resolvers import StorePathsResolver, add_packages


def record(n: int, *, built_at: float | None = None, shared: Digest | None = None) -> ImageRecord:
    own = Digest.of(f"layer {n}".encode())
    layers = [LayerDescriptor(own, own, 10, "own")]
    if shared is not None:
        layers.append(LayerDescriptor(shared, shared, 10, "shared"))
    return ImageRecord(
        key=f"key-{n}", name=f"image-{n}", source="test", revision="r", packages=(f"p{n}",),
        architecture="amd64", config=Digest.of(f"config {n}".encode()),
        manifests={ManifestFormat.DOCKER: ManifestRef(Digest.of(f"manifest {n}".encode()), 100)},
        layers=tuple(layers), built_at=float(n if built_at is None else built_at),
        layer_paths=tuple((f"/nix/store/{n:032d}-p{n}",) for _ in layers),
    )  # fmt: skip


def test_the_least_recently_used_records_go_first() -> None:
    cache = RecordCache(capacity=3)
    for n in range(3):
        cache.put(record(n))
    assert cache.get("key-0") is not None  # used: now the most recent
    cache.put(record(3))
    assert len(cache) == 3
    assert cache.get("key-1") is None
    assert [cache.get(f"key-{n}") is not None for n in (0, 2, 3)] == [True, True, True]


def test_records_are_forgotten_by_the_blobs_they_name() -> None:
    shared = Digest.of(b"shared layer")
    cache = RecordCache(capacity=10)
    for n in range(4):
        cache.put(record(n, shared=shared if n < 2 else None))
    assert cache.forget_using(Digest.of(b"not named by anything")) == 0
    assert cache.forget_using(shared) == 2
    assert [cache.get(f"key-{n}") is None for n in range(4)] == [True, True, False, False]
    assert cache.forget_using(Digest.of(b"manifest 2")) == 1  # manifests count too
    assert [r.key for r in cache.recent()] == ["key-3"]
    cache.put(record(5, shared=shared))
    assert cache.forget_using(shared) == 1
    small = RecordCache(capacity=1)
    small.put(record(6))
    small.put(record(7))  # key-6 evicted: the index no longer names it
    assert small.forget_using(Digest.of(b"layer 6")) == 0 and small.forget_using(Digest.of(b"layer 7")) == 1


def test_the_newest_builds_are_listed_whatever_the_order_they_were_loaded_in() -> None:
    cache = RecordCache(capacity=5)
    order = [7, 3, 90, 1, 55, 12, 80, 2, 60]
    for n in order:
        cache.put(record(n))
    assert len(cache) == 5
    # Recent builds are kept for the landing page even once they left the cache.
    assert [r.built_at for r in cache.recent(4)] == [90.0, 80.0, 60.0, 55.0]
    cache.put(record(90, built_at=1.5))  # rebuilt with another time: listed once, where it now belongs
    assert [r.key for r in cache.recent(3)] == ["key-80", "key-60", "key-55"]
    assert sum(r.key == "key-90" for r in cache.recent(100)) == 1
    for n in range(1000, 1000 + 2 * RECENT):
        cache.put(record(n))
    assert len(cache.recent(1000)) == RECENT
    cache.clear()
    assert cache.recent() == [] and len(cache) == 0


def test_a_use_is_written_once_per_interval_while_cached() -> None:
    cache = RecordCache(capacity=1)
    cache.put(record(1))
    now = 1.7e9
    assert cache.should_write_use("key-1", now=now, interval=3600)
    assert not cache.should_write_use("key-1", now=now + 1000, interval=3600)
    assert cache.should_write_use("key-1", now=now + 4000, interval=3600)
    assert not cache.should_write_use("key-2", now=now + 9000, interval=3600)  # not cached: nothing to note


def test_records_share_what_their_common_layers_hold() -> None:
    cache = RecordCache(capacity=3)
    path = "/nix/store/" + "x" * 32 + "-shared"
    for n in (1, 2, 3):
        # Equal descriptors and strings, distinct objects: as records read from storage one by one.
        shared = Digest.parse("sha256:" + "ab" * 32)
        fresh = record(n, shared=shared)
        cache.put(replace(fresh, layer_paths=((f"/nix/store/{n:032d}-own",), ("".join(list(path)),))))
    held = [cache.get(f"key-{n}") for n in (1, 2, 3)]
    assert held[0].layers[1] is held[1].layers[1] is held[2].layers[1]  # type: ignore[union-attr]
    assert held[0].layer_paths[1] is held[1].layer_paths[1]  # type: ignore[union-attr]
    assert held[0].layers[0] is not held[1].layers[0]  # type: ignore[union-attr]
    assert held[2].layer_paths[0] == (f"/nix/store/{3:032d}-own",)  # type: ignore[union-attr]


def test_the_record_cache_setting() -> None:
    assert config.load({"NIXERY_RECORD_CACHE": "250"}).record_cache == 250
    assert config.load({}).record_cache == 500
    for bad in ("0", "many"):
        with pytest.raises(config.ConfigError, match="NIXERY_RECORD_CACHE"):
            config.load({"NIXERY_RECORD_CACHE": bad})


async def test_a_pull_by_digest_is_a_use_of_the_images_held_that_name_it(tmp_path: Path) -> None:
    """For gc (nixery.pulls): as a pull by tag of those images; of a manifest no image in
    memory names, under its digest."""
    storage = FilesystemStorage(tmp_path / "storage")
    images = ImageStore(storage)
    held = record(1)
    images.cached.put(held)
    images.note_pull(held.manifests[ManifestFormat.DOCKER].digest)
    other = Digest.of(b"the manifest of an image this process does not hold")
    images.note_pull(other)
    await images.close()
    for _ in range(100):  # uses are written in the background
        if await storage.get_meta(f"{USAGE_PREFIX}{held.key}") is not None:
            break
        await asyncio.sleep(0.05)
    assert json.loads(await storage.get_meta(f"{USAGE_PREFIX}{held.key}") or b"{}")["last_used"] > 0
    assert await storage.list_meta("pulls") == [pull_key(other)]


@pytest.mark.nix
async def test_an_image_held_in_memory_has_its_blobs_checked_again_only_every_few_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest answered from memory costs no stat of each layer on every request: the
    blobs of a record held are checked again once RECHECK_INTERVAL has passed, and a record
    whose layer was damaged meanwhile is then not answered (the image is built again)."""
    storage = FilesystemStorage(tmp_path / "storage")
    store = ImageStore(storage)
    layer_bytes = b"a layer's bytes"
    layer = await storage.put_blob_bytes(layer_bytes)
    held = replace(record(1), config=await storage.put_blob_bytes(b"config"),
                   manifests={ManifestFormat.DOCKER: ManifestRef(await storage.put_blob_bytes(b"manifest"), 8)},
                   layers=(LayerDescriptor(layer, layer, len(layer_bytes), "own"),), layer_paths=())
    store.cached.put(held)
    asked: list[Digest] = []
    servable = storage.blob_servable

    async def counted(digest: Digest, size: int | None = None) -> bool:
        asked.append(digest)
        return await servable(digest, size)

    monkeypatch.setattr(storage, "blob_servable", counted)
    now = [1000.0]
    monkeypatch.setattr(images.time, "monotonic", lambda: now[0])
    store.cached.note_checked(held.key, now[0])
    for _ in range(100):
        assert await store.get(held.key) == held
    assert asked == []
    now[0] += images.RECHECK_INTERVAL
    assert await store.get(held.key) == held and await store.get(held.key) == held
    assert len(asked) == 3, "each blob once, then none until the interval has passed again"
    storage.blob_path(layer).write_bytes(b"a layer's BYTES")
    assert await store.get(held.key) == held, "checked within the interval: not again"
    now[0] += images.RECHECK_INTERVAL
    assert await store.get(held.key) is None
    assert store.cached.get(held.key) is None and not storage.blob_path(layer).exists()
    await store.close()
    await storage.close()


async def test_a_builder_keeps_at_most_the_configured_records(tmp_path: Path) -> None:
    names = ["hello", "figlet", "cowsay"]
    # A stand-in for Nix, by design: the closures are real store paths (see tests/resolvers.py).
    resolver = StorePathsResolver(add_packages(tmp_path / "packages", names))
    builder = ImageBuilder(
        storage=FilesystemStorage(tmp_path / "storage"), source=resolver,
        max_layers=10, max_concurrent_builds=2, layer_workers=1, record_cache=2,
    )
    try:
        built = [await builder.image(parse_image_name(name), "latest") for name in names]
        assert resolver.realised == [(name,) for name in names]
        assert len(builder.images.cached) == 2
        assert [r.name for r in builder.recent_images()] == list(reversed(names))
        builds = len(builder.builds.recent())
        # The one dropped from memory is read from storage again, not built again.
        assert await builder.image(parse_image_name("hello"), "latest") == built[0]
        assert len(builder.builds.recent()) == builds and len(builder.images.cached) == 2
        assert len(resolver.realised) == len(names)
    finally:
        await builder.close()


def test_a_recipe_gives_back_the_request_a_declared_config_and_several_platforms_included() -> None:
    """What a pull by digest rebuilds from (stored by each manifest's digest): the same request,
    so the same image key, also for a declared image (its config) and an index (its platforms)."""
    config = RunConfig(user="app", working_dir="/srv", env=("A=1",), entrypoint=("/bin/sh",), cmd=("-c", "x"),
                       exposed_ports=("8080/tcp",), labels=(("a", "1"), ("b", "2")))
    declared = replace(for_platforms(parse_image_name("shell/curl"), [Arch.AMD64, Arch.ARM64]), config=config)
    for request in (parse_image_name("arm64/curl/shell"), declared):
        read = read_recipe(build_recipe(request, "v1", Revision("a set", "commit-1", None)))
        assert read == (request, "v1", "commit-1")
        assert read[0].order == request.order and read[0].config == request.config
    assert read_recipe(b"{}") is None and read_recipe(b"not json") is None
