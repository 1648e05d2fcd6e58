"""Running Nix commands without blocking the event loop, within bounds, and killing them whole.

- Time: one `Deadline` (NIX_TIMEOUT) covers all the Nix work of an image,
  however many processes it takes (waiting for the repl, evaluating, a
  `nix-instantiate` in its place, building, reading the closure); each
  process gets what is left of it.
- Memory: an evaluation's resident memory is read every 0.1 s, and the
  process is killed once it passes the limit (NIXERY_EVALUATOR_MEMORY_MB).
  Builds are not bounded: their builders are the package set's programs.
- A timeout, the memory limit or a cancellation kills Nix and every process
  below it. Each command runs in its own session, but Nix starts builders in
  process groups of their own, so killing Nix's group alone would leave them
  running: the tree is frozen (SIGSTOP) until no new process appears, then
  killed.
- Nix dies with the server, even after a `kill -9`: the kernel sends each
  Nix process a signal when the server exits (PR_SET_PDEATHSIG). Builds get
  SIGTERM, on which Nix kills its builders and exits (on SIGKILL it would
  leave them running); evaluations get SIGKILL, as an evaluation may not
  notice SIGTERM for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from nixery.metrics import NIX_PROCESSES
from nixery.nix.errors import MemoryLimitExceeded, NixError, NixTimeout

log = structlog.get_logger(__name__)

_TAIL_LINES = 25
#: On every evaluating command: `nix` itself, and `builtins.getFlake` for NIXERY_FLAKE (flake.py),
#: so that no nix.conf needs editing (Nix 2.8 has both as experimental features).
NIX_FEATURES = ("--extra-experimental-features", "nix-command flakes")
_STDERR_LIMIT = 1 << 20  # longest single log line we buffer
#: What stands in the log for a longer line (whose bytes so far are dropped; its rest is read as a line).
_CUT_LINE = b"[nixery: a line longer than 1 MiB was left out]"
#: How much of each of the last lines a NixError keeps: its start and end. Whole lines of up to
#: 1 MiB made a failed build's progress page, its events and a pull's error 25 MB each.
_TAIL_LINE_CHARS = 2000
_MEMORY_POLL_SECONDS = 0.1
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)


@dataclass(frozen=True, slots=True)
class Deadline:
    """When the Nix work of one request must be done, on the time.monotonic() clock."""

    seconds: float  # the whole allowance
    at: float
    limit: str = "NIX_TIMEOUT"  # the setting that gave it, for messages

    @classmethod
    def after(cls, seconds: float, limit: str = "NIX_TIMEOUT") -> Deadline:
        return cls(seconds, time.monotonic() + seconds, limit)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def passed(self, what: str, log_tail: str = "") -> NixTimeout:
        """The error of `what`, stopped at this deadline."""
        return NixTimeout(f"{what} did not finish within {self.limit} ({self.seconds:g} s) and was stopped", log_tail)


def memory_limit_error(what: str, limit: int, log_tail: str = "") -> MemoryLimitExceeded:
    return MemoryLimitExceeded(
        f"{what} used more than NIXERY_EVALUATOR_MEMORY_MB={limit >> 20} MB and was stopped", log_tail
    )


async def start_child(argv: Sequence[str], *, builds: bool = False, **kwargs: Any) -> asyncio.subprocess.Process:
    """Start a child process (Nix, git) in its own session that dies with the server.

    `builds`: it runs builders, and gets SIGTERM rather than SIGKILL when the
    server dies (see the module's docstring). Other arguments go to
    `asyncio.create_subprocess_exec`. The signal comes when the thread that
    started the process ends: call this from the event loop's thread, which
    lives as long as the server.
    """
    on_server_exit = signal.SIGTERM if builds else signal.SIGKILL
    return await asyncio.create_subprocess_exec(
        *argv, start_new_session=True, preexec_fn=_signal_on_parent_exit(on_server_exit), **kwargs
    )


def _signal_on_parent_exit(sig: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send `sig` to the child when this process exits."""
    if _prctl is None:  # not Linux
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:  # in the child, between fork and exec
        _prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0)
        if os.getppid() != parent:  # the server exited before the signal was set
            os._exit(1)

    return set_parent_death_signal


async def run_nix(
    argv: Sequence[str],
    *,
    deadline: Deadline,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    memory_limit: int | None = None,
    builds: bool = False,
) -> bytes:
    """Run a Nix command, stopped at `deadline`; return its stdout. Stderr lines go to `on_line`.

    `memory_limit` (bytes) bounds the resident memory of the command's own
    process (an evaluation); `builds`: see `start_child`.
    """
    if deadline.remaining() <= 0:
        raise deadline.passed(argv[0])
    log.debug("nix.run", argv=list(argv))
    process = await start_child(
        argv,
        builds=builds,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=_STDERR_LIMIT,
        env=env,
    )
    tail: deque[str] = deque(maxlen=_TAIL_LINES)

    async def read_stderr() -> None:
        assert process.stderr is not None
        while True:
            try:
                raw = await process.stderr.readline()
            except ValueError:  # a line past _STDERR_LIMIT (a builder's progress bar): dropped, not fatal
                raw = _CUT_LINE
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            tail.append(_shortened(line))
            if on_line is not None:
                on_line(line)

    async def communicate() -> bytes:
        assert process.stdout is not None
        stdout, _ = await asyncio.gather(process.stdout.read(), read_stderr())
        await process.wait()
        return stdout

    running = NIX_PROCESSES.labels(os.path.basename(argv[0]))
    running.inc()
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # comes as the process ends, and a stopping registry then waited for the whole build.
        with MemoryWatch(process.pid, memory_limit) as memory:
            async with asyncio.timeout(deadline.remaining()):
                stdout = await communicate()
    except TimeoutError:
        kill_process_tree(process.pid)
        await process.wait()
        raise deadline.passed(argv[0], "\n".join(tail)) from None
    except BaseException:
        try:
            if builds:  # Nix stopped with SIGTERM removes its build directories (SIGKILL left them in TMPDIR)
                await _terminate(process)
        finally:  # also when this wait is cancelled in turn
            kill_process_tree(process.pid)
            await process.wait()
        raise
    finally:
        running.dec()
    if memory.exceeded:
        assert memory_limit is not None
        raise memory_limit_error(argv[0], memory_limit, "\n".join(tail))
    if process.returncode != 0:
        # Nix's first error line leads the message: after it come the source excerpt and traces,
        # which a message cut to its last lines would keep instead.
        said = next((line.strip() for line in tail if line.lstrip().startswith("error:")), None)
        reason = f": {said[:500]}" if said else ""
        raise NixError(f"{argv[0]} failed with exit code {process.returncode}{reason}", "\n".join(tail))
    return stdout


def _shortened(line: str) -> str:
    if len(line) <= _TAIL_LINE_CHARS:
        return line
    half = _TAIL_LINE_CHARS // 2
    return f"{line[:half]} [nixery: {len(line) - 2 * half} characters left out] {line[-half:]}"


def resident_bytes(pid: int) -> int:
    """A process's resident memory (0 when it cannot be read, e.g. it has exited)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryWatch:
    """While in a `with` block, kill the process tree of `pid` once that process's
    resident memory passes `limit` bytes (None: no limit); `exceeded` says whether it did."""

    def __init__(self, pid: int, limit: int | None):
        self.pid = pid
        self.limit = limit
        self.exceeded = False
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> MemoryWatch:
        if self.limit is not None:
            self._task = asyncio.ensure_future(self._watch(self.limit))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self, limit: int) -> None:
        while resident_bytes(self.pid) <= limit:
            await asyncio.sleep(_MEMORY_POLL_SECONDS)
        self.exceeded = True
        log.info("nix.memory_limit_reached", pid=self.pid, limit=limit)
        kill_process_tree(self.pid)


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def _tree(root: int) -> set[int]:
    children = _children_by_parent()
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


#: How long a Nix that builds gets, once stopped with SIGTERM, to stop its builders and remove
#: their directories before its whole tree is killed.
TERMINATE_GRACE = 3.0


async def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM a Nix that builds and wait, at most TERMINATE_GRACE, for it to end."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(process.wait()), TERMINATE_GRACE)


def kill_process_tree(root: int, *, rounds: int = 5) -> None:
    """SIGKILL `root` and all its descendants, including other process groups."""
    frozen: set[int] = set()
    for _ in range(rounds):
        found = _tree(root) | {p for pid in frozen for p in _tree(pid)}
        if found <= frozen:
            break
        _signal_all(found - frozen, signal.SIGSTOP)
        frozen |= found
    _signal_all(frozen, signal.SIGKILL)
    try:
        os.killpg(root, signal.SIGKILL)
    except ProcessLookupError:
        pass
