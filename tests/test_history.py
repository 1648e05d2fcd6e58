"""The layering history in storage (nixery/history.py): a build writes one small
entry instead of rewriting the whole history, processes on one storage share
their entries, and entries are folded into the snapshot now and then. Real
filesystem storage; the last test builds an image with real Nix (busybox set)."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery import config
from nixery.app import open_builder
from nixery.history import ENTRIES, SNAPSHOT, SharedHistory
from nixery.layers.grouping import DEFAULT_HISTORY_CAPACITY, LayerHistory
from nixery.registry.names import parse_image_name
from nixery.storage.filesystem import FilesystemStorage
from tests.test_catalog import longest_pause

BUSYBOX_SET = Path(__file__).resolve().parent.parent / "pkgs" / "busybox"


def layers(tag: str, count: int = 3, paths: int = 4) -> list[frozenset[str]]:
    return [frozenset(f"/nix/store/{tag}{i:03d}{j}-p" for j in range(paths)) for i in range(count)]


def seeded_history(count: int, seed: int = 1) -> LayerHistory:
    rng = random.Random(seed)
    history = LayerHistory()
    for n in range(count):
        history.record([frozenset(f"/nix/store/{rng.getrandbits(128):032x}-seed-{n}-{j}" for j in range(3))])
    return history


def entries(root: Path) -> list[Path]:
    directory = root / "meta" / ENTRIES
    return sorted(directory.iterdir()) if directory.exists() else []


async def test_a_recorded_plan_is_one_small_entry_and_the_snapshot_stays(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path / "storage")
    seeded = seeded_history(2000)
    await storage.put_meta(SNAPSHOT, seeded.to_json())  # the format stored histories have always had
    snapshot = (tmp_path / "storage" / "meta" / SNAPSHOT).read_bytes()

    history = SharedHistory(storage)
    loaded = await history.current()
    assert len(loaded) == 2000 and loaded.layers() == seeded.layers()
    plan = layers("a")
    await history.record(plan)

    assert (tmp_path / "storage" / "meta" / SNAPSHOT).read_bytes() == snapshot
    (entry,) = entries(tmp_path / "storage")
    assert sorted(map(frozenset, json.loads(entry.read_bytes())["layers"]), key=sorted) == sorted(plan, key=sorted)
    assert all(layer in loaded for layer in plan)


async def test_processes_on_one_storage_share_their_layers(tmp_path: Path) -> None:
    first = SharedHistory(FilesystemStorage(tmp_path / "storage"), refresh_interval=0)
    second = SharedHistory(FilesystemStorage(tmp_path / "storage"), refresh_interval=0)
    await first.record(layers("a"))
    await second.record(layers("b"))
    for history in (first, second):
        known = await history.current()
        assert all(layer in known for layer in layers("a") + layers("b"))
        assert len(known) == 6  # each entry applied once, its own included
    # A process started later loads them all.
    assert len(await SharedHistory(FilesystemStorage(tmp_path / "storage")).current()) == 6


def sizes_known(history: LayerHistory, plan: list[frozenset[str]]) -> list[int | None]:
    """The bytes `history` knows of each layer of `plan` (what a later plan weighs its paths
    outside a closure by)."""
    known = {layer: size for layer, _, _, _, size in history.overlapping({path for layer in plan for path in layer})}
    return [known.get(layer) for layer in plan]


async def test_the_bytes_of_recorded_layers_reach_other_processes_and_the_snapshot(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path / "storage")
    writer = SharedHistory(storage, refresh_interval=0, compact_after=2, fold_age=0)
    await writer.record(layers("a"), [100, None, 300])
    reader = SharedHistory(FilesystemStorage(tmp_path / "storage"), refresh_interval=0)
    assert sizes_known(await reader.current(), layers("a")) == [100, None, 300]
    await writer.record(layers("b"), [1, 2, 3])
    await asyncio.wait_for(_compaction_done(writer), 10)
    folded = LayerHistory.from_json((tmp_path / "storage" / "meta" / SNAPSHOT).read_bytes())
    assert sizes_known(folded, layers("a") + layers("b")) == [100, None, 300, 1, 2, 3]
    # An entry whose bytes do not match its layers is skipped, as any damaged entry.
    damaged = b'{"version": 1, "layers": [["x"]], "bytes": [1, 2]}'
    await storage.put_meta(ENTRIES + "00000000000000000002-damaged", damaged)
    assert frozenset({"x"}) not in await SharedHistory(FilesystemStorage(tmp_path / "storage")).current()


async def test_entries_are_folded_into_the_snapshot(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path / "storage")
    history = SharedHistory(storage, compact_after=3, fold_age=0)
    for tag in "abc":
        await history.record(layers(tag))
    await asyncio.wait_for(_compaction_done(history), 10)

    assert entries(tmp_path / "storage") == []
    folded = LayerHistory.from_json((tmp_path / "storage" / "meta" / SNAPSHOT).read_bytes())
    assert {layer for tag in "abc" for layer in layers(tag)} == set(folded.layers())
    later = await SharedHistory(FilesystemStorage(tmp_path / "storage")).current()
    assert set(later.layers()) == set(folded.layers())
    assert list((tmp_path / "storage" / "locks").iterdir()) == []


async def test_a_damaged_entry_or_snapshot_is_skipped(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path / "storage")
    await storage.put_meta(SNAPSHOT, b"{not json")
    await storage.put_meta(ENTRIES + "00000000000000000001-damaged", b'{"version": 1, "layers": [[1, 2]]}')
    writer = SharedHistory(storage)
    await writer.record(layers("a"))
    known = await SharedHistory(FilesystemStorage(tmp_path / "storage")).current()
    assert set(known.layers()) == set(layers("a"))


def full_history(seed: int = 2) -> LayerHistory:
    """A history at its cap (20,000 layers) of 1 to 19 paths each, from 150,000 store paths
    with long names: what a big registry holds, ~13 MB of JSON."""
    rng = random.Random(seed)
    paths = [
        f"/nix/store/{rng.getrandbits(160):040x}-python3.12-a-rather-long-package-name-{n}-1.2.3"
        for n in range(150_000)
    ]
    history = LayerHistory()
    for _ in range(DEFAULT_HISTORY_CAPACITY):
        history.record([frozenset(rng.sample(paths, rng.randint(1, 19)))])
    return history


async def test_a_large_snapshot_is_read_while_the_event_loop_answers(tmp_path: Path) -> None:
    """The snapshot of a full history is decoded a layer at a time in a thread: the event loop
    is never held for a third of what json.loads of the snapshot takes. (It was held about that
    long, 0.03 s of 0.045 s here: json.loads, even in a thread, holds the interpreter for the
    whole document.)"""
    storage = FilesystemStorage(tmp_path / "storage")
    stored = full_history()
    snapshot = stored.to_json()
    assert snapshot == json.dumps(json.loads(snapshot), separators=(",", ":")).encode()  # the format it always had
    await storage.put_meta(SNAPSHOT, snapshot)
    parse = min(_timed(json.loads, snapshot) for _ in range(3))

    # What is measured is the loader's own holding of the interpreter, the least of three
    # loadings (other processes on the machine add their own pauses). Collections pause every
    # thread for as long as they walk the heap, whoever allocates (pytest's too): they are
    # left out. A shorter switch interval (5 ms by default) gives the loop the interpreter
    # back soon after it asks for it.
    switch_interval = sys.getswitchinterval()
    gc.collect()
    gc.disable()
    sys.setswitchinterval(0.001)
    try:
        pauses = []
        for _ in range(3):
            loaded, pause, took = await longest_pause(SharedHistory(storage).current(), tick=0.001)
            assert loaded.layers() == stored.layers()
            pauses.append(pause)
    finally:
        sys.setswitchinterval(switch_interval)
        gc.enable()
    held = ", ".join(f"{pause:.3f}" for pause in pauses)
    assert min(pauses) < parse / 3, f"the loop was held {held} s; json.loads takes {parse:.3f} s, loading {took:.3f} s"


def _timed(work: Callable[[bytes], object], data: bytes) -> float:
    started = time.monotonic()
    work(data)
    return time.monotonic() - started


async def _compaction_done(history: SharedHistory) -> None:
    while history._compactions:
        await asyncio.sleep(0.01)


@pytest.mark.nix
async def test_a_build_leaves_the_stored_history_as_it_was_and_adds_its_layers(tmp_path: Path) -> None:
    settings = config.load(
        {"NIXERY_PKGS_PATH": str(BUSYBOX_SET), "STORAGE_PATH": str(tmp_path / "storage"),
         "NIXERY_NIX_EVALUATOR": "process"}
    )
    storage = FilesystemStorage(settings.storage_path)
    await storage.put_meta(SNAPSHOT, seeded_history(5000).to_json())
    snapshot = (settings.storage_path / "meta" / SNAPSHOT).read_bytes()
    builder = open_builder(settings, storage)
    try:
        record = await builder.image(parse_image_name("figlet/fortune"), "latest")
    finally:
        await builder.close()

    assert (settings.storage_path / "meta" / SNAPSHOT).read_bytes() == snapshot
    (entry,) = entries(settings.storage_path)
    recorded = {frozenset(layer) for layer in json.loads(entry.read_bytes())["layers"]}
    assert recorded == {frozenset(paths) for paths in record.layer_paths if paths}
