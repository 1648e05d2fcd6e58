"""A new layer's blob and record are written beside its image's config and
manifests, not before them: what that must still guarantee, with real Nix
(the busybox set) and real filesystem storage, in this process.

* An image is answered only once every blob it names is stored.
* A layer being written for one build is not compressed again for another.
* A layer that cannot be written fails the builds that use it, leaves no
  staging file, and is compressed again by the next build.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from nixery import config
from nixery.app import open_builder
from nixery.builder import ImageBuilder
from nixery.images import ImageRecord
from nixery.layers.writers import LayerWriters
from nixery.progress import Build, Stage
from nixery.registry.digest import Digest
from nixery.registry.names import parse_image_name
from nixery.storage.filesystem import FilesystemStorage

BUSYBOX_SET = Path(__file__).resolve().parent.parent / "pkgs" / "busybox"


class HeldStorage(FilesystemStorage):
    """Filesystem storage whose writes of big blobs (the busybox layer) wait for `release`."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.fail_next = False
        self.holding_entry_lookups: asyncio.Barrier | None = None

    async def get_meta(self, key: str) -> bytes | None:
        found = await super().get_meta(key)
        if key.startswith("layers/entry-") and self.holding_entry_lookups is not None:
            await self.holding_entry_lookups.wait()  # until as many builds have looked
        return found

    async def put_blob(self, digest: Digest, staged: Path) -> None:
        if staged.stat().st_size > BIG:
            self.holding.set()
            await self.release.wait()
            if self.fail_next:
                self.fail_next = False
                raise OSError(28, "No space left on device (injected)")
        await super().put_blob(digest, staged)


@pytest.fixture
async def held(tmp_path: Path) -> AsyncIterator[tuple[ImageBuilder, HeldStorage]]:
    settings = config.load(
        {"NIXERY_PKGS_PATH": str(BUSYBOX_SET), "STORAGE_PATH": str(tmp_path / "storage"),
         "NIXERY_NIX_EVALUATOR": "process"}
    )
    storage = HeldStorage(settings.storage_path)
    builder = open_builder(settings, storage)
    yield builder, storage
    storage.release.set()
    await builder.close()


BIG = 500_000  # bytes: of the layers of these images, only busybox's is bigger


@pytest.fixture
def compressed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The compressed size of every layer compressed."""
    sizes: list[int] = []
    real = LayerWriters.write

    async def counted(self, path, write):
        blob = await real(self, path, write)
        sizes.append(blob.size)
        return blob

    monkeypatch.setattr(LayerWriters, "write", counted)
    return sizes


async def image(builder: ImageBuilder, name: str, builds: list[Build] | None = None) -> ImageRecord:
    return await builder.image(parse_image_name(name), "latest", on_wait=builds.append if builds is not None else None)


async def storing_its_config(builds: list[Build]) -> None:
    """Until the build has compressed its own layers and writes its config and manifests."""
    while not builds or builds[0].stage != Stage.UPLOADING:
        await asyncio.sleep(0.01)


async def all_blobs_stored(storage: FilesystemStorage, record: ImageRecord) -> bool:
    return all([await storage.stat_blob(digest) is not None for digest in record.blobs()])


async def test_an_image_is_answered_only_once_its_layers_are_stored(held, compressed: list[int]) -> None:
    builder, storage = held
    first = asyncio.ensure_future(image(builder, "shell/hello"))
    await asyncio.wait_for(storage.holding.wait(), 60)  # compressed; its blob is being written
    second = asyncio.ensure_future(image(builder, "shell/figlet"))  # shares the busybox layer
    await asyncio.sleep(1.0)
    assert not first.done() and not second.done(), "answered before the busybox layer was stored"

    storage.release.set()
    records = await asyncio.wait_for(asyncio.gather(first, second), 60)
    for record in records:
        assert await all_blobs_stored(storage, record)
    shared = {layer.digest for layer in records[0].layers} & {layer.digest for layer in records[1].layers}
    assert any(layer.size > BIG for layer in records[1].layers if layer.digest in shared)
    assert len([size for size in compressed if size > BIG]) == 1, "the layer being written was compressed again"


async def test_a_layer_that_cannot_be_stored_fails_its_builds_and_is_retried(held, compressed: list[int]) -> None:
    builder, storage = held
    storage.fail_next = True
    first = asyncio.ensure_future(image(builder, "shell/hello"))
    await asyncio.wait_for(storage.holding.wait(), 60)
    builds: list[Build] = []
    second = asyncio.ensure_future(image(builder, "shell/figlet", builds))
    await asyncio.wait_for(storing_its_config(builds), 60)  # it now waits for the busybox layer too
    storage.release.set()
    for build in (first, second):
        with pytest.raises(OSError, match="No space left"):
            await asyncio.wait_for(build, 60)
    assert await builder.built(parse_image_name("shell/hello"), "latest") is None
    assert list(storage.staging_dir().iterdir()) == [], "a staging file was left behind"

    record = await asyncio.wait_for(image(builder, "shell/hello"), 60)
    assert await all_blobs_stored(storage, record)
    assert len([size for size in compressed if size > BIG]) == 2, "the failed layer was not compressed again"


def open_files_under(directory: Path) -> list[str]:
    """Files under `directory` that this process holds open (not directories: the process
    holds its staging directory open, locked, for as long as it lives)."""
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith(f"{directory}/") and not os.path.isdir(target):
            held.append(target)
    return held


async def test_built_layers_hold_no_file_open(held, tmp_path: Path) -> None:
    """A long-running registry must not keep a descriptor per layer it wrote: it would run out
    of them, and the disk space of blobs that garbage collection deletes would never come back."""
    builder, storage = held
    storage.release.set()
    for name in ("shell/hello", "figlet", "shell/cowsay"):
        await asyncio.wait_for(image(builder, name), 60)
    assert open_files_under(tmp_path / "storage") == []


async def test_an_entry_layer_stored_already_or_meanwhile_is_reused(held) -> None:
    """`shell/hello` and `bash/hello` have the same programs (bash is busybox here). The entry
    layer is written before its cache key is known: found stored, the new copy is removed;
    two builds that both found it missing store it once and leave no copy behind either."""
    builder, storage = held
    storage.release.set()
    first = await asyncio.wait_for(image(builder, "shell/hello"), 60)
    second = await asyncio.wait_for(image(builder, "bash/hello"), 60)
    assert first.key != second.key
    assert second.layers[-1] == first.layers[-1], "the entry layer was not reused"

    storage.holding_entry_lookups = asyncio.Barrier(2)  # both look it up before either stores it
    together = await asyncio.wait_for(
        asyncio.gather(image(builder, "coreutils/figlet"), image(builder, "busybox/figlet")), 60
    )
    assert together[0].layers[-1] == together[1].layers[-1] != first.layers[-1]
    for record in (first, second, *together):
        assert record.layers[-1].description.startswith("entry points")
        assert await all_blobs_stored(storage, record)
    assert list(storage.staging_dir().iterdir()) == [], "a staging file was left behind"



async def test_a_reused_layer_that_gives_way_keeps_only_paths_no_other_layer_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan is ordered by age: `{a, b, o}` gives way (`o` gone from the store and storage) and
    its paths `a` and `b` are in layers served whole, one of them after it. It is left out, rather
    than become `{a}` a second time."""
    import structlog

    from nixery import builder as builder_module
    from nixery.closure import ClosureGraph

    graph = ClosureGraph.from_mapping({
        "tool": {"size": 1, "refs": ["a", "b", "c"]}, "a": {"size": 1, "refs": []},
        "b": {"size": 1, "refs": []}, "c": {"size": 1, "refs": []},
    })
    plan = [frozenset({"b", "c", "o2"}), frozenset({"a", "b", "o"}), frozenset({"a"}), frozenset({"tool"})]

    async def store_holds(paths: list[str]) -> frozenset[str]:  # a stand-in: `o` was built elsewhere
        return frozenset(path for path in paths if path != "o")

    async def not_stored(paths: list[str]) -> None:
        return None

    monkeypatch.setattr(builder_module.store_db, "valid_paths", store_holds)
    builder = SimpleNamespace(layers=SimpleNamespace(stored=not_stored))
    servable, found = await ImageBuilder._servable(builder, plan, graph, structlog.get_logger("test"))
    assert servable == [plan[0], plan[2], plan[3]] and found == {}


async def test_a_reused_layer_with_paths_outside_the_closure_is_served_or_gives_way(
    tmp_path: Path, built_store_paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan may reuse a stored layer whole although it holds paths of another image
    (`CostModel.takes_stored_layer`). It is served whole while this machine's store holds those
    paths (then it can be made again byte for byte) or storage holds the layer (handed on, not
    looked up again); else the image gets a layer of its own paths."""
    import structlog

    from nixery import builder as builder_module
    from nixery.closure import ClosureGraph
    from nixery.layers.store import LayerStore
    from nixery.registry.mediatypes import Compression

    storage = FilesystemStorage(tmp_path / "storage")
    layers = LayerStore(storage, compression=Compression.GZIP, workers=1)
    try:
        kept, outside = built_store_paths["busybox"], built_store_paths["hello"]  # hello: another image's
        graph = ClosureGraph.from_mapping({kept: {"size": 4, "refs": []}})  # this image: busybox alone
        builder = SimpleNamespace(layers=layers)
        bound = structlog.get_logger("test")
        plan = [frozenset({kept, outside})]
        # Not stored, but the store here holds hello: served whole (compressed again if need be).
        assert await ImageBuilder._servable(builder, plan, graph, bound) == (plan, {})

        async def store_lacks(paths: list[str]) -> frozenset[str]:  # a stand-in: hello built elsewhere
            return frozenset()

        monkeypatch.setattr(builder_module.store_db, "valid_paths", store_lacks)
        stored = await layers.store_paths(sorted([kept, outside]))  # the earlier image's layer
        if stored.stored is not None:
            await stored.stored
        servable, found = await ImageBuilder._servable(builder, plan, graph, bound)
        assert servable == plan and found[plan[0]].descriptor == stored.descriptor  # stored: handed on
        for record in (tmp_path / "storage" / "meta" / "layers").iterdir():
            record.unlink()  # collected since
        assert await ImageBuilder._servable(builder, plan, graph, bound) == ([frozenset({kept})], {})
        # Giving way, it keeps only the paths no layer before it holds: a layer reused whole may
        # hold paths of another stored layer the image reuses (here all of them: no layer is left).
        alone = frozenset({kept})
        assert await ImageBuilder._servable(builder, [alone, *plan], graph, bound) == ([alone], {})
    finally:
        await layers.close()
        await storage.close()
