"""Layers are written in worker processes: the same bytes as in this process,
a worker that dies is replaced, and threads take over where processes cannot start;
closing the layer store stops the compressions that stopped builds left."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from nixery.layers import writers as writers_module
from nixery.layers.store import LayerStore
from nixery.layers.tarball import Entry, LayerBlob, write_entry_layer, write_store_layer
from nixery.layers.writers import LayerWriters
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import Compression
from nixery.storage.filesystem import FilesystemStorage
from tests.daemons import gone, process_tree
from tests.registry import RegistryProcess


def pid_layer(handle: BinaryIO) -> LayerBlob:
    """Not a layer: writes the pid of the process that ran it."""
    data = str(os.getpid()).encode()
    handle.write(data)
    return LayerBlob(Digest.of(data), Digest.of(data), len(data))


def die_once(marker: str, store_path: str, handle: BinaryIO) -> LayerBlob:
    """Killed the first time, as the OOM killer would; a layer of `store_path` the second."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return write_store_layer([store_path], handle)


@pytest.fixture
async def writers():
    pool = LayerWriters(2)
    yield pool
    await pool.close()


async def test_layers_are_written_in_other_processes_with_the_same_bytes(
    writers, tmp_path: Path, built_store_paths: dict[str, str]
) -> None:
    busybox = built_store_paths["busybox"]
    await writers.write(tmp_path / "pid", pid_layer)
    assert int((tmp_path / "pid").read_text()) != os.getpid()
    assert writers.in_processes

    entries = [Entry("bin", "dir", 0o755), Entry("bin/sh", "symlink", target=f"{busybox}/bin/sh")]
    for name, write in [
        ("store", functools.partial(write_store_layer, [busybox])),
        ("entries", functools.partial(write_entry_layer, entries)),
    ]:
        blob = await writers.write(tmp_path / f"{name}.tar.gz", write)
        with open(tmp_path / f"{name}-here.tar.gz", "wb") as handle:
            here = write(handle)
        assert blob == here
        assert (tmp_path / f"{name}.tar.gz").read_bytes() == (tmp_path / f"{name}-here.tar.gz").read_bytes()


async def test_a_killed_worker_is_replaced_and_the_layer_written_again(
    writers, tmp_path: Path, built_store_paths: dict[str, str]
) -> None:
    busybox = built_store_paths["busybox"]
    marker = tmp_path / "killed"
    blob = await writers.write(tmp_path / "layer", functools.partial(die_once, str(marker), busybox))
    assert marker.exists(), "the first worker was not killed"
    with open(tmp_path / "expected", "wb") as handle:
        assert blob == write_store_layer([busybox], handle)
    assert writers.in_processes
    await writers.write(tmp_path / "pid", pid_layer)  # the new workers keep serving
    assert int((tmp_path / "pid").read_text()) not in (os.getpid(), int(marker.read_text()))


async def test_threads_write_where_processes_cannot_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_semaphores(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory: /dev/shm (injected)")

    monkeypatch.setattr(writers_module, "ProcessPoolExecutor", no_semaphores)
    pool = LayerWriters(2)
    try:
        pool.start()
        await pool.write(tmp_path / "pid", pid_layer)
    finally:
        await pool.close()
    assert int((tmp_path / "pid").read_text()) == os.getpid()
    assert not pool.in_processes


class HeldLookups(FilesystemStorage):
    """Filesystem storage whose record look-ups wait for `release`."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.looking = asyncio.Event()
        self.release = asyncio.Event()

    async def get_meta(self, key: str) -> bytes | None:
        self.looking.set()
        await self.release.wait()
        return await super().get_meta(key)


async def test_a_compression_its_build_left_ends_with_the_layer_store(
    tmp_path: Path, built_store_paths: dict[str, str]
) -> None:
    """A layer's compression is shared by the builds that need it, so a stopped build (Ctrl-C in
    `nixery build --local`) left it going, past the layer store's and the storage's close: it made
    the storage's staging directory again, staged its layer there and started new writer processes,
    and the directory stayed behind. Now closing the layer store stops it."""
    storage = HeldLookups(tmp_path / "storage")
    layers = LayerStore(storage, compression=Compression.GZIP, workers=1)
    build = asyncio.ensure_future(layers.store_paths([built_store_paths["busybox"]]))
    await asyncio.wait_for(storage.looking.wait(), 30)  # is the layer stored already?
    build.cancel()
    await asyncio.wait_for(layers.close(), 30)
    await storage.close()
    storage.release.set()  # what was left waiting goes on now
    left = asyncio.all_tasks() - {asyncio.current_task()}
    if left:
        await asyncio.wait(left, timeout=30)
    assert list((tmp_path / "storage" / "tmp").iterdir()) == []


async def test_a_start_that_comes_after_the_close_starts_no_worker() -> None:
    """Workers start in a thread, which goes on when its caller (a stopped build's compression) is
    cancelled: one that came after the close started a new pool of worker processes that nothing
    stopped, and one under way was shut down as it started (tracebacks as the interpreter exited).
    Now the close waits for a start under way, and a later one starts nothing."""
    writers = LayerWriters(2)
    await writers.close()
    before = set(process_tree(os.getpid()))
    await asyncio.to_thread(writers.start)
    assert set(process_tree(os.getpid())) - before == set()
    with pytest.raises(RuntimeError, match="closed"):
        await writers.write(Path(os.devnull), pid_layer)


def test_no_process_outlives_a_killed_registry(tmp_path: Path) -> None:
    """After `kill -9` of the registry, its layer writers, their fork server and the
    Nix evaluator exit too (nothing is left to pile up across restarts)."""
    registry = RegistryProcess(storage=tmp_path / "storage", env={"NIXERY_BUNDLED_SET": "busybox"}).start()
    try:
        registry.manifest("shell/hello")  # layers written in the workers
        children = [pid for pid in process_tree(registry.process.pid) if pid != registry.process.pid]
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        assert sum(b"multiprocessing.forkserver" in command for command in commands) >= 2, commands
    finally:
        registry.process.send_signal(signal.SIGKILL)
        registry.process.wait()
    alive = still_running(children)
    assert alive == [], [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in alive]


def test_a_stopped_registry_of_two_processes_leaves_nothing_behind(tmp_path: Path) -> None:
    """SIGTERM with NIXERY_WORKERS=2 (each process leaves by os._exit): every writer
    exits, and multiprocessing has no leaked semaphore to warn about in the log."""
    registry = RegistryProcess(
        storage=tmp_path / "storage", env={"NIXERY_BUNDLED_SET": "busybox", "NIXERY_WORKERS": "2"}
    ).start()
    try:
        registry.manifest("shell/hello")
        children = [pid for pid in process_tree(registry.process.pid) if pid != registry.process.pid]
    finally:
        registry.stop()
    assert still_running(children) == []
    assert "leaked" not in registry.log() and "Traceback" not in registry.log(), registry.log()[-2000:]


def still_running(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Those of `pids` still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if not gone(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive
