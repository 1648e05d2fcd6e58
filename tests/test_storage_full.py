"""A registry whose STORAGE_PATH file system fills up: a real small tmpfs under a
real registry process (mounting needs root, as the tests have in CI)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.registry import DOCKER_MANIFEST, RegistryProcess, run, slow_package_set

pytestmark = pytest.mark.nix


def fill_blocks(directory: Path) -> None:
    """Take every free block of the file system holding `directory`."""
    with open(directory / "filler", "wb", buffering=0) as handle:  # unbuffered: nothing left to fail at close
        try:
            while True:
                handle.write(b"\0" * (1 << 16))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def fill_inodes(directory: Path) -> None:
    """Take every free inode too: no new file or directory can be made."""
    try:
        for number in range(1_000_000):
            (directory / f"inode-{number}").touch()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc


def error_lines(registry: RegistryProcess) -> list[str]:
    """The log's error lines: JSON ones at level error, and anything that is not JSON (a traceback)."""
    found = []
    for line in registry.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            found.append(line)
            continue
        if entry.get("level") == "error":
            found.append(entry["event"])
    return found


def metric(registry: RegistryProcess, name: str) -> float:
    status, _, body = registry.request("/metrics", accept=None)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


@pytest.fixture
def small_file_system(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-fs"
    mount.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=2000", "tmpfs", str(mount)])
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_storage_is_a_registry_error_and_stored_images_are_still_served(
    small_file_system: Path, tmp_path: Path
) -> None:
    storage = small_file_system / "storage"
    registry = RegistryProcess(
        storage=storage,
        # slowpoke takes 2 s to build: the pulls below all wait for the one build that fails.
        env={"NIXERY_PKGS_PATH": str(slow_package_set(tmp_path / "pkgs", seconds=2)),
             "NIXERY_VERIFIED_BLOB_LINKS": "true"},
        log_path=tmp_path / "registry.log",
    ).start()
    try:
        digest, manifest = registry.manifest("shell/hello")
        fill_blocks(small_file_system)
        # Every pull waits for the one build, which fails writing its layers (in worker processes).
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: registry.request("/v2/shell/slowpoke/manifests/latest"), range(4)))
        for status, _, body in answers:
            assert status == 507, body[:500]
            error = json.loads(body)["errors"][0]
            assert (error["code"], error["detail"]["kind"]) == ("UNAVAILABLE", "STORAGE_FULL")
            assert f"{storage}/" in error["message"] and "is full" in error["message"], error  # names where
        assert metric(registry, "nixery_storage_full_total") == 4
        assert error_lines(registry) == ["storage.full"]  # one line, not one per layer

        # No inode left either: a new image fails at once (its lock file), and is refused the same way.
        fill_inodes(small_file_system)
        status, _, body = registry.request("/v2/shell/figlet/manifests/latest")
        assert status == 507 and json.loads(body)["errors"][0]["detail"]["kind"] == "STORAGE_FULL", body[:500]
        assert metric(registry, "nixery_storage_full_total") == 5
        assert error_lines(registry) == ["storage.full"]  # at most one line a minute

        # What was stored is served as before: its manifest and every blob, bytes intact
        # (each blob's first serving here also tries to link it for nginx, with no inode left).
        assert registry.manifest("shell/hello")[0] == digest
        for blob in [manifest["config"], *manifest["layers"]]:
            status, _, body = registry.request(f"/v2/shell/hello/blobs/{blob['digest']}", accept=None)
            assert status == 200, body[:300]
            assert f"sha256:{hashlib.sha256(body).hexdigest()}" == blob["digest"]
        head = registry.request(f"/v2/shell/hello/manifests/{digest}", method="HEAD", accept=DOCKER_MANIFEST)
        assert head[0] == 200

        # The maintenance commands work on the full disk too (gc is what makes space).
        for command in (["check"], ["gc", "--older-than", "3h"]):
            done = subprocess.run(
                [sys.executable, "-m", "nixery", *command], env={**os.environ, "STORAGE_PATH": str(storage)},
                capture_output=True, text=True, timeout=120,
            )
            assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr

        # Space again: the refused image is built, with no restart.
        for filler in small_file_system.glob("*"):
            if filler != storage:
                filler.unlink()
        registry.manifest("shell/slowpoke")
    finally:
        registry.stop()
    # No half-written blob, no record naming a missing blob.
    check = subprocess.run(
        [sys.executable, "-m", "nixery", "check"], env={**os.environ, "STORAGE_PATH": str(storage)},
        capture_output=True, text=True, timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert not [p for p in (storage / "tmp").rglob("*") if p.is_file()], "staging files were left behind"
