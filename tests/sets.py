"""The Debian-derived set, for tests that need it.

CI generates the set (`make test` runs scripts/debian-set/setup.sh) and sets
NIXERY_REQUIRE_DEBIAN_SET, so there a missing set fails the test. On a
developer's machine without it, the test is skipped with the command that
makes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nixery.config import debian_set


def require_debian_set(needed: str = "default.nix", *, module: bool = False) -> Path:
    """The set's directory, when it holds `needed` (`aarch64-linux.nix` for the arm64 packages)."""
    where = debian_set().path
    if not (where / needed).is_file():
        missing = f"the Debian set in {where} has no {needed}: run scripts/debian-set/setup.sh"
        if os.environ.get("NIXERY_REQUIRE_DEBIAN_SET"):  # CI: its set-up must have worked
            raise RuntimeError(missing)
        pytest.skip(missing, allow_module_level=module)
    return where
