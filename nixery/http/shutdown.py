"""What a registry that is shutting down (SIGTERM, SIGINT) does with its builds.

Requests under way may finish within NIXERY_SHUTDOWN_GRACE (`nixery.http.server`); then
they are cut off (their connections aborted), so the grace bounds the shutdown. A build
is not a request, so it is stopped in two steps:

* At once, the builds no request waits for (a build form's, a declaration's prebuild):
  their progress says `stopped: the registry is shutting down`, and a build's event
  stream ends with that event rather than breaking off.
* The builds a pull waits for go on, so that a pull of an image nearly built is answered
  in full. Shortly before the grace ends (`stop_margin`), they are stopped too: their
  progress says so, and each pull waiting is answered `503 BUILD_STOPPED` (another
  replica, or this one once it is back, builds the image) instead of a connection closed
  with no answer. No build starts from then on.

Event streams of builds end with their build; the rest (another worker's build, read
from the shared directory) end once the builds are stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from nixery.http.routes import BUILDER
from nixery.http.web.builds import STREAMS_STOPPING

log = structlog.get_logger(__name__)

_GRACE = web.AppKey("shutdown_grace", float)
_STOPPING = web.AppKey("stopping_builds", list[asyncio.Task[None]])


def stop_margin(grace: float) -> float:
    """How long before the grace ends the builds pulls wait for are stopped: time to answer
    those pulls and end the event streams, before the server cuts them off."""
    return min(2.0, grace / 2)


def install(app: web.Application, grace: float) -> None:
    """Stop the builds as the module says when `app` shuts down; after the app's lifecycle is
    installed (its clean-up, which closes the builder, must run after this one's)."""
    app[_GRACE] = grace
    app[_STOPPING] = []
    app.on_shutdown.append(_begin)
    app.cleanup_ctx.append(_ended_before_cleanup)


async def _begin(app: web.Application) -> None:
    # In the background: the server drains the requests meanwhile.
    app[_STOPPING].append(asyncio.ensure_future(_stop_builds(app)))


async def _stop_builds(app: web.Application) -> None:
    builder = app[BUILDER]
    grace = app[_GRACE]
    # Side by side: the unwaited builds' clean-up (Nix given seconds to end) must not delay the rest.
    unwaited = asyncio.ensure_future(builder.stop_unwaited_builds())
    app[_STOPPING].append(unwaited)  # cancelled at clean-up, as this is
    try:
        await asyncio.sleep(max(0.0, grace - stop_margin(grace)))
        log.info("registry.stopping_builds", note="the shutdown grace is nearly over")
        builder.stop_builds()  # their events said, their pulls answered; their Nix processes end meanwhile
    finally:
        app[STREAMS_STOPPING].set()
    await unwaited


async def _ended_before_cleanup(app: web.Application) -> AsyncIterator[None]:
    yield
    # Every request is answered or cut off: what is left is stopped by closing the builder.
    for task in app[_STOPPING]:
        task.cancel()
    await asyncio.gather(*app[_STOPPING], return_exceptions=True)
