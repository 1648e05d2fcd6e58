"""The layering history in storage: shared by every process, written a build at a time.

The history (`nixery.layers.grouping.LayerHistory`) lists the layers already
stored, so that new images reuse them. It reaches 20,000 layers (its cap) on a
registry of a few thousand images, megabytes of JSON; rewriting it on every
build cost a second per build. So it is kept in two parts:

    layering/history.json        the snapshot (the format the history always had)
    layering/history.generation  how many times entries were folded into it (a few bytes)
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
`FOLD_AGE` seconds, it folds them into the snapshot in the background, under
the storage-wide lock "layering-history" (one process at a time), counts one
more generation, then deletes them.

A process does not rely on having read an entry before it was folded: one
idle for longer than `FOLD_AGE`, or one that loaded while another folded,
would have lost those layers for good. Each refresh also reads the
generation (one small read); when it is not the one of the snapshot the
process holds, or entries it had read are gone (folded by a process that
counts no generation), the process reads the snapshot again and the entries
still stored, and keeps its own entries not yet listed. Loading reads the
generation, lists the entries, then reads the snapshot: an entry folded
meanwhile counts twice rather than not at all, and one gone before it was
read makes the process read the snapshot again.

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
from typing import NamedTuple, TypeVar

import structlog

from nixery.background import spawn
from nixery.layers.grouping import LayerHistory
from nixery.layers.popularity import is_count
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
#: Reads of the snapshot and the entries while entries are folded between the two.
_RELOAD_ATTEMPTS = 3

T = TypeVar("T")


def generation_key(snapshot: str) -> str:
    """Where the generation of the snapshot under `snapshot` is kept."""
    return snapshot.removesuffix(".json") + ".generation"


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
        self._generation_key = generation_key(self._snapshot)
        self._refresh_interval = refresh_interval
        self._compact_after = compact_after
        self._fold_age = fold_age
        self._history: LayerHistory | None = None
        self._generation: int | None = None  # that of the snapshot `_history` was made from
        # entry name -> when this process first knew it to be stored (monotonic)
        self._seen: dict[str, float] = {}
        # This process's entries no listing has shown yet (on their way to storage, or written
        # since the last listing began): their layers, kept when the snapshot is read again.
        self._own: dict[str, Entry] = {}
        self._refreshed = 0.0
        self._lock = asyncio.Lock()
        self._compactions: set[asyncio.Task[None]] = set()  # at most one

    async def current(self) -> LayerHistory:
        """The history, loaded on first use and brought up to date with other processes'
        entries at most every `refresh_interval` seconds."""
        async with self._lock:
            if self._history is None:
                started = time.monotonic()
                # The generation, then the entries, then the snapshot: one folded meanwhile is in
                # the snapshot or among the entries (or both), and the next refresh reads again.
                generation = await self._read_generation()
                await self._reload(generation, await self._entry_names(), started)
                assert self._history is not None
                log.info("history.loaded", layers=len(self._history), entries=len(self._seen),
                         seconds=round(time.monotonic() - started, 3))
            elif time.monotonic() - self._refreshed >= self._refresh_interval:
                await self._refresh()
            assert self._history is not None
            return self._history

    async def record(self, layers: Sequence[frozenset[str]], sizes: Sequence[int | None] | None = None) -> None:
        """Note that these layers are now stored: in memory at once, in storage as one entry.
        `sizes`: the bytes of each layer's paths, where known (`LayerHistory.record`)."""
        history = self._history if self._history is not None else await self.current()
        history.record(layers, sizes)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:16]}"
        self._own[name] = entry = Entry(layers, sizes)
        try:
            await self._storage.put_meta(self._entries + name, _entry_json(entry))
        except Exception as exc:  # the history only guides reuse: the build goes on
            self._own.pop(name, None)
            log.warning("history.entry_not_written", error=str(exc)[:200])
            return
        self._seen.setdefault(name, time.monotonic())  # stored: a listing begun from now on shows it
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

    async def _read_generation(self) -> int:
        """How many times entries were folded into the stored snapshot (0: never, or by
        processes that counted none). One small read."""
        data = await self._storage.get_meta(self._generation_key)
        try:
            return int(json.loads(data)["generation"]) if data is not None else 0
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("history.generation_unreadable", error=str(exc)[:200])
            return -1

    async def _refresh(self) -> None:
        """Read the entries stored since the last time; the snapshot too if entries were folded
        into it since this process read it."""
        assert self._history is not None
        started = time.monotonic()
        generation = await self._read_generation()
        listed = await self._entry_names()
        # Entries known to be stored before this listing began, and missing from it, were
        # folded: by a process that counted no generation if it is unchanged.
        folded = [name for name, seen in self._seen.items() if seen < started and name not in listed]
        if generation != self._generation or folded:
            log.info("history.snapshot_changed", generation=generation, had=self._generation, folded=len(folded))
            await self._reload(generation, listed, started)
            return
        now = time.monotonic()
        for name in listed & self._own.keys():  # stored, recorded here already
            self._seen.setdefault(name, now)
        new = sorted(listed - self._seen.keys())
        self._note_listed(listed, started)
        documents = await _limited(self._storage.get_meta(self._entries + name) for name in new)
        for name in new:
            self._seen[name] = now
        await asyncio.to_thread(_apply, self._history, zip(new, documents, strict=True))
        self._refreshed = now

    async def _reload(self, generation: int, listed: set[str], started: float) -> None:
        """Make the history anew: the snapshot read now, the `listed` entries, then this
        process's own entries that no listing has shown yet."""
        for attempt in range(_RELOAD_ATTEMPTS):
            self._note_listed(listed, started)
            history = await self._read_snapshot() or LayerHistory()
            names = sorted(listed - self._own.keys())
            documents = await _limited(self._storage.get_meta(self._entries + name) for name in names)
            if None not in documents or attempt == _RELOAD_ATTEMPTS - 1:
                break
            # Entries folded since the listing, maybe into a snapshot newer than the one read
            # (written before they were deleted): read both again rather than lose them.
            started = time.monotonic()
            generation = await self._read_generation()
            listed = await self._entry_names()
        await asyncio.to_thread(_apply, history, zip(names, documents, strict=True))
        # Nothing awaited from here: the own entries are all those recorded until now.
        for entry in self._own.values():
            history.record(entry.layers, entry.sizes)
        now = time.monotonic()
        self._seen = {name: self._seen.get(name, now) for name in listed} | {
            name: seen for name, seen in self._seen.items() if name in self._own
        }
        self._history, self._generation, self._refreshed = history, generation, now

    def _note_listed(self, listed: set[str], started: float) -> None:
        """Drop from `_own` the entries this listing shows, and those stored before it began
        that it does not show (folded: the snapshot holds them)."""
        for name in list(self._own):
            if name in listed or self._seen.get(name, started) < started:
                del self._own[name]

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
            generation = await self._read_generation()
            snapshot = await self._read_snapshot() or LayerHistory()
            documents = await _limited(self._storage.get_meta(self._entries + name) for name in fold)
            data = await asyncio.to_thread(_fold, snapshot, zip(fold, documents, strict=True))
            await self._storage.put_meta(self._snapshot, data)
            # Before the entries go: a process that finds them gone finds a new generation too.
            folded = max(generation, 0) + 1
            await self._storage.put_meta(self._generation_key, json.dumps({"generation": folded}).encode())
            if self._generation == generation:  # this process holds that snapshot and the entries folded
                self._generation = folded
            await _limited(self._storage.delete_meta(self._entries + name) for name in fold)
            for name in fold:  # gone, and not folded by another: no reason to read the snapshot again
                self._seen.pop(name, None)
        log.info("history.compacted", entries=len(fold), layers=len(snapshot),
                 seconds=round(time.monotonic() - started, 3))

class Entry(NamedTuple):
    """One build's layers, and the bytes of each where known."""

    layers: Sequence[frozenset[str]]
    sizes: Sequence[int | None] | None


def _entry_json(entry: Entry) -> bytes:
    document: dict[str, object] = {"version": _ENTRY_VERSION, "layers": [sorted(layer) for layer in entry.layers]}
    if entry.sizes is not None:  # a key of its own: a process that predates it reads the layers
        document["bytes"] = list(entry.sizes)
    return json.dumps(document, separators=(",", ":")).encode()


def _entry_layers(name: str, data: bytes) -> Entry | None:
    try:
        document = json.loads(data)
        if document.get("version") != _ENTRY_VERSION:
            raise ValueError(f"unknown version {document.get('version')!r}")
        layers = [frozenset(layer) for layer in document["layers"]]
        if not all(isinstance(path, str) for layer in layers for path in layer):
            raise ValueError("a path is not a string")
        sizes = document.get("bytes")
        if sizes is not None and (
            len(sizes) != len(layers) or not all(size is None or is_count(size) for size in sizes)
        ):
            raise ValueError("the layers' bytes are not one count (or null) per layer")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("history.entry_unreadable", entry=name, error=str(exc)[:200])
        return None
    return Entry(layers, sizes)


def _apply(history: LayerHistory, entries: Iterable[tuple[str, bytes | None]]) -> None:
    """Record entries in order; those gone meanwhile (folded by another process) are skipped."""
    for name, data in entries:
        if data is not None and (entry := _entry_layers(name, data)) is not None:
            history.record(entry.layers, entry.sizes)


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
