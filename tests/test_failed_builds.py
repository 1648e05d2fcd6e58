"""A build that Nix failed is answered with its error for NIXERY_FAILED_BUILD_TTL seconds, not run
again on every pull (nixery/failures.py): a real Nix build of a package whose builder fails,
pulled again and again, and built again on request (`nixery build`) and after the memory ends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery.failures import FailedBuilds, lasting
from nixery.nix import errors as nix_errors
from nixery.platforms import PlatformFailed
from tests.registry import REPOSITORY, RegistryProcess, busybox_set_with

FAILS = "echo the-build-says-why >&2; exit 3"


def pull_error(registry: RegistryProcess, name: str) -> tuple[int, dict]:
    status, _, body = registry.request(f"/v2/{name}/manifests/latest")
    return status, json.loads(body)["errors"][0]


def builds_failed(registry: RegistryProcess) -> int:
    return len(registry.log_events("build.failed"))


def registry_with_a_broken_package(start: Callable[..., RegistryProcess], tmp_path: Path, ttl: str) -> RegistryProcess:
    pkgs = busybox_set_with(tmp_path / "pkgs", "broken", "broken-1.0", FAILS)
    return start(NIXERY_PKGS_PATH=str(pkgs), NIXERY_FAILED_BUILD_TTL=ttl)


@pytest.mark.nix
def test_a_failed_build_is_answered_from_memory_until_asked_for(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    registry = registry_with_a_broken_package(start_registry, tmp_path, "600")

    status, first = pull_error(registry, "shell/broken")
    assert (status, first["detail"]["kind"]) == (500, "BUILD_FAILED"), first
    assert "the-build-says-why" in first["detail"]["log"] and "this build failed" not in first["message"], first
    said, tail = first["message"].split(":\n", 1)  # Nix's message, then its last lines
    assert builds_failed(registry) == 1

    # Pulled again (a kubelet's retry, a CI job's): the same error at once, saying so, and the same
    # words each time (a declared image's status repeats them); Nix is not run.
    answers = []
    for _ in range(3):
        status, again = pull_error(registry, "shell/broken")
        assert (status, again["detail"]["kind"]) == (500, "BUILD_FAILED"), again
        assert again["detail"]["log"] == first["detail"]["log"], again
        assert again["message"].startswith(said + " (this build failed at "), (first, again)
        assert "NIXERY_FAILED_BUILD_TTL" in again["message"] and again["message"].endswith(":\n" + tail), again
        answers.append(again["message"])
    assert len(set(answers)) == 1, answers
    assert builds_failed(registry) == 1, registry.log()[-3000:]
    assert len(registry.log_events("build.failure_remembered")) == 3

    # The image's page said "the first pull builds it", which it does not meanwhile: it says the
    # last build failed, when, until when pulls get the error, and that its Build button builds.
    failed_at, until = re.search(r"failed at (\S+ UTC) and is not run again until (\S+ UTC)", answers[0]).groups()
    status, _, body = registry.request("/images/shell/broken", accept="text/html")
    page = body.decode()
    said_on_page = " ".join(re.sub(r"<[^>]+>", "", page.split('id="failed-lately"')[1].split("</div>")[0]).split())
    assert status == 404 and "the first pull builds it" not in page, page
    assert f"Its last build failed at {failed_at}. Until {until}, pulls get this error" in said_on_page, said_on_page
    assert "the-build-says-why" in page and "The Build button runs the build now" in page
    assert 'name="image" value="shell/broken"' in page
    assert builds_failed(registry) == 1  # the page builds nothing
    # The image's JSON (`nixery` CLI, scripts) says the same, not "pull it".
    status, _, body = registry.request("/images/shell/broken.json")
    error = json.loads(body)["errors"][0]
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN"), body
    assert f"its last build failed at {failed_at}, and until {until} pulls get that error" in error["message"], error
    assert "pull it" not in error["message"] and "the-build-says-why" in error["detail"]["log_tail"], error
    assert 600 <= error["detail"]["until"] - error["detail"]["failed_at"] <= 601, error  # whole seconds, outwards
    # `nixery inspect` passes it on, instead of "not built yet: build it ... (or pull it)".
    inspected = subprocess.run(
        [sys.executable, "-m", "nixery", "inspect", "shell/broken", "--registry", registry.url],
        capture_output=True, text=True, timeout=120, cwd=REPOSITORY, env=os.environ.copy(),
    )
    assert inspected.returncode == 1 and "or pull it" not in inspected.stderr, inspected
    assert f"its last build failed at {failed_at}" in inspected.stderr, inspected.stderr
    assert builds_failed(registry) == 1

    # Other images are not held back by it: another name of the same set builds.
    assert registry.request("/v2/shell/hello/manifests/latest")[0] == 200

    # Asked for explicitly, it is built again (and fails again, saying so in its own words)...
    built = subprocess.run(
        [sys.executable, "-m", "nixery", "build", "shell/broken", "--registry", registry.url],
        capture_output=True, text=True, timeout=300, cwd=REPOSITORY, env=os.environ.copy(),
    )
    assert built.returncode == 1 and "the-build-says-why" in built.stdout + built.stderr, built
    assert "this build failed at" not in built.stdout + built.stderr, built
    assert builds_failed(registry) == 2, registry.log()[-3000:]
    # ... and that failure is remembered in turn.
    status, again = pull_error(registry, "shell/broken")
    assert status == 500 and "this build failed at" in again["message"] and builds_failed(registry) == 2, again


@pytest.mark.nix
@pytest.mark.parametrize("ttl", ["2", "0"])
def test_once_the_memorys_time_is_up_a_pull_builds_again(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path, ttl: str,
) -> None:
    """Also with a TTL of 0, where every pull builds again."""
    registry = registry_with_a_broken_package(start_registry, tmp_path, ttl)
    for count in (1, 2):
        if count > 1:
            time.sleep(float(ttl) + 0.5)
        status, error = pull_error(registry, "shell/broken")
        assert status == 500 and "this build failed at" not in error["message"], error
        assert builds_failed(registry) == count


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def failure(message: str = "nix-store failed with exit code 100: error: builder for '/nix/store/x.drv' failed",
            tail: str = "the tail") -> nix_errors.NixError:
    return nix_errors.NixError(message, tail)


def test_only_failures_that_would_come_again_are_kept() -> None:
    failures = FailedBuilds(60, clock=Clock(1000.0))
    for passing in (
        nix_errors.NixTimeout("nix-store failed with exit code 101: ran past NIX_TIMEOUT"),
        nix_errors.SourceUnavailable("cannot fetch the channel"),
        nix_errors.PackagesNotFound(["curll"], "the set"),
        nix_errors.RefNotFound("no such branch"),
        nix_errors.UnsupportedSystem("nix-store failed with exit code 1: cannot build for aarch64", "tail"),
        failure("nix-store failed with exit code -9"),  # killed: the kernel's out-of-memory killer
        failure(tail="error: unable to download 'https://cache.nixos.org/x.narinfo': HTTP error 503"),
        failure(tail="curl: (6) Could not resolve host: example.org"),
        failure(tail="error: writing to file: No space left on device"),
        failure("cannot export commit 0123456789ab of the repository"),  # the registry's own work, not Nix's
        OSError("disk"),
        PlatformFailed("linux/arm64", nix_errors.NixTimeout("nix-store failed with exit code 101: timed out")),
    ):
        assert not lasting(passing), passing
        failures.remember("key", passing)
        assert failures.recent("key") is None, passing
    for kept in (failure(), failure("nix-instantiate failed with exit code 1: error: attribute 'x' missing"),
                 failure("the evaluation failed"), nix_errors.MemoryLimitExceeded("past 64 MB", "tail")):
        assert lasting(kept), kept
        failures.remember("key", kept)
        answer = failures.recent("key")
        assert type(answer) is type(kept) and answer is not kept, answer
        assert answer.log_tail == kept.log_tail and answer.message.startswith(kept.message), answer
    failures.remember("index", PlatformFailed("linux/arm64", failure()))
    answer = failures.recent("index")
    assert isinstance(answer, PlatformFailed) and answer.platform == "linux/arm64", answer
    assert answer.message.startswith("building the linux/arm64 image failed: nix-store failed"), answer.message


def test_the_memory_says_when_the_build_failed_and_ends_after_the_ttl() -> None:
    clock, wall = Clock(1000.0), Clock(1_767_225_600.4)  # 2026-01-01 00:00:00.4 UTC
    failures = FailedBuilds(60, clock=clock, wall_clock=wall)
    failures.remember("key", failure())
    clock.now += 12.4
    wall.now += 12.4
    answer = failures.recent("key")
    assert answer is not None, answer
    assert "(this build failed at 00:00:00 UTC and is not run again until 00:01:01 UTC, " in answer.message
    assert failures.recent("other") is None
    clock.now += 47.6
    assert failures.recent("key") is None
    failures.remember("key", failure())
    failures.forget("key")
    assert failures.recent("key") is None
    never = FailedBuilds(0, clock=clock)
    never.remember("key", failure())
    assert never.recent("key") is None
    with pytest.raises(ValueError):
        FailedBuilds(float("nan"))
