"""Running the `nixery` command on a pseudo-terminal, as a user at a terminal runs it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
from collections.abc import Callable

from tests.registry import REPOSITORY


def _own_terminal() -> None:
    """In the child: the pseudo-terminal becomes its controlling terminal (getpass reads that)."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def nixery_in_pty(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, controlling: bool = False,
    answer: Callable[[bytes], bytes | None] | None = None,
) -> tuple[int, bytes]:
    """Run `nixery ARGS` with stdin, stdout and stderr on a pseudo-terminal (`controlling`: as its
    controlling terminal too); returns (exit status, everything shown). `answer` is called with what
    was shown so far whenever more arrives, and what it returns is typed (Ctrl-D: b"\\x04")."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "nixery", *args],
        stdin=terminal, stdout=terminal, stderr=terminal, cwd=REPOSITORY, close_fds=True,
        env=os.environ.copy() if env is None else env, preexec_fn=_own_terminal if controlling else None,
    )
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.5)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    break
                if not chunk:
                    break
                output += chunk
                if answer is not None and (typed := answer(bytes(output))):
                    os.write(controller, typed)
            elif process.poll() is not None:
                break
        status = process.wait(timeout=10)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
    return status, bytes(output)
