"""Running Nix commands without blocking the event loop, and killing them whole.

Each command runs in its own session. A timeout or a cancellation kills Nix
and every process below it: Nix starts builders in process groups of their
own, so killing Nix's group alone would leave them running. The tree is
frozen (SIGSTOP) until no new process appears, then killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import deque
from collections.abc import Callable, Sequence

import structlog

from nixery.metrics import NIX_PROCESSES
from nixery.nix.errors import NixError, NixTimeout

log = structlog.get_logger(__name__)

_TAIL_LINES = 25
_STDERR_LIMIT = 1 << 20  # longest single log line we buffer


async def run_nix(
    argv: Sequence[str],
    *,
    timeout: float,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> bytes:
    """Run a Nix command; return its stdout. Stderr lines go to `on_line`."""
    log.debug("nix.run", argv=list(argv))
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=_STDERR_LIMIT,
        env=env,
    )
    tail: deque[str] = deque(maxlen=_TAIL_LINES)

    async def read_stderr() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
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
        stdout = await asyncio.wait_for(communicate(), timeout)
    except TimeoutError:
        _kill_group(process)
        await process.wait()
        raise NixTimeout(f"{argv[0]} ran longer than {timeout:g} s and was killed", "\n".join(tail)) from None
    except BaseException:
        _kill_group(process)
        await process.wait()
        raise
    finally:
        running.dec()
    if process.returncode != 0:
        raise NixError(f"{argv[0]} failed with exit code {process.returncode}", "\n".join(tail))
    return stdout


def _kill_group(process: asyncio.subprocess.Process) -> None:
    kill_process_tree(process.pid)


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
