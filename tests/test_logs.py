"""The registry's log lines as a terminal, a pipe or a file gets them (nixery/logs.py)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from tests.registry import REPOSITORY

CONSOLE_LINE = (
    "import structlog; from nixery import logs; logs.configure('info', 'console'); "
    "structlog.get_logger().info('test.line', value=1)"
)


def test_console_log_lines_have_colours_only_on_a_terminal() -> None:
    """LOG_FORMAT=console wrote ANSI escape codes into a pipe or a file (journald, `2> log`)."""
    result = subprocess.run([sys.executable, "-c", CONSOLE_LINE], capture_output=True, cwd=REPOSITORY, timeout=60)
    assert result.returncode == 0 and b"test.line" in result.stderr and b"value=1" in result.stderr, result
    assert b"\x1b[" not in result.stderr, result.stderr

    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    shown = on_a_terminal(env)
    assert b"test.line" in shown and b"\x1b[" in shown, shown
    assert b"\x1b[" not in on_a_terminal({**env, "NO_COLOR": "1"})  # https://no-color.org


def on_a_terminal(env: dict[str, str]) -> bytes:
    controller, terminal = pty.openpty()
    try:
        process = subprocess.run([sys.executable, "-c", CONSOLE_LINE], stderr=terminal, cwd=REPOSITORY, env=env,
                                 timeout=60)
        assert process.returncode == 0
        return os.read(controller, 65536)
    finally:
        os.close(controller)
        os.close(terminal)
