"""Package sets from a Nix channel: a tarball of nixpkgs, followed as the channel moves.

NIXERY_CHANNEL names a channel (`nixos-unstable`, `nixos-24.05`) or a nixpkgs
commit; it replaces `{rev}` in NIXERY_CHANNEL_URL (by default GitHub's archive
of the nixpkgs repository) to give the tarball's URL. Air-gapped sites and
tests point the template at a server of their own.

The tarball is downloaded on the first request, unpacked, and kept under
`<cache_dir>/channels/`:

    <key>.json           the revision in use: its directory, id, SHA-256, the URL it
                         came from after redirects, when it was fetched and checked
    <key>-<sha256>/      one revision (key: a hash of the channel's URL)
        meta.json        URL, SHA-256 of the tarball, revision id, package set directory
        tree/            the unpacked tarball (nixpkgs archives hold one top directory)

A revision's directory is assembled under a temporary name and renamed into
place when complete, so a restart, or another process sharing the cache,
finds either nothing or a whole package set, and never downloads it again.

The revision id (which keys the image cache): for a commit, the commit, kept
for ever; for a channel name, the SHA-256 of the tarball. A channel name is
asked again once its revision is NIXERY_CHANNEL_TTL seconds old (checked
rather than fetched: a channel that did not move is not downloaded again
each time): when the URL redirects to the release it redirected to before,
nothing is downloaded; otherwise the tarball is, and a new hash is a new
revision (the previous one is kept for builds under way, older ones are
removed). When the channel cannot be reached, its last revision is served and
it is asked again after another TTL. Tags in image names are ignored.
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
from urllib.parse import quote, urljoin

import aiohttp
import structlog

from nixery.nix.cachefiles import publish_directory, read_json, remove_abandoned, write_json
from nixery.nix.errors import SourceUnavailable
from nixery.nix.sources import PackageSource, Revision, redact_url

log = structlog.get_logger(__name__)

_COMMIT = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 10


class ChannelSource(PackageSource):
    def __init__(self, channel: str, *, url_template: str, cache_dir: Path, timeout: float, ttl: float = 3600.0):
        self.channel = channel
        self.url = url_template.replace("{rev}", quote(channel, safe=""))
        self.shown_url = redact_url(self.url)
        self.description = f"channel {channel}"
        self.timeout = timeout
        #: Seconds a channel name's revision is used before the channel is asked again.
        self.ttl = ttl
        self.pinned = bool(_COMMIT.fullmatch(channel))
        self.root = cache_dir / "channels"
        self.key = hashlib.sha256(self.url.encode()).hexdigest()[:24]
        self._current_file = self.root / f"{self.key}.json"
        self._current: dict | None = None
        self._revision: Revision | None = None
        self._lock = asyncio.Lock()

    async def resolve(self, tag: str) -> Revision:
        if self._revision is not None and not self._due(self._current):
            return self._revision
        async with self._lock:  # one download, however many requests wait for it
            if self._revision is None or self._due(self._current):
                current = await asyncio.to_thread(self._read_current)  # another process may have refreshed it
                if current is None or self._due(current):
                    current = await self._refresh(current)
                self._current = current
                self._revision = Revision(
                    f"{self.description} ({current['id'][:19]})", current["id"],
                    self.root / current["dir"] / current["root"], fetched=current["fetched"],
                )
            return self._revision

    def _due(self, current: dict | None) -> bool:
        """Whether `current` is missing, or a channel name's revision older than the TTL."""
        return current is None or (not self.pinned and time.time() - current["checked"] >= self.ttl)

    async def _refresh(self, current: dict | None) -> dict:
        """The channel as it is now; the revision in use when it cannot be reached."""
        try:
            new = await self._download(current)
        except SourceUnavailable as exc:
            if current is None:
                raise
            log.warning(
                "channel.unreachable_using_last_revision", channel=self.channel, revision=current["id"],
                error=exc.message[:300], note=f"asked again in {self.ttl:g} s",
            )
            new = {**current, "checked": time.time()}
        if current is not None and new["id"] != current["id"]:
            log.info("channel.moved", channel=self.channel, previous=current["id"], revision=new["id"])
        await asyncio.to_thread(write_json, self._current_file, new)
        if current is not None and new["dir"] != current["dir"]:
            await asyncio.to_thread(self._remove_old, keep={new["dir"], current["dir"]})
        return new

    def _read_current(self) -> dict | None:
        """The revision in use, from `<key>.json` (or from a cache made before channels moved)."""
        current = read_json(self._current_file)
        if all(isinstance(current.get(k), str) for k in ("dir", "id", "root", "sha256")) and all(
            isinstance(current.get(k), (int, float)) for k in ("fetched", "checked")
        ):
            return current if (self.root / current["dir"] / "meta.json").is_file() else None
        old = _read_meta(self.root / self.key)
        if old is None:
            return None
        fetched = (self.root / self.key / "meta.json").stat().st_mtime
        return {**old, "dir": self.key, "sha256": old.get("sha256", ""), "fetched": fetched, "checked": fetched}

    def _remove_old(self, keep: set[str]) -> None:
        """Earlier revisions of this channel (the one just replaced stays, for builds under way)."""
        for entry in self.root.glob(f"{self.key}*"):
            if entry.is_dir() and entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    async def _download(self, current: dict | None) -> dict:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(remove_abandoned, self.root)
        staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".tmp-", dir=self.root))
        try:
            started = time.monotonic()
            archive = staging / "download"
            fetched = await self._fetch_to(archive, current)
            now = time.time()
            if fetched is None:  # redirected to the release it was redirected to before
                assert current is not None
                return {**current, "checked": now}
            sha256, size, final_url = fetched
            if current is not None and sha256 == current["sha256"]:
                return {**current, "final_url": final_url, "checked": now}
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
                "id": self.channel if self.pinned else f"sha256-{sha256}",
                "root": root,
            }
            directory = f"{self.key}-{sha256[:16]}"
            await asyncio.to_thread(_finish, staging, archive, meta, self.root / directory)
            log.info("channel.unpacked", channel=self.channel, revision=meta["id"], path=str(self.root / directory))
            return {**meta, "dir": directory, "final_url": final_url, "fetched": now, "checked": now}
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, ignore_errors=True)

    async def _fetch_to(self, destination: Path, current: dict | None) -> tuple[str, int, str] | None:
        """Stream the tarball to disk; returns its SHA-256, size and the URL it came from
        after redirects, or None, without asking for it, when a redirect leads to the URL
        `current` came from (channels redirect to a release, whose content never changes)."""
        digest = hashlib.sha256()
        size = 0
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=30, sock_read=120)
        url = self.url
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for _ in range(_MAX_REDIRECTS + 1):
                    # Redirects are followed here, so that a known target is not even asked for.
                    async with session.get(url, allow_redirects=False) as response:
                        location = response.headers.get("Location")
                        if response.status in _REDIRECTS and location:
                            url = urljoin(url, location)
                            if current is not None and url == current.get("final_url"):
                                return None
                            continue
                        if response.status != 200:
                            raise SourceUnavailable(
                                f"cannot download {self.description} from {self.shown_url}: HTTP {response.status}"
                            )
                        with open(destination, "wb") as handle:
                            async for chunk in response.content.iter_chunked(_CHUNK):
                                digest.update(chunk)
                                size += len(chunk)
                                await asyncio.to_thread(handle.write, chunk)
                        break
                else:
                    raise SourceUnavailable(f"{self.shown_url} redirects more than {_MAX_REDIRECTS} times")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise SourceUnavailable(f"cannot download {self.description} from {self.shown_url}: {reason}") from exc
        return digest.hexdigest(), size, url


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
