"""Whether a process of this machine still runs (shared by storage's staging directories and the
builds that workers share)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists; one of another user counts (it cannot be signalled, but is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
