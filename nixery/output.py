"""A command's standard output that says when it cannot be written.

Output to a full disk (`> /dev/full`, a full file system) or to a closed standard output
(`>&-`) ended in an OSError or AttributeError traceback from whichever print met it. Standard
output is replaced, for the command line only, by one whose write failures are an
`OutputError`, which `nixery.cli.main` reports in one line. A reader that went away
(`| head`) is still a BrokenPipeError, as before: that is no failure of the command.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any


class OutputError(OSError):
    """Standard output could not be written."""


class _Stdout(io.RawIOBase):
    def __init__(self, descriptor: int, *, closed: bool):
        super().__init__()
        self._descriptor = descriptor
        self._was_closed = closed  # it was closed when the command started: nothing can go there
        self.discarding = False
        #: The first write that failed: argparse's --help swallows the OutputError it raises.
        self.failure: OutputError | None = None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._descriptor

    def isatty(self) -> bool:
        return not self._was_closed and os.isatty(self._descriptor)

    def write(self, data: Any) -> int:
        if self.discarding:
            return len(data)
        if self._was_closed:
            self.failure = self.failure or OutputError(9, "standard output is closed")
            raise self.failure
        try:
            return os.write(self._descriptor, data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.failure = self.failure or OutputError(exc.errno, exc.strerror)
            raise self.failure from None


def guard() -> None:
    """Replace sys.stdout (when it is the process's own) by one whose failures are OutputError."""
    if sys.stdout is not None and sys.stdout is not sys.__stdout__:
        return  # already replaced (a test capturing it, or guarded already)
    given = sys.stdout
    if given is None:
        # Descriptor 1 is free: the next file opened would get it and receive the output.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    global _raw
    _raw = _Stdout(1, closed=given is None)
    # Buffered as the output it replaces was: unbuffered under PYTHONUNBUFFERED (python -u), as
    # services often run, so that each line reaches a journal or a pipe as it is printed.
    unbuffered = isinstance(given, io.TextIOWrapper) and given.write_through
    sys.stdout = io.TextIOWrapper(
        _raw if unbuffered else io.BufferedWriter(_raw),
        encoding=given.encoding if given is not None else "utf-8",
        errors=given.errors if given is not None else "strict",
        line_buffering=isinstance(given, io.TextIOWrapper) and given.line_buffering,
        write_through=unbuffered,
    )


_raw: _Stdout | None = None


def discard() -> None:
    """After a failure: what is still buffered goes nowhere, so that exiting does not fail again."""
    if _raw is not None:
        _raw.discarding = True


def check() -> None:
    """Raise the OutputError of a write that failed, if one did: some callers swallow it."""
    if _raw is not None and _raw.failure is not None and not _raw.discarding:
        raise _raw.failure
