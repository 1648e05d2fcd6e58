"""The project's own packaging, as `make run` installs it."""

from __future__ import annotations

import subprocess
import sys

from tests.registry import REPOSITORY


def test_the_package_metadata_builds_without_warnings() -> None:
    """pip prepares the metadata with the build requirement of pyproject.toml (in an isolated
    environment, as `make run` does): setuptools has nothing to warn about (it warned that
    `project.license` as a table is deprecated)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", "--editable", str(REPOSITORY)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Warning" not in output and "deprecated" not in output, output
