"""Nix failures as a client sees them: timeouts kill the whole build, one NIX_TIMEOUT
covers the whole request, evaluations are bounded in memory, a package set that does
not parse is named at start-up, and Nix dies with the server."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.daemons import gone, process_tree
from tests.registry import REPOSITORY, RegistryProcess, busybox_set_with, nix_call_count

FAILING_SET = Path(__file__).parent / "data" / "failing"
EVALUATOR_SET = Path(__file__).parent / "data" / "evaluator"
BUSYBOX_SET = REPOSITORY / "pkgs" / "busybox"


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
    assert (error["code"], error["detail"]["kind"]) == ("UNAVAILABLE", "BUILD_TIMEOUT")
    time.sleep(0.5)
    assert sleeping_builders() == [], "the builder's children outlived the timeout"

    before = nix_call_count(calls)
    status, _, _ = registry.request("/v2/slow/manifests/latest")
    assert status == 504
    assert nix_call_count(calls) > before, "a failed build must not be cached"
    status, _, _ = registry.request("/v2/hello/manifests/latest")
    assert status == 200


def wait_for_event(registry: RegistryProcess, event: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while not (found := registry.log_events(event)):
        assert time.monotonic() < deadline, f"no {event} in the log:\n{registry.log()[-3000:]}"
        time.sleep(0.1)
    return found[0]


def test_a_package_set_cut_short_is_named_at_start_up_and_pulls_fail_fast(start_registry, tmp_path: Path) -> None:
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    whole = f"args: (import {BUSYBOX_SET} args) // {{\n  extra = (import {BUSYBOX_SET} args).hello;\n}}\n"
    (pkgs / "default.nix").write_text(whole[: whole.index(".hello")])  # cut off mid-line 2
    where = f"{pkgs}/default.nix:2:"
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIX_TIMEOUT="30")

    event = wait_for_event(registry, "nix.package_set_does_not_import")
    assert event["level"] == "error" and where in event["nix"], event
    for _ in range(2):
        started = time.monotonic()
        status, _, body = registry.request("/v2/extra/manifests/latest")
        seconds = time.monotonic() - started
        error = json.loads(body)["errors"][0]
        assert status == 500 and (error["code"], error["detail"]["kind"]) == ("UNKNOWN", "BUILD_FAILED"), body
        assert "unexpected end of file" in error["message"] and where in error["message"], error
        assert seconds < 10, f"answered after {seconds:.1f} s (NIX_TIMEOUT is 30 s)"

    (pkgs / "default.nix").write_text(whole)  # a new revision: imported afresh
    status, _, body = registry.request("/v2/extra/manifests/latest")
    assert status == 200, body


def test_one_nix_timeout_covers_the_whole_request(start_registry, tmp_path: Path) -> None:
    # Importing this set never ends (a sum of 10^10 numbers, in a flat ~450 MB).
    spin = ("builtins.foldl' (acc: i: builtins.foldl' (a: j: a + j) acc (builtins.genList (x: x) 100000)) 0 "
            "(builtins.genList (x: x) 100000)")
    (tmp_path / "default.nix").write_text(f"args: builtins.seq ({spin}) (import {BUSYBOX_SET} args)\n")
    registry = start_registry(NIXERY_PKGS_PATH=str(tmp_path), NIX_TIMEOUT="5")
    # The first pull waits for the warm-up's import, the second starts its own: neither
    # then gets a nix-instantiate with another NIX_TIMEOUT of its own.
    for _ in range(2):
        started = time.monotonic()
        status, _, body = registry.request("/v2/hello/manifests/latest")
        seconds = time.monotonic() - started
        assert status == 504 and json.loads(body)["errors"][0]["detail"]["kind"] == "BUILD_TIMEOUT", body
        assert seconds < 5 + 3, f"answered after {seconds:.1f} s"


def test_an_evaluation_past_the_memory_limit_fails_naming_the_limit(start_registry) -> None:
    registry = start_registry(NIXERY_PKGS_PATH=str(EVALUATOR_SET), NIXERY_EVALUATOR_MEMORY_MB="64")
    status, _, body = registry.request("/v2/memoryHog/manifests/latest")
    assert status == 500, body
    error = json.loads(body)["errors"][0]
    assert (error["code"], error["detail"]["kind"]) == ("UNKNOWN", "BUILD_FAILED"), body
    assert "NIXERY_EVALUATOR_MEMORY_MB=64 MB" in error["message"], error
    status, _, body = registry.request("/v2/hello/manifests/latest")
    assert status == 200, body


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment holds `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and not gone(int(entry.name)):
            with contextlib.suppress(OSError):
                if any(text.encode() in (entry / part).read_bytes() for part in ("cmdline", "environ")):
                    found.append(int(entry.name))
    return found


def test_a_build_that_logs_a_line_longer_than_a_mebibyte_gives_its_image(start_registry, tmp_path: Path) -> None:
    """Nix passes on what builders print: a line of 3 MB (a progress bar redrawn with carriage
    returns, say) is left out of the log, where it failed the build with 500 INTERNAL_ERROR."""
    pkgs = busybox_set_with(
        tmp_path / "set", "chatty", f"chatty-{random.getrandbits(64)}",
        "$bb/head -c 3000000 /dev/zero | $bb/tr '\\\\0' a >&2; $bb/mkdir -p $out/bin",
    )
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs))
    status, _, body = registry.request("/v2/shell/chatty/manifests/latest")
    assert status == 200, body[:500]


def test_nix_dies_with_the_server(start_registry, tmp_path: Path) -> None:
    name = f"sleepy-{random.getrandbits(64):x}"  # new on every run, so that it really builds
    pkgs = busybox_set_with(tmp_path / "pkgs", "sleepy", name, "$bb/sleep 3600 & $bb/sleep 3600; $bb/mkdir $out")
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs))
    assert registry.process is not None
    puller = ThreadPoolExecutor(1)
    pull = puller.submit(registry.request, "/v2/sleepy/manifests/latest", timeout=60)
    deadline = time.monotonic() + 60
    while len(processes_mentioning(name)) < 3:  # nix-store, the builder and its sleeps
        assert time.monotonic() < deadline, registry.log()[-3000:]
        time.sleep(0.1)
    nix = [pid for pid in process_tree(registry.process.pid) if pid != registry.process.pid]

    registry.process.kill()
    registry.process.wait()
    deadline = time.monotonic() + 5
    while (left := processes_mentioning(name)) or not all(gone(pid) for pid in nix):
        assert time.monotonic() < deadline, f"still running after the server: {left}, {nix}"
        time.sleep(0.1)
    with pytest.raises(ConnectionError):  # the server went away without answering
        pull.result()
    puller.shutdown()
