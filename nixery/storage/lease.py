"""Leases: the cross-process `exclusive(key)` lock for object stores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
import uuid
from abc import abstractmethod
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from nixery.background import spawn
from nixery.storage.base import BackendUnavailable, Storage, StorageError, check_key

log = structlog.get_logger(__name__)


#: Seconds after which `nixery gc` deletes a lease nobody renewed (it compares the store's dates
#: with its own clock, as it does for blobs: they must agree within minutes).
ABANDONED_LEASE_AGE = 3600.0


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """One process among all that ran on its machine since boot: a pid means
    something only within a pid namespace of one boot, and the start time tells
    the process from a later one given the same pid."""

    boot: str  # /proc/sys/kernel/random/boot_id
    pid_namespace: str  # /proc/self/ns/pid's link, e.g. "pid:[4026531836]"
    pid: int
    started: int  # clock ticks after boot: /proc/<pid>/stat, field 22

    @classmethod
    def from_json(cls, document: Any) -> ProcessIdentity | None:
        try:
            fields = (str(document["boot"]), str(document["pid_namespace"]), int(document["pid"]))
            return cls(*fields, started=int(document["started"]))
        except (KeyError, TypeError, ValueError):
            return None

    def shares_pids_with(self, other: ProcessIdentity) -> bool:
        return (self.boot, self.pid_namespace) == (other.boot, other.pid_namespace)


_this_process: dict[int, ProcessIdentity | None] = {}


def this_process() -> ProcessIdentity | None:
    """This process's identity; None where /proc does not tell (leases then only expire)."""
    pid = os.getpid()  # per pid: forked workers are processes of their own
    if pid not in _this_process:
        try:
            with open("/proc/sys/kernel/random/boot_id") as boot:
                boot_id = boot.read().strip()
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:
            _this_process[pid] = None
        else:
            started = process_start_time(pid)
            _this_process[pid] = None if started is None else ProcessIdentity(boot_id, namespace, pid, started)
    return _this_process[pid]


def process_start_time(pid: int) -> int | None:
    """When process `pid` of this pid namespace started, or None if there is no such
    process (a zombie counts as gone: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name, field 2, is in parentheses and may hold spaces.
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    state, started = fields[0], fields[19]
    return None if state in ("Z", "X") else int(started)


#: Owners (see _Lease.owner) of the leases this process holds or is acquiring, by
#: any driver instance (one process may open several on one bucket, as tests do
#: to stand for replicas): a lease of this process's that is not among them is left over.
_live_owners: set[str] = set()


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
        process = this_process()
        document = {"owner": self.owner, "write": self.writes, "at": time.time(), "ttl": ttl}
        document["process"] = asdict(process) if process else None
        return json.dumps(document).encode()


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

    A waiter does not wait for the lease to run out when it can tell that its
    holder is gone: the lease names its holder's process (`ProcessIdentity`),
    so a process takes over at once a lease that it wrote itself but failed to
    release (the store was away when it ended), and one whose holder was a
    process of its own machine and pid namespace that no longer runs (killed,
    then restarted). A release that fails is retried in the background for a
    while, so the lease does not linger once the store is back; when the work
    under the lease failed because the store is away (`BackendUnavailable`),
    its caller does not wait for the release at all.

    The lease is advisory: a holder that cannot renew (stalled, cut off from
    the bucket) for longer than `lease_ttl` loses it while still working. What
    it guards here (one build per image, merging the layering history) costs
    time when done twice, never correctness: two builds of one image may plan
    different layers, but its record is created only if absent, and both
    processes serve the one stored first (`nixery.images.ImageStore.put`).
    """

    #: Seconds after which a lease that was not renewed is taken over.
    lease_ttl: float = 30.0
    #: Longest pause between a waiter's polls.
    lease_max_poll: float = 1.0
    #: A failed release is retried for this long (the lease expires anyway).
    lease_release_retries_for: float = 300.0

    def __init__(self) -> None:
        super().__init__()
        # Releases that failed, retried in the background until the store is back, by lease name.
        self._release_retries: dict[str, asyncio.Task[None]] = {}
        # Lease writes and deletes that run on after the caller stopped waiting.
        self._lease_tasks: set[asyncio.Task[Any]] = set()

    # Backend primitives. Versions are ETags or generations, as strings.
    @abstractmethod
    async def _lease_create(self, name: str, body: bytes) -> str | None:
        """Create `name` if absent: its version, or None when it exists."""

    @abstractmethod
    async def _lease_version(self, name: str) -> str | None:
        """The current version of `name`, or None when absent."""

    @abstractmethod
    async def _lease_read(self, name: str) -> tuple[str, bytes] | None:
        """The current version of `name` and its body, or None when absent."""

    @abstractmethod
    async def _lease_replace(self, name: str, body: bytes, version: str) -> str | None:
        """Overwrite `name` if it is at `version`: the new version, or None."""

    @abstractmethod
    async def _lease_delete(self, name: str, version: str) -> None:
        """Delete `name` if it is (still) at `version`."""

    @abstractmethod
    async def _lease_names(self) -> list[tuple[str, float]]:
        """Every lease object under `locks/`, with when it was last written (the store's clock)."""

    async def remove_abandoned_locks(self) -> int:
        """Delete the leases whose holder is known to be gone (`_holder_gone`), or that nobody
        has renewed for ABANDONED_LEASE_AGE by the store's dates (a holder renews every
        lease_ttl / 3 seconds): a process killed mid-build leaves one per image, kept until
        that image is built again. Each only if it is still the version read."""
        removed = 0
        now = time.time()
        for name, written in await self._lease_names():
            current = await self._lease_read(name)
            if current is None:
                continue
            version, body = current
            if _holder_gone(*_holder(body)) or now - written > ABANDONED_LEASE_AGE:
                await self._lease_delete(name, version)
                removed += 1
        return removed

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str) -> AsyncIterator[None]:
        lease = _Lease(f"locks/{check_key(key)}", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        _live_owners.add(lease.owner)
        try:
            await self._acquire_lease(lease)
        except BaseException:
            _live_owners.discard(lease.owner)
            raise
        renewal = asyncio.create_task(self._renew_lease(lease))
        store_away = False
        try:
            yield
        except BackendUnavailable:
            store_away = True
            raise
        finally:
            lease.stop.set()
            # Runs to its end even if this task is cancelled meanwhile.
            ending = self._lease_background(self._end_lease(lease, renewal), lease.name)
            # The work failed because the store is away: its caller answers at once (a 503 within
            # the store calls' bound), not after a renewal in flight and the release have given up
            # too. The release goes on in the background, and is retried there until the store is
            # back; meanwhile the lease's owner stays live, so this process does not take it over.
            if not store_away:
                await asyncio.shield(ending)

    async def _acquire_lease(self, lease: _Lease) -> None:
        await self._stop_retrying_release(lease.name)
        seen: str | None = None
        holder: tuple[ProcessIdentity | None, str] = (None, "")
        seen_at = pause = 0.0
        while True:
            version = await self._lease_write(lease, self._lease_create(lease.name, lease.body(self.lease_ttl)))
            if version is not None:
                lease.version = version
                return
            current = await self._lease_read(lease.name)
            now = time.monotonic()
            if current is not None:
                if current[0] != seen:
                    seen, seen_at, holder = current[0], now, _holder(current[1])
                gone = _holder_gone(*holder)
                if gone or now - seen_at >= self.lease_ttl:
                    # A release of this process's still retried must not delete the lease taken over.
                    await self._stop_retrying_release(lease.name)
                    body = lease.body(self.lease_ttl)
                    version = await self._lease_write(lease, self._lease_replace(lease.name, body, current[0]))
                    if version is not None:
                        why = gone or f"not renewed for {self.lease_ttl:g}s"
                        log.warning("lease.taken_over", storage=self.name, lease=lease.name, reason=why)
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
            self._lease_background(self._lease_delete(name, version), name)

    async def _renew_lease(self, lease: _Lease) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lease.stop.wait(), self.lease_ttl / 3)
                return
            assert lease.version is not None
            try:
                version = await self._lease_replace(lease.name, lease.body(self.lease_ttl), lease.version)
            except StorageError as error:
                log.warning("lease.renewal_failed", storage=self.name, lease=lease.name, error=str(error))
                continue
            if version is None:
                log.warning(
                    "lease.lost", storage=self.name, lease=lease.name, reason=f"not renewed within {self.lease_ttl:g}s",
                    action="carrying on",
                )
                lease.version = None
                return
            lease.version = version

    async def _end_lease(self, lease: _Lease, renewal: asyncio.Task[None]) -> None:
        # The owner stays live until its release is done or has failed: a waiter of this process
        # takes over at once only a lease left behind, never one that is being released (with an
        # emulator that ignores the delete's condition, that release could delete the new lease).
        try:
            await self._release_lease(lease, renewal)
        finally:
            _live_owners.discard(lease.owner)

    async def _release_lease(self, lease: _Lease, renewal: asyncio.Task[None]) -> None:
        try:
            await asyncio.wait_for(renewal, self.lease_ttl)  # lets a renewal in flight land first
        except Exception as error:  # noqa: BLE001 (whatever happened, release)
            log.warning("lease.renewal_failed", storage=self.name, lease=lease.name, error=str(error))
        if lease.version is None:
            return
        try:
            await asyncio.wait_for(self._lease_delete(lease.name, lease.version), self.lease_ttl)
        except (StorageError, TimeoutError) as error:
            log.warning(
                "lease.release_failed", storage=self.name, lease=lease.name, error=str(error),
                action="retrying in the background",
            )
            self._release_retries[lease.name] = self._lease_background(
                self._retry_release(lease.name, lease.version), lease.name
            )

    async def _retry_release(self, name: str, version: str) -> None:
        """Delete the lease once the store is back (it is retaken at once by this process meanwhile)."""
        deadline = time.monotonic() + self.lease_release_retries_for
        pause = 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))
            try:
                await self._lease_delete(name, version)
            except StorageError:
                pause = min(pause * 2, self.lease_ttl / 3)
                continue
            log.info("lease.released_late", storage=self.name, lease=name, note="the store is back")
            break
        else:
            log.warning("lease.release_given_up", storage=self.name, lease=name, note="it expires by itself")
        if self._release_retries.get(name) is asyncio.current_task():
            del self._release_retries[name]

    async def _stop_retrying_release(self, name: str) -> None:
        """This process is about to take `name` again: its old release must not delete the new lease."""
        if (retries := self._release_retries.pop(name, None)) is not None:
            retries.cancel()
            await asyncio.wait([retries])

    async def close(self) -> None:
        for retries in list(self._release_retries.values()):
            retries.cancel()

    def _lease_background(self, work: Any, lease: str) -> asyncio.Task[Any]:
        return spawn(
            work, failure_event="lease.background_failed", keep=self._lease_tasks, storage=self.name, lease=lease
        )


def _holder(body: bytes) -> tuple[ProcessIdentity | None, str]:
    """The process that wrote a lease, and the lease's owner string."""
    try:
        document = json.loads(body)
        return ProcessIdentity.from_json(document.get("process")), str(document.get("owner"))
    except (ValueError, AttributeError):
        return None, ""


def _holder_gone(process: ProcessIdentity | None, owner: str) -> str | None:
    """Why a lease's holder is known to be gone, or None if it may still be at work."""
    me = this_process()
    if process is None or me is None or not process.shares_pids_with(me):
        return None  # another machine or container: only the lease's age tells
    if process == me:
        return None if owner in _live_owners else "left by this process, which could not release it"
    if process_start_time(process.pid) != process.started:
        return f"its holder, process {process.pid} on this machine, has ended"
    return None
