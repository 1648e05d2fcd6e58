"""The registry's own image, built by the registry from its own package set and run under podman.

`scripts/self-image/generate.sh` writes a package set (the Debian-derived set
plus `nixery`); a registry serving it builds the image `nixery` with its own
layering and tarball code on the first pull, like any other image. Needs the
Debian set with nix-bin (`scripts/debian-set/setup.sh`; the module is skipped
without it, and fails instead when NIXERY_REQUIRE_DEBIAN_SET is set, as in CI)
and podman.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nixery import __version__
from nixery.config import debian_set
from tests.registry import PODMAN_RUN_FLAGS, REPOSITORY, RegistryProcess, have, podman_run, run

GENERATE = REPOSITORY / "scripts" / "self-image" / "generate.sh"
SEED = REPOSITORY / "deploy" / "base" / "seed-nix-store.yaml"


def _missing() -> str | None:
    packages = debian_set().path / "packages.txt"
    setup = "run scripts/debian-set/setup.sh"
    if not (debian_set().path / "default.nix").is_file():
        return f"the Debian set is not generated ({debian_set().path}/default.nix missing): {setup}"
    if not packages.is_file() or not any(line.startswith("nix-bin ") for line in packages.read_text().splitlines()):
        return f"the Debian set in {debian_set().path} has no nix-bin (generated before it was added): {setup}"
    return None


if (missing := _missing()) is not None:
    if os.environ.get("NIXERY_REQUIRE_DEBIAN_SET"):  # CI: its set-up must have worked
        raise RuntimeError(missing)
    pytest.skip(missing, allow_module_level=True)
if not have("podman"):
    pytest.skip("the registry's image is run with podman, which is not installed", allow_module_level=True)

pytestmark = [pytest.mark.nix, pytest.mark.clients]


@pytest.fixture(scope="module")
def self_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A registry on a freshly generated self set (the pip cache in .cache/self-image is reused)."""
    base = tmp_path_factory.mktemp("self-image")
    set_dir = base / "self-set"
    result = run(["bash", str(GENERATE), "--build"], timeout=900, env_extra={"NIXERY_SELF_SET_DIR": str(set_dir)})
    assert (set_dir / "default.nix").is_file(), result.stdout
    registry = RegistryProcess(
        storage=base / "storage", env={"NIXERY_PKGS_PATH": str(set_dir)}, log_path=base / "registry.log"
    )
    registry.start()
    yield registry
    registry.stop()
    images = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], check=False).stdout.split()
    mine = [image for image in images if image.startswith(registry.host + "/")]
    if mine:
        run(["podman", "rmi", "--force", *mine], check=False)


@pytest.fixture(scope="module")
def image(self_registry: RegistryProcess) -> str:
    """`HOST/nixery`, pulled by podman: the registry builds it on this first request."""
    name = f"{self_registry.host}/nixery"
    run(["podman", "pull", "--tls-verify=false", name], timeout=600)
    return name


def test_nixery_version_runs_in_the_image(image: str) -> None:
    result = podman_run(image, "nixery", "--version")
    assert result.stdout.strip() == f"nixery {__version__}"


def test_image_config(self_registry: RegistryProcess, image: str) -> None:
    """A one-package image starts its main program; TLS clients find the CA bundle."""
    _, manifest = self_registry.manifest("nixery")
    status, _, body = self_registry.request(f"/v2/nixery/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200
    config = json.loads(body)["config"]
    assert config["Cmd"] == ["/bin/nixery"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in config["Env"]


def test_shell_nixery_has_python_nix_and_git(self_registry: RegistryProcess) -> None:
    script = (
        "set -e; python3 -c 'import nixery.app; print(\"import ok\")'; nix --version; git --version;"
        " nix-instantiate --eval -E '1 + 1'"
    )
    result = podman_run(f"{self_registry.host}/shell/nixery", "bash", "-c", script)
    imported, nix, git, evaluated = result.stdout.splitlines()
    assert imported == "import ok"
    assert nix == "nix (Nix) 2.8.0"
    assert git.startswith("git version 2.")
    assert evaluated == "2"
    assert "warning" not in result.stderr, result.stderr  # e.g. about the nixbld group: the image's nix.conf is used


def test_every_dependency_imports(image: str) -> None:
    """The wheels' compiled modules load with the store's glibc, libstdc++ and zlib: the image has no
    dynamic loader at the FHS paths (its /lib, if any, is the requested packages' lib/ linked at /)."""
    modules = [
        "aiohttp", "isal.isal_zlib", "rustworkx", "structlog", "prometheus_client", "rich", "obstore",
        "google.cloud.storage", "google._upb._message", "google_crc32c", "cryptography.hazmat.bindings._rust",
        "yaml", "markdown_it", "numpy", "zstandard.backend_c", "orjson",
    ]
    code = (
        "import importlib, sys, yaml\n"
        "for m in sys.argv[1:]: importlib.import_module(m)\n"
        "print(yaml.__with_libyaml__)"
    )
    result = podman_run(image, "python3", "-c", code, *modules)
    assert result.stdout.strip() == "True"
    loaders = "/lib/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2 /usr/lib/ld-linux-x86-64.so.2"
    result = podman_run(image, "bash", "-c", f"for f in {loaders}; do test ! -e $f || exit 1; done; echo no-loader")
    assert result.stdout.strip() == "no-loader"


def test_nix_builds_in_the_image(image: str) -> None:
    """Nix as root in a container, with the image's nix.conf (no build users, no sandbox)."""
    expr = (
        'derivation { name = "hello"; system = "x86_64-linux"; builder = "/bin/sh";'
        ' args = [ "-c" "echo built > $out" ]; }'
    )
    build = f"nix-build --no-out-link --option substituters '' -E '{expr}'"
    result = podman_run(image, "bash", "-c", f"cat $({build})")
    assert result.stdout.strip() == "built", result.stderr


def test_the_image_serves_images(image: str, tmp_path: Path) -> None:
    """`nixery serve` in its own image builds an image with the image's Nix (a mounted package set)."""
    (tmp_path / "pkgs").mkdir()
    (tmp_path / "pkgs" / "default.nix").write_text(textwrap.dedent("""\
        { system ? builtins.currentSystem, ... }: {
          hello = derivation {
            name = "hello-1";
            inherit system;
            builder = "/bin/sh";
            args = [ "-c" "/bin/mkdir -p $out/bin && echo 'echo hi' > $out/bin/hi && /bin/chmod 555 $out/bin/hi" ];
          };
        }
        """))
    (tmp_path / "pull.py").write_text(textwrap.dedent("""\
        import json, os, subprocess, sys, time, urllib.request
        env = {**os.environ, "NIXERY_PKGS_PATH": "/pkgs", "STORAGE_PATH": "/tmp/storage", "PORT": "8080"}
        env["NIX_CONFIG"] = "substituters ="
        log = open("/tmp/registry.log", "w")
        registry = subprocess.Popen(["nixery", "serve"], env=env, stdout=log, stderr=log)
        for _ in range(300):
            try:
                urllib.request.urlopen("http://127.0.0.1:8080/v2/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(
            "http://127.0.0.1:8080/v2/hello/manifests/latest",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        try:
            manifest = json.load(urllib.request.urlopen(request, timeout=120))
            print("evaluator", "nix.evaluator_ready" in open("/tmp/registry.log").read())
            print("layers", len(manifest["layers"]))
        except Exception as exc:
            print("failed:", exc, open("/tmp/registry.log").read()[-3000:], file=sys.stderr)
            sys.exit(1)
        finally:
            registry.terminate()
            registry.wait(30)
        """))
    result = run([
        "podman", "run", "--rm", *PODMAN_RUN_FLAGS,
        "-v", f"{tmp_path / 'pkgs'}:/pkgs:ro", "-v", f"{tmp_path / 'pull.py'}:/pull.py:ro",
        image, "python3", "/pull.py",
    ], timeout=300)
    layers = int(result.stdout.split()[-1])
    assert layers >= 2, result.stdout  # the package's store path and the entry layer
    assert "evaluator True" in result.stdout, "the image's Nix runs the long-running evaluator"


def _remove_tree(path: Path) -> None:
    """Store copies are read-only directories."""
    def writable_then_retry(function, target, _exc):
        os.chmod(os.path.dirname(target), stat.S_IRWXU)
        function(target)

    shutil.rmtree(path, onerror=writable_then_retry)


def test_deploy_seed_then_serve(image: str, tmp_path: Path) -> None:
    """What deploy/ does: the init container's seed.py copies the image's /nix into a volume,
    then the registry's container runs with that volume on /nix."""
    (seed_dir := tmp_path / "seed-script").mkdir()
    (seed_dir / "seed.py").write_text(yaml.safe_load(SEED.read_text())["data"]["seed.py"])
    volume = tmp_path / "nix"
    volume.mkdir()
    try:
        seed = [
            "podman", "run", "--rm", *PODMAN_RUN_FLAGS,
            "-v", f"{volume}:/seed", "-v", f"{seed_dir}:/opt/nixery-seed:ro",
            image, "python3", "/opt/nixery-seed/seed.py", "/seed",
        ]
        first = run(seed, timeout=300).stdout
        assert first.startswith("seeded ") and int(first.split()[1]) > 50, first
        assert run(seed).stdout.startswith("seeded 0 store paths"), "a second seed copies nothing"
        result = run([
            "podman", "run", "--rm", *PODMAN_RUN_FLAGS, "-v", f"{volume}:/nix", image,
            "bash", "-c", "nixery --version && nix-instantiate --eval -E '1 + 1'",
        ])
        assert result.stdout.split("\n")[:2] == [f"nixery {__version__}", "2"], result.stdout
    finally:
        _remove_tree(volume)


def _seeded(image: str, volume: Path, scripts: Path) -> str:
    """Run the init container's seed.py (deploy/base/seed-nix-store.yaml) of `image` into `volume`."""
    scripts.mkdir(exist_ok=True)
    (scripts / "seed.py").write_text(yaml.safe_load(SEED.read_text())["data"]["seed.py"])
    return run([
        "podman", "run", "--rm", *PODMAN_RUN_FLAGS, "-v", f"{volume}:/seed", "-v", f"{scripts}:/opt/nixery-seed:ro",
        image, "python3", "/opt/nixery-seed/seed.py", "/seed",
    ], timeout=300).stdout


def test_nix_knows_the_images_paths_in_a_seeded_volume(image: str, tmp_path: Path) -> None:
    """The image has a Nix database of its own paths (it has Nix's programs). The init container
    copied it only into a volume that had none (the Deployment's `emptyDir`); in one that had a
    database already (the DaemonSet's host directory, seeded by an earlier image) the image's paths
    stayed unknown, and nix-collect-garbage there deleted the registry's own programs. Now they are
    registered in that database too. The next image's seed left the earlier image's roots, so each
    upgrade kept a whole closure for ever, and rewrote the rows of paths the volume knew already,
    dropping their signatures: now its roots replace the earlier ones and known rows stay."""
    empty, used = tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    used.mkdir()
    try:
        # An earlier image's database: one that lists none of this image's paths.
        run(["podman", "run", "--rm", *PODMAN_RUN_FLAGS, "-v", f"{used}:/seed", "-e", "NIX_STATE_DIR=/seed/var/nix",
             image, "bash", "-c", "nix-store --load-db < /dev/null"])
        assert (used / "var" / "nix" / "db" / "db.sqlite").is_file()
        for volume in (empty, used):
            assert _seeded(image, volume, tmp_path / "seed-script").startswith("seeded "), volume
            kept = run(["podman", "run", "--rm", *PODMAN_RUN_FLAGS, "-v", f"{volume}:/nix", image, "bash", "-c",
                        "nix-collect-garbage && nixery --version"]).stdout
            assert "0 store paths deleted" in kept and kept.splitlines()[-1] == f"nixery {__version__}", (volume, kept)
        # The next image: the earlier one's root goes with it, what the volume knew keeps its row.
        earlier = run(["podman", "run", "--rm", *PODMAN_RUN_FLAGS, "-v", f"{used}:/nix", image, "bash", "-c",
                       "echo earlier > /tmp/earlier && path=$(nix-store --add /tmp/earlier) && "
                       "ln -s $path /nix/var/nix/gcroots/nixery/$(basename $path) && echo $path"]).stdout.split()[-1]
        with sqlite3.connect(used / "var" / "nix" / "db" / "db.sqlite") as database:
            (first,) = database.execute("SELECT min(id) FROM ValidPaths").fetchone()
            database.execute("UPDATE ValidPaths SET sigs = 'built-here:c2ln', ultimate = 1 WHERE id = ?", (first,))
            # A path of this image that the earlier one did not have: no other path refers to it.
            (new_id, new_path) = database.execute(
                "SELECT id, path FROM ValidPaths WHERE id NOT IN (SELECT reference FROM Refs) AND id != ? "
                "AND path != ? ORDER BY path LIMIT 1", (first, earlier)).fetchone()
            database.execute("DELETE FROM Refs WHERE referrer = ?", (new_id,))
            database.execute("DELETE FROM ValidPaths WHERE id = ?", (new_id,))
        assert _seeded(image, used, tmp_path / "seed-script").startswith("seeded 0 store paths")
        with sqlite3.connect(used / "var" / "nix" / "db" / "db.sqlite") as database:
            kept_row = database.execute("SELECT sigs, ultimate FROM ValidPaths WHERE id = ?", (first,)).fetchone()
            added = database.execute("SELECT count(*) FROM ValidPaths WHERE path = ?", (new_path,)).fetchone()
        assert kept_row == ("built-here:c2ln", 1), "its row was rewritten, its signature dropped"
        assert added == (1,), f"{new_path}, which the volume's database lacked, is not registered"
        collected = run(["podman", "run", "--rm", *PODMAN_RUN_FLAGS, "-v", f"{used}:/nix", image, "bash", "-c",
                         "nix-collect-garbage && nixery --version"]).stdout
        assert re.search(r"(?m)^1 store paths deleted", collected), collected
        assert not (used / earlier.removeprefix("/nix/")).exists(), collected
        assert collected.splitlines()[-1] == f"nixery {__version__}"
    finally:
        _remove_tree(empty)
        _remove_tree(used)


def test_the_layers_self_image_md_says_the_image_has(self_registry: RegistryProcess, image: str) -> None:
    """"groups the image's ~120 store paths into N layers": the page said 85 after the layering
    had come to give it 31 (19 after the layering change of 2026-12-05)."""
    page = " ".join((REPOSITORY / "docs" / "self-image.md").read_text().split())
    said = re.search(r"store paths into (\d+) layers", page)
    assert said is not None
    _, manifest = self_registry.manifest("nixery")
    assert abs(len(manifest["layers"]) - int(said[1])) <= max(3, int(said[1]) // 5), (said[1], len(manifest["layers"]))


def test_generate_usage() -> None:
    result = subprocess.run([str(GENERATE), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "usage" in result.stdout.lower()
    result = subprocess.run([str(GENERATE), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
