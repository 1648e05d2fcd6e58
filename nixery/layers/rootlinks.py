"""The requested packages' trees at `/`, as symbolic links into the store (like symlinkJoin).

Every top-level directory of every requested package (`bin`, `lib`, `share`,
`etc`, `usr`, ...) appears at `/`, merged across packages:

    curl:  share/man/man1/curl.1        /share/man/man1/curl.1 -> <curl>/share/man/man1/curl.1
           share/zsh/...                /share/man/man1/jq.1   -> <jq>/share/man/man1/jq.1
    jq:    share/man/man1/jq.1          /share/zsh             -> <curl>/share/zsh
                                        /share/doc             -> <jq>/share/doc
           share/doc/...

A directory that only one package provides is one link to it, however many
files it holds (the highest such directory is linked); directories that
several provide are made real and their entries merged, one level further
down. So the layer holds as many links as the packages' trees overlap, not as
many as they have files; `MAX_LINKS` bounds it still, and `MAX_DEPTH` the
descent.

Packages are taken in order; on a conflict (two packages with a file at the
same path, or a file where another has a directory) the first one keeps the
path and each loser is reported (`Conflict`). The image's own entries (the
directories it needs real, /etc/passwd, the CA bundle's links) come before
every package. Never linked: `nix-support` (Nix's bookkeeping), and the
directories a container runtime mounts or programs must be able to write to
(`dev`, `proc`, `sys`, `run`, `tmp`, `var`).

`/bin` is special, as it always was: it holds the programs of every package's
`bin/` and `sbin/` (so `/bin/ip` works), one link per program.

A package from a Debian-derived set has Debian's tree (`usr/share/zoneinfo`,
`etc/...`), so its files land where Debian puts them with no special case.

Deterministic: directories are read in sorted order and the same packages in
the same order give the same entries. Reads the store: call it off the event loop.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nixery.layers.tarball import Entry

#: Most links (and directories) the packages may add to the entry-point layer; past it,
#: the rest is left out, and reported.
MAX_LINKS = 20_000
#: How deep merged directories are followed; below, the first package's directory is linked.
MAX_DEPTH = 32
#: Conflicts kept for the build's log and progress (all are counted).
MAX_REPORTED = 50

#: Top-level directories of a package that are never linked (see the module docstring).
NOT_LINKED = frozenset({"nix-support", "dev", "proc", "sys", "run", "tmp", "var"})
#: What the image's own entries are attributed to in conflicts.
IMAGE = "the image"


@dataclass(frozen=True, slots=True)
class LinkedPackage:
    name: str  # how conflicts name it (the image name's package)
    outputs: tuple[str, ...]  # store paths, linked in this order


@dataclass(frozen=True, slots=True)
class Conflict:
    path: str  # in the image, e.g. "/share/man/man1/x.1"
    kept: str  # the package whose entry is there
    lost: str  # the package whose entry is not

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "kept": self.kept, "lost": self.lost}

    def __str__(self) -> str:
        return f"{self.path}: {self.kept}'s, not {self.lost}'s"


@dataclass(slots=True)
class Linked:
    """The entries that link the packages, and what did not fit."""

    entries: list[Entry] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)  # the first MAX_REPORTED
    conflict_count: int = 0
    #: The first path left out for MAX_LINKS, and how many were.
    left_out: str | None = None
    left_out_count: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "conflicts": [c.to_json() for c in self.conflicts], "conflict_count": self.conflict_count,
            "left_out": self.left_out, "left_out_count": self.left_out_count,
        }


@dataclass(frozen=True, slots=True)
class _Source:
    package: str
    path: str  # absolute, in the store
    is_dir: bool  # a real directory (a link to one is a file here)


def _listing(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:  # not a directory, unreadable
        return []


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class _Linker:
    def __init__(self, own: Mapping[str, Entry]):
        self.own = own  # the image's entries, by name; its directories stay real
        self.result = Linked()

    def conflict(self, path: str, kept: str, lost: str) -> None:
        if kept == lost:
            return
        self.result.conflict_count += 1
        if len(self.result.conflicts) < MAX_REPORTED:
            self.result.conflicts.append(Conflict("/" + path, kept, lost))

    def add(self, entry: Entry) -> bool:
        if len(self.result.entries) >= MAX_LINKS:
            self.leave_out(entry.name)
            return False
        self.result.entries.append(entry)
        return True

    def leave_out(self, path: str) -> None:
        self.result.left_out = self.result.left_out or "/" + path
        self.result.left_out_count += 1

    def merge(self, path: str, sources: Sequence[_Source], depth: int) -> None:
        """`path`, a directory that `sources` (in order) provide."""
        mine = self.own.get(path)
        if mine is None and len(sources) == 1:
            self.add(Entry(path, "symlink", target=sources[0].path))
            return
        if depth >= MAX_DEPTH:  # the first one's directory, as a conflict with the others
            if mine is None and self.add(Entry(path, "symlink", target=sources[0].path)):
                for other in sources[1:]:
                    self.conflict(path, sources[0].package, other.package)
            return
        if mine is None and not self.add(Entry(path, "dir", 0o755)):
            return
        children: dict[str, list[_Source]] = {}
        for source in sources:
            for name in _listing(source.path):
                child = os.path.join(source.path, name)
                children.setdefault(name, []).append(_Source(source.package, child, _is_dir(child)))
        for name, found in sorted(children.items()):
            self.place(f"{path}/{name}" if path else name, found, depth + 1)

    def place(self, path: str, found: list[_Source], depth: int) -> None:
        """`path`, which the `found` entries (in order) want."""
        mine = self.own.get(path)
        if mine is not None and mine.kind != "dir":  # the image's own file or link
            for source in found:
                if mine.target != source.path:  # the CA bundle's link is that package's own file
                    self.conflict(path, IMAGE, source.package)
            return
        first = found[0]
        if mine is not None or first.is_dir:
            directories = [s for s in found if s.is_dir]
            kept = first.package if first.is_dir else IMAGE
            for loser in (s for s in found if not s.is_dir):
                self.conflict(path, kept, loser.package)
            if directories:
                self.merge(path, directories, depth)
            return
        if self.add(Entry(path, "symlink", target=first.path)):
            for loser in found[1:]:
                self.conflict(path, first.package, loser.package)


def link_packages(packages: Sequence[LinkedPackage], own: Sequence[Entry]) -> Linked:
    """The entries that put `packages` at `/`, around the image's `own` entries (which win)."""
    linker = _Linker({entry.name: entry for entry in own})
    top: dict[str, list[_Source]] = {}
    for package in packages:
        for output in package.outputs:
            for name in _listing(output):
                path = os.path.join(output, name)
                if name not in NOT_LINKED and os.path.isdir(path):  # files at the top are not linked
                    top.setdefault(name, []).append(_Source(package.name, path, _is_dir(path)))
            for directory in ("bin", "sbin"):  # /bin: every program (see the module docstring)
                path = os.path.join(output, directory)
                if os.path.isdir(path):  # a link to a directory too, as it always was
                    top.setdefault("\0bin", []).append(_Source(package.name, path, True))
    programs = top.pop("\0bin", [])
    top.pop("bin", None)
    if programs:
        linker.merge("bin", programs, 0)
    for name, sources in sorted(top.items()):
        linker.place(name, sources, 0)
    return linker.result
