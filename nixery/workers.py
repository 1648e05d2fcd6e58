"""The worker processes of one `nixery serve` with NIXERY_WORKERS above 1, and the parent that
supervises them.

Each worker accepts on sockets of its own on the shared port (SO_REUSEPORT: the kernel spreads
connections). The parent starts them, forwards SIGTERM, SIGINT and SIGHUP (each stops a worker
gracefully: `nixery.http.server`), and replaces a worker that ends while the registry serves (a
crash, the OOM killer, `kill -9`) by a new one on newly bound sockets: a closed socket leaves the
group, so no connection waits on a dead worker. Workers that
keep ending within WORKER_MIN_LIFETIME of their start are restarted after a growing delay; the
QUICK_ENDS_LIMIT-th such end within QUICK_ENDS_WINDOW stops the registry (status 1, one line).

A worker that cannot start (it ends before it listens) stops the others: the registry as a whole
could not start, or a replacement could not say why (a setting or storage it cannot use). The signals
are blocked from before the first fork (`blocked_signals`): a SIGTERM during start-up stops the
workers already started, and the parent's directories go with it.
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import socket

log = structlog.get_logger(__name__)

#: Exit status of a worker that could not start and said why through the reasons pipe.
STARTUP_FAILED = 2

#: A worker that ends sooner than this after its start counts as a quick end.
WORKER_MIN_LIFETIME = 10.0
#: This many quick ends within QUICK_ENDS_WINDOW seconds stop the registry...
QUICK_ENDS_LIMIT = 3
QUICK_ENDS_WINDOW = 60.0
#: ...and before that, the n-th is replaced after RESTART_DELAY * 2**(n-1) seconds (not at once).
RESTART_DELAY = 1.0

#: SIGHUP too (a closed terminal, an init system's "reload"): the registry has nothing to reload, and
#: the default action ended the parent alone, leaving its workers serving without a supervisor.
_STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_WATCHED = {*_STOPPING, signal.SIGCHLD}

#: What a worker runs: serve on its sockets, calling `listening` once they accept; None once
#: stopped, or the one line saying why it could not start.
Serve = Callable[[list["socket.socket"], Callable[[], object]], "str | None"]


@contextlib.contextmanager
def blocked_signals() -> Iterator[None]:
    """SIGTERM, SIGINT, SIGHUP and SIGCHLD held back until `supervise` waits for them: one that comes while
    the parent starts (makes directories, binds, forks) is acted on once it can stop the workers."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_when_gone(parent: int) -> None:
    """In a worker: stop (as on SIGHUP: in-flight requests finish, without the drain delay) once
    the parent has ended, however it ended.

    A parent killed by `kill -9` or the OOM killer forwards no signal: its workers served on
    without a supervisor for as long as the machine ran, on the port a restarted registry then
    shared with them (SO_REUSEPORT), answering part of its connections with the old code and
    settings. A pidfd becomes readable when its process ends, even one that ended already.
    """
    if os.getppid() != parent:  # gone already (its pid may even be another process's by now)
        os.kill(os.getpid(), signal.SIGHUP)
        return
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:  # gone (and reaped) already
        os.kill(os.getpid(), signal.SIGHUP)
        return
    except (AttributeError, OSError):  # no pidfd (not Linux): as before
        return
    threading.Thread(target=_signal_when_readable, args=(pidfd,), name="parent-watch", daemon=True).start()


def _signal_when_readable(pidfd: int) -> None:
    select.select([pidfd], [], [])  # readable once the parent has ended
    log.warning("worker.parent_gone", note="the parent process ended without stopping its workers: stopping")
    os.kill(os.getpid(), signal.SIGHUP)


@dataclass
class _Worker:
    pid: int
    started: float
    replaces: int | None
    scratch: str  # its temporary directory, removed when it ends


@dataclass
class _Supervisor:
    serve: Serve
    addresses: list[tuple[int, Any]]
    reasons: tuple[int, int] = field(default_factory=os.pipe)
    ready: tuple[int, int] = field(default_factory=os.pipe)
    workers: dict[int, _Worker] = field(default_factory=dict)
    listening: set[int] = field(default_factory=set)
    quick_ends: list[float] = field(default_factory=list)
    restarts: list[tuple[float, int]] = field(default_factory=list)  # (when, pid of the worker replaced)
    stopping: signal.Signals | None = None
    status: int = 0
    problem: str | None = None

    def start(self, sockets: list[socket.socket], replaces: int | None = None,
              others: Sequence[list[socket.socket]] = ()) -> None:
        """A worker on `sockets` (closed here: the worker holds its own). `others`, the sets of
        workers still to start, are closed in it: a socket whose worker ended must not stay open
        (and get connections) in another."""
        from nixery.http import server

        # The worker's temporary files (its evaluators' directories, multiprocessing's pymp-*) go in
        # a directory of its own, removed here when it ends however it ends: a worker killed by
        # the OOM killer or `kill -9` removes nothing itself.
        scratch = tempfile.mkdtemp(prefix="worker-")  # in nixery-run-* (nixery.scratch)
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            shutil.rmtree(scratch, ignore_errors=True)
            server.close_all([sockets])
            raise
        if pid == 0:
            tempfile.tempdir = scratch  # for this process's tempfile calls, not its children's TMPDIR
            server.close_all(others)
            self._run_worker(sockets, parent)
        server.close_all([sockets])
        self.workers[pid] = _Worker(pid, time.monotonic(), replaces, scratch)
        if replaces is not None:
            log.info("worker.started", pid=pid, replaces=replaces)

    def _run_worker(self, sockets: list[socket.socket], parent: int) -> None:
        status = 1  # an exception out of serving: its traceback, and status 1, as one process ends
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED)
            _stop_when_gone(parent)
            os.close(self.reasons[0])
            os.close(self.ready[0])

            def listening() -> None:  # the parent tells a worker that ends from one that could not start
                os.write(self.ready[1], f"{os.getpid()}\n".encode())

            if (problem := self.serve(sockets, listening)) is not None:
                os.write(self.reasons[1], f"{problem}\n".encode())
                status = STARTUP_FAILED
            else:
                status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            # os._exit runs no exit handlers: multiprocessing's removes its temporary directory
            # (pymp-*, the layer writers' socket), which TMPDIR kept, one per worker per stop.
            with contextlib.suppress(Exception):
                multiprocessing.util._run_finalizers()  # type: ignore[attr-defined]  # as its atexit handler does
            os._exit(status)

    def stop(self, signum: signal.Signals) -> None:
        if self.stopping is None:
            self.stopping = signum
            self.restarts.clear()
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def wait(self) -> None:
        """Until a signal comes or the next restart is due; acts on the signals."""
        timeout = max(0.0, min(when for when, _ in self.restarts) - time.monotonic()) if self.restarts else None
        info = signal.sigtimedwait(_WATCHED, timeout) if timeout is not None else signal.sigwaitinfo(_WATCHED)
        received = {info.si_signo} if info is not None else set()
        received |= signal.sigpending() & set(_STOPPING)  # a stop comes first, whatever came with it
        for signum in received & set(_STOPPING):
            signal.sigtimedwait([signum], 0)
            self.stop(signal.Signals(signum))

    def reap(self) -> None:
        self._read_ready()
        while self.workers:
            pid, code = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                shutil.rmtree(worker.scratch, ignore_errors=True)
                self._ended(worker, os.waitstatus_to_exitcode(code))

    def _read_ready(self) -> None:
        os.set_blocking(self.ready[0], False)
        with contextlib.suppress(BlockingIOError):
            self.listening.update(int(pid) for pid in os.read(self.ready[0], 65536).split())

    def _ended(self, worker: _Worker, code: int) -> None:
        from nixery import metrics

        metrics.process_ended(worker.pid)  # its gauges no longer count (builds it was running)
        if self.stopping is not None:
            if code not in (0, -self.stopping):  # ended by the signal forwarded: stopped as asked
                self.status = self.status or code
            return
        if worker.pid not in self.listening and (worker.replaces is None or code == STARTUP_FAILED):
            # It could not start: nor can the registry (a replacement killed while it started is
            # a quick end, below).
            self.status = self.status or code
            self.stop(signal.SIGTERM)
            return
        self.listening.discard(worker.pid)
        now = time.monotonic()
        lived = now - worker.started
        if lived < WORKER_MIN_LIFETIME:
            self.quick_ends = [when for when in self.quick_ends if now - when < QUICK_ENDS_WINDOW] + [now]
        ended = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        if len(self.quick_ends) >= QUICK_ENDS_LIMIT:
            log.error("worker.ended", pid=worker.pid, ended=ended, lived=round(lived, 1), replaced=False)
            self.problem = (f"nixery: {len(self.quick_ends)} workers ended within {WORKER_MIN_LIFETIME:g} s of "
                            f"starting (the last, pid {worker.pid}: {ended}): stopping the registry")
            self.status = 1
            self.stop(signal.SIGTERM)
            return
        delay = RESTART_DELAY * 2 ** (len(self.quick_ends) - 1) if lived < WORKER_MIN_LIFETIME else 0.0
        log.error("worker.ended", pid=worker.pid, ended=ended, lived=round(lived, 1), replaced_in=delay)
        self.restarts.append((now + delay, worker.pid))

    def restart_due(self) -> None:
        from nixery.http import server

        now = time.monotonic()
        for due in [restart for restart in self.restarts if restart[0] <= now]:
            self.restarts.remove(due)
            try:
                self.start(server.listen_on(self.addresses), replaces=due[1])
            except (OSError, server.ListenError) as exc:  # no fork, no socket: the registry stops
                self.problem = f"nixery: cannot replace worker {due[1]}: {exc}"
                self.status = 1
                self.stop(signal.SIGTERM)
                return

    def close(self) -> list[str]:
        """The reasons the workers gave for not starting, once all have ended."""
        os.close(self.reasons[1])
        os.close(self.ready[0])
        os.close(self.ready[1])
        with os.fdopen(self.reasons[0], "rb") as pipe:
            return pipe.read().decode(errors="replace").splitlines()


def supervise(serve: Serve, sockets: Sequence[list[socket.socket]]) -> int:
    """Run a worker on each set of `sockets` (from `server.listen`) until stopped; its status.
    To be called inside `blocked_signals`."""
    from nixery.http import server

    supervisor = _Supervisor(serve, server.bound_addresses(sockets[0]))
    remaining = list(sockets)
    try:
        while remaining:
            supervisor.start(remaining.pop(0), others=remaining)
            if signal.sigpending() & set(_STOPPING):
                break  # stopped while starting: the rest is not started
    except OSError as exc:  # fork failed: those started are stopped
        supervisor.problem = f"nixery: cannot start worker {len(sockets) - len(remaining)} of {len(sockets)}: {exc}"
        supervisor.status = 1
        supervisor.stop(signal.SIGTERM)
    finally:
        server.close_all(remaining)
    while supervisor.workers or supervisor.restarts:  # all may have died, their replacements due
        supervisor.wait()
        supervisor.reap()
        if supervisor.stopping is None:
            supervisor.restart_due()
    problems = supervisor.close()
    if supervisor.problem or problems:
        print(supervisor.problem or problems[0], file=sys.stderr)
    return supervisor.status
