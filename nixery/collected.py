"""How garbage collection tells running registries that it removed things.

Registry processes keep image records and manifests in memory, and may serve
them for hours. `nixery gc` runs elsewhere (a CronJob, a timer) against the
same storage, so it leaves a note there: the small document `gc/last`
(`meta/gc/last`), rewritten with a new id each time it has removed image
records and again once it has removed blobs. Every registry process reads the
note every `POLL_INTERVAL` seconds, off the request path (one small read:
a file, or one GET on a bucket); when it has changed, the process drops every
record and manifest it holds in memory, so that each image is looked up in
storage again (and rebuilt if it was collected) on its next pull.

gc waits `SETTLE` seconds (more than one poll) between removing records and
removing blobs, so that by the time a blob goes, every live process has
already dropped the records that named it: a pull by tag during or after a
collection rebuilds the image instead of answering a manifest whose blobs are
gone. Manifests asked for by digest are dropped when the second note is read,
at most POLL_INTERVAL seconds after gc ends; until then a blob request that
finds its blob gone drops them at once in the process it reached.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import structlog

from nixery.registry.image import canonical_json
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)

MARKER = "gc/last"
#: Seconds between two reads of the note by a registry process.
POLL_INTERVAL = 2.0
#: Seconds gc waits between removing records and removing blobs: two polls.
SETTLE = 2 * POLL_INTERVAL


async def announce(storage: Storage, removed: str) -> None:
    """Tell running registries that gc has removed `removed` ("images" or "blobs")."""
    note = {"id": uuid.uuid4().hex, "removed": removed, "at": time.time()}
    await storage.put_meta(MARKER, canonical_json(note))


class CollectionWatch:
    """Calls `on_collected` whenever the note in storage changes (checked every `interval` s)."""

    def __init__(self, storage: Storage, on_collected: Callable[[], None], *, interval: float = POLL_INTERVAL):
        self._storage = storage
        self._on_collected = on_collected
        self._interval = interval
        self._seen: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def check(self) -> bool:
        """Read the note once; whether it changed (and the caches were dropped).

        The first note a process reads counts as a change: what it loaded
        before then was not checked against it.
        """
        note = await self._storage.get_meta(MARKER)
        if note is None or note == self._seen:
            return False
        self._seen = note
        log.info("gc.noticed", note=note.decode(errors="replace")[:200], action="dropping images held in memory")
        self._on_collected()
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
                if self._failing:
                    log.info("gc.watch_recovered")
                self._failing = False
            except Exception as exc:  # storage unavailable: try again at the next poll
                if not self._failing:
                    log.warning("gc.watch_failed", error=str(exc)[:200])
                self._failing = True
            await asyncio.sleep(self._interval)
