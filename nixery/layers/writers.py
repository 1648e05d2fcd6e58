"""Where layer tarballs are written: worker processes, one per core.

Writing a layer is CPU work in two parts: compressing and hashing, which
release the interpreter lock, and making the tar headers, ~20 µs of Python per
file, which does not. In threads, the headers of every layer being written and
the server's own event loop share one lock, so a layer of many files held
back the others and the requests being served, and a thread waiting for the
lock after each compressed piece could lose the interpreter's 5 ms switch
interval. In processes each layer has its own interpreter (python3 of the
Debian set built ~15 % quicker here), and on more cores the headers of many
layers are made at once. The image's entry points (pure Python too) are
worked out there as well. A layer costs ~3 ms more in a process (its
arguments and result cross a pipe); no image here was slower for it.

The processes are forked by a fork server that imports only the layer
modules (the tarball writer and the entry points, ~20 MB resident, mostly
shared), never the server with its threads and sockets; they exit when the server does, even
after a `kill -9`. As with any multiprocessing worker, each imports the
server's main script under another name first: `python -m nixery` is
skipped, and the `nixery` console script only runs under `__main__`. A pool
whose process dies (the OOM killer, a signal) is replaced, and the layer
written again once; if processes cannot be started at all (no /dev/shm for
their semaphores, say), threads do the work and a warning says so.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import structlog

from nixery.layers.tarball import LayerBlob
from nixery.storage.base import raising_storage_full

log = structlog.get_logger(__name__)

# What the workers run, imported once by the fork server rather than by each worker.
_PRELOAD = ["nixery.layers.writers", "nixery.layers.tarball", "nixery.layers.entrypoints", "nixery.layers.rootlinks"]
T = TypeVar("T")

#: Writes one layer's bytes to an open file: a picklable callable (a partial of a
#: module-level function), as it is sent to a worker process.
LayerWrite = Callable[[BinaryIO], LayerBlob]


#: What multiprocessing's resource tracker prints, in plain text into the JSON log, when it
#: frees the semaphores of a pool whose server process was killed (`worker.ended` says that).
_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"  # -W: the message's start (no colons)


def _quiet_resource_tracker() -> None:
    """The tracker is started, with this interpreter's -W options, when the first pool makes
    its semaphores: it takes the filter from there (its leak warnings are its only output)."""
    if _TRACKER_WARNING not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_WARNING)


def write_file(path: Path, write: Callable[[BinaryIO], T]) -> T:
    """Run `write` on a new file at `path` (in a worker). `path` is in the storage's
    staging directory: a full disk there is the storage's StorageFull."""
    with raising_storage_full(f"the storage's staging directory {path.parent}"), open(path, "wb") as handle:
        return write(handle)


def _ready(_: int) -> None:
    """A task that only makes the pool start a worker."""


def _exit_with(server_pid: int) -> None:
    """In each worker: exit when the server does, even when it is killed.

    The pool stops its workers only while the server runs; after a `kill -9`
    they would wait for work forever (each holds both ends of its queue).

    Ctrl-C reaches every process of the terminal's process group: the workers
    ignore it (each printed a KeyboardInterrupt traceback), and the server, which
    stops on it, stops them.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked until here: see LayerWriters.start
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
    """A pool of layer writers, started once and replaced when one of its processes dies."""

    def __init__(self, workers: int, *, processes: bool = True):
        self.workers = workers
        self._processes = processes
        self._pool: Executor | None = None
        self._started: Executor | None = None  # the pool whose workers all run
        self._creating = threading.Lock()  # pools are made in threads and on the event loop
        self._starting = threading.Lock()
        self._closed = False

    @property
    def in_processes(self) -> bool:
        return self._processes

    def start(self) -> None:
        """Start every worker of the pool (blocking: starting processes talks to the fork server)."""
        with self._starting:
            if self._closed:  # a start whose caller was cancelled, let go on in its thread: nothing to start
                return
            pool = self._current()
            if pool is self._started:
                return
            began = time.monotonic()
            # The fork server starts here, and its workers are forked from it with its signal mask:
            # SIGINT blocked, until each ignores it (_exit_with), so that a Ctrl-C while they start
            # does not end one before it can.
            unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                list(pool.map(_ready, range(self.workers)))
            except Exception as exc:  # OSError, BrokenProcessPool, multiprocessing's RuntimeErrors
                self._use_threads(pool, exc)
                pool = self._current()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
            self._started = pool
            log.info("layers.writers_ready", workers=self.workers, processes=self._processes,
                     seconds=round(time.monotonic() - began, 3))

    async def write(self, path: Path, write: LayerWrite) -> LayerBlob:
        """Write a layer to the file at `path`, in a worker."""
        return await self.run(write_file, path, write)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` in a worker: a module-level function, picklable arguments and result."""
        pool = await self._running_pool()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, func, *args)
        except BrokenProcessPool as exc:
            log.warning("layers.writer_died", error=str(exc)[:200], note="new workers do it again")
            self._replace(pool)
            pool = await self._running_pool()
            return await asyncio.get_running_loop().run_in_executor(pool, func, *args)

    async def close(self) -> None:
        """Stop the workers once their current layers are written.

        Waited for (in a thread): a server process that leaves by `os._exit`
        (`NIXERY_WORKERS` > 1) would otherwise leave the pool's semaphores to
        multiprocessing's resource tracker, which warns about them.
        """
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        # After any start under way: one whose caller was cancelled goes on in its thread, and a
        # pool shut down while it started broke it (tracebacks as the interpreter exited).
        with self._starting:
            self._closed = True
            with self._creating:
                pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    async def _running_pool(self) -> Executor:
        """The pool, its workers started off the event loop (a pool starts them on demand,
        in the submitting thread, and the first one waits for the fork server to start)."""
        if self._pool is None or self._pool is not self._started:
            await asyncio.to_thread(self.start)
        return self._current()

    def _current(self) -> Executor:
        with self._creating:
            if self._closed:
                raise RuntimeError("the layer writers are closed")
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool

    def _new_pool(self) -> Executor:
        if self._processes:
            _quiet_resource_tracker()
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
        with self._creating:
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _use_threads(self, pool: Executor | None, exc: BaseException) -> None:
        if self._processes:
            log.warning("layers.writers_in_threads", error=str(exc)[:200], note="worker processes could not start")
        self._processes = False
        if pool is not None:
            self._replace(pool)
