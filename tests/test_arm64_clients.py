"""`arm64/NAME` from this x86_64 registry, as real clients pull and run it.

The registry builds the bundled sets' aarch64-linux packages itself (Nix with
`extra-extra-platforms`); the clients ask for arm64 (`--arch`, `--platform`)
and the programs run under qemu-user-static through binfmt_misc, which
scripts/install-system-deps.sh (`make setup`, CI) sets up: without it these
tests fail, they are not skipped. Each image is built once, by the module's
registry, and every client here pulls that one.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import daemons
from tests.registry import PODMAN_RUN_FLAGS, RegistryProcess, run, skopeo_to_oci, unpack_oci
from tests.sets import require_debian_set

pytestmark = [pytest.mark.nix, pytest.mark.clients]

BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
#: ELF e_machine values (elf.h).
MACHINES = {3: "i386", 62: "x86_64", 183: "aarch64"}


@pytest.fixture(scope="module", autouse=True)
def aarch64_emulation() -> None:
    if not BINFMT.is_file() or "enabled" not in BINFMT.read_text():
        raise AssertionError(f"aarch64 emulation is not set up ({BINFMT}): run scripts/install-system-deps.sh")


def the_debian_set() -> None:
    require_debian_set("aarch64-linux.nix")


@pytest.fixture(scope="module")
def debian_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One registry on the Debian-derived set (the default bundled set) for the module."""
    the_debian_set()
    base = tmp_path_factory.mktemp("arm64-debian")
    registry = RegistryProcess(storage=base / "storage", env={"NIXERY_BUNDLED_SET": "debian"},
                               log_path=base / "registry.log").start()
    yield registry
    registry.stop()
    # podman keeps what it pulled: drop this registry's images
    images = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], check=False).stdout.split()
    if mine := [image for image in images if image.startswith(registry.host + "/")]:
        run(["podman", "rmi", "--force", *mine], check=False)


@pytest.fixture(scope="module")
def curl_rootfs(debian_registry: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`arm64/shell/curl` copied by skopeo to an OCI layout and unpacked with umoci."""
    work = tmp_path_factory.mktemp("arm64-curl")
    skopeo_to_oci(f"{debian_registry.host}/arm64/shell/curl", work / "layout")
    return unpack_oci(work / "layout", work / "bundle")


def elf_machines(root: Path) -> dict[str, list[str]]:
    """Every ELF file under `root` (symbolic links not followed), by machine."""
    found: dict[str, list[str]] = {}
    for directory, _, files in os.walk(root):
        for name in files:
            file = Path(directory, name)
            if file.is_symlink() or not file.is_file():
                continue
            with open(file, "rb") as f:
                header = f.read(20)
            if header[:4] == b"\x7fELF" and len(header) == 20:
                (machine,) = struct.unpack_from("<H", header, 18)
                found.setdefault(MACHINES.get(machine, str(machine)), []).append(str(file.relative_to(root)))
    return found


def program(root: Path, path: str) -> str:
    """The ELF file that runs when `path` runs in the file system `root`, relative to
    `root`: symbolic links followed (absolute targets are under `root`), and a
    script's `#!` interpreter in its place (the Debian set's bash is a wrapper)."""
    for _ in range(40):
        file = root / path.lstrip("/")
        if file.is_symlink():
            path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(file)))
            continue
        with open(file, "rb") as f:
            first_line = f.readline(4096)
        if not first_line.startswith(b"#!"):
            return path.lstrip("/")
        path = first_line[2:].split()[0].decode()
    raise AssertionError(f"{path}: too many levels of links and interpreters")


def in_chroot(root: Path, *argv: str) -> str:
    return run(["chroot", str(root), *argv], timeout=120).stdout


def test_skopeo_copy_of_arm64_curl_holds_only_aarch64_programs(curl_rootfs: Path) -> None:
    machines = elf_machines(curl_rootfs)
    assert machines.keys() == {"aarch64"}, {machine: files[:5] for machine, files in machines.items()}
    assert len(machines["aarch64"]) > 10  # bash, curl, glibc, openssl... not one stray file
    programs = {program(curl_rootfs, "/bin/bash"), program(curl_rootfs, "/bin/curl")}
    assert programs <= set(machines["aarch64"]), programs


def test_skopeo_copy_of_arm64_curl_runs_under_emulation(curl_rootfs: Path) -> None:
    out = in_chroot(curl_rootfs, "/bin/bash", "-c", "curl --version && uname -m")
    assert out.startswith("curl ") and "aarch64-unknown-linux-gnu" in out, out
    assert out.endswith("\naarch64\n"), out


def podman_run_arm64(image: str, *command: str) -> str:
    return run(["podman", "run", "--rm", "--arch", "arm64", "--tls-verify=false", *PODMAN_RUN_FLAGS,
                image, *command], timeout=600).stdout


def test_podman_runs_arm64_curl(debian_registry: RegistryProcess) -> None:
    assert podman_run_arm64(f"{debian_registry.host}/arm64/shell/curl", "uname", "-m") == "aarch64\n"


def test_podman_runs_arm64_python3_with_ssl(debian_registry: RegistryProcess) -> None:
    out = podman_run_arm64(
        f"{debian_registry.host}/arm64/shell/python3",
        "python3", "-c", "import json, platform, ssl; print(platform.machine(), ssl.OPENSSL_VERSION.split()[0])",
    )
    assert out == "aarch64 OpenSSL\n"


def test_arm64_images_of_the_debian_set_have_its_locale_terminfo_var_tmp_and_ca_bundle(
    debian_registry: RegistryProcess,
) -> None:
    """What every amd64 image of the Debian set has (tests/test_debian_set.py, test_image_contents.py),
    the arm64 ones have too: the baseline's C.UTF-8 locale and terminfo database come from the set's
    aarch64-linux packages (a baseline name that set lacked would be left out without a word), and
    /var/tmp and the CA bundle at OpenSSL's default file from the registry. Any warning (bash's
    "setlocale: cannot change locale") shows in the output, which must be exact."""
    # python3 started without the shell's environment (as podman, cron or `su -` start programs):
    # no TERMINFO_DIRS from the set's bash, no SSL_CERT_FILE (arm64 libssl reads /usr/lib/ssl/cert.pem)
    python = (
        "import curses, locale, platform, ssl; curses.setupterm(); print(platform.machine(),"
        " locale.setlocale(locale.LC_ALL, ''), curses.tigetnum('cols'),"
        " len(ssl.create_default_context().get_ca_certs()) > 100)"
    )
    script = "\n".join([
        "exec 2>&1",  # warnings land in the output: bash warns when LC_ALL names a locale it lacks
        "export LC_ALL=C.UTF-8",
        "printf '\\303\\251\\n' | wc -m",  # one character, two bytes
        "mktemp -p /var/tmp >/dev/null && stat -c %a /var/tmp",
        f'env -i TERM=xterm LC_ALL=C.UTF-8 /bin/python3 -c "{python}"',
    ])
    out = podman_run_arm64(f"{debian_registry.host}/arm64/shell/python3", "bash", "-c", script)
    assert out == "2\n1777\naarch64 C.UTF-8 80 True\n", out


def test_containerd_pulls_arm64(debian_registry: RegistryProcess, tmp_path: Path) -> None:
    image = f"{debian_registry.host}/arm64/shell/curl:latest"
    with daemons.containerd(tmp_path / "containerd") as socket:
        ctr = ["ctr", "--address", str(socket)]
        run([*ctr, "image", "pull", "--plain-http", "--platform", "linux/arm64", image])
        listed = run([*ctr, "image", "ls"]).stdout.splitlines()
        ran = run([*ctr, "run", "--rm", "--platform", "linux/arm64", image, "arm64-curl", "curl", "--version"])
    row = next(line.split() for line in listed if line.startswith(image + " "))
    assert "linux/arm64" in row, listed
    assert ran.stdout.startswith("curl ") and "aarch64-unknown-linux-gnu" in ran.stdout, ran.stdout


def test_docker_pulls_arm64(debian_registry: RegistryProcess, tmp_path: Path) -> None:
    image = f"{debian_registry.host}/arm64/shell/curl"
    with daemons.dockerd(tmp_path / "docker") as socket:
        docker = ["docker", "-H", f"unix://{socket}"]
        run([*docker, "pull", "--platform", "linux/arm64", image])
        inspected = json.loads(run([*docker, "image", "inspect", image]).stdout)[0]
        ran = run([*docker, "run", "--rm", "--network", "none", "--platform", "linux/arm64", image, "uname", "-m"])
    assert (inspected["Os"], inspected["Architecture"]) == ("linux", "arm64")
    assert ran.stdout == "aarch64\n"


def test_busybox_set_arm64_shell(tmp_path: Path) -> None:
    """The busybox set's arm64 `shell`: Debian's static arm64 busybox, and nothing x86."""
    registry = RegistryProcess(storage=tmp_path / "storage", env={"NIXERY_BUNDLED_SET": "busybox"},
                               log_path=tmp_path / "registry.log").start()
    try:
        skopeo_to_oci(f"{registry.host}/arm64/shell", tmp_path / "layout")
    finally:
        registry.stop()
    rootfs = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    assert elf_machines(rootfs).keys() == {"aarch64"}
    assert in_chroot(rootfs, "/bin/sh", "-c", "echo ok; uname -m") == "ok\naarch64\n"
