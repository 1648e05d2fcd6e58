"""Package sources: where the package set of an image comes from.

A source turns an image tag into a `Revision`: a local directory holding the
package set's `default.nix`, and an identifier that changes whenever the
package set does. The identifier, not the tag, keys the image cache.

A package set is the same for every source: a directory (a repository's root,
a tarball's top directory) whose `default.nix` evaluates to a function of one
attribute set, called as `import dir { system = "x86_64-linux"; }`, that
returns an attribute set of derivations (nested sets allowed), as nixpkgs does.

    source                 tag selects    revision id                  module
    NIXERY_PKGS_PATH       nothing        hash of the directory tree   here
    NIXERY_PKGS_REPO       a git ref      the commit                   git.py
    NIXERY_CHANNEL         nothing        commit, or tarball SHA-256   channel.py
    (none: bundled set)    nothing        hash of the directory tree   here
"""

from __future__ import annotations

import asyncio
import hashlib
import os
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
        # Concurrent requests share a walk of the tree, but only one that began
        # after they arrived, so an edit always shows up in the next pull.
        self._walks: FreshRun[str] = FreshRun(lambda: asyncio.to_thread(tree_fingerprint, self.path))

    async def resolve(self, tag: str) -> Revision:
        return Revision(self.description, f"tree-{await self._walks.run()}", self.path)


_SKIPPED_DIRECTORIES = frozenset({".git", "__pycache__", "result"})


def tree_fingerprint(root: Path) -> str:
    """A hash of every file's name, size, and modification time under `root`.

    Cheap enough for every request: it reads directory entries, not contents.
    An edit changes the modification time, so it changes the fingerprint.
    Files are visited as os.walk would (a directory's files by name, then its
    subdirectories; symbolic links to directories are not followed).
    """
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
            except FileNotFoundError:
                continue
            digest.update(f"{prefix}{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for entry in subdirectories:
            if entry.name not in _SKIPPED_DIRECTORIES and not entry.is_symlink():
                visit(entry.path, f"{prefix}{entry.name}/")

    visit(str(root), "")
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
    if bundled.name == "busybox":
        log.info(
            "source.bundled_busybox",
            note="serving the busybox package set; run `make debian-set` for real software (bash, curl, git, python3)",
        )
    return LocalPathSource(bundled.path, description=f"bundled {bundled.name}")
