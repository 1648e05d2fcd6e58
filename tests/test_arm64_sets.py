"""The bundled sets' aarch64-linux packages: built on this x86_64 machine, run under emulation.

Real Nix builds (`--option extra-platforms aarch64-linux`, as the derivations
have an x86_64 builder) and real aarch64 programs run by qemu-user-static
through binfmt_misc, which scripts/install-system-deps.sh (`make setup`, CI)
sets up: without it these tests fail, they are not skipped. The programs run
in a chroot holding only their closure, so a library or loader missing from
the closure, or an x86_64 one in it, shows.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.registry import REPOSITORY, run
from tests.sets import require_debian_set

pytestmark = pytest.mark.nix

BUSYBOX_SET = REPOSITORY / "pkgs" / "busybox"
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
#: ELF e_machine values (elf.h).
MACHINES = {62: "x86_64", 183: "aarch64"}


@pytest.fixture(scope="module", autouse=True)
def aarch64_emulation() -> None:
    if not BINFMT.is_file() or "enabled" not in BINFMT.read_text():
        raise AssertionError(f"aarch64 emulation is not set up ({BINFMT}): run scripts/install-system-deps.sh")


def build(expression: str) -> list[str]:
    """nix-build of a list of derivations for aarch64-linux on this machine."""
    result = run(
        ["nix-build", "--no-out-link", "--option", "extra-platforms", "aarch64-linux", "-E", expression], timeout=900
    )
    return result.stdout.split()


def closure(paths: list[str]) -> list[Path]:
    return [Path(p) for p in run(["nix-store", "--query", "--requisites", *paths]).stdout.split()]


ChrootOf = Callable[[list[str]], Path]


@pytest.fixture
def chroot_of(tmp_path: Path) -> Iterator[ChrootOf]:
    """A root file system holding only the closure of some store paths (copied)."""

    def make(paths: list[str]) -> Path:
        root = tmp_path / "root"
        (root / "nix" / "store").mkdir(parents=True)
        (root / "tmp").mkdir()
        for path in closure(paths):
            run(["cp", "-a", str(path), str(root / "nix" / "store")])
        return root

    yield make
    # the store's copies are read-only
    run(["chmod", "-R", "u+w", str(tmp_path)], check=False)


def elf_machines(paths: list[Path]) -> dict[str, list[str]]:
    """Every ELF file under `paths`, by machine."""
    found: dict[str, list[str]] = {}
    for top in paths:
        for directory, _, files in os.walk(top):
            for name in files:
                file = Path(directory, name)
                if file.is_symlink():
                    continue
                with open(file, "rb") as f:
                    header = f.read(20)
                if header[:4] == b"\x7fELF" and len(header) == 20:
                    (machine,) = struct.unpack_from("<H", header, 18)
                    found.setdefault(MACHINES.get(machine, str(machine)), []).append(str(file))
    return found


def in_chroot(root: Path, *argv: str) -> str:
    return run(["chroot", str(root), *argv], timeout=120).stdout


def test_busybox_set_for_aarch64_holds_and_runs_the_arm64_busybox(chroot_of: ChrootOf) -> None:
    """`{ system = "aarch64-linux"; }` gives aarch64-linux derivations built by this machine's
    busybox; their outputs hold Debian's arm64 busybox and run under emulation."""
    expression = f'let s = import {BUSYBOX_SET} {{ system = "aarch64-linux"; }}; in [ s.shell s.hello s.greet ]'
    systems = run(["nix-instantiate", "--eval", "--strict", "--json", "-E",
                   f"map (d: d.system) ({expression})"]).stdout
    assert systems.strip() == '["aarch64-linux","aarch64-linux","aarch64-linux"]'
    shell, hello, greet = build(expression)
    assert elf_machines(closure([shell, hello, greet])).keys() == {"aarch64"}

    root = chroot_of([shell, hello, greet])
    assert in_chroot(root, f"{shell}/bin/uname", "-m") == "aarch64\n"
    assert in_chroot(root, f"{hello}/bin/hello") == "Hello, world!\n"
    assert "Greetings from /nix/store/" in in_chroot(root, f"{greet}/bin/greet")


def debian_set() -> Path:
    return require_debian_set("aarch64-linux.nix")


def test_debian_set_for_aarch64_runs_bash_curl_and_python3(chroot_of: ChrootOf) -> None:
    """Debian's arm64 .deb files, patched from this x86_64 machine, run under emulation from their
    closure alone: every ELF file in it is aarch64 (glibc's loader and libraries included)."""
    expression = (f'let s = import {debian_set()} {{ system = "aarch64-linux"; }}; '
                  "in [ s.shell s.curl s.python3 ]")
    shell, curl, python3 = build(expression)
    machines = elf_machines(closure([shell, curl, python3]))
    assert machines.keys() == {"aarch64"}, {machine: files[:5] for machine, files in machines.items()}

    root = chroot_of([shell, curl, python3])
    out = in_chroot(root, f"{shell}/bin/bash", "-c", f"PATH={curl}/bin:{shell}/bin; curl --version && uname -m")
    assert out.startswith("curl 7.") and "aarch64-unknown-linux-gnu" in out, out
    assert out.endswith("\naarch64\n"), out
    assert in_chroot(root, f"{python3}/bin/python3", "-c",
                     "import json, platform, ssl; print(platform.machine(), ssl.OPENSSL_VERSION.split()[0])"
                     ) == "aarch64 OpenSSL\n"


def test_debian_set_refuses_a_system_it_has_no_packages_for() -> None:
    result = run(["nix-instantiate", "--eval", "-E", f'(import {debian_set()} {{ system = "riscv64-linux"; }}).bash'],
                 check=False)
    assert result.returncode != 0
    assert "has packages for x86_64-linux, aarch64-linux, not riscv64-linux" in result.stderr


def test_busybox_set_says_where_a_missing_busybox_comes_from(tmp_path: Path) -> None:
    missing = tmp_path / "busybox"
    result = run(["nix-instantiate", "--eval", "-E",
                  f'(import {BUSYBOX_SET} {{ system = "aarch64-linux"; '
                  f'busyboxBinaries.aarch64-linux = {missing}; }}).hello.outPath'], check=False)
    assert result.returncode != 0
    assert f"{missing} is missing: run scripts/install-system-deps.sh" in result.stderr
