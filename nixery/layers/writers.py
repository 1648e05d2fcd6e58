"""Where layer tarballs are written: worker processes, one per core.

Writing a layer is CPU work in two parts: compressing and hashing, which
release the interpreter lock, and making the tar headers, ~20 µs of Python per
file, which does not. In threads, the headers of every layer being written and
the server's own event loop share one lock, so a layer of many files held
back the others and the requests being served, and a thread waiting for the
lock after each compressed piece lost up to the interpreter's 5 ms switch
interval. In processes each layer has its own interpreter: a small image's
build was ~10 % quicker here, and a large one's headers use every core.

The processes are forked by a fork server that imports only the tarball
module (`nixery.layers.tarball`, ~19 MB resident, mostly shared), never the
server with its threads and sockets; they exit when the server does, even
after a `kill -9`. A pool whose process dies (the OOM killer, a signal) is
replaced, and the layer written again once; if processes cannot be started
at all (no /dev/shm for their semaphores, say), threads do the work and a
warning says so.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import BinaryIO

import structlog

from nixery.layers.tarball import LayerBlob

log = structlog.get_logger(__name__)

_PRELOAD = ["nixery.layers.tarball"]

#: Writes one layer's bytes to an open file: a picklable callable (a partial of a
#: module-level function), as it is sent to a worker process.
LayerWrite = Callable[[BinaryIO], LayerBlob]


def write_file(path: Path, write: LayerWrite) -> LayerBlob:
    """Run `write` on a new file at `path` (in a worker)."""
    with open(path, "wb") as handle:
        return write(handle)


def _ready(_: int) -> None:
    """A task that only makes the pool start a worker."""


def _exit_with(server_pid: int) -> None:
    """In each worker: exit when the server does, even when it is killed.

    The pool stops its workers only while the server runs; after a `kill -9`
    they would wait for work forever (each holds both ends of its queue).
    """
    try:
        pidfd = os.pidfd_open(server_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux): left to the pool
        return
    threading.Thread(target=_exit_when_readable, args=(pidfd,), name="server-watch", daemon=True).start()


def _exit_when_readable(pidfd: int) -> None:
    select.select([pidfd], [], [])  # readable once the process has exited
    os._exit(1)


class LayerWriters:
    def __init__(self, workers: int, *, processes: bool = True):
        self.workers = workers
        self._processes = processes
        self._pool: Executor | None = None
        self._creating = threading.Lock()  # `start` runs in a thread, `write` on the event loop

    @property
    def in_processes(self) -> bool:
        return self._processes

    def start(self) -> None:
        """Start the workers now rather than on the first layer (blocking: run it in a thread)."""
        pool = self._current()
        try:
            list(pool.map(_ready, range(self.workers)))
        except (OSError, BrokenProcessPool) as exc:
            self._use_threads(pool, exc)

    async def write(self, path: Path, write: LayerWrite) -> LayerBlob:
        """Write a layer to the file at `path`, in a worker."""
        pool = self._current()
        try:
            return await self._submit(pool, path, write)
        except BrokenProcessPool as exc:
            log.warning("layers.writer_died", error=str(exc)[:200], note="new workers write it again")
            self._replace(pool)
            return await self._submit(self._current(), path, write)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _submit(self, pool: Executor, path: Path, write: LayerWrite) -> asyncio.Future[LayerBlob]:
        loop = asyncio.get_running_loop()
        try:  # starting a worker process happens here, before the layer is written
            return loop.run_in_executor(pool, write_file, path, write)
        except OSError as exc:
            if pool is not self._pool or not self._processes:
                raise
            self._use_threads(pool, exc)
            return loop.run_in_executor(self._current(), write_file, path, write)

    def _current(self) -> Executor:
        with self._creating:
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool

    def _new_pool(self) -> Executor:
        if self._processes:
            try:  # its queues' semaphores are made here
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(_PRELOAD)
                return ProcessPoolExecutor(
                    self.workers, mp_context=context, initializer=_exit_with, initargs=(os.getpid(),)
                )
            except OSError as exc:
                self._use_threads(None, exc)
        return ThreadPoolExecutor(self.workers, thread_name_prefix="layer-writer")

    def _replace(self, broken: Executor) -> None:
        if self._pool is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _use_threads(self, pool: Executor | None, exc: BaseException) -> None:
        if self._processes:
            log.warning("layers.writers_in_threads", error=str(exc)[:200], note="worker processes could not start")
        self._processes = False
        if pool is not None:
            self._replace(pool)
