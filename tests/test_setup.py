"""The set-up behind the README's two commands (`make run`, `make test`): scripts/install-system-deps.sh.

Run as root it is the first step of every CI run. Here: what it does for another user.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.registry import REPOSITORY


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None, reason="needs root to run as another user")
def test_another_user_is_told_to_run_the_set_up_as_root_before_anything_changes() -> None:
    """Nix is set up single-user for root, so another user's registry could build nothing:
    every first pull would fail. The script says so at once instead, and exits non-zero
    (then `make run` stops) before it asks sudo for anything."""
    script = (REPOSITORY / "scripts" / "install-system-deps.sh").read_text()
    # On standard input: the checkout may be in a directory that only root can read (CI's).
    result = subprocess.run(["runuser", "-u", "nobody", "--", "bash", "-s"], input=script,
                            capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 1, result
    assert "run the set-up as root (sudo make run, sudo make test)" in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
