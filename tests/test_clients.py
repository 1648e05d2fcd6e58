"""Real container clients pull images the registry builds from their names, and run them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import daemons
from tests.registry import RegistryProcess, ctr_pull_and_run, have, podman_run, run, skopeo_to_oci, unpack_oci

pytestmark = pytest.mark.clients


def requests_seen(registry: RegistryProcess) -> list[tuple[str, str]]:
    return [(entry["method"], entry["path"]) for entry in registry.log_events("http.request")]


def manifest_requests(registry: RegistryProcess, image: str) -> list[tuple[str, str]]:
    return [(m, p) for m, p in requests_seen(registry) if p.startswith(f"/v2/{image}/manifests/")]


@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
@pytest.mark.parametrize(
    ("image", "command", "expected"),
    [
        ("shell", ["/bin/sh", "-c", "echo ok"], "ok\n"),
        ("shell/hello", ["/bin/sh", "-c", "hello && echo ok"], "Hello, world!\nok\n"),
        # No `shell` requested: no /bin/sh, but the programs run from /bin.
        ("fortune/cowsay", ["/bin/cowsay", "moo"], " < moo >"),
    ],
)
def test_skopeo_copy_unpack_and_run(registry: RegistryProcess, tmp_path: Path, image, command, expected) -> None:
    skopeo_to_oci(f"{registry.host}/{image}", tmp_path / "layout")
    rootfs = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    assert run(["chroot", str(rootfs), *command]).stdout.startswith(expected)


@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_podman_runs_hello(registry: RegistryProcess) -> None:
    result = podman_run(f"{registry.host}/shell/hello", "sh", "-c", "hello && echo ok")
    assert result.stdout.splitlines()[-2:] == ["Hello, world!", "ok"]


@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_podman_default_command_of_a_shell_image_is_the_shell(registry: RegistryProcess) -> None:
    result = subprocess.run(
        ["podman", "run", "--rm", "-i", "--tls-verify=false", "--runtime", "runc", "--network", "none",
         "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", f"{registry.host}/shell/figlet"],
        input="figlet hi; echo done\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "##### hi #####" in result.stdout and "done" in result.stdout


@pytest.mark.skipif(not (have("containerd") and have("ctr")), reason="needs containerd and ctr")
def test_containerd_pulls_and_runs(registry: RegistryProcess, tmp_path: Path) -> None:
    image = f"{registry.host}/shell/hello:latest"
    result = ctr_pull_and_run(image, tmp_path / "containerd", "sh", "-c", "hello && echo ok")
    assert result.stdout.splitlines()[-2:] == ["Hello, world!", "ok"]
    seen = manifest_requests(registry, "shell/hello")
    assert ("HEAD", "/v2/shell/hello/manifests/latest") in seen
    assert any(m == "GET" and p.rsplit("/", 1)[1].startswith("sha256:") for m, p in seen), seen


@pytest.mark.skipif(not have("dockerd"), reason="needs docker.io")
def test_docker_pulls_and_runs(registry: RegistryProcess, tmp_path: Path) -> None:
    image = f"{registry.host}/shell/fortune"
    with daemons.dockerd(tmp_path / "docker") as socket:
        docker = ["docker", "-H", f"unix://{socket}"]
        run([*docker, "pull", image])
        result = run([*docker, "run", "--rm", "--network", "none", image, "sh", "-c", "fortune >/dev/null && echo ok"])
        inspected = json.loads(run([*docker, "image", "inspect", image]).stdout)[0]
    assert result.stdout.strip() == "ok"
    assert inspected["Config"]["Cmd"] == ["/bin/sh"]
    assert inspected["Architecture"] == "amd64"
    seen = manifest_requests(registry, "shell/fortune")
    assert ("HEAD", "/v2/shell/fortune/manifests/latest") in seen
    assert any(m == "GET" and p.rsplit("/", 1)[1].startswith("sha256:") for m, p in seen), seen


def test_fresh_registries_agree_on_the_digest(start_registry) -> None:
    """The same package-set revision and the same (empty) layering history give the same
    digests (docs/layering.md, "What is deterministic")."""
    first = start_registry(NIXERY_BUNDLED_SET="busybox")
    second = start_registry(NIXERY_BUNDLED_SET="busybox")
    for image in ("shell/hello", "fortune/greet"):
        digest_a, manifest_a = first.manifest(image)
        digest_b, manifest_b = second.manifest(image)
        assert digest_a == digest_b
        assert manifest_a == manifest_b
