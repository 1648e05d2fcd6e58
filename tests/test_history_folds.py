"""Layers another process folds into the snapshot of the layering history reach every
process (nixery/history.py), on real filesystem storage.

Before, a process read the snapshot once, at start-up, and then only entries: one that
loaded while another process folded entries (the old snapshot read before, the entries
listed after), or that planned no image for FOLD_AGE while another folded entries it had
not read, never saw those layers, and made them again for as long as it ran. Now each
refresh reads the snapshot's generation (one small read) and reads the snapshot again when
it changed. The moment that matters is forced: a read of the snapshot that answers late,
a compaction done at once (fold_age=0 stands for the minute passing).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from nixery.history import SNAPSHOT, SharedHistory
from nixery.storage.filesystem import FilesystemStorage
from tests.test_history import entries, layers


class SlowSnapshotRead(FilesystemStorage):
    """Counts the reads of metadata; the snapshot's answers wait for `gate`."""

    gate: asyncio.Event | None = None

    def __init__(self, root: Path):
        super().__init__(root)
        self.reads: list[str] = []

    async def get_meta(self, key: str) -> bytes | None:
        self.reads.append(key)
        data = await super().get_meta(key)
        if key == SNAPSHOT and self.gate is not None:
            await self.gate.wait()  # read; the process is slow to go on (a busy loop, a big document)
        return data


def known(history_layers: object, *tags: str) -> bool:
    return all(layer in history_layers for tag in tags for layer in layers(tag))  # type: ignore[operator]


async def test_a_process_that_loads_while_another_folds_the_entries_gets_their_layers(tmp_path: Path) -> None:
    folder = SharedHistory(FilesystemStorage(tmp_path / "storage"), compact_after=10**9, fold_age=0)
    for tag in "abc":
        await folder.record(layers(tag))
    storage = SlowSnapshotRead(tmp_path / "storage")
    storage.gate = asyncio.Event()
    loader = SharedHistory(storage, refresh_interval=0)
    loading = asyncio.ensure_future(loader.current())  # a replica starts
    await asyncio.sleep(0.05)
    folder._compact_after = 3  # the other folds its entries (as it does once 500 are a minute old)
    await folder._compact()
    assert entries(tmp_path / "storage") == []
    storage.gate.set()
    loaded = await loading
    storage.gate = None

    assert known(loaded, "a", "b", "c") and len(loaded) == 9, "loaded with the folded layers"
    assert len(await loader.current()) == 9


async def test_an_idle_process_gets_the_layers_folded_meanwhile(tmp_path: Path) -> None:
    folder = SharedHistory(FilesystemStorage(tmp_path / "storage"), compact_after=3, fold_age=0)
    for tag in "abc":
        await folder.record(layers(tag))
    while folder._compactions:
        await asyncio.sleep(0.01)
    idle = SharedHistory(FilesystemStorage(tmp_path / "storage"), refresh_interval=0)
    assert len(await idle.current()) == 9
    for tag in "def":  # while the idle one plans nothing: recorded, and folded
        await folder.record(layers(tag))
    while folder._compactions:
        await asyncio.sleep(0.01)
    assert entries(tmp_path / "storage") == []

    now = await idle.current()
    assert known(now, *"abcdef") and len(now) == 18
    assert len(await SharedHistory(FilesystemStorage(tmp_path / "storage")).current()) == 18


async def test_a_refresh_reads_one_small_document_more_and_the_snapshot_only_when_it_changed(tmp_path: Path) -> None:
    storage = SlowSnapshotRead(tmp_path / "storage")
    history = SharedHistory(storage, refresh_interval=0, compact_after=2, fold_age=0)
    other = SharedHistory(FilesystemStorage(tmp_path / "storage"), refresh_interval=0)
    await history.current()
    await other.record(layers("a"))
    storage.reads.clear()
    assert known(await history.current(), "a")
    assert storage.reads.count(SNAPSHOT) == 0 and len(storage.reads) == 2, storage.reads  # generation, entry
    storage.reads.clear()
    await history.current()
    assert len(storage.reads) == 1, storage.reads  # nothing new: the generation only

    await history.record(layers("b"))  # this process folds "a" and "b": it holds them, no need to read them back
    while history._compactions:
        await asyncio.sleep(0.01)
    assert entries(tmp_path / "storage") == []
    storage.reads.clear()
    assert known(await history.current(), "a", "b") and SNAPSHOT not in storage.reads
    storage.reads.clear()
    assert known(await other.current(), "a", "b") and len(await other.current()) == 6


async def test_a_process_s_own_entries_written_while_it_reads_the_snapshot_again_are_kept(tmp_path: Path) -> None:
    folder = SharedHistory(FilesystemStorage(tmp_path / "storage"), compact_after=1, fold_age=0)
    storage = SlowSnapshotRead(tmp_path / "storage")
    history = SharedHistory(storage, refresh_interval=0)
    await history.current()
    await folder.record(layers("a"))  # folded at once: a new generation
    while folder._compactions:
        await asyncio.sleep(0.01)
    storage.gate = asyncio.Event()
    reloading = asyncio.ensure_future(history.current())
    await asyncio.sleep(0.05)
    await history.record(layers("b"))  # a build of this process ends meanwhile
    storage.gate.set()
    now = await reloading
    storage.gate = None
    assert known(now, "a", "b") and len(now) == 6
    assert known(await history.current(), "a", "b") and len(await history.current()) == 6
