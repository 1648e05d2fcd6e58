"""A build that Nix failed is answered with its error for NIXERY_FAILED_BUILD_TTL seconds, not run
again on every pull (nixery/failures.py): a real Nix build of a package whose builder fails,
pulled again and again, and built again on request (`nixery build`) and after the memory ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery.failures import FailedBuilds, lasting
from nixery.nix import errors as nix_errors
from tests.registry import REPOSITORY, RegistryProcess, busybox_set_with

FAILS = "echo the-build-says-why >&2; exit 3"


def pull_error(registry: RegistryProcess, name: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    status, _, body = registry.request(f"/v2/{name}/manifests/latest")
    return status, json.loads(body)["errors"][0], time.monotonic() - started


def builds_failed(registry: RegistryProcess) -> int:
    return len(registry.log_events("build.failed"))


@pytest.mark.nix
def test_a_failed_build_is_answered_from_memory_until_asked_for_or_its_time_is_up(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    pkgs = busybox_set_with(tmp_path / "pkgs", "broken", "broken-1.0", FAILS)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_FAILED_BUILD_TTL="8")

    status, first, _ = pull_error(registry, "shell/broken")
    assert (status, first["detail"]["kind"]) == (500, "BUILD_FAILED"), first
    assert "the-build-says-why" in first["detail"]["log"] and "this build failed" not in first["message"], first
    said, tail = first["message"].split(":\n", 1)  # Nix's message, then its last lines
    assert builds_failed(registry) == 1

    # Pulled again (a kubelet's retry, a CI job's): the same error at once, saying why; Nix is not run.
    for _ in range(3):
        status, again, _ = pull_error(registry, "shell/broken")
        assert (status, again["detail"]["kind"]) == (500, "BUILD_FAILED"), again
        assert again["detail"]["log"] == first["detail"]["log"], again
        assert again["message"].startswith(said + " (this build failed "), (first, again)
        assert "NIXERY_FAILED_BUILD_TTL" in again["message"] and again["message"].endswith(":\n" + tail), again
    assert builds_failed(registry) == 1, registry.log()[-3000:]
    assert len(registry.log_events("build.failure_remembered")) == 3

    # Other images are not held back by it: another name of the same set builds.
    assert registry.request("/v2/shell/hello/manifests/latest")[0] == 200

    # Asked for explicitly, it is built again (and fails again, saying so in its own words).
    built = subprocess.run(
        [sys.executable, "-m", "nixery", "build", "shell/broken", "--registry", registry.url],
        capture_output=True, text=True, timeout=300, cwd=REPOSITORY, env=os.environ.copy(),
    )
    assert built.returncode == 1 and "the-build-says-why" in built.stdout + built.stderr, built
    assert builds_failed(registry) == 2, registry.log()[-3000:]

    # Once the memory's time is up, a pull builds it again.
    deadline = time.monotonic() + 8 + 1
    while time.monotonic() < deadline:
        time.sleep(0.5)
    status, later, _ = pull_error(registry, "shell/broken")
    assert status == 500 and "this build failed" not in later["message"], later
    assert builds_failed(registry) == 3


@pytest.mark.nix
def test_with_a_ttl_of_zero_every_pull_builds_again(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    pkgs = busybox_set_with(tmp_path / "pkgs", "broken", "broken-1.0", FAILS)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_FAILED_BUILD_TTL="0")
    for count in (1, 2):
        status, error, _ = pull_error(registry, "shell/broken")
        assert status == 500 and "this build failed" not in error["message"], error
        assert builds_failed(registry) == count


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_failures_that_would_come_again_are_kept() -> None:
    clock = Clock()
    failures = FailedBuilds(60, clock=clock)
    for passing in (
        nix_errors.NixTimeout("ran past NIX_TIMEOUT"),
        nix_errors.SourceUnavailable("cannot fetch the channel"),
        nix_errors.PackagesNotFound(["curll"], "the set"),
        nix_errors.RefNotFound("no such branch"),
        OSError("disk"),
    ):
        assert not lasting(passing)
        failures.remember("key", passing)
        assert failures.recent("key") is None, passing
    for kept in (nix_errors.NixError("nix-build failed", "the tail"),
                 nix_errors.MemoryLimitExceeded("past 64 MB", "tail"),
                 nix_errors.UnsupportedSystem("cannot build for aarch64", "tail")):
        failures.remember("key", kept)
        answer = failures.recent("key")
        assert type(answer) is type(kept) and answer is not kept, answer
        assert answer.log_tail == kept.log_tail and answer.message.startswith(kept.message), answer


def test_the_memory_says_its_age_and_ends_after_the_ttl() -> None:
    clock = Clock()
    failures = FailedBuilds(60, clock=clock)
    failures.remember("key", nix_errors.NixError("nix-build failed", "tail"))
    clock.now += 12.4
    answer = failures.recent("key")
    assert answer is not None and "failed 12 s ago and is not run again for 48 s" in answer.message, answer
    assert failures.recent("other") is None
    clock.now += 47.6
    assert failures.recent("key") is None
    failures.remember("key", nix_errors.NixError("nix-build failed", "tail"))
    failures.forget("key")
    assert failures.recent("key") is None
    never = FailedBuilds(0, clock=clock)
    never.remember("key", nix_errors.NixError("nix-build failed", "tail"))
    assert never.recent("key") is None
    with pytest.raises(ValueError):
        FailedBuilds(float("nan"))
