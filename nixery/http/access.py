"""The access log: one `http.request` line per answered request.

Most requests are logged by `access_log`, the application's outermost middleware;
a file's (a blob's) once it is sent, so that its time and status are the client's.
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
    log_request(request, await _sent(request, response), started)
    return response


async def _sent(request: web.Request, response: web.StreamResponse) -> int:
    """The response's status, a file's once it is sent (as aiohttp would once the middlewares
    return): 499 when the client was gone before it or left during it. A file's bytes (every
    blob) went out after the line was written: every download was logged as a 200 of a tenth of
    a millisecond, one cut off after 400 KB of 8 MB and one that took 4 s alike. Other answers
    are small: logged before they are sent, as before, so the line is there when a client has
    its answer."""
    status = answered_status(request, response)
    file = isinstance(response, web.FileResponse) or getattr(response, "sent_on_prepare", False)
    if not file or response.prepared or status == 499:
        return status
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:  # aiohttp ends the connection quietly, as it does when it sends
        return 499
    return status
