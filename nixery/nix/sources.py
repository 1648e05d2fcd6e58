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
    (none: bundled set)    nothing        hash of the files' content   here
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import structlog

from nixery.config import Settings
from nixery.singleflight import FreshRun

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Revision:
    source: str  # human description, e.g. "path /srv/pkgs"
    id: str  # changes whenever the package set's content does
    path: Path | None  # directory with default.nix; None until `checkout` makes it


class PackageSource(ABC):
    description: str

    @abstractmethod
    async def resolve(self, tag: str) -> Revision:
        """The package set to build `tag` from (cheap: the image cache is keyed by its id)."""

    async def checkout(self, revision: Revision) -> Path:
        """The local directory of a revision, fetched only when an image must be built."""
        assert revision.path is not None, "sources without a local path override checkout"
        return revision.path


class LocalPathSource(PackageSource):
    """A directory on this machine, re-read when its content changes.

    Tags do not select anything here: every tag builds the directory as it is.
    """

    def __init__(self, path: Path, description: str | None = None):
        self.path = path.resolve()
        self.description = description or f"path {self.path}"
        self._hashes = FileHashes()
        # Concurrent requests share a walk of the tree, but only one that began
        # after they arrived, so an edit always shows up in the next pull.
        self._walks: FreshRun[str] = FreshRun(
            lambda: asyncio.to_thread(tree_fingerprint, self.path, self._hashes)
        )

    async def resolve(self, tag: str) -> Revision:
        return Revision(self.description, f"tree-{await self._walks.run()}", self.path)


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


def tree_fingerprint(root: Path, hashes: FileHashes | None = None) -> str:
    """A hash of the tree under `root`: every file's name, content and executable bit,
    and where each symbolic link to a directory points.

    Content, not times: the same files give the same fingerprint on every
    machine and after every copy or regeneration, and an edit changes it.
    With `hashes` kept from an earlier walk, only files whose stat changed are
    read (a walk of an unchanged tree reads directory entries only).
    Files are visited as os.walk would (a directory's files by name, then its
    subdirectories; symbolic links to directories are not followed).
    """
    hashes = hashes if hashes is not None else FileHashes()
    hashes.start_walk()
    digest = hashlib.sha256()

    def visit(directory: str, prefix: str) -> None:
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:  # gone or unreadable: skipped, as os.walk does
            return
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
            if entry.is_symlink():
                try:
                    target = os.readlink(entry.path)
                except OSError:
                    continue
                digest.update(f"l\0{prefix}{entry.name}\0{target}\n".encode(errors="surrogateescape"))
                continue
            visit(entry.path, f"{prefix}{entry.name}/")

    visit(str(root), "")
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


def open_source(settings: Settings) -> PackageSource:
    """The package source the settings name; the bundled set when none is named."""
    # Imported here: those modules build on the classes above.
    from nixery.nix.channel import ChannelSource
    from nixery.nix.git import GitSource

    if settings.pkgs_path is not None:
        return LocalPathSource(settings.pkgs_path)
    if settings.pkgs_repo:
        return GitSource(
            settings.pkgs_repo,
            cache_dir=settings.cache_dir,
            ref_ttl=settings.git_ref_ttl,
            fetch_timeout=settings.nix_timeout,
        )
    if settings.channel:
        return ChannelSource(
            settings.channel,
            url_template=settings.channel_url,
            cache_dir=settings.cache_dir,
            timeout=settings.nix_timeout,
        )
    bundled = settings.bundled_set
    if bundled.fallback:  # not asked for: say how to get the set `auto` would prefer
        log.info(
            "source.bundled_busybox",
            note="serving the busybox package set, as the Debian set is not generated; "
            "run `make debian-set` for real software (bash, curl, git, python3)",
        )
    return LocalPathSource(bundled.path, description=f"bundled {bundled.name}")
