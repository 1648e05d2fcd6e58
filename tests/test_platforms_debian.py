"""NIXERY_PLATFORMS with the Debian-derived set: real clients pull the arm64 image of
a name without a platform (`shell/curl`) and get Debian's arm64 bash and curl,
patched from this x86_64 machine, with no x86 file among them; they run under
qemu-user-static (binfmt_misc, set up by scripts/install-system-deps.sh).

Needs the Debian set with its aarch64-linux packages (`make debian-set` and CI
generate it); the module is skipped otherwise, as tests/test_debian_set.py is.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import daemons
from tests.registry import RegistryProcess, have, run, unpack_oci
from tests.sets import require_debian_set
from tests.test_platforms import BOTH, elf_machine, skopeo_copy_for

SET = require_debian_set("aarch64-linux.nix", module=True)
IMAGE = "shell/curl"


@pytest.fixture(scope="module")
def registry_both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One registry on the Debian set with both platforms: `shell/curl` is built once for the module."""
    base = tmp_path_factory.mktemp("platforms-debian")
    registry = RegistryProcess(
        storage=base / "storage", env={"NIXERY_BUNDLED_SET": "debian", "NIXERY_PLATFORMS": BOTH},
        log_path=base / "registry.log",
    )
    registry.start()
    yield registry
    registry.stop()


@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
def test_skopeo_copies_arm64_bash_and_curl_and_they_run(registry_both: RegistryProcess, tmp_path: Path) -> None:
    skopeo_copy_for(f"{registry_both.host}/{IMAGE}", "arm64", tmp_path / "layout")
    root = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    machines: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and (machine := elf_machine(path)) is not None:
            machines.setdefault(machine, []).append(str(path.relative_to(root)))
    assert machines.keys() == {"aarch64"}, {machine: files[:5] for machine, files in machines.items()}
    programs = {Path(path).name for path in machines["aarch64"]}
    assert {"bash", "curl"} <= programs, sorted(programs)[:40]
    out = run(["chroot", str(root), "/bin/bash", "-c", "curl --version && uname -m"]).stdout
    assert out.startswith("curl 7.") and "aarch64-unknown-linux-gnu" in out, out
    assert out.endswith("\naarch64\n"), out


@pytest.mark.skipif(not (have("containerd") and have("ctr")), reason="needs containerd and ctr")
def test_containerd_pulls_the_arm64_image(registry_both: RegistryProcess, tmp_path: Path) -> None:
    image = f"{registry_both.host}/{IMAGE}:latest"
    with daemons.containerd(tmp_path / "containerd") as socket:
        ctr = ["ctr", "--address", str(socket)]
        run([*ctr, "image", "pull", "--plain-http", "--platform", "linux/arm64", image])
        config = _ctr_config(ctr, image, "linux/arm64")
        assert config["architecture"] == "arm64" and config["os"] == "linux"


def _ctr_config(ctr: list[str], image: str, platform: str) -> dict:
    """The config of the platform's image under `image`, from containerd's content store."""
    index = json.loads(run([*ctr, "content", "get", _target_digest(ctr, image)]).stdout)
    os_name, arch = platform.split("/")
    entry = next(m for m in index["manifests"] if m["platform"] == {"os": os_name, "architecture": arch})
    manifest = json.loads(run([*ctr, "content", "get", entry["digest"]]).stdout)
    return json.loads(run([*ctr, "content", "get", manifest["config"]["digest"]]).stdout)


def _target_digest(ctr: list[str], image: str) -> str:
    for line in run([*ctr, "image", "ls"]).stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == image:
            return next(field for field in fields if field.startswith("sha256:"))
    raise AssertionError(f"{image} is not among containerd's images")


@pytest.mark.skipif(not have("dockerd"), reason="needs docker.io (dockerd)")
def test_docker_pulls_the_arm64_image(registry_both: RegistryProcess) -> None:
    image = f"{registry_both.host}/{IMAGE}"
    base = Path(tempfile.mkdtemp(prefix="nixery-platforms-docker-"))  # dockerd's sockets need short paths
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        socket = cleanup.enter_context(daemons.dockerd(base))
        docker = ["docker", "-H", f"unix://{socket}"]
        run([*docker, "pull", "--platform", "linux/arm64", image], timeout=600)
        inspected = json.loads(run([*docker, "image", "inspect", image]).stdout)[0]
    assert inspected["Architecture"] == "arm64" and inspected["Os"] == "linux"
