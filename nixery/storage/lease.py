"""Leases: the cross-process `exclusive(key)` lock for object stores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
import uuid
from abc import abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from nixery.storage.base import Storage, StorageError, check_key

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Lease:
    name: str
    owner: str
    version: str | None = None
    writes: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def body(self, ttl: float) -> bytes:
        # Unique per write, so that every renewal changes the object's version (ETag).
        self.writes += 1
        return json.dumps({"owner": self.owner, "write": self.writes, "at": time.time(), "ttl": ttl}).encode()


class LeasedStorage(Storage):
    """`exclusive(key)` for object stores: a lease object with conditional writes.

    The lock is the object `locks/<key>`, created only if absent (S3
    `If-None-Match: *`, GCS `ifGenerationMatch=0`). Its holder rewrites it every
    `lease_ttl / 3` seconds, each time only if it is still the version it wrote
    last (`If-Match` / `ifGenerationMatch`), and deletes it on release. A waiter
    polls with backoff; once it has seen the same version for `lease_ttl`
    seconds by its own clock, the holder is presumed dead and the waiter takes
    the lock over, again only if it is still that version. No clocks are
    compared between machines.

    The lease is advisory: a holder that cannot renew (stalled, cut off from
    the bucket) for longer than `lease_ttl` loses it while still working. What
    it guards here (one build per image, merging the layering history) costs
    time when done twice, never correctness.
    """

    #: Seconds after which a lease that was not renewed is taken over.
    lease_ttl: float = 30.0
    #: Longest pause between a waiter's polls.
    lease_max_poll: float = 1.0

    # Backend primitives. Versions are ETags or generations, as strings.
    @abstractmethod
    async def _lease_create(self, name: str, body: bytes) -> str | None:
        """Create `name` if absent: its version, or None when it exists."""

    @abstractmethod
    async def _lease_version(self, name: str) -> str | None:
        """The current version of `name`, or None when absent."""

    @abstractmethod
    async def _lease_replace(self, name: str, body: bytes, version: str) -> str | None:
        """Overwrite `name` if it is at `version`: the new version, or None."""

    @abstractmethod
    async def _lease_delete(self, name: str, version: str) -> None:
        """Delete `name` if it is (still) at `version`."""

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        lease = _Lease(f"locks/{check_key(key)}", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        await self._acquire_lease(lease)
        renewal = asyncio.create_task(self._renew_lease(lease))
        try:
            yield
        finally:
            lease.stop.set()
            # Runs to its end even if this task is cancelled meanwhile.
            ending = self._lease_background(self._end_lease(lease, renewal))
            await asyncio.shield(ending)

    async def _acquire_lease(self, lease: _Lease) -> None:
        seen: str | None = None
        seen_at = pause = 0.0
        while True:
            version = await self._lease_write(lease, self._lease_create(lease.name, lease.body(self.lease_ttl)))
            if version is not None:
                lease.version = version
                return
            current = await self._lease_version(lease.name)
            now = time.monotonic()
            if current is not None and current != seen:
                seen, seen_at = current, now
            elif current is not None and now - seen_at >= self.lease_ttl:
                body = lease.body(self.lease_ttl)
                version = await self._lease_write(lease, self._lease_replace(lease.name, body, current))
                if version is not None:
                    _log.warning("%s: took over %s, not renewed for %gs", self.name, lease.name, self.lease_ttl)
                    lease.version = version
                    return
            pause = min(max(pause * 2, 0.05), self.lease_max_poll)
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))

    async def _lease_write(self, lease: _Lease, write: Any) -> str | None:
        """A create or takeover that, if this task is cancelled meanwhile, is undone once it lands."""
        task = asyncio.ensure_future(write)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda done: self._undo_lease_write(lease.name, done))
            raise

    def _undo_lease_write(self, name: str, done: asyncio.Future[str | None]) -> None:
        if not done.cancelled() and done.exception() is None and (version := done.result()) is not None:
            self._lease_background(self._lease_delete(name, version))

    async def _renew_lease(self, lease: _Lease) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lease.stop.wait(), self.lease_ttl / 3)
                return
            assert lease.version is not None
            try:
                version = await self._lease_replace(lease.name, lease.body(self.lease_ttl), lease.version)
            except StorageError as error:
                _log.warning("%s: could not renew %s: %s", self.name, lease.name, error)
                continue
            if version is None:
                _log.warning("%s: lost %s (not renewed within %gs); carrying on", self.name, lease.name, self.lease_ttl)
                lease.version = None
                return
            lease.version = version

    async def _end_lease(self, lease: _Lease, renewal: asyncio.Task[None]) -> None:
        try:
            await asyncio.wait_for(renewal, self.lease_ttl)  # lets a renewal in flight land first
        except Exception as error:  # noqa: BLE001 (whatever happened, release)
            _log.warning("%s: renewing %s failed: %s", self.name, lease.name, error)
        if lease.version is None:
            return
        try:
            await asyncio.wait_for(self._lease_delete(lease.name, lease.version), self.lease_ttl)
        except (StorageError, TimeoutError) as error:
            _log.warning("%s: could not release %s (expires in %gs): %s", self.name, lease.name, self.lease_ttl, error)

    def _lease_background(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        tasks: set[asyncio.Task[Any]] = self.__dict__.setdefault("_lease_tasks", set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task
