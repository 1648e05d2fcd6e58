"""Package sources, end to end: git repositories with tags as refs, channels
served over HTTP, local directories. Every test drives a real `nixery serve`
process, real git and real Nix, and checks what a user pulling images sees:
which programs an image runs, whether digests change, which error comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery.nix.errors import RefNotFound
from nixery.nix.git import GitSource
from tests.daemons import process_tree
from tests.httpd import LocalHTTP
from tests.registry import REPOSITORY, RegistryProcess, have, nix_counting_path, run, skopeo_to_oci, unpack_oci

pytestmark = pytest.mark.nix

BUNDLED_BUSYBOX = REPOSITORY / "pkgs" / "busybox"
needs_clients = pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")


# ---- helpers shared with test_names.py ----------------------------------------


def _nix_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def package_set_nix(programs: dict[str, str]) -> str:
    """A self-contained package set: each program a busybox shell script.

    `programs` maps attribute names (dotted for nested sets) to script bodies.
    The shell comes from the bundled busybox set, so every set shares it.
    """
    tree: dict = {}
    for attr, body in programs.items():
        *parents, leaf = attr.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = f"program {_nix_string(leaf)} {_nix_string(body)}"

    def render(node: dict, indent: str) -> str:
        lines = []
        for name, value in node.items():
            rendered = value if isinstance(value, str) else "{\n" + render(value, indent + "  ") + indent + "}"
            lines.append(f"{indent}{_nix_string(name)} = {rendered};\n")
        return "".join(lines)

    return (
        "# A package set made by nixery's tests.\n"
        "{ system ? builtins.currentSystem, ... }:\n"
        "let\n"
        f"  base = import {BUNDLED_BUSYBOX} {{ inherit system; }};\n"
        '  sh = "${base.busybox}/bin/sh";\n'
        "  program = name: body: derivation {\n"
        "    inherit name system body;\n"
        "    builder = sh;\n"
        '    PATH = "${base.busybox}/bin";\n'
        '    passAsFile = [ "body" ];\n'
        "    args = [ \"-euc\" ''\n"
        "      mkdir -p $out/bin\n"
        "      { echo \"#!${sh}\"; cat \"$bodyPath\"; } > $out/bin/${name}\n"
        "      chmod 555 $out/bin/${name}\n"
        "    '' ];\n"
        "  } // { meta.mainProgram = name; };\n"
        "in {\n"
        "  shell = base.busybox;\n"
        f"{render(tree, '  ')}"
        "}\n"
    )


def write_package_set(directory: Path, programs: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "default.nix").write_text(package_set_nix(programs))
    return directory


def error_of(registry: RegistryProcess, name: str, reference: str = "latest") -> tuple[int, dict]:
    """Status and the first registry error of a manifest request that must fail."""
    status, _, body = registry.request(f"/v2/{name}/manifests/{reference}")
    assert status >= 400, (status, body[:500])
    return status, json.loads(body)["errors"][0]


def rootfs_of(registry: RegistryProcess, image: str, workdir: Path) -> Path:
    """Pull `image` (name:tag) with skopeo and unpack it with umoci, as a user would."""
    workdir.mkdir(parents=True)
    skopeo_to_oci(f"{registry.host}/{image}", workdir / "layout")
    return unpack_oci(workdir / "layout", workdir / "bundle")


def run_in(rootfs: Path, *command: str, stdin: str | None = None) -> str:
    return run(["chroot", str(rootfs), *command], input=stdin).stdout


def started(storage: Path, **env: str) -> RegistryProcess:
    return RegistryProcess(storage=storage, env=env, log_path=storage.parent / f"{storage.name}.log").start()


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo.parent),
    }
    return run(["git", "-C", str(repo), *args], env=env).stdout.strip()


def commit_package_set(repo: Path, programs: dict[str, str], message: str) -> str:
    write_package_set(repo, programs)
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", message)
    return git(repo, "rev-parse", "HEAD")


# ---- git repositories -----------------------------------------------------------


class GitWorld:
    """A repository with two tagged versions, its commits, and a registry on it.

    main:     A (tag v1: hello says v1) ── B (tag v2, annotated: hello v2, extra)
    feature:  A ── F (hello says feature), not otherwise reachable by a tag
    """

    def __init__(self, root: Path):
        self.root = root
        self.repo = root / "pkgs"
        self.repo.mkdir(parents=True)
        git(self.repo, "init", "--quiet", "--initial-branch=main")
        self.v1 = commit_package_set(self.repo, {"hello": "echo hello v1"}, "v1")
        git(self.repo, "tag", "v1")
        git(self.repo, "checkout", "--quiet", "-b", "feature")
        self.feature = commit_package_set(self.repo, {"hello": "echo hello feature"}, "feature")
        git(self.repo, "checkout", "--quiet", "main")
        self.v2 = commit_package_set(
            self.repo, {"hello": "echo hello v2", "extra": "echo extra v2"}, "v2"
        )
        git(self.repo, "tag", "-a", "v2", "-m", "version 2")
        self.registry = started(root / "storage", NIXERY_PKGS_REPO=str(self.repo), NIXERY_GIT_REF_TTL="0.2")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitWorld]:
    world = GitWorld(tmp_path_factory.mktemp("git"))
    yield world
    world.registry.stop()


@needs_clients
def test_git_tags_give_different_images_with_their_programs(world: GitWorld, tmp_path: Path) -> None:
    v1 = rootfs_of(world.registry, "hello:v1", tmp_path / "v1")
    v2 = rootfs_of(world.registry, "hello/extra:v2", tmp_path / "v2")
    assert run_in(v1, "/bin/hello") == "hello v1\n"
    assert run_in(v2, "/bin/hello") == "hello v2\n"
    assert run_in(v2, "/bin/extra") == "extra v2\n"
    assert world.registry.manifest("hello", "v1")[0] != world.registry.manifest("hello", "v2")[0]
    # The program that only v2 has is missing at v1, and the error says so.
    status, error = error_of(world.registry, "hello/extra", "v1")
    assert (status, error["code"], error["detail"]["missing"]) == (404, "MANIFEST_UNKNOWN", ["extra"])


def test_git_commit_hash_and_branch_names_select_commits(world: GitWorld) -> None:
    digest_v1, _ = world.registry.manifest("hello", "v1")
    # A commit is its own image key: the same commit by hash is the same image as its tag.
    assert world.registry.manifest("hello", world.v1)[0] == digest_v1
    # A commit that only a branch reaches, by hash and by branch name.
    by_hash, _ = world.registry.manifest("hello", world.feature)
    assert world.registry.manifest("hello", "feature")[0] == by_hash
    assert by_hash != digest_v1


@needs_clients
def test_git_commit_hash_image_runs(world: GitWorld, tmp_path: Path) -> None:
    rootfs = rootfs_of(world.registry, f"hello:{world.feature}", tmp_path / "f")
    assert run_in(rootfs, "/bin/hello") == "hello feature\n"


@needs_clients
def test_git_latest_follows_the_default_branch(world: GitWorld, tmp_path: Path) -> None:
    """Runs last among the git tests on the shared repository: it moves `main`."""
    registry = world.registry
    digest_v1, _ = registry.manifest("hello", "v1")
    # main is at v2 now.
    assert registry.manifest("hello", "latest")[0] == registry.manifest("hello", "v2")[0]

    moved = commit_package_set(world.repo, {"hello": "echo hello v3", "extra": "echo extra v3"}, "v3")
    time.sleep(0.5)  # NIXERY_GIT_REF_TTL=0.2
    latest, _ = registry.manifest("hello", "latest")
    assert latest != registry.manifest("hello", "v2")[0]
    assert run_in(rootfs_of(registry, "hello:latest", tmp_path / "latest"), "/bin/hello") == "hello v3\n"
    assert registry.manifest("hello", moved)[0] == latest
    # The old tag keeps its image: same manifest digest as before the branch moved.
    assert registry.manifest("hello", "v1")[0] == digest_v1
    # A branch by name moves too.
    assert registry.manifest("hello", "main")[0] == latest


@pytest.mark.parametrize("ref", ["nosuchbranch", "v3-rc1", "0" * 40])
def test_git_missing_ref_is_manifest_unknown_naming_it(world: GitWorld, ref: str) -> None:
    status, error = error_of(world.registry, "hello", ref)
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN")
    assert ref in error["message"]


@pytest.mark.parametrize("ref", ["a..b", "-x", "x.lock", "v1.", ".hidden", "x~1", "@"])
def test_git_bad_ref_is_tag_invalid(world: GitWorld, ref: str) -> None:
    status, error = error_of(world.registry, "hello", ref)
    assert (status, error["code"], error["detail"]["kind"]) == (400, "NAME_INVALID", "TAG_INVALID"), error


def test_git_file_url(tmp_path: Path, world: GitWorld) -> None:
    registry = started(tmp_path / "storage", NIXERY_PKGS_REPO=f"file://{world.repo}")
    try:
        assert registry.manifest("hello", "v1")[0] == world.registry.manifest("hello", "v1")[0]
        assert registry.manifest("hello", world.feature)[0] == world.registry.manifest("hello", world.feature)[0]
    finally:
        registry.stop()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("{tmp}/no-such-repository", "{tmp}/no-such-repository"),
        ("git@nonexistent.invalid:pkgs.git", "git@nonexistent.invalid:pkgs.git"),
        ("https://user:t0ken@nonexistent.invalid/pkgs.git", "https://***@nonexistent.invalid/pkgs.git"),
    ],
)
def test_git_unreachable_repository_is_source_unavailable(tmp_path: Path, url: str, shown: str) -> None:
    url, shown = url.format(tmp=tmp_path), shown.format(tmp=tmp_path)
    registry = started(tmp_path / "storage", NIXERY_PKGS_REPO=url)
    try:
        for tag in ("latest", "v1", "a" * 40):
            status, error = error_of(registry, "hello", tag)
            assert (status, error["code"], error["detail"]["kind"]) == (502, "UNAVAILABLE", "SOURCE_UNAVAILABLE"), error
            assert shown in error["message"]
            assert "t0ken" not in json.dumps(error)
    finally:
        registry.stop()


def _sleeps_below_this_process(marker: str) -> list[int]:
    """The processes below this one with `marker` among their arguments."""
    found = []
    for pid in process_tree(os.getpid()):
        with contextlib.suppress(OSError):  # ended meanwhile
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(pid)
    return found


async def test_closing_the_resolver_stops_a_git_look_up_a_stopped_build_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A git source shares its look-ups (`git ls-remote`) and checkouts among the builds that
    need them, so a stopped build (Ctrl-C in `nixery build --local`, a stopped registry) left them
    going, git included, past the resolver's close. Now closing the resolver stops them and their
    processes."""
    seconds = "61.5"  # how the stand-in git is told apart from other processes
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    (wrappers / "git").write_text(f"#!/bin/sh\nexec sleep {seconds}\n")  # a remote that does not answer
    (wrappers / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")
    resolver = GitSource(str(tmp_path / "pkgs"), cache_dir=tmp_path / "cache", ref_ttl=60, fetch_timeout=60).resolver(
        timeout=60, evaluators=None
    )
    resolving = asyncio.ensure_future(resolver.resolve("latest"))
    for _ in range(200):
        if _sleeps_below_this_process(seconds):
            break
        await asyncio.sleep(0.05)
    assert _sleeps_below_this_process(seconds), "git did not start"
    resolving.cancel()
    await asyncio.wait_for(resolver.close(), 30)
    assert _sleeps_below_this_process(seconds) == []


def test_git_keeps_serving_built_images_when_the_repository_goes_away(tmp_path: Path, world: GitWorld) -> None:
    repo = tmp_path / "pkgs"
    shutil.copytree(world.repo, repo, symlinks=True)
    storage = tmp_path / "storage"
    registry = started(storage, NIXERY_PKGS_REPO=str(repo), NIXERY_GIT_REF_TTL="0.2")
    try:
        built = {tag: registry.manifest("hello", tag)[0] for tag in ("v1", "latest", world.v2)}
        repo.rename(tmp_path / "gone")
        time.sleep(0.5)  # past the branch cache time: the registry asks the repository again
        for tag, digest in built.items():
            assert registry.manifest("hello", tag)[0] == digest
        # Something never built needs the repository, and says which one.
        status, error = error_of(registry, "hello", "feature")
        assert (status, error["code"], error["detail"]["kind"]) == (502, "UNAVAILABLE", "SOURCE_UNAVAILABLE")
        assert str(repo) in error["message"]
    finally:
        registry.stop()
    # A restart remembers the last commit of each tag.
    registry = started(storage, NIXERY_PKGS_REPO=str(repo), NIXERY_GIT_REF_TTL="0.2")
    try:
        for tag, digest in built.items():
            assert registry.manifest("hello", tag)[0] == digest
        # An image not built before, from a commit already checked out, builds.
        registry.manifest("hello/shell", "v1")
    finally:
        registry.stop()


# ---- channels -------------------------------------------------------------------


class ChannelServer:
    """Serves `/archive/<rev>.tar.gz` on 127.0.0.1 and counts the downloads."""

    def __init__(self, tarballs: dict[str, bytes]):
        self.tarballs = tarballs
        self.http = LocalHTTP(self._answer)
        self.requests = self.http.requests

    def _answer(self, path: str) -> tuple[int, dict[str, str], bytes] | None:
        body = self.tarballs.get(path.removeprefix("/archive/").removesuffix(".tar.gz"))
        return None if body is None else (200, {"Content-Type": "application/gzip"}, body)

    @property
    def url_template(self) -> str:
        return self.http.url("/archive/{rev}.tar.gz")

    def close(self) -> None:
        self.http.close()


def channel_tarball(top: str, programs: dict[str, str]) -> bytes:
    """A gzipped tarball with one top directory, as nixpkgs archives are."""
    source = package_set_nix(programs).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        directory = tarfile.TarInfo(top)
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        member = tarfile.TarInfo(f"{top}/default.nix")
        member.size, member.mode = len(source), 0o644
        tar.addfile(member, io.BytesIO(source))
    return buffer.getvalue()


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def channel_server() -> Iterator[ChannelServer]:
    server = ChannelServer(
        {
            "nixos-test": channel_tarball("nixpkgs-nixos-test", {"hello": "echo hello from the channel"}),
            COMMIT: channel_tarball(f"nixpkgs-{COMMIT}", {"hello": "echo hello from a pinned commit"}),
        }
    )
    yield server
    server.close()


@needs_clients
def test_channel_image_runs_and_a_restart_does_not_download_again(
    tmp_path: Path, channel_server: ChannelServer
) -> None:
    storage = tmp_path / "storage"
    env = {"NIXERY_CHANNEL": "nixos-test", "NIXERY_CHANNEL_URL": channel_server.url_template}
    registry = started(storage, **env)
    try:
        rootfs = rootfs_of(registry, "shell/hello", tmp_path / "pull")
        assert run_in(rootfs, "/bin/hello") == "hello from the channel\n"
        assert run_in(rootfs, "/bin/sh", "-c", "echo shell works") == "shell works\n"
        digest, _ = registry.manifest("shell/hello")
    finally:
        registry.stop()
    assert channel_server.requests == ["/archive/nixos-test.tar.gz"]

    registry = started(storage, **env)
    try:
        assert registry.manifest("shell/hello")[0] == digest
        registry.manifest("hello")  # a new image: evaluates the cached package set
    finally:
        registry.stop()
    assert channel_server.requests == ["/archive/nixos-test.tar.gz"]


def test_channel_commit_hash(tmp_path: Path, channel_server: ChannelServer) -> None:
    registry = started(tmp_path / "storage", NIXERY_CHANNEL=COMMIT, NIXERY_CHANNEL_URL=channel_server.url_template)
    try:
        _, manifest = registry.manifest("hello", "any-tag-is-ignored")
        assert manifest["layers"]
        assert channel_server.requests == [f"/archive/{COMMIT}.tar.gz"]
    finally:
        registry.stop()


@pytest.mark.parametrize("reason", ["not served", "nothing listening"])
def test_channel_unreachable_is_source_unavailable_naming_the_url(
    tmp_path: Path, channel_server: ChannelServer, reason: str
) -> None:
    template = channel_server.url_template
    if reason == "nothing listening":
        channel_server.close()
    registry = started(tmp_path / "storage", NIXERY_CHANNEL="nixos-missing", NIXERY_CHANNEL_URL=template)
    try:
        status, error = error_of(registry, "hello")
        assert (status, error["code"], error["detail"]["kind"]) == (502, "UNAVAILABLE", "SOURCE_UNAVAILABLE"), error
        assert template.replace("{rev}", "nixos-missing") in error["message"]
    finally:
        registry.stop()


# ---- local paths ----------------------------------------------------------------


@needs_clients
def test_local_path_edit_gives_a_new_image(tmp_path: Path) -> None:
    pkgs = write_package_set(tmp_path / "pkgs", {"hello": "echo hello one"})
    registry = started(tmp_path / "storage", NIXERY_PKGS_PATH=str(pkgs))
    try:
        first, _ = registry.manifest("hello")
        assert registry.manifest("hello")[0] == first  # unchanged directory: same image
        assert run_in(rootfs_of(registry, "hello", tmp_path / "one"), "/bin/hello") == "hello one\n"

        write_package_set(pkgs, {"hello": "echo hello two", "newprog": "echo brand new"})
        second, _ = registry.manifest("hello")
        assert second != first
        assert run_in(rootfs_of(registry, "hello", tmp_path / "two"), "/bin/hello") == "hello two\n"
        assert run_in(rootfs_of(registry, "newprog", tmp_path / "new"), "/bin/newprog") == "brand new\n"
    finally:
        registry.stop()


@needs_clients
def test_a_local_path_that_is_a_symlink_follows_it_to_a_new_release(tmp_path: Path) -> None:
    """NIXERY_PKGS_PATH=/srv/pkgs, a symbolic link that a deployment moves to each new release
    (`ln -sfn releases/v2 /srv/pkgs`): the next pull serves the new release, and removing the
    old release afterwards breaks nothing. The registry read the link once at start-up: it
    served the old release until restarted, and once that was deleted every pull failed with
    500 BUILD_FAILED 'getting status of .../v1: No such file or directory'."""
    write_package_set(tmp_path / "releases" / "v1", {"hello": "echo hello one"})
    write_package_set(tmp_path / "releases" / "v2", {"hello": "echo hello two"})
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "v1")
    registry = started(tmp_path / "storage", NIXERY_PKGS_PATH=str(current))
    try:
        first, _ = registry.manifest("hello")
        assert run_in(rootfs_of(registry, "hello", tmp_path / "one"), "/bin/hello") == "hello one\n"

        (tmp_path / "next").symlink_to(tmp_path / "releases" / "v2")
        (tmp_path / "next").replace(current)  # an atomic switch, as deployments do it
        shutil.rmtree(tmp_path / "releases" / "v1")
        second, _ = registry.manifest("hello")
        assert second != first, "the old release is still served"
        assert run_in(rootfs_of(registry, "hello", tmp_path / "two"), "/bin/hello") == "hello two\n"
    finally:
        registry.stop()


@needs_clients
def test_a_local_path_moved_to_a_release_with_the_same_files_forgets_the_old_one(tmp_path: Path) -> None:
    """The link moved to a release with the same files (a redeploy of one version), and the old
    release was removed: the revision is the same (it is the files'), and its evaluator, started
    on the old directory, went on reading it; the next name not evaluated before failed with 500
    BUILD_FAILED. Now the evaluator is the directory's."""
    for release in ("v1", "v1-again"):  # `extra` in a file of its own, read once it is asked for
        write_package_set(tmp_path / "releases" / release, {"hello": "echo hello same", "extra": "EXTRA"})
        default = tmp_path / "releases" / release / "default.nix"
        program = 'program "extra" "echo extra same"'
        default.write_text(default.read_text().replace('program "extra" "EXTRA"', "import ./extra.nix program"))
        (default.parent / "extra.nix").write_text(f"program: {program}\n")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "v1")
    registry = started(tmp_path / "storage", NIXERY_PKGS_PATH=str(current))
    try:
        registry.manifest("hello")
        (tmp_path / "next").symlink_to(tmp_path / "releases" / "v1-again")
        (tmp_path / "next").replace(current)
        shutil.rmtree(tmp_path / "releases" / "v1")
        registry.manifest("extra")
        assert run_in(rootfs_of(registry, "extra", tmp_path / "extra"), "/bin/extra") == "extra same\n"
    finally:
        registry.stop()


@needs_clients
def test_an_edit_under_a_symlinked_directory_of_a_local_path_gives_a_new_image(tmp_path: Path) -> None:
    """A package set that keeps part of itself behind a symbolic link (`pkgs/sub -> ../shared`,
    a checkout kept elsewhere) is re-read when a file behind the link changes, as when any
    other of its files does. Only where the link pointed counted: the edit was never seen,
    not even after a restart (the image cache is keyed by the revision), so the tag kept
    serving the old program and new images mixed old and new packages."""
    write_package_set(tmp_path / "shared", {"hello": "echo hello one"})
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "default.nix").write_text("args: import ./sub args\n")
    (pkgs / "sub").symlink_to(Path("..") / "shared")
    registry = started(tmp_path / "storage", NIXERY_PKGS_PATH=str(pkgs))
    try:
        first, _ = registry.manifest("hello")
        assert run_in(rootfs_of(registry, "hello", tmp_path / "one"), "/bin/hello") == "hello one\n"

        write_package_set(tmp_path / "shared", {"hello": "echo hello two"})
        second, _ = registry.manifest("hello")
        assert second != first, "the edit behind the link was not seen"
        assert run_in(rootfs_of(registry, "hello", tmp_path / "two"), "/bin/hello") == "hello two\n"
    finally:
        registry.stop()


def test_a_link_loop_or_a_store_link_in_a_local_path_ends_the_walk(tmp_path: Path) -> None:
    """Links to directories are followed, but not round a loop."""
    from nixery.nix.sources import tree_fingerprint

    pkgs = write_package_set(tmp_path / "pkgs", {"hello": "echo hello"})
    (pkgs / "lib").mkdir()
    (pkgs / "lib" / "up").symlink_to("..")
    (pkgs / "lib" / "self").symlink_to(".")
    (pkgs / "busybox").symlink_to(BUNDLED_BUSYBOX)  # a directory outside the store: followed
    first = tree_fingerprint(pkgs)
    assert tree_fingerprint(pkgs) == first
    (pkgs / "lib" / "notes.txt").write_text("new\n")
    assert tree_fingerprint(pkgs) != first
    assert tree_fingerprint(pkgs / "lib") == tree_fingerprint(pkgs / "lib" / "up" / "lib")


def test_a_link_out_of_a_local_path_to_a_whole_disk_is_not_walked_for_ever(tmp_path: Path) -> None:
    """A link by mistake to `/` (or a home directory) walked the whole disk on every pull, and
    read /proc's files, some of which never end. Links into /proc, /sys and /dev are not
    followed, and a walk that meets too many files stops with an error that names the set."""
    from nixery.nix.errors import SourceUnavailable
    from nixery.nix.sources import tree_fingerprint

    pkgs = write_package_set(tmp_path / "pkgs", {"hello": "echo hello"})
    for name, target in [("proc", "/proc"), ("sys", "/sys"), ("dev", "/dev"), ("self-proc", "/proc/self")]:
        (pkgs / name).symlink_to(target)
    started = time.monotonic()
    first = tree_fingerprint(pkgs)
    assert time.monotonic() - started < 5 and tree_fingerprint(pkgs) == first  # /proc changes all the time
    big = tmp_path / "elsewhere"
    big.mkdir()
    for number in range(50):
        (big / f"file-{number}").write_text(str(number))
    (pkgs / "vendored").symlink_to(big)
    assert tree_fingerprint(pkgs, max_entries=100) != first
    with pytest.raises(SourceUnavailable, match=rf"the package set {pkgs} holds more than 40 files and directories"):
        tree_fingerprint(pkgs, max_entries=40)


def test_a_walk_through_a_link_to_a_directory_above_proc_does_not_enter_it(tmp_path: Path, monkeypatch) -> None:
    """Through a link to `/`, /proc is a plain directory, not a link: it was entered all the same.
    (Here a directory of our own stands for /proc.)"""
    import nixery.nix.sources as sources_module
    from nixery.nix.sources import tree_fingerprint

    pkgs = write_package_set(tmp_path / "pkgs", {"hello": "echo hello"})
    above = tmp_path / "above"
    (above / "proc").mkdir(parents=True)
    (above / "etc").mkdir()
    (above / "etc" / "motd").write_text("welcome\n")
    (above / "proc" / "kmsg").write_text("never ends\n")
    (pkgs / "root").symlink_to(above)
    monkeypatch.setattr(sources_module, "_NOT_FOLLOWED", (os.path.realpath(above / "proc"),))
    first = tree_fingerprint(pkgs)
    (above / "proc" / "kmsg").write_text("changed\n")
    assert tree_fingerprint(pkgs) == first, "a file under the stand-in for /proc was read"
    (above / "etc" / "motd").write_text("changed\n")
    assert tree_fingerprint(pkgs) != first


def test_a_local_path_rewritten_with_the_same_content_is_not_evaluated_again(tmp_path: Path) -> None:
    """Regenerating a package set (a `make run` rewrote the Debian set each time) or touching
    its files keeps its revision: a running registry serves the image it built, starting no
    Nix process, instead of evaluating and building it again."""
    (tmp_path / "nix").mkdir()
    path, calls = nix_counting_path(tmp_path / "nix")
    pkgs = write_package_set(tmp_path / "pkgs", {"hello": "echo hello", "other": "echo other"})
    (pkgs / "lib").mkdir()
    (pkgs / "lib" / "notes.txt").write_text("a file the set does not use\n")
    registry = started(tmp_path / "storage", NIXERY_PKGS_PATH=str(pkgs), PATH=path)
    try:
        first, _ = registry.manifest("hello")
        builds = len(registry.log_events("build.queued"))
        before = calls.read_text()

        later = time.time() + 3600
        for file in [pkgs / "default.nix", pkgs / "lib" / "notes.txt"]:
            file.write_bytes(file.read_bytes())  # rewritten: new times, same bytes
            os.utime(file, (later, later))
        assert registry.manifest("hello")[0] == first
        assert len(registry.log_events("build.queued")) == builds, "the image was built again"
        assert calls.read_text() == before, "Nix ran again"

        (pkgs / "lib" / "notes.txt").write_text("changed\n")  # any change of content is a new revision
        assert registry.manifest("hello")[0] == first  # (the same derivations: the same image...)
        assert len(registry.log_events("build.queued")) == builds + 1  # (...but looked at again)
    finally:
        registry.stop()


# ---- sources in-process: concurrency and the cache on disk ------------------------


def test_only_a_busybox_set_served_for_want_of_the_debian_set_suggests_generating_it(tmp_path: Path) -> None:
    """NIXERY_BUNDLED_SET=busybox is a choice: no advice to `make debian-set` (only `auto`
    falling back to the busybox set, because the Debian set is not generated, gives it)."""
    import structlog

    from nixery import config
    from nixery.app import open_source

    def advice(env: dict[str, str]) -> list[str]:
        with structlog.testing.capture_logs() as logs:
            source = open_source(config.load(env))
        assert source.description == "bundled busybox"
        return [entry["note"] for entry in logs if "make debian-set" in entry.get("note", "")]

    assert advice({"NIXERY_BUNDLED_SET": "busybox"}) == []
    not_generated = {"NIXERY_DEBIAN_SET_DIR": str(tmp_path / "not-generated")}
    assert len(advice(not_generated)) == 1
    assert len(advice({**not_generated, "NIXERY_BUNDLED_SET": "auto"})) == 1


def test_the_debian_set_directory_is_read_when_the_settings_are(tmp_path: Path) -> None:
    """NIXERY_DEBIAN_SET_DIR is a setting like the others: taken from the environment the
    settings are loaded from, not from the process's at import time."""
    from nixery import config

    generated = tmp_path / "debian-set"
    generated.mkdir()
    (generated / "default.nix").write_text("{ ... }: { }\n")
    assert config.load({"NIXERY_DEBIAN_SET_DIR": str(generated)}).bundled_set == config.BundledSet(
        "debian", generated, baseline=config.DEBIAN_SET_BASELINE
    )
    missing = {"NIXERY_DEBIAN_SET_DIR": str(tmp_path / "missing"), "NIXERY_BUNDLED_SET": "debian"}
    with pytest.raises(config.ConfigError, match="missing' has no default.nix"):
        config.load(missing)


async def test_a_local_path_revision_is_a_hash_of_content_read_only_when_files_change(
    tmp_path: Path, monkeypatch
) -> None:
    from nixery.nix import sources as sources_module
    from nixery.nix.sources import LocalPathSource

    pkgs = write_package_set(tmp_path / "pkgs", {"hello": "echo one"})
    (pkgs / "sub").mkdir()
    (pkgs / "sub" / "build.sh").write_text("echo building\n")
    (pkgs / ".git").mkdir()  # skipped, as before
    (pkgs / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    reads: list[str] = []
    real_open = open

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(sources_module, "open", counting_open, raising=False)
    source = LocalPathSource(pkgs)
    first = (await source.resolve("latest")).id
    assert sorted(reads) == [str(pkgs / "default.nix"), str(pkgs / "sub" / "build.sh")]

    reads.clear()
    assert (await source.resolve("latest")).id == first
    assert reads == [], "an unchanged tree is not read again"

    for file in (pkgs / "default.nix", pkgs / "sub" / "build.sh", pkgs / ".git" / "HEAD"):
        os.utime(file, (1, 1))
    (pkgs / ".git" / "HEAD").write_text("ref: refs/heads/other\n")
    assert (await source.resolve("latest")).id == first, "times, and .git, do not count"
    assert sorted(reads) == [str(pkgs / "default.nix"), str(pkgs / "sub" / "build.sh")]

    copy = tmp_path / "copy"
    shutil.copytree(pkgs, copy)  # new times and inodes
    assert (await LocalPathSource(copy).resolve("latest")).id == first

    (pkgs / "sub" / "build.sh").chmod(0o755)  # Nix copies the executable bit: another package set
    executable = (await source.resolve("latest")).id
    assert executable != first
    (pkgs / "sub" / "build.sh").write_text("echo building!\n")
    assert (await source.resolve("latest")).id not in (first, executable)
    (pkgs / "sub" / "build.sh").write_text("echo building\n")
    assert (await source.resolve("latest")).id == executable
    (pkgs / "sub" / "build.sh").unlink()
    assert (await source.resolve("latest")).id not in (first, executable)




async def test_local_path_requests_share_walks_but_always_see_an_edit(tmp_path: Path, monkeypatch) -> None:
    """Many manifest requests at once cost a few walks of the directory, not one
    each; and a request that comes after an edit, even while a walk that began
    before the edit is still under way, gets a revision that has the edit."""
    from nixery.nix import sources as sources_module
    from nixery.nix.sources import LocalPathSource

    pkgs = write_package_set(tmp_path / "pkgs", {"hello": "echo one"})
    walks: list[float] = []
    real_walk = sources_module.tree_fingerprint

    def slow_walk(root: Path, *args: object) -> str:
        walks.append(time.monotonic())
        fingerprint = real_walk(root, *args)
        time.sleep(0.2)  # a big package set: the walk ends well after it has read the tree
        return fingerprint

    monkeypatch.setattr(sources_module, "tree_fingerprint", slow_walk)
    source = LocalPathSource(pkgs)
    before = await asyncio.gather(*(source.resolve("latest") for _ in range(50)))
    assert len({r.id for r in before}) == 1
    assert len(walks) == 1

    walk_under_way = asyncio.ensure_future(source.resolve("latest"))
    await asyncio.sleep(0.05)  # that walk has begun and read the old directory
    write_package_set(pkgs, {"hello": "echo two"})
    after_edit = await asyncio.gather(*(source.resolve("latest") for _ in range(20)))
    assert (await walk_under_way).id == before[0].id
    assert {r.id for r in after_edit} != {before[0].id} and len({r.id for r in after_edit}) == 1
    assert len(walks) == 3  # the one under way, and one shared by the twenty that came after the edit


async def test_concurrent_requests_for_one_commit_make_one_checkout(tmp_path: Path, monkeypatch) -> None:
    from nixery.nix import git as git_module
    from nixery.nix.git import GitSource

    repo = tmp_path / "pkgs"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit = commit_package_set(repo, {"hello": "echo hi"}, "one")
    git(repo, "tag", "v1")
    calls: list[list[str]] = []
    real_run_git = git_module.run_git

    async def counting_run_git(args, **kwargs):
        calls.append(args)
        return await real_run_git(args, **kwargs)

    monkeypatch.setattr(git_module, "run_git", counting_run_git)
    # Two sources on one cache stand for two registry processes sharing it.
    first, second = (
        GitSource(str(repo), cache_dir=tmp_path / "cache", ref_ttl=30, fetch_timeout=60) for _ in range(2)
    )
    pairs = [(source, await_) for source in (first, second) for await_ in ["v1"] * 4]
    revisions = await asyncio.gather(*(source.resolve(tag) for source, tag in pairs))
    assert {r.id for r in revisions} == {commit}
    assert not any(args[0] in ("fetch", "archive") for args in calls), "resolving alone must not fetch"
    paths = await asyncio.gather(*(source.checkout(r) for (source, _), r in zip(pairs, revisions, strict=True)))
    assert len(set(paths)) == 1
    assert (paths[0] / "default.nix").read_text() == package_set_nix({"hello": "echo hi"})
    assert sum(args[0] == "ls-remote" for args in calls) == 2  # one per source, not one per request
    assert sum(args[0] == "archive" for args in calls) <= 2
    leftovers = [p.name for p in paths[0].parent.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []

    # A fresh source (a restart) finds the checkout of a known commit without git fetching anything.
    calls.clear()
    shutil.rmtree(repo)
    fresh = GitSource(str(repo), cache_dir=tmp_path / "cache", ref_ttl=30, fetch_timeout=60)
    assert await fresh.checkout(await fresh.resolve(commit)) == paths[0]
    assert calls == []


async def test_a_restart_knows_every_tag_resolved_at_once(tmp_path: Path, monkeypatch) -> None:
    """Two tags resolved at the same time each save the list of known tags. The first save is
    made slow here: the last list on disk must still hold both tags, so that a restart whose
    repository has gone away serves both (fresh-ci once saw `v1` forgotten this way)."""
    from nixery.nix import git as git_module
    from nixery.nix.git import GitSource

    repo = tmp_path / "pkgs"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    commit = commit_package_set(repo, {"hello": "echo hi"}, "one")
    git(repo, "tag", "v1")
    real_write_json = git_module.write_json

    def slow_first_write(path: Path, data: dict) -> None:
        if set(data) == {"v1"}:
            time.sleep(0.5)
        real_write_json(path, data)

    monkeypatch.setattr(git_module, "write_json", slow_first_write)
    source = GitSource(str(repo), cache_dir=tmp_path / "cache", ref_ttl=30, fetch_timeout=60)
    resolving_v1 = asyncio.ensure_future(source.resolve("v1"))
    while not source._known and not resolving_v1.done():  # v1 is known and its save has started
        await asyncio.sleep(0.01)
    await source.resolve("latest")
    await resolving_v1
    repo.rename(tmp_path / "gone")
    restarted = GitSource(str(repo), cache_dir=tmp_path / "cache", ref_ttl=30, fetch_timeout=60)
    assert [(await restarted.resolve(tag)).id for tag in ("v1", "latest")] == [commit, commit]


async def test_an_old_commit_by_hash_from_a_server_that_only_gives_ref_tips(tmp_path: Path, monkeypatch) -> None:
    """Protocol v0 servers refuse commits by hash; the source then fetches whole branches."""
    from nixery.nix.git import GitSource

    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "protocol.version")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "0")
    repo = tmp_path / "pkgs"
    repo.mkdir()
    git(repo, "init", "--quiet", "--initial-branch=main")
    old = commit_package_set(repo, {"hello": "echo old"}, "old")
    commit_package_set(repo, {"hello": "echo middle"}, "middle")
    tip = commit_package_set(repo, {"hello": "echo tip"}, "tip")
    source = GitSource(str(repo), cache_dir=tmp_path / "cache", ref_ttl=30, fetch_timeout=60)
    latest = await source.resolve("latest")
    assert latest.id == tip
    await source.checkout(latest)  # the mirror is now a shallow copy of the tip
    revision = await source.resolve(old)
    assert revision.id == old and "echo old" in (await source.checkout(revision) / "default.nix").read_text()
    with pytest.raises(RefNotFound, match="f" * 40):
        await source.checkout(await source.resolve("f" * 40))


async def test_concurrent_requests_for_a_channel_download_it_once(
    tmp_path: Path, channel_server: ChannelServer
) -> None:
    from nixery.nix.channel import ChannelSource

    source = ChannelSource("nixos-test", url_template=channel_server.url_template, cache_dir=tmp_path, timeout=60)
    revisions = await asyncio.gather(*(source.resolve(f"tag{i}") for i in range(8)))
    assert len(set(revisions)) == 1
    assert channel_server.requests == ["/archive/nixos-test.tar.gz"]
    revision = revisions[0]
    assert revision.id.startswith("sha256-")
    assert revision.path.name == "nixpkgs-nixos-test"  # the tarball's one top directory
    assert (revision.path / "default.nix").is_file()
    # The id is the tarball's hash: a restart reads it back, and does not download.
    restarted = ChannelSource("nixos-test", url_template=channel_server.url_template, cache_dir=tmp_path, timeout=60)
    assert await restarted.resolve("latest") == revision
    assert len(channel_server.requests) == 1


def test_ref_listing_prefers_tags_and_peels_annotated_tags() -> None:
    from nixery.nix.git import _pick_ref

    a, b, c = "a" * 40, "b" * 40, "c" * 40
    listing = f"{a}\trefs/heads/v1\n{b}\trefs/tags/v1\n{c}\trefs/tags/v1^{{}}\n"
    assert _pick_ref("v1", listing) == ("tag", "refs/tags/v1", c)
    assert _pick_ref("v1", f"{a}\trefs/heads/v1\n") == ("branch", "refs/heads/v1", a)
    assert _pick_ref("v1", f"{a}\trefs/heads/v10\n") is None
    assert _pick_ref("latest", f"ref: refs/heads/main\tHEAD\n{a}\tHEAD\n") == ("head", "refs/heads/main", a)
    assert _pick_ref("latest", "") is None


@pytest.mark.parametrize(
    "ref", ["-x", "--upload-pack=touch /tmp/x", "a..b", "x.lock", ".x", "a/.b", "a//b", "a@{1}", "a b", "a:b", "a\\b"]
)
def test_the_git_source_refuses_what_git_would_not_take_as_a_ref(tmp_path: Path, ref: str) -> None:
    """The source raises an error of the Nix layer; the HTTP layer's one map makes it TAG_INVALID."""
    from nixery.errors import TagInvalid
    from nixery.http.errors import registry_error
    from nixery.nix.errors import RefInvalid
    from nixery.nix.git import GitSource

    source = GitSource(str(tmp_path / "missing"), cache_dir=tmp_path, ref_ttl=1, fetch_timeout=1)
    with pytest.raises(RefInvalid) as refused:
        asyncio.run(source.resolve(ref))
    assert not isinstance(refused.value, TagInvalid)
    mapped = registry_error(refused.value)
    assert isinstance(mapped, TagInvalid) and mapped.detail == {"tag": ref}


def test_credentials_never_appear_in_source_descriptions(tmp_path: Path) -> None:
    from nixery.nix.git import GitSource

    source = GitSource(
        "https://user:s3cret@git.example.invalid/pkgs.git", cache_dir=tmp_path, ref_ttl=1, fetch_timeout=1
    )
    assert "s3cret" not in source.description and "git.example.invalid/pkgs.git" in source.description
    assert GitSource("git@host.invalid:pkgs.git", cache_dir=tmp_path, ref_ttl=1, fetch_timeout=1).url == (
        "git@host.invalid:pkgs.git"
    )


# ---- configuration ----------------------------------------------------------------


@pytest.mark.parametrize(
    "names",
    [
        ("NIXERY_PKGS_PATH", "NIXERY_PKGS_REPO"),
        ("NIXERY_PKGS_REPO", "NIXERY_CHANNEL"),
        ("NIXERY_PKGS_PATH", "NIXERY_CHANNEL"),
    ],
)
def test_two_sources_at_once_is_a_start_up_error_naming_both(tmp_path: Path, names: tuple[str, str]) -> None:
    values = {
        "NIXERY_PKGS_PATH": str(BUNDLED_BUSYBOX), "NIXERY_PKGS_REPO": str(tmp_path), "NIXERY_CHANNEL": "nixos-unstable",
    }
    env = {k: v for k, v in os.environ.items() if k not in values}
    env.update({name: values[name] for name in names}, STORAGE_PATH=str(tmp_path / "storage"), PORT="0")
    result = subprocess.run(
        [sys.executable, "-m", "nixery", "serve"], env=env, cwd=REPOSITORY, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(name in lines[0] for name in names), lines[0]
