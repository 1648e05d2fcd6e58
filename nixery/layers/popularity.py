"""Popularity data for a fresh registry's layering (NIX_POPULARITY_URL).

A registry that has built nothing yet has no layering history, and grouping
(`nixery.layers.grouping`) then knows only how many paths of one closure
depend on each path. Package-wide counts say more: Nixery publishes them
(its `popcount` tool) as one JSON object of package name, a store path's name
without its hash, to the number of packages whose closure holds it:

    {"glibc-2.37-8": 11624, "zlib-1.3": 4172, ...}

Such a name counts for every store path of that name, whatever its hash. Keys
may also name one store path: `<hash>-<name>` or a whole `/nix/store/...`
path, which comes first where both are given. The data is read once
per process, from `file://` or `http(s)://`, within `MAX_BYTES` and
`FETCH_TIMEOUT`, and parsed off the event loop. Data that cannot be fetched
or is not such an object is logged as one warning; layering goes on
without it, as it always did.

The registry's own history takes over once it remembers `TAKES_OVER_AT`
layers: from then on the images it has built, not a package set's
statistics, say which paths travel together (`Popularity.until`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
import structlog

log = structlog.get_logger(__name__)

STORE_DIR = "/nix/store/"
#: Nixery's data for all of nixpkgs is a few MB.
MAX_BYTES = 64 << 20
FETCH_TIMEOUT = 60.0
#: Layers in the history past which popularity data is no longer used.
TAKES_OVER_AT = 1000
#: A store path's base name: its 32-character hash (Nix's base 32), a dash, the name.
HASHED_NAME = re.compile(r"[0-9a-z]{32}-(.+)")


class PopularityError(Exception):
    """The data cannot be fetched or is not an object of counts."""


def check_url(url: str) -> str | None:
    """Why `url` cannot be NIX_POPULARITY_URL, or None."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return None if parts.path else "a file:// URL needs a path"
    if parts.scheme in ("http", "https"):
        return None if parts.netloc else "an http(s) URL needs a host"
    return "only file://, http:// and https:// URLs are read"


def is_count(value: object) -> bool:
    """Whether `value` is a count: a non-negative integer (JSON's true and false are not, though
    Python's bools are ints)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class Counts(Mapping[str, int]):
    """Store path -> count: a path's own count, else the count of its name (Nixery's keys).

    Iterating gives the keys as the data has them (store paths, and names without a hash)."""

    def __init__(self, by_path: dict[str, int], by_name: dict[str, int]):
        self.by_path = by_path
        self.by_name = by_name

    def __getitem__(self, path: str) -> int:
        count = self.by_path.get(path, self.by_name.get(path))
        if count is not None:
            return count
        matched = HASHED_NAME.fullmatch(path.rpartition("/")[2]) if path.startswith(STORE_DIR) else None
        if matched is None:
            raise KeyError(path)
        return self.by_name[matched.group(1)]

    def __iter__(self) -> Iterator[str]:
        yield from self.by_path
        yield from self.by_name

    def __len__(self) -> int:
        return len(self.by_path) + len(self.by_name)


def parse_counts(data: bytes) -> Counts:
    """The counts of the JSON document: of store paths (a key with a hash; without a directory it
    gets the store's) and of names (a key without one, as Nixery's popcount writes them)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise PopularityError(f"not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise PopularityError(f"expected an object of store path names to counts, not {type(document).__name__}")
    by_path: dict[str, int] = {}
    by_name: dict[str, int] = {}
    for name, count in document.items():
        if not is_count(count):
            raise PopularityError(f"the count of {name[:200]!r} is not a non-negative integer: {count!r:.50}")
        if name.startswith("/"):
            by_path[name] = count
        elif HASHED_NAME.fullmatch(name):
            by_path[STORE_DIR + name] = count
        else:
            by_name[name] = count
    return Counts(by_path, by_name)


class Popularity:
    """NIX_POPULARITY_URL's counts, fetched once (the first `load` or `until`)."""

    def __init__(self, url: str):
        self.url = url
        parts = urlsplit(url)
        # For the log: without a user part, which may hold a password or token.
        self.shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
        self._counts: Counts | None = None
        self._loaded = False
        self._lock = asyncio.Lock()

    async def until(self, history_layers: int) -> Mapping[str, int] | None:
        """The counts while a history of `history_layers` layers has not taken over; else None."""
        return None if history_layers >= TAKES_OVER_AT else await self.load()

    async def load(self) -> Mapping[str, int] | None:
        """The counts; None, after one warning in the log, when they cannot be had."""
        if self._loaded:
            return self._counts
        async with self._lock:
            if not self._loaded:
                try:
                    self._counts = await asyncio.to_thread(parse_counts, await self._fetch())
                    log.info("layering.popularity_loaded", url=self.shown, paths=len(self._counts))
                except PopularityError as exc:
                    log.warning("layering.popularity_unavailable", url=self.shown, error=str(exc)[:500],
                                note="layering goes on without it")
                self._loaded = True
        return self._counts

    async def _fetch(self) -> bytes:
        parts = urlsplit(self.url)
        if parts.scheme == "file":
            return await asyncio.to_thread(_read_file, Path(unquote(parts.path)))
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url) as response:
                if response.status != 200:
                    raise PopularityError(f"HTTP {response.status}")
                if (response.content_length or 0) > MAX_BYTES:
                    raise PopularityError(f"larger than {MAX_BYTES} bytes")
                data = bytearray()  # to the end: one read gives only what has arrived
                async for piece in response.content.iter_chunked(1 << 20):
                    data += piece
                    if len(data) > MAX_BYTES:
                        break
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise PopularityError(f"cannot fetch it: {reason}") from exc
        if len(data) > MAX_BYTES:
            raise PopularityError(f"larger than {MAX_BYTES} bytes")
        return bytes(data)


def _read_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise PopularityError(f"cannot read it: {exc}") from exc
    if len(data) > MAX_BYTES:
        raise PopularityError(f"larger than {MAX_BYTES} bytes")
    return data
