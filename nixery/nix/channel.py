"""Package sets from a Nix channel: a tarball of nixpkgs, fetched once.

NIXERY_CHANNEL names a channel (`nixos-unstable`, `nixos-24.05`) or a nixpkgs
commit; it replaces `{rev}` in NIXERY_CHANNEL_URL (by default GitHub's archive
of the nixpkgs repository) to give the tarball's URL. Air-gapped sites and
tests point the template at a server of their own.

The tarball is downloaded on the first request, unpacked, and kept under
`<cache_dir>/channels/<hash of the URL>/`:

    meta.json   URL, SHA-256 of the tarball, revision id, package set directory
    tree/       the unpacked tarball (nixpkgs archives hold one top directory)

The directory is assembled under a temporary name and renamed into place when
complete, so a restart, or another process sharing the cache, finds either
nothing or a whole package set, and never downloads it again.

The revision id (which keys the image cache): for a commit, the commit; for a
channel name, the SHA-256 of the downloaded tarball. A channel name is thus
pinned to the content fetched first, for as long as that download is cached:
to follow the channel, remove its directory under `<cache_dir>/channels/` (or
name a commit) and restart. Tags in image names are ignored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
import structlog

from nixery.nix.cachefiles import publish_directory, remove_abandoned
from nixery.nix.errors import SourceUnavailable
from nixery.nix.sources import PackageSource, Revision, redact_url

log = structlog.get_logger(__name__)

_COMMIT = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 20


class ChannelSource(PackageSource):
    def __init__(self, channel: str, *, url_template: str, cache_dir: Path, timeout: float):
        self.channel = channel
        self.url = url_template.replace("{rev}", quote(channel, safe=""))
        self.shown_url = redact_url(self.url)
        self.description = f"channel {channel}"
        self.timeout = timeout
        self.root = cache_dir / "channels"
        self.directory = self.root / hashlib.sha256(self.url.encode()).hexdigest()[:24]
        self._revision: Revision | None = None
        self._lock = asyncio.Lock()

    async def resolve(self, tag: str) -> Revision:
        if self._revision is not None:
            return self._revision
        async with self._lock:  # one download, however many requests wait for it
            if self._revision is None:
                meta = await asyncio.to_thread(_read_meta, self.directory)
                if meta is None:
                    meta = await self._download()
                self._revision = Revision(
                    f"{self.description} ({meta['id'][:19]})", meta["id"], self.directory / meta["root"]
                )
            return self._revision

    async def _download(self) -> dict:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(remove_abandoned, self.root)
        staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".tmp-", dir=self.root))
        try:
            started = time.monotonic()
            archive = staging / "download"
            sha256, size = await self._fetch_to(archive)
            log.info(
                "channel.downloaded", channel=self.channel, url=self.shown_url, bytes=size,
                seconds=round(time.monotonic() - started, 3),
            )
            root = await asyncio.to_thread(_unpack, archive, staging / "tree")
            if root is None:
                raise SourceUnavailable(
                    f"the tarball of {self.description} at {self.shown_url} has no default.nix "
                    "at its top level (or in its one top directory)"
                )
            meta = {
                "url": self.shown_url,
                "sha256": sha256,
                "id": self.channel if _COMMIT.fullmatch(self.channel) else f"sha256-{sha256}",
                "root": root,
            }
            await asyncio.to_thread(_finish, staging, archive, meta, self.directory)
            log.info("channel.unpacked", channel=self.channel, revision=meta["id"], path=str(self.directory))
            return await asyncio.to_thread(_read_meta, self.directory) or meta
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)

    async def _fetch_to(self, destination: Path) -> tuple[str, int]:
        """Stream the tarball to disk; returns its SHA-256 and size."""
        digest = hashlib.sha256()
        size = 0
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=30, sock_read=120)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(self.url) as response:
                    if response.status != 200:
                        raise SourceUnavailable(
                            f"cannot download {self.description} from {self.shown_url}: HTTP {response.status}"
                        )
                    with open(destination, "wb") as handle:
                        async for chunk in response.content.iter_chunked(_CHUNK):
                            digest.update(chunk)
                            size += len(chunk)
                            await asyncio.to_thread(handle.write, chunk)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise SourceUnavailable(f"cannot download {self.description} from {self.shown_url}: {reason}") from exc
        return digest.hexdigest(), size


def _read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in ("id", "root")):
        return None
    return meta


def _unpack(archive: Path, destination: Path) -> str | None:
    """Unpack; returns the package set's directory relative to the parent of `destination`."""
    destination.mkdir()
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            tar.extractall(destination, filter="tar")  # nothing outside `destination`
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceUnavailable(f"cannot unpack the downloaded tarball: {exc}") from exc
    if (destination / "default.nix").is_file():
        return destination.name
    entries = list(destination.iterdir())
    if len(entries) == 1 and (entries[0] / "default.nix").is_file():
        return f"{destination.name}/{entries[0].name}"
    return None


def _finish(staging: Path, archive: Path, meta: dict, final: Path) -> None:
    """Drop the download, write meta.json last, and rename the whole into place."""
    archive.unlink()
    (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    publish_directory(staging, final)
