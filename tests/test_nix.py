"""Nix failures as a client sees them: timeouts kill the whole build."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.registry import RegistryProcess, nix_call_count

FAILING_SET = Path(__file__).parent / "data" / "failing"


def sleeping_builders() -> list[str]:
    result = subprocess.run(["pgrep", "-f", "sleep 3600"], capture_output=True, text=True)
    return result.stdout.split()


def test_timeout_kills_the_process_tree_and_the_next_request_retries(start_registry, nix_calls) -> None:
    path, calls = nix_calls
    registry: RegistryProcess = start_registry(NIXERY_PKGS_PATH=str(FAILING_SET), NIX_TIMEOUT="2", PATH=path)
    started = time.monotonic()
    status, _, body = registry.request("/v2/slow/manifests/latest")
    assert status == 504, body
    assert time.monotonic() - started < 15
    error = json.loads(body)["errors"][0]
    assert error["code"] == "BUILD_TIMEOUT"
    time.sleep(0.5)
    assert sleeping_builders() == [], "the builder's children outlived the timeout"

    before = nix_call_count(calls)
    status, _, _ = registry.request("/v2/slow/manifests/latest")
    assert status == 504
    assert nix_call_count(calls) > before, "a failed build must not be cached"
    status, _, _ = registry.request("/v2/hello/manifests/latest")
    assert status == 200
