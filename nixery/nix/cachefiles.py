"""Directories and files under the source cache (NIXERY_CACHE_DIR).

The invariant every source keeps: whatever has its final name is complete.
Work happens in a `.tmp-*` directory next to the final one and is renamed
into place at the end; a rename that loses to another process (sharing the
cache) keeps the other's copy, which holds the same content.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

#: `.tmp-*` entries older than this were left by a process that died.
ABANDONED_AFTER = 6 * 3600


def publish_directory(staging: Path, final: Path) -> None:
    """Rename a finished directory into place; if another process won, keep theirs."""
    try:
        os.rename(staging, final)
    except OSError:
        if not final.is_dir():
            raise


def remove_abandoned(directory: Path) -> None:
    cutoff = time.time() - ABANDONED_AFTER
    for entry in directory.glob(".tmp-*"):
        try:
            if entry.lstat().st_mtime < cutoff:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def read_json(path: Path) -> dict:
    """A JSON object from `path`; empty when the file is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> None:
    """Replace `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=".tmp-json-")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(staging, path)
    except BaseException:
        os.unlink(staging)
        raise
