"""The access log: one `http.request` line per answered request.

Most requests are logged by `access_log`, the application's outermost middleware.
A few are answered before any middleware runs (aiohttp's 417 to an `Expect`
header other than `100-continue`); the server logs those with `log_request`,
so that no answer is missing from the log.
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from nixery import fair
from nixery.http.errors import Handler
from nixery.metrics import answered_status

log = structlog.get_logger(__name__)


def log_request(request: web.BaseRequest, status: int, started: float) -> None:
    """Log one answered request; `started` is a `time.monotonic()` reading."""
    log.info(
        "http.request",
        client=request.remote,
        method=request.method,
        path=request.path[:300],
        status=status,
        ms=round((time.monotonic() - started) * 1000, 1),
    )


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    fair.requester.set(request.remote or "")  # the builds it starts wait for a slot in turn with others'
    response = await handler(request)
    log_request(request, answered_status(request, response), started)
    return response
