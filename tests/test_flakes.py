"""NIXERY_FLAKE end to end: local flakes in git repositories, real Nix (with
the experimental features passed on the command line, nix.conf unchanged),
real `nixery serve` processes, images pulled by skopeo and run.

    lib (git)   C1: greeting "lib one" ── C2: greeting "lib two"
    pkgs (git)  v1: hello v1 ── v2 (main): hello v2; flake.lock pins lib at C1
    paths (git) a flake with a `path:` input, no lock file
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry import RegistryProcess, run
from tests.test_sources import (
    error_of,
    git,
    needs_clients,
    package_set_nix,
    rootfs_of,
    run_in,
    started,
)

pytestmark = pytest.mark.nix

SYSTEM = "x86_64-linux"
FEATURES = ["--extra-experimental-features", "nix-command flakes"]


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def new_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    return path


_FLAKE = """{
@INPUTS@  outputs = { @ARGUMENTS@ }:
    let
      set = import ./default.nix { system = "@SYSTEM@"; };
      sh = "${set.shell}/bin/sh";
      # A program that echoes `text` (a Nix string: it may use the inputs).
      says = name: text: derivation {
        inherit name text;
        system = "@SYSTEM@";
        builder = sh;
        PATH = "${set.shell}/bin";
        args = [ "-euc" ''
          mkdir -p $out/bin; printf '#!%s\\necho %s\\n' ${sh} "$text" > $out/bin/${name}
          chmod 555 $out/bin/${name}
        '' ];
      };
    in {
      packages.@SYSTEM@.hello = says "hello" @HELLO@;
      legacyPackages.@SYSTEM@ = set;
    };
}
"""


def write_flake(repo: Path, *, inputs: dict[str, str], hello: str, legacy: dict[str, str]) -> None:
    """A flake whose `packages.<system>.hello` echoes `hello` (a Nix string expression that
    may use the inputs, flakes with a `greeting`), and whose `legacyPackages.<system>` is
    a busybox package set of `legacy` programs (dotted names nest) with a `hello` of its own."""
    (repo / "default.nix").write_text(package_set_nix({**legacy, "hello": "echo hello from legacyPackages"}))
    input_lines = "".join(f'  inputs.{name}.url = "{url}";\n' for name, url in inputs.items())
    (repo / "flake.nix").write_text(
        _FLAKE.replace("@INPUTS@", input_lines).replace("@ARGUMENTS@", ", ".join(["self", *inputs]))
        .replace("@SYSTEM@", SYSTEM).replace("@HELLO@", hello)
    )


def lib_flake(repo: Path, greeting: str) -> str:
    (repo / "flake.nix").write_text(f'{{ outputs = {{ self }}: {{ greeting = "{greeting}"; }}; }}\n')
    return commit_all(repo, greeting)


class FlakeWorld:
    def __init__(self, root: Path):
        self.lib = new_repo(root / "lib")
        self.lib_one = lib_flake(self.lib, "lib one")
        self.pkgs = new_repo(root / "pkgs")
        inputs = {"lib": f"git+file://{self.lib}"}
        legacy = {"legacy": "echo from legacyPackages", "tools.greet": "echo greetings from a nested set"}
        write_flake(self.pkgs, inputs=inputs, hello='"hello v1, ${lib.greeting}"', legacy=legacy)
        git(self.pkgs, "add", "-A")  # a git flake is its tracked files
        run(["nix", *FEATURES, "flake", "lock", f"git+file://{self.pkgs}"])
        assert json.loads((self.pkgs / "flake.lock").read_text())["nodes"]["lib"]["locked"]["rev"] == self.lib_one
        self.v1 = commit_all(self.pkgs, "v1")
        git(self.pkgs, "tag", "v1")
        git(self.pkgs, "checkout", "--quiet", "-b", "feature")
        write_flake(self.pkgs, inputs=inputs, hello='"hello feature"', legacy=legacy)
        self.feature = commit_all(self.pkgs, "feature")
        git(self.pkgs, "checkout", "--quiet", "main")
        write_flake(self.pkgs, inputs=inputs, hello='"hello v2, ${lib.greeting}"', legacy=legacy)
        self.v2 = commit_all(self.pkgs, "v2")
        # The input moves on; the lock file still says C1.
        self.lib_two = lib_flake(self.lib, "lib two")
        self.registry = started(root / "storage", NIXERY_FLAKE=f"git+file://{self.pkgs}", NIXERY_GIT_REF_TTL="0.2")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlakeWorld]:
    world = FlakeWorld(tmp_path_factory.mktemp("flakes"))
    yield world
    world.registry.stop()


@needs_clients
def test_latest_and_a_tag_give_two_versions_with_the_locked_input(world: FlakeWorld, tmp_path: Path) -> None:
    latest = rootfs_of(world.registry, "hello", tmp_path / "latest")
    v1 = rootfs_of(world.registry, "hello:v1", tmp_path / "v1")
    # packages.<system>.hello wins over legacyPackages' hello; the lock file's lib, not lib's head.
    assert run_in(latest, "/bin/hello") == "hello v2, lib one\n"
    assert run_in(v1, "/bin/hello") == "hello v1, lib one\n"


def test_commits_key_the_images_and_name_them_by_hash(world: FlakeWorld) -> None:
    registry = world.registry
    assert registry.manifest("hello", "v1")[0] == registry.manifest("hello", world.v1)[0]
    assert registry.manifest("hello", "latest")[0] == registry.manifest("hello", world.v2)[0]
    assert registry.manifest("hello", "v1")[0] != registry.manifest("hello", "latest")[0]
    # A branch by name, and its commit by hash (on no branch Nix fetches by default).
    assert registry.manifest("hello", "feature")[0] == registry.manifest("hello", world.feature)[0]
    status, error = error_of(registry, "hello", "0123456789abcdef0123456789abcdef01234567")
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN"), error
    status, error = error_of(registry, "hello", "no-such-tag")
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN") and "no-such-tag" in error["message"], error


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"NIXERY_FLAKE": "git+file:///srv/pkgs", "NIXERY_PKGS_REPO": "/srv/pkgs"}, "NIXERY_FLAKE"),
        ({"NIXERY_FLAKE": "no reference"}, "not a flake reference"),
    ],
)
def test_flake_settings_are_checked_at_start_up(env: dict[str, str], said: str) -> None:
    from nixery.config import ConfigError, load

    with pytest.raises(ConfigError, match=said):
        load(env)


@needs_clients
def test_legacy_packages_and_dotted_names_into_nested_sets(world: FlakeWorld, tmp_path: Path) -> None:
    rootfs = rootfs_of(world.registry, "legacy/tools.greet", tmp_path / "legacy")
    assert run_in(rootfs, "/bin/legacy") == "from legacyPackages\n"
    assert run_in(rootfs, "/bin/greet") == "greetings from a nested set\n"
    status, error = error_of(world.registry, "nosuchthing")
    assert (status, error["code"], error["detail"]["missing"]) == (404, "MANIFEST_UNKNOWN", ["nosuchthing"])


@needs_clients
def test_a_flake_with_a_path_input(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "flake.nix").write_text('{ outputs = { self }: { greeting = "from a path input"; }; }\n')
    repo = new_repo(tmp_path / "paths")
    (repo / "inner").mkdir()
    (repo / "inner" / "flake.nix").write_text('{ outputs = { self }: { greeting = "one of its own"; }; }\n')
    inputs = {"base": f"path:{base}", "inner": "path:./inner"}  # absolute, and within the flake's repository
    write_flake(repo, inputs=inputs, hello='"hello ${base.greeting} and ${inner.greeting}"', legacy={})
    commit_all(repo, "a flake with path inputs and no lock file")
    registry = started(tmp_path / "storage", NIXERY_FLAKE=f"git+file://{repo}")
    try:
        rootfs = rootfs_of(registry, "hello", tmp_path / "pull")
        assert run_in(rootfs, "/bin/hello") == "hello from a path input and one of its own\n"
    finally:
        registry.stop()
    assert not (repo / "flake.lock").exists()  # the registry writes nothing into the flake


def test_a_path_flake_is_keyed_by_its_nar_hash_and_follows_edits(tmp_path: Path) -> None:
    directory = tmp_path / "flake"
    directory.mkdir()
    write_flake(directory, inputs={}, hello='"one"', legacy={})
    registry = started(tmp_path / "storage", NIXERY_FLAKE=f"path:{directory}")
    try:
        first, _ = registry.manifest("hello")
        assert registry.manifest("hello", "any-tag")[0] == first  # tags select nothing in a directory
        write_flake(directory, inputs={}, hello='"two"', legacy={})
        assert registry.manifest("hello")[0] != first
        revisions = {e["revision"] for e in registry.log_events("flake.locked")}
        assert len(revisions) == 2 and all(r.startswith("sha256-") for r in revisions), revisions
    finally:
        registry.stop()


@pytest.mark.parametrize(
    ("packages", "said", "evaluator"),
    [
        ("notDefinedAnywhere", "undefined variable 'notDefinedAnywhere'", "repl"),  # found when locking
        ("{ hello = (1).notAnAttribute; }", "while a set was expected", "repl"),  # found when evaluating
        ("{ hello = (1).notAnAttribute; }", "while a set was expected", "process"),  # by nix-instantiate
    ],
)
def test_a_flake_that_fails_to_evaluate_is_a_5xx_naming_the_file(
    tmp_path: Path, packages: str, said: str, evaluator: str
) -> None:
    repo = new_repo(tmp_path / "broken")
    flake = "{\n  outputs = { self }: {\n    packages.x86_64-linux = PACKAGES;\n  };\n}\n"
    (repo / "flake.nix").write_text(flake.replace("PACKAGES", packages))
    commit_all(repo, "a flake that does not evaluate")
    registry: RegistryProcess = started(
        tmp_path / "storage", NIXERY_FLAKE=f"git+file://{repo}", NIXERY_NIX_EVALUATOR=evaluator
    )
    try:
        status, headers, body = registry.request("/v2/hello/manifests/latest")
        assert 500 <= status < 600, (status, body[:500])
        assert headers["Content-Type"].startswith("application/json")
        error = json.loads(body)["errors"][0]
        assert error["code"] and error["message"] and "detail" in error
        assert "flake.nix:3:" in error["message"] and said in error["message"], error
    finally:
        registry.stop()


def test_a_forge_reference_takes_the_tag_as_its_ref(tmp_path: Path) -> None:
    """GitHub cannot be reached here: what the registry asks Nix to lock, checked as text."""
    from nixery.nix.flake import FlakeSource

    source = FlakeSource("github:owner/repo/main?dir=sub", cache_dir=tmp_path, ref_ttl=30, fetch_timeout=60)
    assert source._with_forge_ref("v2") == "github:owner/repo/v2?dir=sub"
    assert source._with_forge_ref("a" * 40) == f"github:owner/repo/{'a' * 40}?dir=sub"


def test_metadata_of_newer_nix_is_read_too() -> None:
    from nixery.nix.flake import parse_metadata

    locked = {"type": "path", "path": "/srv/pkgs", "narHash": "sha256-AAAA", "lastModified": 1}
    output = {"locked": locked, "locks": {"nodes": {"root": {}}, "root": "root", "version": 7},
              "lockedUrl": "path:/srv/pkgs?narHash=sha256-AAAA", "url": "path:/srv/pkgs?narHash=sha256-AAAA"}
    flake = parse_metadata(json.dumps(output).encode(), "")
    assert flake.id == "sha256-AAAA" and flake.spec["locked"] == locked
