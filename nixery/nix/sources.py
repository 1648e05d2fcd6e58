"""Package sources: where the package set of an image comes from.

A source turns an image tag into a `Revision`: a local directory holding the
package set's `default.nix`, and an identifier that changes whenever the
package set does. The identifier, not the tag, keys the image cache.

A package set is the same for every source: a directory (a repository's root,
a tarball's top directory) whose `default.nix` evaluates to a function of one
attribute set, called as `import dir { system = "x86_64-linux"; }`, that
returns an attribute set of derivations (nested sets allowed), as nixpkgs does.

    source                 tag selects    revision id                  module
    NIXERY_PKGS_PATH       nothing        hash of the files' content   here
    NIXERY_PKGS_REPO       a git ref      the commit                   git.py
    NIXERY_CHANNEL         nothing        commit, or tarball SHA-256   channel.py
    NIXERY_FLAKE           a git ref      locked commit, or narHash    flake.py
    (none: bundled set)    nothing        hash of the files' content   here

Each source supplies the builder's resolver (`PackageSource.resolver`, the
`nixery.resolver.PackageResolver` protocol): here always a `NixResolver`,
which evaluates that `default.nix` and builds what names resolve to with Nix.
Which source the settings name is decided where the registry is wired
together (`nixery.app.open_source`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import structlog

from nixery.closure import ClosureGraph, Registration
from nixery.nix import packages as nix
from nixery.nix.errors import SourceUnavailable
from nixery.nix.evaluator import Evaluators
from nixery.nix.process import Deadline
from nixery.nix.store_db import STORE_DIR
from nixery.resolver import ResolvedPackage, Revision
from nixery.singleflight import FreshRun

log = structlog.get_logger(__name__)


class PackageSource(ABC):
    description: str

    @abstractmethod
    async def resolve(self, tag: str) -> Revision:
        """The package set to build `tag` from (cheap: the image cache is keyed by its id)."""

    async def checkout(self, revision: Revision) -> Path:
        """The local directory of a revision, fetched only when an image must be built."""
        assert revision.path is not None, "sources without a local path override checkout"
        return revision.path

    async def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Stop the fetches under way: they are shared, so they outlive the builds that asked."""

    def resolver(self, *, timeout: float, evaluators: Evaluators | None) -> NixResolver:
        """How the builder gets this source's packages: every source here is a package set
        that Nix evaluates and builds (`NIXERY_NIX_TIMEOUT` is `timeout`)."""
        return NixResolver(self, timeout=timeout, evaluators=evaluators)


class NixResolver:
    """A package set's `default.nix` through Nix (`nixery.resolver.PackageResolver`).

    Names are evaluated by a long-running Nix evaluator when there are
    `evaluators`, else by one `nix-instantiate` per image; closures are read
    from Nix's store database when everything is built already.
    """

    def __init__(self, source: PackageSource, *, timeout: float, evaluators: Evaluators | None):
        self.source = source
        self.description = source.description
        self.timeout = timeout
        #: Long-running Nix evaluators (None: one nix-instantiate per image).
        self.evaluators = evaluators

    async def resolve(self, tag: str) -> Revision:
        return await self.source.resolve(tag)

    async def evaluate(
        self, revision: Revision, names: Sequence[str], system: str, *, until: float
    ) -> list[ResolvedPackage]:
        return await nix.evaluate(
            await self.source.checkout(revision), names, system, source=revision.source,
            deadline=self._deadline(until), evaluators=self.evaluators, revision=revision.id,
        )

    async def realise(
        self, packages: Sequence[ResolvedPackage], system: str, *, until: float,
        on_line: Callable[[str], None] | None = None,
    ) -> ClosureGraph:
        outputs = [out for package in packages for out in package.outputs]
        return await nix.ensure_built_closure(
            [p.drv_path for p in packages], outputs, system=system, deadline=self._deadline(until), on_line=on_line
        )

    async def registrations(self, paths: Sequence[str], *, until: float) -> list[Registration]:
        return await nix.registrations(paths, deadline=self._deadline(until))

    async def warm_up(self) -> None:
        """Start this host's evaluator on a local package set, so the first image need not."""
        if self.evaluators is None:
            return
        try:
            revision = await self.source.resolve("latest")
        except Exception as exc:  # the first build reports it
            log.info("build.warm_up_skipped", error=str(exc)[:200])
            return
        if revision.path is not None:  # fetched sources warm up with their first build
            await self.evaluators.warm(
                revision.id, revision.path, system=nix.host_system(), deadline=Deadline.after(self.timeout)
            )

    async def close(self) -> None:
        await self.source.close()
        if self.evaluators is not None:
            await self.evaluators.close()

    def _deadline(self, until: float) -> Deadline:
        return Deadline(self.timeout, until)


class LocalPathSource(PackageSource):
    """A directory on this machine, re-read when its content changes.

    Tags do not select anything here: every tag builds the directory as it is.
    The path may be a symbolic link that a deployment moves to each new release
    (`ln -sfn releases/v2 /srv/pkgs`): it is followed anew on every walk, so the
    next pull serves the release it points to then.
    """

    def __init__(self, path: Path, description: str | None = None):
        self.path = path.absolute()
        self.description = description or f"path {self.path}"
        self._hashes = FileHashes()
        # Concurrent requests share a walk of the tree, but only one that began
        # after they arrived, so an edit always shows up in the next pull.
        self._walks: FreshRun[tuple[str, Path]] = FreshRun(lambda: asyncio.to_thread(self._walk))

    def _walk(self) -> tuple[str, Path]:
        directory = self.path.resolve()  # where the link points now
        return tree_fingerprint(directory, self._hashes), directory

    async def resolve(self, tag: str) -> Revision:
        fingerprint, directory = await self._walks.run()
        return Revision(self.description, f"tree-{fingerprint}", directory)


def _under(path: str, directories: Sequence[str]) -> bool:
    return any(path == directory or path.startswith(f"{directory}/") for directory in directories)


_SKIPPED_DIRECTORIES = frozenset({".git", "__pycache__", "result"})

#: What a file's content hash is kept under: when any of these changes, the file is read again.
_StatKey = tuple[int, int, int, int, int]  # device, inode, size, modification and change times (ns)


class FileHashes:
    """The content hashes of a tree's files, each kept with the `stat` it was read at.

    A file is read again only when its stat changes; a change of times alone
    (a `touch`, a copy, a regenerated file with the same bytes) costs one read
    and changes no fingerprint. Used by one walk at a time (FreshRun); each
    walk keeps only the files it met, so memory follows the tree.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[_StatKey, bytes]] = {}  # as of the last walk
        self._walk: dict[str, tuple[_StatKey, bytes]] = {}  # met by the walk under way

    def start_walk(self) -> None:
        self._walk = {}

    def end_walk(self) -> None:
        self._known, self._walk = self._walk, {}

    def digest(self, path: str, st: os.stat_result) -> bytes:
        """The SHA-256 of a regular file's bytes (read only if its stat is new)."""
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = self._known.get(path)
        if known is None or known[0] != key:
            digest = hashlib.sha256()
            with open(path, "rb") as file:
                while chunk := file.read(1 << 20):
                    digest.update(chunk)
            known = (key, digest.digest())
        self._walk[path] = known
        return known[1]


#: Files and directories a package set's walk meets at most, its links followed: a link to
#: `/` or a home directory by mistake would walk a whole disk on every pull.
MAX_TREE_ENTRIES = 500_000

#: Never entered, through a link or as a directory under a linked one: their files are not the
#: package set's, and some block when read (/proc/kmsg) or never end (/dev/zero).
_NOT_FOLLOWED = ("/proc", "/sys", "/dev")


def tree_fingerprint(root: Path, hashes: FileHashes | None = None, *, max_entries: int = MAX_TREE_ENTRIES) -> str:
    """A hash of the tree under `root`: every file's name, content and executable bit,
    also of the files behind symbolic links to directories (Nix follows them too).

    Content, not times: the same files give the same fingerprint on every
    machine and after every copy or regeneration, and an edit changes it.
    With `hashes` kept from an earlier walk, only files whose stat changed are
    read (a walk of an unchanged tree reads directory entries only).
    Files are visited as os.walk would (a directory's files by name, then its
    subdirectories). A link to a directory in the Nix store counts by its target
    only (store paths do not change), and so does one to a directory the walk is
    already inside (a loop). A link into /proc, /sys or /dev counts by its target only, and the
    walk enters none of them, nor the Nix store, through a link to a directory above them.

    Raises SourceUnavailable past `max_entries` files and directories.
    """
    hashes = hashes if hashes is not None else FileHashes()
    hashes.start_walk()
    digest = hashlib.sha256()
    met = 0

    def visit(directory: str, prefix: str, inside: frozenset[str], inside_real: str) -> None:
        """Hash `directory` (whose real path is `inside_real`, within the real directories `inside`)."""
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:  # gone or unreadable: skipped, as os.walk does
            return
        nonlocal met
        met += len(entries)
        if met > max_entries:
            raise SourceUnavailable(
                f"the package set {root} holds more than {max_entries:,} files and directories, its links "
                f"followed (the walk was in {directory}): does a link in it point out of it by mistake?"
            )
        subdirectories = []
        for entry in entries:
            try:
                is_directory = entry.is_dir()
            except OSError:
                is_directory = False
            if is_directory:
                subdirectories.append(entry)
                continue
            try:
                st = entry.stat()
                # Only regular files are read: a FIFO or a device would block or never end.
                content = hashes.digest(entry.path, st) if stat.S_ISREG(st.st_mode) else b"special"
                executable = "x" if st.st_mode & 0o100 else "-"
            except (FileNotFoundError, IsADirectoryError):  # removed, or replaced by a directory, meanwhile
                continue
            except OSError:  # unreadable: Nix could not read it either; its name still counts
                content, executable = b"unreadable", "?"
            digest.update(f"f\0{prefix}{entry.name}\0{executable}\0".encode(errors="surrogateescape") + content + b"\n")
        for entry in subdirectories:
            if entry.name in _SKIPPED_DIRECTORIES:
                continue
            real = os.path.join(inside_real, entry.name)
            if entry.is_symlink():
                try:
                    real = os.path.realpath(entry.path)
                    target = os.readlink(entry.path)
                except OSError:  # gone meanwhile, or a /proc link that reads as none
                    continue
                digest.update(f"l\0{prefix}{entry.name}\0{target}\n".encode(errors="surrogateescape"))
                if real in inside or real.startswith(f"{STORE_DIR}/"):
                    continue
            # Through a link to `/`, say, the walk meets these as plain directories: not the package
            # set's files, and some never end.
            if real == STORE_DIR or _under(real, _NOT_FOLLOWED):
                continue
            visit(entry.path, f"{prefix}{entry.name}/", inside | {real}, real)

    top = os.path.realpath(root)
    visit(str(root), "", frozenset({top}), top)
    hashes.end_walk()
    return digest.hexdigest()[:32]


def redact_url(url: str) -> str:
    """The URL without its user part (which may hold a password or token), for messages."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
