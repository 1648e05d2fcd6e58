"""The NixImage watch: keeps declarations equal to the cluster's objects and reports status.

The watch loop keeps the declaration store's `kubernetes` source equal to the
cluster's objects:

* a list replaces the whole table (objects deleted while we were away vanish)
  and gives the resourceVersion to watch from;
* ADDED / MODIFIED / DELETED events update it; BOOKMARK events only move the
  resourceVersion on;
* a watch that ends (the server's timeoutSeconds, a dropped connection, a
  read time-out) is opened again from the last resourceVersion seen;
* 410 Gone (as the response's status or as an ERROR event: our
  resourceVersion is too old) means list again;
* any other failure, of whatever type, is logged (`k8s.watch_failed`, with
  `error_type`) and retried with exponential back-off and jitter, up to
  `max_backoff` seconds; the registry keeps serving what it knows meanwhile.
  After a connection failure the retry watches on from the last
  resourceVersion; after anything else (an error the server answered, such as
  504 "Too large resource version" from a server restored from an older etcd
  backup, or an event that cannot be read) it lists again;
* events are applied in batches, those that arrived together, and the
  declaration table is rebuilt once per batch, so a burst of changes costs a
  few rebuilds, not one per object;
* the work per object (reading its JSON, checking it, its fingerprint) is
  done for a whole list or batch in a thread, and so is the rebuild
  (`DeclarationStore.update_source`): the event loop only files the results,
  in the events' order, and goes on answering pulls meanwhile; so is the walk
  over every object that a new table needs to decide each status
  (`statuses_to_write`), whose results the loop files unless a newer table
  overtook it;
* one object that cannot be read or served fails alone: an object whose
  `data` nests deeper than Python's JSON parser allows is read without that
  value (`nixery.k8s.decoding`) and reported `Invalid`, like any other
  invalid object; the others are served and watched on.

Status (`status` subresource; NixImage is cluster-scoped, but namespaced
objects are addressed correctly too):

    phase: Pending | Ready | Failed | Invalid | Conflict
    image: curl-and-jq:v1        digest / ociDigest: manifest digests when Ready
    indexDigest: the OCI image index's, when Ready with several platforms (data.arch a list)
    error: why Failed, Invalid or Conflict      observedGeneration, builtAt

An object's status is patched only when it differs from what we want it to
say, so our own patches (which come back as MODIFIED events) change nothing
and several replicas do not fight: `Pending` is written with the object's
resourceVersion as a precondition and never over a result another replica
wrote for the same generation, and the first result for a generation stays
(except that Ready replaces Failed): replicas or nodes whose builds differ
never take turns rewriting it. So `digest` is that of the generation's first
successful build.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import structlog

from nixery.declarations import KUBERNETES, Declaration, DeclarationStore
from nixery.k8s.client import ApiError, Gone, KubeClient
from nixery.k8s.credentials import KubeConfig, load_kube_config
from nixery.k8s.objects import Seen, WatchedObject, WatchEvent, object_origin, read_events, read_objects
from nixery.registry.mediatypes import OCI_INDEX
from nixery.registry.negotiation import pull_digests

if TYPE_CHECKING:
    from nixery.images import ImageRecord

log = structlog.get_logger(__name__)

_STATUS_FIELDS = ("phase", "image", "digest", "ociDigest", "indexDigest", "error", "observedGeneration", "builtAt")
#: Failures of the connection, after which a watch resumes from the last resourceVersion seen.
_CONNECTION_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)
#: Objects the status walk (in a thread) looks at between two hand-overs of the GIL (as `nixery.yaml_files`).
_WALK_SHARES_THE_GIL_EVERY = 100
#: The digests of a status that is not Ready.
_NO_DIGESTS = {"digest": None, "ociDigest": None, "indexDigest": None}


def _says(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the status `current` already says everything `wanted` does (absent fields are null)."""
    return all(current.get(name) == wanted.get(name) for name in _STATUS_FIELDS if name in wanted)


def desired_status(
    obj: WatchedObject,
    status: Mapping[str, Any],
    result: Mapping[str, Any] | None,
    winners: Mapping[str, Declaration],
    losers: Mapping[str, Declaration],
) -> tuple[dict[str, Any], bool] | None:
    """The status `obj` should say, given its `status` and build `result` and the table's `winners`
    and `losers` (`StatusReporter.table_changed`), and whether writing it needs the resourceVersion
    precondition; None: leave it. It reads only what it is given, so it may run in a thread."""
    common = {"observedGeneration": obj.generation}
    if obj.problem is not None:
        return {**common, "phase": "Invalid", "error": obj.problem, "image": None, **_NO_DIGESTS,
                "builtAt": None}, False
    declaration = obj.declaration
    assert declaration is not None
    winner = losers.get(obj.key)
    if winner is not None:
        return {**common, "phase": "Conflict", "image": declaration.reference, **_NO_DIGESTS,
                "builtAt": None, "error": f"{declaration.reference} is already declared by {winner.origin}"}, False
    if obj.key not in winners:
        return None
    this_generation = (
        status.get("observedGeneration") == obj.generation and status.get("image") == declaration.reference
    )
    if result is not None:
        # The first result for a generation stays, but Ready replaces Failed: replicas (or nodes)
        # whose builds differ, in a digest or an error message, must not take turns rewriting it.
        if this_generation and (
            status.get("phase") == "Ready" or (status.get("phase") == "Failed" and result["phase"] == "Failed")
        ):
            return None
        return {**common, "image": declaration.reference, **result}, False
    if this_generation and status.get("phase") in ("Pending", "Ready", "Failed"):
        return None  # already said, by us or another replica
    return {**common, "phase": "Pending", "image": declaration.reference, **_NO_DIGESTS,
            "error": None, "builtAt": None}, True


@dataclass(frozen=True, slots=True)
class StatusToWrite:
    """A status the walk wants written, and what it decided it on (`status_seen`, `result_seen`:
    the object's, which are replaced when they change, never edited)."""

    obj: WatchedObject
    status_seen: dict[str, Any]
    result_seen: dict[str, Any] | None
    status: dict[str, Any]
    conditional: bool


def statuses_to_write(
    objects: Iterable[WatchedObject], winners: Mapping[str, Declaration], losers: Mapping[str, Declaration]
) -> list[StatusToWrite]:
    """The statuses `objects` should say and do not yet, in their order: the walk over every object
    that a new table needs, which the watch runs in a thread (it touches no state)."""
    wanted = []
    for walked, obj in enumerate(objects, 1):
        if walked % _WALK_SHARES_THE_GIL_EVERY == 0:
            time.sleep(0)  # hands the GIL over: else the event loop's thread waits up to 5 ms for it each time
        status, result = obj.status, obj.result  # read once: the event loop may replace them meanwhile
        desired = desired_status(obj, status, result, winners, losers)
        if desired is not None and not _says(status, desired[0]):
            wanted.append(StatusToWrite(obj, status, result, *desired))
    return wanted


@dataclass
class _Backoff:
    base: float
    limit: float
    failures: int = 0

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        delay = min(self.limit, self.base * (2**self.failures))
        self.failures += 1
        return delay * random.uniform(0.75, 1.25)


@dataclass
class NixImageWatch:
    """Keeps the store's `kubernetes` declarations in step with the cluster, and writes status."""

    client: KubeClient
    store: DeclarationStore
    min_backoff: float = 0.5
    max_backoff: float = 30.0
    watch_timeout: int = 300
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    objects: dict[str, WatchedObject] = field(default_factory=dict)
    resource_version: str | None = None
    _winners: dict[str, Declaration] = field(default_factory=dict)
    _losers: dict[str, Declaration] = field(default_factory=dict)
    _status_queue: dict[str, tuple[dict[str, Any], bool]] = field(default_factory=dict)
    _status_ready: asyncio.Event = field(default_factory=asyncio.Event)
    _table_changes: int = 0  # tables reported (`table_changed`)
    _walked: int = 0  # the last of them whose statuses are queued (`_walk_statuses`)
    _walking: asyncio.Task[None] | None = None
    #: counters for tests and logs
    lists: int = 0
    watches: int = 0

    def __post_init__(self) -> None:
        self.store.add_reporter(KUBERNETES, self)

    # ---- list and watch --------------------------------------------

    async def run(self) -> None:
        backoff = _Backoff(self.min_backoff, self.max_backoff)
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    backoff.reset()
                await self._watch(backoff)
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                log.info("k8s.watch_expired", resource_version=self.resource_version, reason=exc.message)
                self.resource_version = None  # list again, at once
            except Exception as exc:  # whatever it is, the watch goes on: a stopped one serves a stale table
                delay = backoff.next()
                expected = isinstance(exc, (*_CONNECTION_ERRORS, ApiError, ValueError))
                (log.warning if expected else log.error)(
                    "k8s.watch_failed", error=str(exc)[:500] or type(exc).__name__, error_type=type(exc).__name__,
                    retry_in=round(delay, 2), resource_version=self.resource_version,
                    exc_info=None if expected else exc,
                )
                if not isinstance(exc, _CONNECTION_ERRORS):
                    # The server refused the watch itself, e.g. 504 "Too large resource version" from
                    # one restored from an older etcd backup, which would refuse every watch from
                    # here, or sent an event we cannot read (a malformed line, JSON nested deeper than
                    # the parser allows), which a watch from the same resourceVersion would send
                    # again: list again (as client-go does). A dropped connection resumes instead.
                    self.resource_version = None
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        items, resource_version = await self.client.list()
        self.lists += 1
        previous = self.objects
        # `objects` changes only in this task, which waits for the thread: it may read them.
        seen = await asyncio.to_thread(read_objects, items, previous)
        self.objects = {}
        for one in seen:
            self._keep(one, previous.get(one.key))
        self.resource_version = resource_version
        log.info("k8s.listed", objects=len(items), resource_version=resource_version)
        await self._publish()
        self.synced.set()

    async def _watch(self, backoff: _Backoff) -> None:
        assert self.resource_version is not None
        self.watches += 1
        started, events = time.monotonic(), 0
        async for batch in self.client.watch(self.resource_version, timeout_seconds=self.watch_timeout):
            # The table is rebuilt once per batch (the events that arrived together), not per event:
            # a rebuild walks every object (3.6 ms at 2,000), and a burst of 500 creations held the
            # event loop for hundreds of them. The batch is read (JSON, checks), and the table rebuilt,
            # in a thread; `objects` changes only in this task, which waits for the thread, so the
            # thread may read them.
            read, failure = await asyncio.to_thread(read_events, batch, self.objects)
            changed = False
            for event in read:
                events += 1
                changed = self._apply(event, backoff) or changed
            if changed:  # also when a later event of the batch fails: the earlier ones count
                await self._publish()
            if failure is not None:
                raise failure
        if events == 0 and time.monotonic() - started < 1.0:
            # Ended at once with nothing to say: don't spin on a server that closes every watch.
            await asyncio.sleep(backoff.next())
        else:
            log.debug("k8s.watch_ended", events=events, resource_version=self.resource_version)

    def _apply(self, event: WatchEvent, backoff: _Backoff) -> bool:
        """Take one watch event into `objects`; True when what they declare may have changed."""
        if event.resource_version:
            self.resource_version = event.resource_version
        backoff.reset()
        if event.seen is not None:
            key = event.seen.key
            if self._keep(event.seen, self.objects.get(key)):
                return True
            self._update_status(self.objects[key])  # only its status or metadata changed
        elif event.kind == "DELETED" and self.objects.pop(event.key, None) is not None:
            log.info("k8s.object_deleted", object=object_origin(event.key))
            return True
        return False  # a BOOKMARK, or an event of a kind we do not know

    def _keep(self, seen: Seen, previous: WatchedObject | None) -> bool:
        """Keep the object `seen`; True when what it declares may have changed."""
        if seen.fresh is None and previous is not None:
            previous.resource_version = seen.resource_version
            previous.status = seen.status
            self.objects[seen.key] = previous
            return False
        assert seen.fresh is not None  # `read_object` reads anew what it does not know
        self.objects[seen.key] = seen.fresh
        return True

    async def _publish(self) -> None:
        await self.store.update_source(KUBERNETES, [o.declaration for o in self.objects.values() if o.declaration])

    # ---- status (StatusReporter) -----------------------------------

    def table_changed(self, winners: Mapping[str, Declaration], losers: Mapping[str, Declaration]) -> None:
        """Every object's status may change with the table: walked in a thread (`_walk_statuses`)."""
        self._winners, self._losers = dict(winners), dict(losers)
        self._table_changes += 1
        if self._walking is None or self._walking.done():
            self._walking = self.store.run_in_background(self._walk_statuses(), failure_event="k8s.status_walk_failed")

    async def _walk_statuses(self) -> None:
        """Queue the status each object should now say, worked out in a thread: the walk over every
        object took 12-22 ms of the event loop at 10,000 objects, on every change of the table.

        The loop only files the walk's results, as they would have been on the loop: a walk that a
        newer table overtook is dropped (the next one covers it), an object replaced or deleted
        meanwhile is left to the table its change brings, and one whose status or build result
        changed meanwhile is decided again, as it is now. After three overtaken walks (a table
        that keeps changing) the walk is done here, as `DeclarationStore.update_source` does."""
        overtaken = 0
        while self._walked != self._table_changes:
            changes = self._table_changes
            winners, losers = self._winners, self._losers  # replaced, never edited: the thread may read them
            objects = list(self.objects.values())
            if overtaken < 3:
                wanted = await asyncio.to_thread(statuses_to_write, objects, winners, losers)
                if self._table_changes != changes:
                    overtaken += 1
                    continue  # overtaken: these may be the old table's
            else:
                wanted = statuses_to_write(objects, winners, losers)
            overtaken = 0
            self._walked = changes
            for want in wanted:
                obj = want.obj
                if self.objects.get(obj.key) is not obj:
                    continue  # replaced or deleted meanwhile: the table it brings is walked again
                if obj.status is not want.status_seen or obj.result is not want.result_seen:
                    self._update_status(obj)  # its status or build result changed meanwhile
                    continue
                self._status_queue[obj.key] = (want.status, want.conditional)
                self._status_ready.set()

    def wants_build_result(self, declaration: Declaration) -> bool:
        obj = self.objects.get(declaration.key or "")
        if obj is None or obj.declaration is None or not obj.declaration.same_image(declaration):
            return False
        if obj.result is not None and obj.result["phase"] == "Ready":
            return False  # a failure is followed again: the next pull may succeed
        status = obj.status
        return not (
            status.get("phase") == "Ready"
            and status.get("observedGeneration") == obj.generation
            and status.get("image") == declaration.reference
        )

    def build_finished(self, declaration: Declaration, record: ImageRecord | None, error: str | None) -> None:
        obj = self.objects.get(declaration.key or "")
        if obj is None or obj.declaration is None or not obj.declaration.same_image(declaration):
            return  # changed or deleted meanwhile: this result is about something else
        if record is not None:
            digests = pull_digests(record.descriptors)
            obj.result = {
                "phase": "Ready",
                "digest": str(digests.default),  # what pods get: OCI for zstd images
                "ociDigest": str(digests.oci) if digests.oci else None,
                "indexDigest": next((str(d.digest) for d in record.indexes if d.media_type == OCI_INDEX), None),
                "error": None,
                "builtAt": datetime.fromtimestamp(record.built_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        else:
            obj.result = {"phase": "Failed", **_NO_DIGESTS, "error": error, "builtAt": None}
        self._update_status(obj)

    def _update_status(self, obj: WatchedObject) -> None:
        desired = desired_status(obj, obj.status, obj.result, self._winners, self._losers)
        if desired is None:
            return
        status, conditional = desired
        if _says(obj.status, status):
            return
        self._status_queue[obj.key] = (status, conditional)
        self._status_ready.set()

    async def write_statuses(self) -> None:
        """Patch queued statuses, one object at a time; failures are retried with back-off."""
        backoff = _Backoff(self.min_backoff, self.max_backoff)
        while True:
            await self._status_ready.wait()
            self._status_ready.clear()
            while self._status_queue:
                key = next(iter(self._status_queue))
                status, conditional = self._status_queue.pop(key)
                obj = self.objects.get(key)
                if obj is None or _says(obj.status, status):
                    continue  # gone, or already says so (an earlier patch or another replica's)
                try:
                    updated = await self.client.patch_status(
                        obj.name, obj.namespace, status,
                        resource_version=obj.resource_version if conditional else None,
                    )
                except asyncio.CancelledError:
                    raise
                except ApiError as exc:
                    if exc.status in (404, 409):
                        # Deleted, or changed since we looked: the watch brings the news and we decide again.
                        log.info("k8s.status_skipped", object=object_origin(key), status=exc.status)
                        continue
                    self._retry_status(key, status, conditional, exc, backoff)
                    await asyncio.sleep(backoff.next())
                    continue
                except Exception as exc:  # whatever it is, the writer goes on: a stopped one writes no status again
                    self._retry_status(key, status, conditional, exc, backoff)
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                current = self.objects.get(key)
                if current is not None and isinstance(updated, dict):
                    current.status = dict(updated.get("status") or status)
                    version = (updated.get("metadata") or {}).get("resourceVersion")
                    if version:
                        current.resource_version = str(version)
                log.info(
                    "k8s.status_patched", object=object_origin(key), phase=status.get("phase"),
                    digest=status.get("digest"), error=status.get("error"),
                )

    def _retry_status(
        self, key: str, status: dict[str, Any], conditional: bool, exc: Exception, backoff: _Backoff
    ) -> None:
        log.warning(
            "k8s.status_failed", object=object_origin(key), error=str(exc)[:500] or type(exc).__name__,
            error_type=type(exc).__name__,
        )
        self._status_queue.setdefault(key, (status, conditional))  # unless a newer one is already queued
        self._status_ready.set()


async def start_watch(
    settings: Any,
    store: DeclarationStore,
    *,
    config: KubeConfig | None = None,
    sync_timeout: float = 5.0,
    **options: Any,
) -> NixImageWatch:
    """Start watching NixImage objects; waits up to `sync_timeout` for the first list."""
    config = config or load_kube_config(getattr(settings, "kubeconfig", None))
    client = KubeClient(config)
    watch = NixImageWatch(client, store, **options)
    store.run_in_background(watch.run(), failure_event="k8s.watch_failed")
    store.run_in_background(watch.write_statuses(), failure_event="k8s.status_writer_failed")
    store.run_in_background(_close_on_cancel(client), failure_event="k8s.client_close_failed")
    log.info("k8s.watch_started", server=config.server, credentials=config.description)
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watch.synced.wait(), sync_timeout)
    if not watch.synced.is_set():
        log.warning("k8s.not_synced_yet", waited=round(time.monotonic() - started, 1))
    return watch


async def _close_on_cancel(client: KubeClient) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await client.close()
