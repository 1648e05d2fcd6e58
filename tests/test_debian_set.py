"""The Debian-derived bundled set: real programs from Debian 12 built by Nix, served by a real registry.

Needs the set generated first (`scripts/debian-set/setup.sh`, which `make
debian-set` and CI run); the whole module is skipped otherwise.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import shutil
import ssl
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixery.nix.packages import EVAL_NIX, host_system
from tests import daemons
from tests.httpd import LocalHTTP
from tests.registry import RegistryProcess, ctr_pull_and_run, podman_run, run, skopeo_to_oci, unpack_oci
from tests.sets import require_debian_set

SET = require_debian_set(module=True)


@pytest.fixture(scope="module")
def debian_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One registry on the Debian set for the module: images share its storage and layer history."""
    base = tmp_path_factory.mktemp("debian-set")
    registry = RegistryProcess(
        storage=base / "storage", env={"NIXERY_BUNDLED_SET": "debian"}, log_path=base / "registry.log"
    )
    registry.start()
    yield registry
    registry.stop()
    # podman keeps what it pulled: drop this registry's images
    images = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"], check=False).stdout.split()
    mine = [image for image in images if image.startswith(registry.host + "/")]
    if mine:
        run(["podman", "rmi", "--force", *mine], check=False)


def nix_build(attr: str) -> str:
    return run(["nix-build", "--no-out-link", str(SET), "-A", attr], timeout=900).stdout.strip().splitlines()[-1]


# --- the set itself (Nix only) ----------------------------------------------


def test_names_nix_and_debian() -> None:
    """Usual Nix names, Debian names and sanitized names all resolve; `shell`'s program is bash."""
    expr = f"""
      let s = import {SET} {{}}; in {{
        names = builtins.filter (n: builtins.hasAttr n s) [
          "python3" "openssh" "openssh-client" "gnugrep" "gnused" "gnutar" "xz" "xz-utils" "cacert"
          "ca-certificates" "curl" "git" "jq" "vim" "nano" "openssl" "bash" "coreutils" "shell"
          "libstdc++6" "libstdcxx6" "python3.11" "python3_11" "gawk" "less" "findutils" ];
        shellMain = s.shell.meta.mainProgram;
        sameOpenssh = s.openssh.drvPath == s."openssh-client".drvPath;
        sameStdcxx = s.libstdcxx6.drvPath == s."libstdc++6".drvPath;
      }}"""
    result = json.loads(run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr]).stdout)
    assert len(result["names"]) == 26, result["names"]
    assert result["shellMain"] == "bash"
    assert result["sameOpenssh"] and result["sameStdcxx"]


def test_every_package_is_found_by_its_name_in_lower_case() -> None:
    """Registry clients refuse upper-case names, and the search shows the set's own names
    (`python3.11`, `libstdc++6`, `bashInteractive`): the resolver finds every top-level
    package by its name in lower case, and finds that package itself."""
    expr = f"""
      let s = import {SET} {{}};
          isDrv = n: (builtins.tryEval (builtins.isAttrs s.${{n}} && (s.${{n}}.type or null) == "derivation")).value;
      in builtins.filter isDrv (builtins.attrNames s)"""
    names = json.loads(run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr]).stdout)
    assert len(names) > 150 and "python3.11" in names and "bashInteractive" in names
    request = json.dumps({"packages": [name.lower() for name in names], "system": host_system()})
    result = json.loads(run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(EVAL_NIX),
         "--argstr", "pkgsPath", str(SET), "--argstr", "request", request],
        timeout=600,
    ).stdout)
    assert result["missing"] == []
    assert {p["name"]: p["attr"] for p in result["packages"]} == {name.lower(): name for name in names}
    assert {p["pullName"] for p in result["packages"]} == {name.lower() for name in names}


def test_cacert_bundle_and_shell_references_it() -> None:
    cacert = Path(nix_build("cacert"))
    bundle = (cacert / "etc/ssl/certs/ca-certificates.crt").read_text()
    assert bundle.count("-----BEGIN CERTIFICATE-----") > 100
    shell = nix_build("shell")
    closure = run(["nix-store", "-qR", shell]).stdout.split()
    assert str(cacert) in closure


# --- images under podman ------------------------------------------------------


def test_shell_curl_runs_bash_and_curl(debian_registry: RegistryProcess) -> None:
    script = 'curl --version; echo "bash $BASH_VERSION"'
    result = podman_run(f"{debian_registry.host}/shell/curl", "bash", "-c", script)
    assert result.stdout.startswith("curl 7.88"), result.stdout
    assert "OpenSSL/3" in result.stdout
    assert "bash 5.2" in result.stdout


def test_shell_image_config(debian_registry: RegistryProcess) -> None:
    """Cmd is bash, SSL_CERT_FILE names the bundle of the closure."""
    _, manifest = debian_registry.manifest("shell/curl")
    status, _, body = debian_registry.request(f"/v2/shell/curl/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200
    config = json.loads(body)["config"]
    assert config["Cmd"] == ["/bin/bash"]
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in config["Env"]


def test_shell_python3_imports_json_and_ssl(debian_registry: RegistryProcess) -> None:
    result = podman_run(
        f"{debian_registry.host}/shell/python3",
        "python3", "-c", "import json, ssl, sys; print(json.dumps([sys.version_info[:2], ssl.OPENSSL_VERSION]))",
    )
    version, openssl = json.loads(result.stdout)
    assert version == [3, 11]
    assert openssl.startswith("OpenSSL 3")


def test_shell_git_commits(debian_registry: RegistryProcess) -> None:
    script = (
        "cd /tmp && git init -q repo && cd repo"
        " && git -c user.name=Test -c user.email=test@example.com commit -q --allow-empty -m x"
        " && git log --format=%s"
    )
    result = podman_run(f"{debian_registry.host}/shell/git", "bash", "-c", script)
    assert result.stdout.strip() == "x", (result.stdout, result.stderr)


def test_shell_jq_filters_json(debian_registry: RegistryProcess) -> None:
    result = podman_run(f"{debian_registry.host}/shell/jq", "bash", "-c", "echo '{\"a\":1}' | jq .a")
    assert result.stdout.strip() == "1"


def test_python3_alone_runs_shell_commands(debian_registry: RegistryProcess) -> None:
    """`python3` without `shell`: `os.system` and `shell=True` need `/bin/sh`, which is the
    closure's dash (the one Debian's scripts run)."""
    script = (
        "import os, subprocess\n"
        "print(subprocess.run('echo $0', shell=True, capture_output=True, text=True).stdout.strip())\n"
        "print(os.system('exit 3') >> 8)\n"
    )
    result = podman_run(f"{debian_registry.host}/python3", "python3", "-c", script)
    assert result.stdout.split() == ["/bin/sh", "3"], (result.stdout, result.stderr)


def test_shell_nix_builds_a_derivation_as_root(debian_registry: RegistryProcess) -> None:
    """Nix in an image built nothing: its defaults want the `nixbld` group's build users and a
    sandbox, and an image has neither ("the group 'nixbld' specified in 'build-users-group' does
    not exist"). The image's /etc/nix/nix.conf now says so; Nix builds as root."""
    expression = (
        'derivation { name = "greeting"; system = builtins.currentSystem; builder = "/bin/sh";'
        ' args = [ "-c" "echo built in the image > $out" ]; }'
    )
    script = f"set -e; out=$(nix-build --no-out-link --option substituters '' -E '{expression}'); cat $out"
    result = podman_run(f"{debian_registry.host}/shell/nix", "bash", "-c", script)
    assert result.stdout == "built in the image\n", result.stderr[-2000:]


def test_shell_nix_knows_the_images_paths_and_its_garbage_collection_keeps_them(
    debian_registry: RegistryProcess,
) -> None:
    """The image had no Nix database: Nix took every path of it for invalid, and
    `nix-collect-garbage` deleted them all, the running container's `ls` with them. Now the image
    lists its paths (Nix checks their contents against the hashes it lists) and roots its packages."""
    script = (
        "set -e; bash=$(readlink -f /bin/bash); bash=${bash%/bin/bash}\n"
        "nix-store --verify --check-contents > /tmp/verify 2>&1 || { cat /tmp/verify; exit 1; }\n"
        "echo verified $(nix-store -q --requisites $bash | wc -l)\n"
        "nix-store -q --references $bash | grep -q libc6 && echo bash refers to libc6\n"
        "extra=$(nix-build --no-out-link --option substituters '' -E "
        "'derivation { name = \"extra\"; system = builtins.currentSystem; builder = \"/bin/sh\"; "
        "args = [ \"-c\" \"echo > $out\" ]; }')\n"
        "nix-collect-garbage 2>&1 | tail -1\n"
        "test -e $extra || echo the built path is collected\n"
        "ls / > /dev/null && echo ls still runs"
    )
    result = podman_run(f"{debian_registry.host}/shell/nix", "bash", "-c", script)
    lines = result.stdout.splitlines()
    assert len(lines) == 5, (result.stdout, result.stderr[-2000:])
    assert lines[0].startswith("verified ") and int(lines[0].split()[1]) > 1, result.stdout  # bash's closure
    assert lines[1] == "bash refers to libc6", result.stdout
    # Only what was made in the container goes (the derivation and its output): the image's are rooted.
    assert lines[2].startswith("2 store paths deleted"), result.stdout
    assert lines[3:] == ["the built path is collected", "ls still runs"], result.stdout


def test_localhost_resolves_under_ctr_run(debian_registry: RegistryProcess, tmp_path: Path) -> None:
    """`ctr run` mounts no /etc/hosts: the image's own names localhost, so a program that
    connects to `localhost` (a sidecar, a test database) finds 127.0.0.1 without DNS."""
    script = "import socket; print(socket.getaddrinfo('localhost', 80, socket.AF_INET)[0][4][0])"
    result = ctr_pull_and_run(f"{debian_registry.host}/python3:latest", tmp_path, "python3", "-c", script)
    assert result.stdout.strip() == "127.0.0.1", (result.stdout, result.stderr)


def layer_paths(registry: RegistryProcess, name: str, digest: str) -> set[str]:
    """Top-level store paths in a layer ("/nix/store/<hash>-<name>")."""
    status, _, body = registry.request(f"/v2/{name}/blobs/{digest}", accept=None)
    assert status == 200, status
    paths = set()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(body))) as tar:
        for member in tar.getmembers():
            parts = member.name.lstrip("./").split("/")
            if len(parts) >= 3 and parts[:2] == ["nix", "store"]:
                paths.add("/nix/store/" + parts[2])
    return paths


def test_curl_and_jq_share_the_glibc_layer(debian_registry: RegistryProcess) -> None:
    glibc = nix_build("libc6")
    layers = {}
    for image in ("shell/curl", "shell/jq"):
        _, manifest = debian_registry.manifest(image)
        holding = [layer["digest"] for layer in manifest["layers"]
                   if glibc in layer_paths(debian_registry, image, layer["digest"])]
        assert len(holding) == 1, (image, holding)
        layers[image] = holding[0]
    assert layers["shell/curl"] == layers["shell/jq"]


def test_an_image_holding_a_path_in_two_layers_runs_under_podman_containerd_and_docker(tmp_path: Path) -> None:
    """A stored layer is reused whole although another stored layer the image reuses holds some of
    its paths, where those weigh little (`CostModel.takes_stored_layer`): clients that pulled the
    earlier images fetch nothing again. Such a path sits in two layers, unpacked one over the other.
    Here shell/curl and shell/jq each stored a layer that shell/curl/jq/git reuses."""
    registry = RegistryProcess(
        storage=tmp_path / "storage", env={"NIXERY_BUNDLED_SET": "debian"}, log_path=tmp_path / "registry.log"
    )
    registry.start()
    name = "shell/curl/jq/git"
    try:
        for earlier in ("shell/curl", "shell/jq"):
            registry.manifest(earlier)
        _, manifest = registry.manifest(name)
        held = [layer_paths(registry, name, layer["digest"]) for layer in manifest["layers"]]
        twice = {path for n, paths in enumerate(held) for path in paths if any(path in other for other in held[n + 1:])}
        assert twice, "no store path sits in two layers: the test no longer checks what it says"
        script = "curl --version | head -n 1; echo '{\"a\": 1}' | jq .a; git --version"
        image = f"{registry.host}/{name}"
        with daemons.dockerd(tmp_path / "d") as socket:  # short: dockerd's sockets must fit in 108 bytes
            docker = ["docker", "-H", f"unix://{socket}"]
            run([*docker, "pull", image])
            under_docker = run([*docker, "run", "--rm", "--network", "none", image, "bash", "-c", script])
        for result in (
            podman_run(image, "bash", "-c", script),
            ctr_pull_and_run(f"{image}:latest", tmp_path / "containerd", "bash", "-c", script),
            under_docker,
        ):
            curl, jq, git = result.stdout.splitlines()
            assert curl.startswith("curl 7.88") and jq == "1" and git.startswith("git version 2.39"), result.stdout
    finally:
        registry.stop()
        run(["podman", "rmi", "--force", f"{registry.host}/{name}"], check=False)


# --- nothing from the host ------------------------------------------------------


def elf_interpreter(path: Path) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF file, None without one (or not ELF)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return None
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, = struct.unpack_from("<I", table, i * phentsize)
            if p_type == 3:  # PT_INTERP
                offset, = struct.unpack_from("<Q", table, i * phentsize + 8)
                size, = struct.unpack_from("<Q", table, i * phentsize + 32)
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode()
    return None


def test_unpacked_image_references_only_the_store(debian_registry: RegistryProcess, tmp_path: Path) -> None:
    """Every symlink and ELF interpreter of shell/curl points into /nix/store, and resolves in the image."""
    skopeo_to_oci(f"{debian_registry.host}/shell/curl", tmp_path / "oci")
    rootfs = unpack_oci(tmp_path / "oci", tmp_path / "bundle")
    links = elves = 0
    problems = []

    def inside(target: str) -> Path:
        return rootfs / target.lstrip("/")

    for directory, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            path = Path(directory) / name
            shown = "/" + str(path.relative_to(rootfs))
            if path.is_symlink():
                links += 1
                target = os.readlink(path)
                if target.startswith("/"):
                    # the entry layer's links (/bin/*, /etc/ssl/certs/*) and the store's own
                    if not target.startswith("/nix/store/"):
                        problems.append(f"{shown} -> {target}: outside /nix/store")
                    elif not os.path.lexists(inside(target)):
                        problems.append(f"{shown} -> {target}: not in the image")
                else:
                    resolved = os.path.normpath(os.path.join(os.path.dirname(shown), target))
                    if resolved.startswith("/..") or not os.path.lexists(inside(resolved)):
                        problems.append(f"{shown} -> {target}: does not resolve inside the image")
            elif name in filenames and path.is_file():
                interpreter = elf_interpreter(path)
                if interpreter is not None:
                    elves += 1
                    if not interpreter.startswith("/nix/store/") or not inside(interpreter).exists():
                        problems.append(f"{shown}: ELF interpreter {interpreter}")
    assert not problems, "\n".join(problems[:50])
    assert links > 100 and elves > 50, (links, elves)

    # The programs users run: scripts among them name a store interpreter (or /usr/bin/env).
    for entry in sorted((rootfs / "bin").iterdir()):
        real = entry
        for _ in range(40):
            if not real.is_symlink():
                break
            target = os.readlink(real)
            real = inside(target) if target.startswith("/") else real.parent / target
        with open(real, "rb") as f:
            first = f.readline(256)
        if first.startswith(b"#!"):
            interpreter = first[2:].split()[0].decode()
            assert interpreter.startswith("/nix/store/") or interpreter == "/usr/bin/env", (entry, interpreter)


def test_setup_script_usage() -> None:
    """setup.sh documents itself and refuses unknown options without doing anything."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "debian-set" / "setup.sh"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "usage" in result.stdout.lower()
    result = subprocess.run([str(script), "--bogus"], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0


# --- generating it (scripts/debian-set/generate.py) ----------------------------------

GENERATE = Path(__file__).resolve().parent.parent / "scripts" / "debian-set" / "generate.py"
DEBS = Path(os.environ.get("NIXERY_DEBIAN_CACHE") or GENERATE.parent.parent.parent / ".cache" / "debian-debs")


def test_generating_again_from_the_same_inputs_rewrites_nothing(tmp_path: Path) -> None:
    """`make run` runs setup.sh every time: with the same inputs, generate.py leaves the set as
    it is (it took 13 s and rewrote every file, which made a new package-set revision)."""
    out = tmp_path / "set"
    generate = [sys.executable, str(GENERATE), "--cache", str(DEBS), "--out", str(out)]
    run(generate, timeout=600)
    written = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.iterdir()}
    assert (out / "inputs.sha256").is_file()

    again = run(generate, timeout=600)
    assert "is up to date" in again.stdout, again.stdout
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.iterdir()} == written


def test_what_makes_the_set_out_of_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inputs are the scripts, the manifest and the bytes of the .deb files (not their
    times), and the output must still be what was written."""
    spec = importlib.util.spec_from_file_location("generate", GENERATE)
    generate = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "generate", generate)  # its dataclasses look their module up
    spec.loader.exec_module(generate)
    cache, out = tmp_path / "debs", tmp_path / "set"
    cache.mkdir()
    out.mkdir()
    (cache / "a.deb").write_bytes(b"deb one")
    (cache / "manifest.txt").write_text("a 1.0 amd64 a.deb 0123\n")
    (cache / "manifest-arm64.txt").write_text("a 1.0 arm64 a.deb 0123\n")
    for name in generate.OUTPUTS:
        (out / name).write_text(f"{name}\n")

    def record() -> None:
        inputs = generate.inputs_fingerprint(cache, out)
        (out / generate.STAMP).write_text(f"{inputs}\n{generate.outputs_fingerprint(out)}\n")

    def current() -> bool:
        return generate.up_to_date(out, generate.inputs_fingerprint(cache, out))

    record()
    assert current()
    for path in (cache / "a.deb", cache / "manifest.txt", out / "default.nix"):
        path.write_bytes(path.read_bytes())
        os.utime(path, (1, 1))
    assert current(), "times do not count"
    (cache / "a.deb").write_bytes(b"deb two")
    assert not current()
    record()
    (cache / "manifest-arm64.txt").write_text("a 1.1 arm64 a.deb 0123\n")
    assert not current(), "the arm64 packages are inputs too"
    record()
    (out / "default.nix").write_text("edited\n")
    assert not current()
    record()
    (out / "lib.nix").unlink()
    assert not current()
    assert not generate.up_to_date(out, None)


def test_fetching_again_for_the_same_package_lists_asks_apt_nothing(tmp_path: Path) -> None:
    """fetch.sh took 8 s on every `make run`, asking apt to resolve the lists again; with the
    lists and the files as they were, it now checks the files and ends without apt."""
    fetch = GENERATE.parent / "fetch.sh"
    cache = tmp_path / "debs"
    cache.mkdir()
    for deb in DEBS.glob("*.deb"):
        (cache / deb.name).symlink_to(deb)
    env = {"NIXERY_DEBIAN_CACHE": str(cache)}
    if (DEBS / "inputs.sha256").is_file():  # fetched by this fetch.sh (CI): reuse its record
        for name in ("manifest.txt", "manifest-arm64.txt", "inputs.sha256"):
            shutil.copyfile(DEBS / name, cache / name)
    else:
        run(["bash", str(fetch)], env_extra=env, timeout=600)
    no_apt = tmp_path / "bin"
    no_apt.mkdir()
    for tool in ("apt-get", "apt-cache"):
        (no_apt / tool).write_text("#!/bin/sh\necho 'apt was asked' >&2\nexit 1\n")
        (no_apt / tool).chmod(0o755)
    env["PATH"] = f"{no_apt}:{os.environ['PATH']}"

    quick = run(["bash", str(fetch)], env_extra=env)
    assert "fetched before" in quick.stdout, quick.stdout + quick.stderr

    damaged = sorted(cache.glob("*.deb"))[0]
    damaged.unlink()
    damaged.write_bytes(b"cut short")
    again = run(["bash", str(fetch)], env_extra=env, check=False)
    assert again.returncode != 0 and "apt was asked" in again.stderr  # a damaged file is fetched again


# --- what is deterministic (docs/layering.md) ------------------------------------------


def test_the_same_history_gives_the_same_digest_and_another_history_another_split(tmp_path: Path) -> None:
    """docs/layering.md, "What is deterministic": same revision, names and layering history,
    same manifest digest; a registry that stored other images first may split the same files
    into other layers (here, as the doc says: bytes only, two layers fewer)."""
    first = "shell/git/jq/python3/perl/vim"
    env = {"NIXERY_BUNDLED_SET": "debian", "NIXERY_LAYER_COST_MB": "0"}
    registries = [
        RegistryProcess(storage=tmp_path / n, env=env, log_path=tmp_path / f"{n}.log")
        for n in ("fresh", "history", "same-history")
    ]
    try:
        for registry in registries:
            registry.start()
        fresh, history, same_history = registries
        for registry in (history, same_history):
            _, first_manifest = registry.manifest(first)
        digests = {}
        for registry in registries:
            digests[registry.storage.name], manifest = registry.manifest("shell/curl")
            status, _, body = registry.request("/images/shell/curl.json", accept="application/json")
            assert status == 200
            image = json.loads(body)
            assert [layer["digest"] for layer in image["layers"]] == [layer["digest"] for layer in manifest["layers"]]
            paths = sorted(path for layer in image["layers"] for path in layer["paths"])
            if registry is fresh:
                fresh_paths, fresh_layers = paths, len(manifest["layers"])
            else:
                assert paths == fresh_paths  # the same files...
                assert len(manifest["layers"]) == fresh_layers - 2  # ...split another way
                # docs/layering.md, "The order of layers": the layers shell/curl shares with the
                # image built before come first, in that image's order.
                before = [layer["digest"] for layer in first_manifest["layers"]]
                after = [layer["digest"] for layer in manifest["layers"]]
                shared = [digest for digest in before if digest in after]
                assert len(shared) >= 10 and after[: len(shared)] == shared
    finally:
        for registry in registries:
            registry.stop()
    assert digests["history"] == digests["same-history"] != digests["fresh"]


# --- what every image holds (issue 24) ----------------------------------------


def test_tzdata_lands_where_debian_puts_it(debian_registry: RegistryProcess) -> None:
    """`shell/tzdata`: the package's usr/share/zoneinfo is /usr/share/zoneinfo, where glibc
    looks; the baseline's netbase (`iana-etc`) gives /etc/services; ncurses-term's terminfo
    is at /usr/share/terminfo."""
    script = "TZ=Asia/Tokyo date +%Z; grep -c -w '^ssh' /etc/services; grep -c '^tcp' /etc/protocols"
    result = podman_run(f"{debian_registry.host}/shell/tzdata", "bash", "-c", script)
    assert result.stdout.split() == ["JST", "1", "1"], result.stdout
    kitty = "test -f /usr/share/terminfo/k/kitty && echo ok"
    result = podman_run(f"{debian_registry.host}/shell/ncurses-term", "bash", "-c", kitty)
    assert result.stdout.strip() == "ok"


def test_programs_the_set_does_not_wrap_find_xterm_in_the_terminfo_database(debian_registry: RegistryProcess) -> None:
    """`podman run -t` sets TERM=xterm. Debian's terminfo database (ncurses-base) is Essential, so
    no package depends on it and only the programs the set wraps (bash, vim, less...) were told
    where it is: `python3`'s curses failed ("could not find terminfo database"), and so did
    readline's. The Debian set's baseline now has it at /lib/terminfo and /usr/share/terminfo,
    where libtinfo looks."""
    script = (
        "import curses, os; curses.setupterm();"
        " print(os.environ['TERM'], curses.tigetnum('cols'), curses.tigetstr('clear'),"
        " os.path.isfile('/lib/terminfo/x/xterm'))"
    )
    result = podman_run(f"{debian_registry.host}/python3", "python3", "-c", script, tty=True)
    assert result.stdout.split() == ["xterm", "80", "b'\\x1b[H\\x1b[2J'", "True"], result.stdout


def test_lc_all_c_utf8_is_a_locale_in_every_image(debian_registry: RegistryProcess) -> None:
    """Debian has the C.UTF-8 locale in every system (libc-bin, Essential: no package depends on
    it), and users set LANG or LC_ALL to it. The set's images had no locale: bash warned "setlocale:
    LC_ALL: cannot change locale (C.UTF-8)", perl "Setting locale failed", Python's
    setlocale raised "unsupported locale setting", and `wc -m` counted bytes. The Debian set's
    baseline now has libc-bin's C.UTF-8 alone (`locales-c-utf8`: not its scripts' bash and gawk)."""
    script = (
        "printf '\\303\\251\\n' | wc -m; perl -e 'print qq(perl\\n)';"
        " python3 -c 'import locale; print(locale.setlocale(locale.LC_ALL, \"\"))'"
    )
    result = podman_run(f"{debian_registry.host}/shell/perl/python3", "env", "LC_ALL=C.UTF-8", "bash", "-c", script)
    assert result.stdout.split() == ["2", "perl", "C.UTF-8"], (result.stdout, result.stderr[-2000:])
    assert "locale" not in result.stderr, result.stderr[-2000:]


def make_test_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signed: (ca.pem, server.pem, server.key)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=nixery test CA",
         "-keyout", str(ca_key), "-out", str(ca)])
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
         "-out", str(csr)])
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "2", "-extfile", str(extensions), "-out", str(cert)])
    return ca, cert, key


@contextlib.contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 answering every GET with a greeting; yields its port."""

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = LocalHTTP(lambda path: (200, {}, b"hello over TLS\n"), tls=context)
    try:
        yield server.port
    finally:
        server.close()


def test_every_image_trusts_the_sets_ca_bundle(tmp_path: Path) -> None:
    """A package set whose `cacert` holds a test CA (the Debian set otherwise): curl and Python in
    `shell/curl/python3` reach a TLS server with a certificate of that CA, and `jq`, whose closure
    has no CA bundle, has the bundle and SSL_CERT_FILE too (the baseline). Without SSL_CERT_FILE
    (`env -i`, `su -`, cron) Debian's Python trusted no CA at all: it reads /usr/lib/ssl/cert.pem."""
    ca, cert, key = make_test_ca(tmp_path)
    packages = tmp_path / "pkgs"
    packages.mkdir()
    shutil.copyfile(ca, packages / "ca.pem")
    busybox = Path(__file__).resolve().parent.parent / "pkgs" / "busybox"
    (packages / "default.nix").write_text(f"""{{ system ? builtins.currentSystem, ... }}@args:
let base = import {SET} args; bb = "${{(import {busybox} args).busybox}}/bin";
in base // {{
  cacert = derivation {{
    name = "test-cacert"; inherit system; builder = "${{bb}}/sh";
    args = [ "-c" "${{bb}}/mkdir -p $out/etc/ssl/certs && ${{bb}}/cp ${{./ca.pem}} $out/etc/ssl/certs/ca-bundle.crt" ];
  }};
}}
""")
    registry = RegistryProcess(storage=tmp_path / "storage", env={"NIXERY_PKGS_PATH": str(packages)})
    registry.start()
    try:
        environments = {}
        for name in ("shell/curl/python3", "jq"):
            _, manifest = registry.manifest(name)
            status, _, body = registry.request(f"/v2/{name}/blobs/{manifest['config']['digest']}", accept=None)
            environments[name] = json.loads(body)["config"]["Env"]
            assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in environments[name], name
        skopeo_to_oci(f"{registry.host}/jq", tmp_path / "jq")
        jq = unpack_oci(tmp_path / "jq", tmp_path / "jq-bundle")
        bundle = os.readlink(jq / "etc/ssl/certs/ca-certificates.crt")
        assert (jq / bundle.lstrip("/")).read_bytes() == ca.read_bytes()
        skopeo_to_oci(f"{registry.host}/shell/curl/python3", tmp_path / "curl")
        rootfs = unpack_oci(tmp_path / "curl", tmp_path / "curl-bundle")
        with tls_server(cert, key) as port:
            # chroot shares this machine's network, so the image's programs reach the test server
            url = f"https://127.0.0.1:{port}/"
            python = f"import urllib.request; print(urllib.request.urlopen({url!r}).read().decode(), end='')"
            for environment in (environments["shell/curl/python3"], []):
                for command in (["/bin/curl", "-sS", url], ["/bin/python3", "-c", python]):
                    result = run(["chroot", str(rootfs), "/usr/bin/env", "-i", *environment, *command], check=False)
                    assert result.stdout == "hello over TLS\n", (environment, command, result.stderr[-500:])
    finally:
        registry.stop()
