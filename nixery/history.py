"""The layering history in storage: shared by every process, written a build at a time.

The history (`nixery.layers.grouping.LayerHistory`) lists the layers already
stored, so that new images reuse them. It reaches 20,000 layers (its cap) on a
registry of a few thousand images, megabytes of JSON; rewriting it on every
build cost a second per build. So it is kept in two parts:

    layering/history.json        the snapshot (the format the history always had)
    layering/history/<name>      one small entry per build since: the layers it planned

That is the host platform's history; each other platform (Nix system) has its
own, the same under `layering/<system>/` (`PlatformHistories`).

A build records its layers in the process's history in memory and writes one
entry: work in proportion to its own layers, whatever the size of the
history, without the storage-wide lock. Entry names begin with the time in
nanoseconds, so they sort about in the order they were written.

Each process loads the snapshot and every entry once (at start-up), and reads
the entries it has not seen yet at most every `REFRESH_INTERVAL` seconds,
before it plans an image: replicas share what each other stored within
seconds. Once `COMPACT_AFTER` entries have been known to a process for
`FOLD_AGE` seconds (so every live process has read them), it folds them into
the snapshot in the background, under the storage-wide lock
"layering-history" (one process at a time), then deletes them.

All of it only guides reuse, so failures cost layers, never correctness: an
entry that cannot be written is a layer the next image may make anew (the
layer cache still finds it by its paths), an entry folded twice (a crash
between writing the snapshot and deleting the entries) counts its layers'
use twice, and a damaged snapshot or entry is skipped.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from typing import TypeVar

import structlog

from nixery.background import spawn
from nixery.layers.grouping import LayerHistory
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)

SNAPSHOT = "layering/history.json"
ENTRIES = "layering/history/"
LOCK = "layering-history"
#: Seconds between two reads of other processes' entries.
REFRESH_INTERVAL = 5.0
#: Entries that make folding them into the snapshot worth its cost (it reads and writes it whole).
COMPACT_AFTER = 500
#: Seconds a process must have known an entry before folding it (every live process has read it by then).
FOLD_AGE = 60.0
#: Reads or deletes of entries in flight at once.
_CONCURRENCY = 16
_ENTRY_VERSION = 1

T = TypeVar("T")


def history_keys(system: str | None) -> tuple[str, str, str]:
    """The snapshot key, the entries' prefix and the lock name of one platform's history:
    those above for the default one (None: the host's, as they always were), else under
    `layering/<system>/`."""
    if system is None:
        return SNAPSHOT, ENTRIES, LOCK
    return f"layering/{system}/history.json", f"layering/{system}/history/", f"{LOCK}-{system}"


class SharedHistory:
    """This process's layering history, kept in step with storage (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        *,
        system: str | None = None,
        refresh_interval: float = REFRESH_INTERVAL,
        compact_after: int = COMPACT_AFTER,
        fold_age: float = FOLD_AGE,
    ):
        self._storage = storage
        # One history per platform: another platform's store paths are others (`history_keys`).
        self._snapshot, self._entries, self._lock_name = history_keys(system)
        self._refresh_interval = refresh_interval
        self._compact_after = compact_after
        self._fold_age = fold_age
        self._history: LayerHistory | None = None
        self._seen: dict[str, float] = {}  # entry name -> when this process first knew it (monotonic)
        self._writing: set[str] = set()  # this process's entries on their way to storage
        self._refreshed = 0.0
        self._lock = asyncio.Lock()
        self._compactions: set[asyncio.Task[None]] = set()  # at most one

    async def current(self) -> LayerHistory:
        """The history, loaded on first use and brought up to date with other processes'
        entries at most every `refresh_interval` seconds."""
        async with self._lock:
            if self._history is None:
                started = time.monotonic()
                self._history = await self._read_snapshot() or LayerHistory()
                await self._read_new_entries()
                log.info("history.loaded", layers=len(self._history), entries=len(self._seen),
                         seconds=round(time.monotonic() - started, 3))
            elif time.monotonic() - self._refreshed >= self._refresh_interval:
                await self._read_new_entries()
            return self._history

    async def record(self, layers: Sequence[frozenset[str]]) -> None:
        """Note that these layers are now stored: in memory at once, in storage as one entry."""
        history = self._history if self._history is not None else await self.current()
        history.record(layers)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:16]}"
        self._seen[name] = time.monotonic()
        self._writing.add(name)
        try:
            await self._storage.put_meta(self._entries + name, _entry_json(layers))
        except Exception as exc:  # the history only guides reuse: the build goes on
            log.warning("history.entry_not_written", error=str(exc)[:200])
        finally:
            self._writing.discard(name)
        self._compact_soon()

    async def close(self) -> None:
        for compaction in list(self._compactions):
            compaction.cancel()
        await asyncio.gather(*self._compactions, return_exceptions=True)

    async def _read_snapshot(self) -> LayerHistory | None:
        """The stored snapshot; a damaged one is dropped (it only guides reuse)."""
        data = await self._storage.get_meta(self._snapshot)
        if data is None:
            return None
        try:
            return await asyncio.to_thread(LayerHistory.from_json, data)
        except ValueError as exc:
            log.warning("history.snapshot_unreadable", error=str(exc)[:200], note="starting a new history")
            return None

    async def _read_new_entries(self) -> None:
        assert self._history is not None
        started = time.monotonic()
        listed = await self._entry_names()
        # Forget the names that another process folded and deleted. Not a recent one of this
        # process's: its write may have landed after the listing began.
        for name, seen in list(self._seen.items()):
            if name not in listed and name not in self._writing and seen < started - self._fold_age:
                del self._seen[name]
        new = sorted(listed - self._seen.keys())
        now = time.monotonic()
        documents = await _limited(self._storage.get_meta(self._entries + name) for name in new)
        for name in new:
            self._seen[name] = now
        await asyncio.to_thread(_apply, self._history, zip(new, documents, strict=True))
        self._refreshed = now

    async def _entry_names(self) -> set[str]:
        return {key.removeprefix(self._entries) for key in await self._storage.list_meta(self._entries)}

    def _compact_soon(self) -> None:
        if self._compactions or len(self._seen) < self._compact_after:
            return
        if len(self._foldable(self._seen.keys())) < self._compact_after:
            return
        spawn(self._compact(), failure_event="history.compaction_failed", keep=self._compactions)

    def _foldable(self, names: Iterable[str]) -> list[str]:
        now = time.monotonic()
        return sorted(name for name in names if now - self._seen.get(name, now) >= self._fold_age)

    async def _compact(self) -> None:
        started = time.monotonic()
        async with self._storage.exclusive(self._lock_name):
            fold = self._foldable(await self._entry_names() & self._seen.keys())
            if len(fold) < self._compact_after:  # another process folded them meanwhile
                return
            snapshot = await self._read_snapshot() or LayerHistory()
            documents = await _limited(self._storage.get_meta(self._entries + name) for name in fold)
            data = await asyncio.to_thread(_fold, snapshot, zip(fold, documents, strict=True))
            await self._storage.put_meta(self._snapshot, data)
            await _limited(self._storage.delete_meta(self._entries + name) for name in fold)
        log.info("history.compacted", entries=len(fold), layers=len(snapshot),
                 seconds=round(time.monotonic() - started, 3))

def _entry_json(layers: Sequence[frozenset[str]]) -> bytes:
    document = {"version": _ENTRY_VERSION, "layers": [sorted(layer) for layer in layers]}
    return json.dumps(document, separators=(",", ":")).encode()


def _entry_layers(name: str, data: bytes) -> list[frozenset[str]] | None:
    try:
        document = json.loads(data)
        if document.get("version") != _ENTRY_VERSION:
            raise ValueError(f"unknown version {document.get('version')!r}")
        layers = [frozenset(layer) for layer in document["layers"]]
        if not all(isinstance(path, str) for layer in layers for path in layer):
            raise ValueError("a path is not a string")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("history.entry_unreadable", entry=name, error=str(exc)[:200])
        return None
    return layers


def _apply(history: LayerHistory, entries: Iterable[tuple[str, bytes | None]]) -> None:
    """Record entries in order; those gone meanwhile (folded by another process) are skipped."""
    for name, data in entries:
        if data is not None and (layers := _entry_layers(name, data)) is not None:
            history.record(layers)


def _fold(snapshot: LayerHistory, entries: Iterable[tuple[str, bytes | None]]) -> bytes:
    _apply(snapshot, entries)
    return snapshot.to_json()


async def _limited(work: Iterable[Awaitable[T]]) -> list[T]:
    """Run the awaitables with at most _CONCURRENCY in flight; results in order."""
    slots = asyncio.Semaphore(_CONCURRENCY)

    async def one(item: Awaitable[T]) -> T:
        async with slots:
            return await item

    return await asyncio.gather(*(one(item) for item in work))


class PlatformHistories:
    """One `SharedHistory` per platform (Nix system), each made on first use and planned
    under its own lock, so platforms are planned side by side; the host's has the keys
    the history always had."""

    def __init__(self, storage: Storage, host_system: str):
        self._storage = storage
        self._host = host_system
        self._histories: dict[str, SharedHistory] = {}
        self._planning: dict[str, asyncio.Lock] = {}

    def of(self, system: str) -> SharedHistory:
        if system not in self._histories:
            own = None if system == self._host else system
            self._histories[system] = SharedHistory(self._storage, system=own)
            self._planning[system] = asyncio.Lock()
        return self._histories[system]

    def planning(self, system: str) -> asyncio.Lock:
        """Held while an image of `system` is planned against its history."""
        self.of(system)
        return self._planning[system]

    async def close(self) -> None:
        await asyncio.gather(*(history.close() for history in self._histories.values()))
