"""One directory under TMPDIR for all the temporary files of a registry (or a local build), which
the next one to start removes if the process that made it was killed.

A registry ended by `kill -9` or the OOM killer removes nothing itself: its evaluators'
directories (`nixery-eval-*`), multiprocessing's (`pymp-*`), the workers' and Nix's build
directories stayed in TMPDIR, a set per crash, for as long as the machine ran. Now they are all
made inside `nixery-run-*`, whose `owner.lock` the process holds locked (flock) while it lives,
and its forked workers with it; the lock goes with the last of them, however they end. Starting,
a process removes every `nixery-run-*` directory whose lock it can take: no live registry (of any
user able to lock it) owns it: `remove_abandoned`, which the registry runs in the background as
it starts serving (a start that fails is one line; removing much takes a while).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PREFIX = "nixery-run-"
LOCK_NAME = "owner.lock"
#: Where a directory is made and locked before it is renamed to PREFIX...: a sweep never sees
#: one that is not locked yet.
_MAKING_PREFIX = ".nixery-run-making-"
#: Where `own_temporary_directory` made its directory: where others' are looked for.
_base: Path | None = None


@contextlib.contextmanager
def own_temporary_directory() -> Iterator[Path]:
    """Within: this process's temporary files (tempfile's, and TMPDIR for the processes it starts)
    go in a directory of its own, removed at the end, or by the next process to start after a kill.
    For a process's whole work: the process should end when this does (see the end)."""
    global _base
    base = _base = Path(tempfile.gettempdir())
    directory, lock = _make_locked(base)
    previous_tempdir, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(directory)
    os.environ["TMPDIR"] = str(directory)
    try:
        yield directory
    finally:
        tempfile.tempdir = previous_tempdir
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env
        if (multiprocessing_util := sys.modules.get("multiprocessing.util")) is not None:
            # Its exit handlers remove its directory (pymp-*, in ours) and fail if it is gone
            # already: they run now, as the process ends after this anyway.
            multiprocessing_util._run_finalizers()
        shutil.rmtree(directory, ignore_errors=True)
        os.close(lock)


def _make_locked(base: Path) -> tuple[Path, int]:
    making = Path(tempfile.mkdtemp(prefix=_MAKING_PREFIX, dir=base))
    try:
        lock = os.open(making / LOCK_NAME, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)  # kept by forked workers (shared), not by programs started
        directory = base / (PREFIX + making.name.removeprefix(_MAKING_PREFIX))
        making.rename(directory)
    except BaseException:
        shutil.rmtree(making, ignore_errors=True)
        raise
    return directory, lock


def remove_abandoned_in_background() -> None:
    """`remove_abandoned`, in a daemon thread, logging what it removed
    (`registry.temporary_files_removed`): a stop need not wait for the removal of a crashed
    build's gigabytes, nor a start or a local build begin after it."""

    def run() -> None:
        if removed := remove_abandoned():
            log.info("registry.temporary_files_removed", directories=removed)

    threading.Thread(target=run, name="nixery-temporary-files", daemon=True).start()


def remove_abandoned(base: Path | None = None) -> list[str]:
    """Remove the PREFIX directories in `base` (default: where `own_temporary_directory` made
    this process's) that no live process holds; their names."""
    base = base or _base
    if base is None:
        return []
    removed = []
    for directory in sorted(base.glob(PREFIX + "*")):
        try:
            lock = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # gone meanwhile, another user's, or not ours at all
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its registry lives
            os.close(lock)
            continue
        try:
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(lock)
        removed.append(directory.name)
    return removed
