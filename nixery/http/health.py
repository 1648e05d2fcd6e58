"""Readiness: `GET /readyz` answers 200 while this process can reach its storage, 503 otherwise.

For a load balancer or the kubelet's readiness probe: a replica whose bucket is
unreachable (or whose credentials were revoked) is taken out of service until
it can serve again, while its liveness (`/v2/`, answered from memory) keeps it
from being restarted for what a restart would not fix.

Guarantees:

* cheap for the store: one read-only request (`Storage.check_access(write=False)`),
  and its answer is reused for FRESH_FOR seconds, however many probes ask;
  probes that arrive while a check is under way wait for that one;
* never slow: a check that has not answered within ANSWER_WITHIN seconds
  counts as "not ready" (it goes on, and its answer serves the next probes),
  and checks run in the event loop's usual way (no blocking call);
* open: it sits outside `/v2`, so it needs no credentials when access control
  is on, and says nothing a stranger could use: no bucket, endpoint or error
  text (those go to the log when readiness changes).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import web

from nixery.storage import Storage, StorageError

log = structlog.get_logger(__name__)

#: Seconds an answer from the store is reused.
FRESH_FOR = 5.0
#: Seconds a probe waits for a check under way before it answers "not ready".
ANSWER_WITHIN = 3.0


class StorageReadiness:
    """Whether the storage answered its last check, asked at most every FRESH_FOR seconds."""

    def __init__(self, storage: Storage, *, fresh_for: float = FRESH_FOR, answer_within: float = ANSWER_WITHIN):
        self._storage = storage
        self._fresh_for = fresh_for
        self._answer_within = answer_within
        self._ready: bool | None = None  # None: never checked
        self._checked_at = 0.0
        self._check: asyncio.Task[bool] | None = None

    async def ready(self) -> bool:
        if self._ready is not None and time.monotonic() - self._checked_at < self._fresh_for:
            return self._ready
        if self._check is None:
            self._check = asyncio.ensure_future(self._run_check())
        try:
            async with asyncio.timeout(self._answer_within):
                return await asyncio.shield(self._check)
        except TimeoutError:
            # Not fresh: the next probe waits for this check again (or the one after it).
            self._report(False, f"no answer within {self._answer_within:g}s")
            return False

    async def _run_check(self) -> bool:
        problem: str | None
        try:
            await self._storage.check_access(write=False)
        except Exception as error:  # noqa: BLE001 (whatever fails, this process cannot serve)
            ready, problem = False, str(error) if isinstance(error, StorageError) else repr(error)
        else:
            ready, problem = True, None
        finally:
            self._check = None
        self._report(ready, problem)
        self._checked_at = time.monotonic()
        return ready

    def _report(self, ready: bool, problem: str | None) -> None:
        """Log when readiness changes (the reason goes to the log, never to the prober)."""
        if ready != self._ready:
            if ready:
                log.info("readiness.ready", storage=self._storage.name)
            else:
                log.warning("readiness.storage_unavailable", storage=self._storage.name, problem=problem)
        self._ready = ready


READINESS = web.AppKey("readiness", StorageReadiness)
_SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)


def begin_shutdown(app: web.Application) -> None:
    """The registry is stopping: from now on not ready, so load balancers send it nothing new."""
    shutting_down = app.get(_SHUTTING_DOWN)
    if shutting_down is not None:  # an app without `/readyz` has no readiness to change
        shutting_down.set()


async def readiness(request: web.Request) -> web.Response:
    if request.app[_SHUTTING_DOWN].is_set():
        return web.json_response({"ready": False, "reason": "shutting down"}, status=503)
    checker = request.app.get(READINESS)
    if checker is not None and await checker.ready():
        return web.json_response({"ready": True})
    return web.json_response({"ready": False, "reason": "storage unavailable"}, status=503)


def add_routes(app: web.Application) -> None:
    """`/readyz`: "not ready" until the app's lifecycle has set READINESS, and once shutting down."""
    app[_SHUTTING_DOWN] = asyncio.Event()
    app.router.add_get("/readyz", readiness)
