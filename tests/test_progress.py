"""Build progress read from Nix's own output."""

from __future__ import annotations

import asyncio

from nixery.layers.store import StoredLayer
from nixery.progress import Build, BuildLog, LayerCounter, NixLogProgress, Stage
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor


def test_nix_log_progress_counts_derivations() -> None:
    async def run() -> Build:
        build = Build(id="b1", image="shell/hello")
        progress = NixLogProgress(build)
        for line in [
            "these 2 derivations will be built:",
            "  /nix/store/aaa-hello.drv",
            "building '/nix/store/aaa-libwords-1.4.drv'...",
            "building '/nix/store/bbb-hello-2.12.1.drv'...",
        ]:
            progress(line)
        return build

    build = asyncio.run(run())
    assert build.stage is Stage.BUILDING
    assert build.events[-1].data == {"built": 2, "to_build": 2, "fetched": 0, "to_fetch": 0}


def test_singular_wording() -> None:
    async def run() -> NixLogProgress:
        progress = NixLogProgress(Build(id="b2", image="hello"))
        progress("this derivation will be built:")
        progress("this path will be fetched (0.01 MiB download, 0.05 MiB unpacked):")
        return progress

    progress = asyncio.run(run())
    assert (progress.to_build, progress.to_fetch) == (1, 1)


def test_followers_see_past_and_live_events_until_done() -> None:
    async def run() -> list[str]:
        build = Build(id="b3", image="hello")
        build.emit(Stage.EVALUATING, "evaluating")
        seen: list[str] = []

        async def follow() -> None:
            async for event in build.follow():
                seen.append(event.stage.value)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)
        build.emit(Stage.BUILDING, "building")
        build.emit(Stage.DONE, "done")
        build.emit(Stage.BUILDING, "ignored after the end")
        await asyncio.wait_for(follower, 5)
        return seen

    assert asyncio.run(run()) == ["evaluating", "building", "done"]


def _compressed(size: int, seconds: float) -> str:
    """The message of a layer of `size` bytes, compressed in `seconds`."""
    async def run() -> str:
        build = Build(id="b4", image="hello")
        digest = Digest("ab" * 32)
        LayerCounter(build, 1).count(StoredLayer(LayerDescriptor(digest, digest, size, "hello"), True, seconds))
        return build.events[-1].message

    return asyncio.run(run())


def test_a_layers_rate_is_in_the_unit_that_suits_it_or_left_out() -> None:
    """A small layer said `(0.0 MB, 0 MB/s)`: its size and rate are said in kB, or in B, and a
    layer compressed too fast to time has no rate."""
    assert _compressed(5_600, 0.5) == "compressed layer abababababab (5.6 kB, 11.2 kB/s)"
    assert _compressed(5_600, 0.002) == "compressed layer abababababab (5.6 kB)"
    assert _compressed(40, 0.2) == "compressed layer abababababab (40 B, 200 B/s)"
    assert _compressed(72_000_000, 2.0) == "compressed layer abababababab (72.0 MB, 36.0 MB/s)"


def test_a_build_keeps_the_tag_it_was_started_for() -> None:
    log = BuildLog()
    assert log.new("shell/hello", "v2").summary()["tag"] == "v2"
    assert log.new("shell/hello").tag == "latest"
