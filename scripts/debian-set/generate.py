#!/usr/bin/env python3
"""Writes the Debian-derived package set: Nix files with one derivation per Debian package.

    python3 scripts/debian-set/generate.py [--cache DIR] [--out DIR]

Reads the .deb files that fetch.sh listed in DIR/manifest.txt (amd64) and
DIR/manifest-arm64.txt (default DIR: ${NIXERY_DEBIAN_CACHE:-<repo>/.cache/debian-debs})
with `dpkg-deb`, and writes, in <out> (default
${NIXERY_DEBIAN_SET_DIR:-<repo>/.cache/debian-set}), one set per system
(x86_64-linux.nix, aarch64-linux.nix) and default.nix, which picks the one of
its `system` argument, next to copies of the builders (lib.nix, build-deb.sh,
build-env.sh, common.sh). Python standard library only.

Every build runs on this (amd64) machine: the aarch64-linux derivations have an
x86_64 builder (this machine's busybox, and patchelf from the amd64 .deb
files), which Nix runs with `--option extra-platforms aarch64-linux`; only
their outputs are aarch64 programs.

Writes nothing when the output is up to date: <out>/inputs.sha256 records
what the last run read (the files of scripts/debian-set/, the manifest and the
bytes of every .deb it names, both directories) and what it wrote; when both
are unchanged, the run ends at once (a `make run` then does not rewrite the
set, whose revision is a hash of its files). Delete that file to regenerate.

How Debian's metadata becomes Nix (details in the tables below):
- Depends and Pre-Depends: each `a | b` group resolves to the first alternative
  that is a package of the set or is provided (Provides) by one; groups that
  resolve to nothing are dropped, with a comment in default.nix (mostly the
  packages of excluded.txt: debconf, dpkg, init-system-helpers, adduser...).
- Debian allows dependency cycles (libc6 <-> libgcc-s1), Nix does not: the
  packages of a cycle are built into one derivation, reachable under each name.
- A few dependencies are added (EXTRA_DEPS: the CA bundle for TLS clients,
  terminfo for curses programs) or removed (DROP_DEPS).
- "#!" interpreters that Debian takes from Essential packages (/bin/sh...) come
  from INTERPRETERS, given to every package that cannot be in their closure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parent.parent
TEMPLATES = ("lib.nix", "build-deb.sh", "build-env.sh", "common.sh")


@dataclass(frozen=True)
class Arch:
    """A Debian architecture of the set and what its files are called."""

    debian: str  # Debian's name
    system: str  # Nix's
    triplet: str  # Debian's multiarch directory (lib/<triplet>)
    loader: str  # glibc's dynamic loader, in lib/<triplet>
    manifest: str  # fetch.sh's list of its .deb files


AMD64 = Arch("amd64", "x86_64-linux", "x86_64-linux-gnu", "ld-linux-x86-64.so.2", "manifest.txt")
ARM64 = Arch("arm64", "aarch64-linux", "aarch64-linux-gnu", "ld-linux-aarch64.so.1", "manifest-arm64.txt")
ARCHES = (AMD64, ARM64)
#: The architecture of the builds (busybox, the bootstrap patchelf): this machine's.
BUILD_ARCH = AMD64
#: The package list of amd64 keeps its old name (scripts/self-image reads it).
PACKAGE_LISTS = {AMD64: "packages.txt", ARM64: "packages-arm64.txt"}
OUTPUTS = ("default.nix", *(f"{arch.system}.nix" for arch in ARCHES), *PACKAGE_LISTS.values(), *TEMPLATES)
STAMP = "inputs.sha256"

# --- policy ---------------------------------------------------------------

#: Usual Nix (nixpkgs) attribute names -> Debian package names, or the merged
#: environments of ENVS (prefixed "env:").
NIX_NAMES = {
    "bashInteractive": "bash",
    "gnugrep": "grep",
    "gnused": "sed",
    "gnutar": "tar",
    "gnumake": "make",
    "gnupatch": "patch",
    "xz": "xz-utils",
    "openssh": "openssh-client",
    "cacert": "ca-certificates",
    "iana-etc": "netbase",
    "sqlite": "sqlite3",
    "ncurses": "ncurses-bin",
    "netcat": "netcat-openbsd",
    "iputils": "iputils-ping",
    "which": "debianutils",
    "glibc": "libc6",
    "zlib": "zlib1g",
    "python3": "env:python3",
    "python311": "env:python3",
    # Debian's python3.11 holds pydoc3.11 alone (the interpreter is in python3.11-minimal): the
    # name asks for Python. debian."python3.11" is still the package itself.
    "python3.11": "env:python3",
    "python3_11": "env:python3",  # its sanitized spelling, for clients that refuse '.'
    "perl": "env:perl",
    "nix": "nix-bin",
}

#: Extra dependencies (Debian name -> Debian names). TLS clients reference the
#: CA bundle so that images containing them get /etc/ssl/certs and SSL_CERT_FILE.
EXTRA_DEPS = {
    "curl": ["ca-certificates"],
    "wget": ["ca-certificates"],
    "git": ["ca-certificates"],
    "openssl": ["ca-certificates"],
    "libpython3.11-stdlib": ["ca-certificates"],
}

#: Dependencies left out (Debian name -> Debian names), with the reason.
DROP_DEPS = {
    # update-ca-certificates runs `openssl rehash`; the bundle is built here instead.
    # (Keeping it would make a cycle: openssl -> ca-certificates -> openssl.)
    "ca-certificates": ["openssl"],
    # Only their postinst uses debianutils (add-shell), and debianutils' own
    # scripts need a /bin/sh: without these, dash can be their interpreter.
    "dash": ["debianutils"],
    "bash": ["debianutils"],
}

#: Links that Debian's postinst scripts make with update-alternatives
#: (maintainer scripts are not run). Paths relative to the package root.
ALTERNATIVES = {
    "gawk": {"usr/bin/awk": "gawk", "usr/bin/nawk": "gawk"},
    "vim": {f"usr/bin/{n}": "vim.basic" for n in ("vim", "vi", "view", "ex", "rvim", "rview", "vimdiff")},
    "debianutils": {"usr/bin/which": "which.debianutils"},
    "netcat-openbsd": {"bin/nc": "nc.openbsd", "bin/netcat": "nc.openbsd"},
    "tar": {"usr/sbin/rmt": "rmt-tar"},
}

TERMINFO = {"TERMINFO_DIRS": "@ncurses-base@/lib/terminfo"}

#: Programs that look their data up under / (compiled-in paths): they are moved
#: to libexec/nixery-wrapped/ and replaced by a bash script that sets the
#: variable (when unset; "VAR+" appends to the caller's value) and execs them.
#: "@out@" is the package's own store path, "@name@" a dependency's.
WRAPPERS = {
    # terminfo lives in ncurses-base, compiled in as /lib/terminfo and
    # /usr/share/terminfo; exported by bash, so programs started from the shell
    # find it too
    "bash": {"bin/bash": TERMINFO},
    "less": {"usr/bin/less": TERMINFO},
    "nano": {"bin/nano": TERMINFO},
    "htop": {"usr/bin/htop": TERMINFO},
    "procps": {"usr/bin/top": TERMINFO, "usr/bin/watch": TERMINFO},
    "ncurses-bin": {f"usr/bin/{n}": TERMINFO for n in ("clear", "tput", "tset", "tabs", "infocmp")},
    # vim's runtime files (syntax, defaults.vim) are another package
    "vim": {"usr/bin/vim.basic": {"VIM": "@vim-runtime@/usr/share/vim", **TERMINFO}},
    # git's helpers and templates are compiled in as /usr/lib/git-core and
    # /usr/share/git-core/templates
    "git": {
        "usr/bin/git": {
            "GIT_EXEC_PATH": "@out@/usr/lib/git-core",
            "GIT_TEMPLATE_DIR": "@out@/usr/share/git-core/templates",
            "GITPERLLIB": "@out@/usr/share/perl5:@liberror-perl@/usr/share/perl5",
        }
    },
    # the magic database is in libmagic-mgc, compiled in as /usr/share/misc/magic
    "file": {"usr/bin/file": {"MAGIC": "@libmagic-mgc@/usr/lib/file/magic.mgc"}},
    # OPENSSLDIR is /usr/lib/ssl
    "openssl": {"usr/bin/openssl": {"OPENSSL_CONF": "@out@/usr/lib/ssl/openssl.cnf"}},
    # Nix 2.8 runs its build hook, $NIX_LIBEXEC_DIR/nix/build-remote (compiled
    # in as /usr/libexec), for every build, and nix-channel runs
    # $NIX_BIN_DIR/nix-env. nix-build, nix-store... link to `nix`, which picks
    # its personality from argv[0]: the wrapper keeps argv[0].
    "nix-bin": {"usr/bin/nix": {"NIX_LIBEXEC_DIR": "@out@/usr/libexec", "NIX_BIN_DIR": "@out@/usr/bin"}},
}
WRAPPER_SHELL = "bash"  # bash: `exec -a` keeps argv[0]

#: Shell steps run in $out after unpacking (postinst work that matters).
FIXUPS = {
    # Debian ships the certificates and builds the bundle in postinst.
    "ca-certificates": r"""
mkdir -p etc/ssl/certs
find usr/share/ca-certificates -name '*.crt' | sort | while read -r crt; do
  cat "$crt"
  [ -z "$(tail -c 1 "$crt")" ] || echo
done > etc/ssl/certs/ca-certificates.crt
[ -s etc/ssl/certs/ca-certificates.crt ]
""",
}

#: "#!" interpreters of Essential packages that Debian packages do not declare,
#: in priority order: (path, provider, file in the provider). A package whose
#: executables name one of them (read from the .deb) gets it as a build input
#: when the provider cannot depend on the package (no cycle); the rest fall
#: back to the package itself and its dependency closure.
INTERPRETERS = [
    ("/bin/sh", "dash", "bin/dash"),
    ("/usr/bin/sh", "dash", "bin/dash"),
    ("/bin/dash", "dash", "bin/dash"),
    ("/bin/bash", "bash", "libexec/nixery-wrapped/bin/bash"),
    ("/usr/bin/bash", "bash", "libexec/nixery-wrapped/bin/bash"),
    ("/usr/bin/perl", "env:perl", "bin/perl"),
    ("/usr/bin/python3", "env:python3", "bin/python3"),
    ("/usr/bin/python3.11", "env:python3", "bin/python3.11"),
    ("/usr/bin/awk", "gawk", "usr/bin/gawk"),
]

#: "{triplet}" is the architecture's multiarch directory name (x86_64-linux-gnu).
PERL_DIRS = ":".join(
    f"@out@/{d}"
    for d in (
        "usr/lib/{triplet}/perl5/5.36",
        "usr/share/perl5",
        "usr/lib/{triplet}/perl-base",
        "usr/lib/{triplet}/perl/5.36",
        "usr/share/perl/5.36",
    )
)

#: Merged trees for programs whose files are spread over several packages.
ENVS = {
    # python3.11 finds its standard library (libpython3.11-minimal + -stdlib)
    # next to its real location: a merged tree with a copy of the binary.
    "python3": {
        "name": "python3",
        "members": ["python3", "python3-minimal", "python3.11", "python3.11-minimal",
                    "libpython3.11-minimal", "libpython3.11-stdlib", "libpython3-stdlib",
                    # /usr/lib/python3/dist-packages, found relative to the prefix
                    "python3-pip", "python3-setuptools", "python3-pkg-resources", "python3-wheel",
                    "python3-distutils", "python3-lib2to3"],
        "version_of": "python3",
        "copy": ["usr/bin/python3.11"],
        "extra": ["ca-certificates"],
        "main": "python3",
    },
    # perl's @INC is compiled in (/usr/share/perl/5.36...): PERL5LIB in a wrapper.
    "perl": {
        "name": "perl",
        "members": ["perl", "perl-base", "perl-modules-5.36", "libperl5.36"],
        "version_of": "perl",
        "wrappers": {"usr/bin/perl": {"PERL5LIB+": PERL_DIRS}},
        "main": "perl",
    },
}

#: The `shell` image component: bin/ of these, first one winning; Cmd = bash.
SHELL_MEMBERS = ["bash", "dash", "coreutils", "grep", "sed", "gawk", "findutils", "diffutils", "less",
                 "tar", "gzip", "procps", "ncurses-bin", "debianutils", "hostname", "nano"]
SHELL_EXTRA = ["ca-certificates"]

#: Files of a package as a package of their own, without the package's dependencies (copied, so
#: nothing refers to the package): attribute -> (Debian package, paths). The registry gives every
#: image of the set the C.UTF-8 locale (its baseline, nixery/baseline.py); all of libc-bin would
#: bring the bash and gawk of its scripts (ldd, tzselect) along, 16 MB more in every image. The
#: package's Debian names, version and copyright come along for the SBOM.
PARTS = {
    "locales-c-utf8": ("libc-bin", ["usr/lib/locale/C.utf8", "usr/share/doc/libc-bin/copyright",
                                    "nix-support/debian-packages", "nix-support/debian-versions"]),
}

#: meta.mainProgram where it is not the package name.
MAIN_PROGRAMS = {
    "openssh-client": "ssh", "xz-utils": "xz", "ripgrep": "rg", "netcat-openbsd": "nc",
    "iputils-ping": "ping", "procps": "ps", "ncurses-bin": "tput", "vim": "vim",
    "debianutils": "which", "findutils": "find", "diffutils": "diff", "psmisc": "pstree",
    "iproute2": "ip", "sqlite3": "sqlite3", "ca-certificates": None, "dash": "dash",
    "nix-bin": "nix",
}

# --- reading the .deb files -------------------------------------------------


@dataclass
class Deb:
    name: str
    version: str
    arch: str
    path: Path
    depends: list[list[str]] = field(default_factory=list)  # groups of alternatives
    provides: list[str] = field(default_factory=list)
    files: set[str] = field(default_factory=set)  # "usr/bin/x", no leading "./"
    interpreters: set[str] = field(default_factory=set)  # "#!" paths of its executables
    sha256: str = ""


def _relations(text: str) -> list[list[str]]:
    groups = []
    for group in text.split(","):
        names = []
        for alternative in group.split("|"):
            alternative = re.sub(r"\([^)]*\)|\[[^\]]*\]|<[^>]*>", "", alternative).strip()
            if alternative:
                names.append(alternative.split(":")[0])
        if names:
            groups.append(names)
    return groups


def read_deb(name: str, version: str, arch: str, path: Path) -> Deb:
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(path), "Package", "Version", "Depends", "Pre-Depends", "Provides"],
        check=True, capture_output=True, text=True,
    ).stdout
    info: dict[str, str] = {}
    key = None
    for line in fields.splitlines():
        if line[:1] in (" ", "\t") and key:
            info[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            info[key] = value.strip()
    if info.get("Package") != name or info.get("Version") != version:
        raise SystemExit(f"{path}: is {info.get('Package')} {info.get('Version')}, manifest says {name} {version}")
    deb = Deb(name, version, arch, path)
    deb.depends = _relations(info.get("Pre-Depends", "")) + _relations(info.get("Depends", ""))
    deb.provides = [g[0] for g in _relations(info.get("Provides", ""))]
    # One pass over the file system tarball: the file list and the "#!" lines.
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(path)], stdout=subprocess.PIPE) as proc:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                deb.files.add(member.name.removeprefix("./").rstrip("/"))
                if member.isreg() and member.mode & 0o111:
                    head = tar.extractfile(member).read(256)
                    if head.startswith(b"#!"):
                        words = head[2:].split(b"\n")[0].split()
                        if words:
                            deb.interpreters.add(words[0].decode(errors="replace"))
    if proc.returncode:
        raise SystemExit(f"dpkg-deb --fsys-tarfile {path} failed")
    deb.sha256 = file_sha256(path)
    return deb


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(cache: Path, arch: Arch) -> list[Deb]:
    manifest = cache / arch.manifest
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: run scripts/debian-set/fetch.sh first")
    rows = [line.split() for line in manifest.read_text().splitlines() if line.strip()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda r: read_deb(r[0], r[1], r[2], cache / r[3]), rows))


def excluded_names() -> set[str]:
    text = (HERE / "excluded.txt").read_text()
    return {word for line in text.splitlines() for word in line.split("#")[0].split()}


# --- the graph ----------------------------------------------------------------


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def reaches(edges: dict[str, set[str]], start: str, goal: str) -> bool:
    seen = {start}
    todo = [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        for child in edges.get(node, ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return False


def breadth_first(edges: dict[str, set[str]], start: str) -> list[str]:
    """Everything reachable from start (not start itself), nearest first."""
    order: list[str] = []
    seen = {start}
    queue = deque(sorted(edges[start]))
    seen.update(queue)
    while queue:
        node = queue.popleft()
        order.append(node)
        for child in sorted(edges[node]):
            if child not in seen:
                seen.add(child)
                queue.append(child)
    return order


# --- Nix output ---------------------------------------------------------------


def nix_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def nix_indented(value: str, indent: str) -> str:
    body = value.replace("''", "'''").replace("${", "''${").strip("\n")
    return "''\n" + "\n".join(indent + "  " + line if line else "" for line in body.splitlines()) + "\n" + indent + "''"


def attr_name(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'-]*", name) else nix_string(name)


def sanitized(name: str) -> str:
    """A name reachable through the registry's dotted paths: '+' -> 'x', '.' -> '_'."""
    return name.replace("+", "x").replace(".", "_")


def store_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+._?=-]", "_", text)


def upstream_version(version: str) -> str:
    return version.split(":", 1)[-1]


class SetWriter:
    def __init__(self, arch: Arch, debs: list[Deb], excluded: set[str]):
        self.arch = arch
        self.debs = {d.name: d for d in debs}
        self.excluded = excluded
        self.providers: dict[str, list[str]] = {}
        for deb in debs:
            for virtual in deb.provides:
                self.providers.setdefault(virtual, []).append(deb.name)
        self.deps: dict[str, set[str]] = {}
        self.dropped: dict[str, list[str]] = {}
        self.warnings: list[str] = []

    def resolve(self) -> None:
        for deb in self.debs.values():
            deps: set[str] = set()
            dropped: list[str] = []
            for group in deb.depends:
                chosen = None
                for alternative in group:
                    if alternative in self.debs:
                        chosen = alternative
                    elif self.providers.get(alternative):
                        chosen = sorted(self.providers[alternative])[0]
                    if chosen:
                        break
                text = " | ".join(group)
                if chosen is None:
                    excluded = any(a in self.excluded or a == "debconf-2.0" for a in group)
                    why = "excluded" if excluded else "not in the set"
                    dropped.append(f"{text} ({why})")
                elif chosen in DROP_DEPS.get(deb.name, ()):
                    dropped.append(f"{text} (DROP_DEPS)")
                elif chosen != deb.name:
                    deps.add(chosen)
            for extra in EXTRA_DEPS.get(deb.name, ()):
                self._need(extra, f"EXTRA_DEPS of {deb.name}")
                deps.add(extra)
            for variables in WRAPPERS.get(deb.name, {}).values():
                for value in variables.values():
                    for ref in re.findall(r"@([^@]+)@", value):
                        if ref != "out":
                            self._need(ref, f"wrapper of {deb.name}")
                            deps.add(ref)
            self.deps[deb.name] = deps
            self.dropped[deb.name] = dropped

    def _need(self, name: str, why: str) -> None:
        if name not in self.debs:
            raise SystemExit(f"{why} needs Debian package {name}, which is not in the set (packages.txt)")

    def build_graph(self) -> None:
        names = sorted(self.debs)
        components = strongly_connected(names, self.deps)
        self.unit_of: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}
        for component in components:
            unit = "+".join(component)
            self.members[unit] = component
            for name in component:
                self.unit_of[name] = unit
            if len(component) > 1:
                self.warnings.append(f"dependency cycle {' <-> '.join(component)}: one derivation {unit}")
        # Real dependencies: Debian's (and EXTRA_DEPS), between units.
        self.edges: dict[str, set[str]] = {
            unit: {self.unit_of[d] for m in members for d in self.deps[m]} - {unit}
            for unit, members in self.members.items()
        }
        bash = self.unit_of["bash"]
        for unit, members in self.members.items():
            if any(m in WRAPPERS for m in members) and unit != bash:
                if reaches(self.edges, bash, unit):
                    raise SystemExit(f"{unit} has wrappers but bash depends on it")
                self.edges[unit].add(bash)
        # Merged environments are nodes too.
        for env_name, env in ENVS.items():
            for member in env["members"] + env.get("extra", []):
                self._need(member, f"environment {env_name}")
            node = f"env:{env_name}"
            self.edges[node] = {self.unit_of[m] for m in env["members"] + env.get("extra", [])}
            if env.get("wrappers"):
                self.edges[node].add(bash)
        self.closure = {unit: breadth_first(self.edges, unit) for unit in self.members}
        # Interpreter overrides: only where they add no cycle.
        self.all_edges = {node: set(children) for node, children in self.edges.items()}
        self.interpreters: dict[str, dict[str, tuple[str, str]]] = {unit: {} for unit in self.members}
        for path, provider, file in INTERPRETERS:
            node = provider if provider.startswith("env:") else self.unit_of[provider]
            for unit in sorted(self.members):
                if not any(path in self.debs[m].interpreters for m in self.members[unit]):
                    continue
                if unit == node or reaches(self.all_edges, node, unit):
                    continue
                self.all_edges[unit].add(node)
                self.interpreters[unit][path] = (node, file)

    def node_expr(self, node: str) -> str:
        if node.startswith("env:"):
            return f"envs.{attr_name(node[4:])}"
        return f"units.{attr_name(node)}"

    def main_program(self, names: list[str]) -> str | None:
        for name in names:
            deb = self.debs[name]
            candidates = [MAIN_PROGRAMS[name]] if name in MAIN_PROGRAMS else [name]
            for program in candidates:
                if program is None:
                    return None
                for directory in ("bin", "usr/bin", "sbin", "usr/sbin"):
                    if f"{directory}/{program}" in deb.files or f"{directory}/{program}" in ALTERNATIVES.get(name, {}):
                        return program
        return None

    def nix_file(self, cache: Path, build: SetWriter) -> str:
        """The set of `self.arch`, as `<system>.nix`; `build` is the set of BUILD_ARCH (its patchelf)."""
        libc = self.unit_of["libc6"]
        native = self.arch == build.arch
        lines: list[str] = []
        w = lines.append
        w(f"# The Debian-derived bundled package set of nixery for {self.arch.system} (Debian {self.arch.debian}).")
        w(f"# GENERATED by scripts/debian-set/generate.py from {len(self.debs)} Debian packages in")
        w(f"# {cache}; do not edit: run scripts/debian-set/setup.sh again.")
        w("#")
        w("# Top level: every Debian package by its Debian name, names with '+' or '.'")
        w("# also sanitized ('+' -> 'x', '.' -> '_': libstdcxx6, python3_11), the usual")
        w("# nixpkgs names (python3, openssh, gnugrep...), `shell`, and `debian.<name>`")
        w("# for the unmerged Debian packages (debian.python3, debian.perl).")
        if not native:
            w(f"# The builds run on {build.arch.system}: its busybox, and patchelf from its .deb files.")
        for warning in self.warnings:
            w(f"# NOTE: {warning}")
        w("{ busyboxBinary }:")
        w("let")
        w(f"  system = {nix_string(self.arch.system)};")
        w("  lib = import ./lib.nix {")
        w("    inherit system busyboxBinary;")
        if not native:
            w(f"    buildSystem = {nix_string(build.arch.system)};")
        w(f"    triplet = {nix_string(self.arch.triplet)}; loader = {nix_string(self.arch.loader)};")
        w("  };")
        w(f"  debDir = {nix_string(str(cache))};")

        def import_debs(attr: str, debs: dict[str, Deb], names: list[str]) -> None:
            w(f"  {attr} = {{")
            for name in names:
                deb = debs[name]
                w(f"    {attr_name(name)} = lib.importDeb {{ path = /. + \"${{debDir}}/{deb.path.name}\"; "
                  f"name = {nix_string(store_name(deb.path.name))}; sha256 = \"{deb.sha256}\"; }};")
            w("  };")

        import_debs("debs", self.debs, sorted(self.debs))
        w("")
        bootstrap = (("libc", "libc6"), ("libgcc", "libgcc-s1"), ("libstdcxx", "libstdc++6"), ("patchelf", "patchelf"))
        for _, pkg in bootstrap:
            build._need(pkg, "the bootstrap patchelf")
        if not native:
            w(f"  # The {build.arch.debian} .deb files of the build's patchelf.")
            import_debs("buildDebs", build.debs, [pkg for _, pkg in bootstrap])
        w("  # patchelf for the builds: its .deb unpacked as is, run by glibc's loader.")
        w("  patchelf = lib.mkPatchelf {")
        for arg, pkg in bootstrap:
            source = "debs" if native else "buildDebs"
            w(f"    {arg} = lib.unpackRaw {nix_string(store_name(pkg) + '-unpacked')} [ {source}.{attr_name(pkg)} ];")
        w("  };")
        w("")
        w("  units = {")
        for unit in sorted(self.members):
            members = self.members[unit]
            first = self.debs[members[0]]
            w(f"    {attr_name(unit)} = lib.mkDeb {{")
            w(f"      name = {nix_string(store_name(unit + '-' + upstream_version(first.version)))};")
            w(f"      packages = [ {' '.join(nix_string(m) for m in members)} ];")
            w(f"      debs = [ {' '.join('debs.' + attr_name(m) for m in members)} ];")
            for member in members:
                for dropped in self.dropped[member]:
                    w(f"      # dropped dependency of {member}: {dropped}")
            w(f"      deps = [ {' '.join(self.node_expr(d) for d in sorted(self.edges[unit]))} ];")
            w(f"      closure = [ {' '.join(self.node_expr(d) for d in self.closure[unit])} ];")
            w("      inherit patchelf;")
            if unit == libc:
                w("      interpreter = null;  # glibc itself")
            elif libc in self.closure[unit]:
                w(f"      interpreter = \"${{units.{attr_name(libc)}}}/lib/{self.arch.triplet}/{self.arch.loader}\";")
            else:
                w("      interpreter = null;  # glibc is not a dependency: no ELF programs expected")
            if self.interpreters[unit]:
                w("      interpreters = {")
                for path, (node, file) in sorted(self.interpreters[unit].items()):
                    w(f"        {nix_string(path)} = \"${{{self.node_expr(node)}}}/{file}\";")
                w("      };")
            alternatives = {k: v for m in members for k, v in ALTERNATIVES.get(m, {}).items()}
            if alternatives:
                w("      alternatives = {")
                for link, target in sorted(alternatives.items()):
                    w(f"        {nix_string(link)} = {nix_string(target)};")
                w("      };")
            wrappers = {k: v for m in members for k, v in WRAPPERS.get(m, {}).items()}
            if wrappers:
                w("      wrappers = {")
                for file, variables in sorted(wrappers.items()):
                    pairs = " ".join(f"{attr_name(k)} = {self.nix_value(v)};" for k, v in variables.items())
                    w(f"        {nix_string(file)} = {{ {pairs} }};")
                w("      };")
                if unit == self.unit_of["bash"]:
                    w("      wrapperShell = \"@out@/libexec/nixery-wrapped/bin/bash\";")
                else:
                    w(f"      wrapperShell = {self.wrapper_shell()};")
            fixups = "\n".join(FIXUPS[m] for m in members if m in FIXUPS)
            if fixups:
                w(f"      fixup = {nix_indented(fixups, '      ')};")
            main = self.main_program(members)
            described = ", ".join(f"{m} {self.debs[m].version}" for m in members)
            meta = [f"description = {nix_string('Debian package ' + described)};"]
            if main:
                meta.append(f"mainProgram = {nix_string(main)};")
            w(f"      meta = {{ {' '.join(meta)} }};")
            w("    };")
        w("  };")
        w("")
        w("  envs = {")
        for env_name, env in ENVS.items():
            version = upstream_version(self.debs[env["version_of"]].version)
            w(f"    {attr_name(env_name)} = lib.mkEnv {{")
            w(f"      name = {nix_string(store_name(env['name'] + '-merged-' + version))};")
            w(f"      paths = [ {' '.join(self.node_expr(self.unit_of[m]) for m in env['members'])} ];")
            if env.get("copy"):
                w(f"      copy = [ {' '.join(nix_string(c) for c in env['copy'])} ];")
            if env.get("extra"):
                w(f"      extraDeps = [ {' '.join(self.node_expr(self.unit_of[m]) for m in env['extra'])} ];")
            if env.get("wrappers"):
                w("      wrappers = {")
                for file, variables in sorted(env["wrappers"].items()):
                    pairs = " ".join(f"{nix_string(k)} = {self.nix_value(v)};" for k, v in variables.items())
                    w(f"        {nix_string(file)} = {{ {pairs} }};")
                w("      };")
                w(f"      wrapperShell = {self.wrapper_shell()};")
            described = nix_string("Debian packages " + ", ".join(env["members"]) + ", merged")
            w(f"      meta = {{ mainProgram = {nix_string(env['main'])}; description = {described}; }};")
            w("    };")
        w("  };")
        w("")
        w("  # Debian names (and sanitized ones) -> derivations.")
        w("  debian = {")
        aliases: dict[str, str] = {}
        for name in sorted(self.debs):
            aliases[name] = self.unit_of[name]
            if sanitized(name) != name:
                if sanitized(name) in self.debs:
                    raise SystemExit(f"sanitized name {sanitized(name)} of {name} is a package name too")
                aliases[sanitized(name)] = self.unit_of[name]
        for alias, unit in sorted(aliases.items()):
            w(f"    {attr_name(alias)} = units.{attr_name(unit)};")
        w("  };")
        w("")
        w("  shell = lib.mkEnv {")
        for member in SHELL_MEMBERS + SHELL_EXTRA:
            self._need(member, "shell")
        w("    name = \"shell-debian-12\";")
        w(f"    paths = [ {' '.join(self.node_expr(self.unit_of[m]) for m in SHELL_MEMBERS)} ];")
        w(f"    extraDeps = [ {' '.join(self.node_expr(self.unit_of[m]) for m in SHELL_EXTRA)} ];")
        w("    binOnly = true;")
        described = nix_string("bash, coreutils and the tools of an interactive shell: " + " ".join(SHELL_MEMBERS))
        w(f"    meta = {{ mainProgram = \"bash\"; description = {described}; }};")
        w("  };")
        w("")
        w("  parts = {")
        for part, (package, paths) in sorted(PARTS.items()):
            self._need(package, f"part {part}")
            if part in self.debs:
                raise SystemExit(f"part {part} is a package name too")
            w(f"    {attr_name(part)} = lib.mkPart {{")
            w(f"      name = {nix_string(store_name(part + '-' + self.debs[package].version))};")
            w(f"      from = units.{attr_name(self.unit_of[package])};")
            w(f"      paths = [ {' '.join(nix_string(path) for path in paths)} ];")
            described = nix_string(f"{', '.join(paths[:1])} of Debian package {package} {self.debs[package].version}")
            w(f"      meta = {{ description = {described}; }};")
            w("    };")
        w("  };")
        w("")
        w("  nixNames = {")
        for nix_name, target in sorted(NIX_NAMES.items()):
            if target.startswith("env:"):
                w(f"    {attr_name(nix_name)} = envs.{attr_name(target[4:])};")
            else:
                self._need(target, f"Nix name {nix_name}")
                w(f"    {attr_name(nix_name)} = debian.{attr_name(target)};")
        w("  };")
        w("in")
        w("debian // nixNames // parts // { inherit shell debian; }")
        return "\n".join(lines) + "\n"

    def package_list(self) -> str:
        return "".join(f"{name} {self.debs[name].version}\n" for name in sorted(self.debs))

    def wrapper_shell(self) -> str:
        return f'"${{units.{attr_name(self.unit_of["bash"])}}}/libexec/nixery-wrapped/bin/bash"'

    def nix_value(self, value: str) -> str:
        """A wrapper value: "@name@" -> the dependency's store path, "@out@" stays for the builder."""
        parts = re.split(r"@([^@]+)@", value.replace("{triplet}", self.arch.triplet))
        text = ""
        for i, part in enumerate(parts):
            if i % 2 == 0:
                text += part.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
            elif part == "out":
                text += "@out@"
            else:
                text += f"${{units.{attr_name(self.unit_of[part])}}}"
        return f'"{text}"'


def write_set(out: Path, cache: Path, writers: dict[Arch, SetWriter]) -> None:
    """Writes every output; default.nix, which picks a system's set, last: its
    existing means the set is complete. It names its sets' hashes, so that it
    changes whenever they do (scripts/self-image records it)."""
    out.mkdir(parents=True, exist_ok=True)
    for template in TEMPLATES:
        shutil.copyfile(HERE / template, out / template)
    build = writers[BUILD_ARCH]
    hashes = []
    for arch, writer in writers.items():
        text = writer.nix_file(cache, build)
        (out / f"{arch.system}.nix").write_text(text)
        (out / PACKAGE_LISTS[arch]).write_text(writer.package_list())
        hashes.append(f"#   {arch.system}.nix  sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    systems = " ".join(nix_string(arch.system) for arch in writers)
    listed = ", ".join(arch.system for arch in writers)
    default = "\n".join([
        "# The Debian-derived bundled package set of nixery: the set of `system`,",
        f"# one of {listed}.",
        "# GENERATED by scripts/debian-set/generate.py; do not edit: run scripts/debian-set/setup.sh again.",
        *hashes,
        "{ system ? builtins.currentSystem",
        ", busyboxBinary ? # from Debian's busybox-static; /usr/bin first because /bin may be a symlink",
        "    (if builtins.pathExists /usr/bin/busybox then /usr/bin/busybox else /bin/busybox)",
        ", ...",
        "}:",
        f"if builtins.elem system [ {systems} ]",
        "then import (./. + \"/${system}.nix\") { inherit busyboxBinary; }",
        f"else throw \"the Debian-derived set has packages for {listed}, not ${{system}}\"",
    ]) + "\n"
    tmp = out / "default.nix.tmp"
    tmp.write_text(default)
    tmp.replace(out / "default.nix")


# --- skipping an up-to-date output ---------------------------------------------


def inputs_fingerprint(cache: Path, out: Path) -> str | None:
    """A hash of everything the output depends on; None when an input is missing
    (the run then fails with the usual message)."""
    digest = hashlib.sha256()
    try:
        for path in sorted(HERE.iterdir()):
            if path.is_file():
                digest.update(f"script {path.name} {file_sha256(path)}\n".encode())
        digest.update(f"directories {cache} {out}\n".encode())
        for arch in ARCHES:
            manifest = (cache / arch.manifest).read_text()
            digest.update(f"manifest {arch.debian}\n{manifest}".encode())
            for row in (line.split() for line in manifest.splitlines() if line.strip()):
                digest.update(f"deb {row[3]} {file_sha256(cache / row[3])}\n".encode())
    except (OSError, IndexError):
        return None
    return digest.hexdigest()


def outputs_fingerprint(out: Path) -> str | None:
    try:
        return hashlib.sha256("".join(f"{name} {file_sha256(out / name)}\n" for name in OUTPUTS).encode()).hexdigest()
    except OSError:
        return None


def up_to_date(out: Path, inputs: str | None) -> bool:
    """Whether the last run read these inputs and its output is still as it wrote it."""
    try:
        recorded = (out / STAMP).read_text().split()
    except OSError:
        return False
    return inputs is not None and recorded == [inputs, outputs_fingerprint(out) or "missing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("NIXERY_DEBIAN_CACHE") or REPOSITORY / ".cache" / "debian-debs"))
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("NIXERY_DEBIAN_SET_DIR") or REPOSITORY / ".cache" / "debian-set"))
    args = parser.parse_args()
    cache = (REPOSITORY / args.cache).resolve() if not args.cache.is_absolute() else args.cache
    out = (REPOSITORY / args.out).resolve() if not args.out.is_absolute() else args.out
    start = time.monotonic()
    inputs = inputs_fingerprint(cache, out)
    if up_to_date(out, inputs):
        print(f"generate.py: {out / 'default.nix'} is up to date (inputs unchanged; {out / STAMP}); "
              f"took {time.monotonic() - start:.1f} s")
        return
    (out / STAMP).unlink(missing_ok=True)  # from here on the output is being replaced
    writers = {}
    for arch in ARCHES:
        writer = writers[arch] = SetWriter(arch, read_manifest(cache, arch), excluded_names())
        writer.resolve()
        writer.build_graph()
    write_set(out, cache, writers)
    if inputs is not None:
        (out / STAMP).write_text(f"{inputs}\n{outputs_fingerprint(out)}\n")
    for arch, writer in writers.items():
        for warning in writer.warnings:
            print(f"generate.py: {arch.debian}: {warning}")
    counts = ", ".join(
        f"{arch.debian} {len(w.debs)} packages, {len(w.members)} derivations" for arch, w in writers.items()
    )
    print(f"generate.py: {counts} -> {out / 'default.nix'}; took {time.monotonic() - start:.1f} s")


if __name__ == "__main__":
    main()
