"""What every image holds besides its store paths (issue 24): the requested packages'
whole trees at `/`, the baseline packages (NIXERY_BASELINE: a CA bundle,
/etc/services), and names that start with a digit.

A real registry on a package set made for the test (the busybox set plus a few
packages), images pulled with skopeo and unpacked with umoci, programs run
under chroot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery.config import ConfigError, load
from nixery.layers.rootlinks import Conflict, Linked
from nixery.nix.catalog import Catalog, CatalogEntry
from nixery.progress import Build, Stage, report_links
from tests.registry import PODMAN_RUN_FLAGS, REPOSITORY, RegistryProcess, run, skopeo_to_oci, unpack_oci

PACKAGES = """{ system ? builtins.currentSystem, ... }@args:
let
  base = import @BUSYBOX@ args;
  bb = "${base.busybox}/bin";
  package = name: script:
    derivation { inherit name system; builder = "${bb}/sh"; args = [ "-euc" script ]; PATH = bb; };
in base // {
  # nixpkgs spells it so: an attribute name cannot start with a digit
  _7zz = package "7zz-23.01" ''
    mkdir -p $out/bin
    printf '#!${bb}/sh\\necho 7-Zip 23.01\\n' > $out/bin/7zz
    chmod 555 $out/bin/7zz
  '';
  "iana-etc" = package "iana-etc-20240318" ''
    mkdir -p $out/etc
    echo 'ssh 22/tcp' > $out/etc/services
    echo 'tcp 6 TCP' > $out/etc/protocols
  '';
  zones = package "zones-1" ''
    mkdir -p $out/share/zoneinfo/Asia $out/nix-support
    echo JST-9 > $out/share/zoneinfo/Asia/Tokyo
    echo '${base.busybox}' > $out/nix-support/propagated-build-inputs
  '';
  otherhello = package "otherhello-1" ''
    mkdir -p $out/bin $out/share/zoneinfo
    printf '#!${bb}/sh\\necho other\\n' > $out/bin/hello
    chmod 555 $out/bin/hello
    echo UTC0 > $out/share/zoneinfo/UTC
  '';
}
"""


@pytest.fixture(scope="module")
def package_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("contents-set")
    (directory / "default.nix").write_text(PACKAGES.replace("@BUSYBOX@", str(REPOSITORY / "pkgs" / "busybox")))
    return directory


@pytest.fixture(scope="module")
def registry(package_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    base = tmp_path_factory.mktemp("contents-registry")
    process = RegistryProcess(
        storage=base / "storage", env={"NIXERY_PKGS_PATH": str(package_set)}, log_path=base / "registry.log"
    )
    process.start()
    yield process
    process.stop()


def rootfs_of(registry: RegistryProcess, name: str, where: Path) -> Path:
    skopeo_to_oci(f"{registry.host}/{name}", where / "oci")
    return unpack_oci(where / "oci", where / "bundle")


def resolve_in(rootfs: Path, path: str, hops: int = 40) -> Path:
    """Where `path` of the image leads, following symbolic links inside `rootfs` (as chroot would)."""
    current = rootfs
    for part in Path(path.lstrip("/")).parts:
        current = current / part
        while current.is_symlink() and hops:
            target = os.readlink(current)
            current = rootfs / target.lstrip("/") if target.startswith("/") else current.parent / target
            hops -= 1
    return current


def config_env(registry: RegistryProcess, name: str) -> list[str]:
    _, manifest = registry.manifest(name)
    status, _, body = registry.request(f"/v2/{name}/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200
    return json.loads(body)["config"]["Env"]


def test_a_name_that_starts_with_a_digit_finds_the_attribute_nix_spells_with_an_underscore(
    registry: RegistryProcess, tmp_path: Path,
) -> None:
    """Docker names cannot start with `_`: `HOST/7zz` is nixpkgs' `_7zz`."""
    rootfs = rootfs_of(registry, "7zz", tmp_path)
    result = run(["chroot", str(rootfs), "/bin/7zz"])
    assert result.stdout.strip() == "7-Zip 23.01"
    done = [event for event in registry.log_events("build.done") if event["image"] == "7zz"]
    assert done, registry.log()[-3000:]


def test_the_package_list_does_not_call_a_digit_name_missing() -> None:
    """The web pages check names against the package list before any build: `7zz` is there as `_7zz`."""
    entries = tuple(CatalogEntry(name, "package", "1", None) for name in ("_7zz", "_1password", "hello"))
    catalog = Catalog("rev", "test", entries, total=3, complete=True, read_at=0.0)
    assert catalog.missing(["7zz", "1Password", "_7zz", "hello", "8zz", "zz"]) == ["8zz", "zz"]


def test_whole_packages_are_linked_at_the_root_merged_and_the_first_wins(
    registry: RegistryProcess, tmp_path: Path,
) -> None:
    rootfs = rootfs_of(registry, "otherhello/zones/hello", tmp_path)
    zoneinfo = rootfs / "share" / "zoneinfo"
    assert zoneinfo.is_dir() and not zoneinfo.is_symlink()  # both packages have it: merged
    assert resolve_in(rootfs, "/share/zoneinfo/Asia/Tokyo").read_text() == "JST-9\n"
    assert resolve_in(rootfs, "/share/zoneinfo/UTC").read_text() == "UTC0\n"
    assert (rootfs / "share" / "zoneinfo" / "Asia").is_symlink()  # only `zones` has it: one link
    assert not (rootfs / "nix-support").exists()
    # `hello` comes before `otherhello` in the image's name (the order that identifies it)
    assert run(["chroot", str(rootfs), "/bin/hello"]).stdout.strip() == "Hello, world!"
    conflicts = registry.log_events("build.link_conflicts")
    assert [c for event in conflicts for c in event["conflicts"]] == [
        {"path": "/bin/hello", "kept": "hello", "lost": "otherhello"}
    ]


def test_every_image_gets_the_baseline_ca_bundle_and_etc_services(registry: RegistryProcess, tmp_path: Path) -> None:
    """`hello` has no CA bundle in its closure: the baseline's `cacert` and `iana-etc` are added."""
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in config_env(registry, "hello")
    rootfs = rootfs_of(registry, "hello", tmp_path)
    bundle = resolve_in(rootfs, "/etc/ssl/certs/ca-certificates.crt")
    assert bundle.is_file() and "-nss-cacert-" in str(bundle)
    assert resolve_in(rootfs, "/etc/services").read_text() == "ssh 22/tcp\n"
    assert resolve_in(rootfs, "/etc/protocols").read_text() == "tcp 6 TCP\n"
    assert run(["chroot", str(rootfs), "/bin/hello"]).stdout.strip() == "Hello, world!"


def test_an_empty_baseline_adds_nothing(package_set: Path, start_registry) -> None:
    plain = start_registry(NIXERY_PKGS_PATH=str(package_set), NIXERY_BASELINE="")
    assert [env.split("=")[0] for env in config_env(plain, "hello")] == ["PATH"]


def test_baseline_names_a_set_lacks_are_skipped_silently(start_registry) -> None:
    """The busybox set has `cacert` but no `iana-etc`."""
    busybox = start_registry(NIXERY_BUNDLED_SET="busybox")
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in config_env(busybox, "hello")
    assert not busybox.log_events("build.failed")


def test_the_baseline_setting_is_checked() -> None:
    assert load({"NIXERY_BASELINE": "cacert, iana-etc cacert"}).baseline == ("cacert", "iana-etc")
    assert load({"NIXERY_BASELINE": ""}).baseline == ()
    assert load({"NIXERY_BUNDLED_SET": "busybox"}).baseline == ("cacert", "iana-etc")
    with pytest.raises(ConfigError, match="NIXERY_BASELINE"):
        load({"NIXERY_BASELINE": "cacert,bad name!"})


def test_the_bundled_debian_set_adds_its_terminfo_database_and_locale_to_the_default_baseline(
    tmp_path: Path,
) -> None:
    """Debian's terminfo database and C.UTF-8 locale are Essential (no package depends on them): the
    bundled Debian set's default baseline has them; another source, or NIXERY_BASELINE set, does not."""
    (tmp_path / "default.nix").write_text("{ ... }: { }\n")
    debian = {"NIXERY_BUNDLED_SET": "debian", "NIXERY_DEBIAN_SET_DIR": str(tmp_path)}
    assert load(debian).baseline == ("cacert", "iana-etc", "ncurses-base", "locales-c-utf8")
    assert load({**debian, "NIXERY_BASELINE": "cacert"}).baseline == ("cacert",)
    assert load({**debian, "NIXERY_PKGS_PATH": str(tmp_path)}).baseline == ("cacert", "iana-etc")


def test_conflicts_are_told_in_the_builds_progress() -> None:
    build = Build("b1", "hello/otherhello")
    logged: list[tuple[str, dict]] = []

    class Log:
        def warning(self, event: str, **fields: object) -> None:
            logged.append((event, fields))

    linked = Linked(conflicts=[Conflict("/bin/hello", "hello", "otherhello")], conflict_count=1)
    report_links(build, Log(), linked)
    event = build.events[-1]
    assert event.stage is Stage.COMPRESSING
    assert "/bin/hello: hello's, not otherhello's" in event.message
    assert event.data["conflicts"] == [{"path": "/bin/hello", "kept": "hello", "lost": "otherhello"}]
    assert logged[0][0] == "build.link_conflicts"



def test_an_image_without_a_shell_package_runs_sh_and_env_scripts_from_its_closure(
    registry: RegistryProcess, tmp_path: Path,
) -> None:
    """`hello` is a script of busybox's sh: its image has `/bin/sh` and `/usr/bin/env` (busybox's),
    so a mounted `#!/usr/bin/env sh` script runs under podman, as in any image with a shell."""
    script = tmp_path / "greet.sh"
    script.write_text('#!/usr/bin/env sh\necho "$(hello) from $0"\n')
    script.chmod(0o755)
    image = f"{registry.host}/hello"
    try:
        result = run([
            "podman", "run", "--rm", "--tls-verify=false", *PODMAN_RUN_FLAGS,
            "-v", f"{script}:/greet.sh:ro", image, "/greet.sh",
        ])
    finally:
        run(["podman", "rmi", "--force", image], check=False)
    assert result.stdout == "Hello, world! from /greet.sh\n"


def test_every_image_has_a_var_tmp_that_any_user_writes_to(registry: RegistryProcess) -> None:
    """Debian has /var/tmp, sticky and writable by all, like /tmp: `mktemp -p /var/tmp` said
    "No such file or directory" in every image."""
    image = f"{registry.host}/hello"
    script = "mktemp -p /var/tmp >/dev/null && stat -c %a /var/tmp"
    try:
        for user in ("0", "65534"):
            result = run([
                "podman", "run", "--rm", "--tls-verify=false", *PODMAN_RUN_FLAGS, "--user", user, image,
                "sh", "-c", script,
            ], check=False)
            assert (result.returncode, result.stdout) == (0, "1777\n"), (user, result.stdout, result.stderr[-1000:])
    finally:
        run(["podman", "rmi", "--force", image], check=False)
