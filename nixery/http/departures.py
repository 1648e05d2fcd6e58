"""Requests whose client may leave during a long wait: a pull waiting for its image's build.

aiohttp does not cancel a handler when its client hangs up, so a pull given up mid-build
went on waiting until the build ended: it was logged then, with the build's time, and it
still counted as a client waiting, so a shutdown waited for a build nobody wanted any more.
`unless_client_leaves` looks at the connection while it waits and stops waiting once the
client is gone (499). The work itself is not stopped by that: a build goes on for the next
pull (`nixery.singleflight`), unless no other client waits for it and the registry stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from nixery.background import retrieve
from nixery.errors import ClientClosedRequest
from nixery.metrics import client_left

T = TypeVar("T")

#: Seconds between looks at a waiting client's connection (a look is an attribute read).
LOOK_EVERY = 0.5


async def unless_client_leaves(request: web.Request, work: Awaitable[T], doing: str) -> T:
    """`work`'s result; ClientClosedRequest once the client of `request` has hung up before it
    is done (the wait for it is cancelled). `doing` says what the client waited for."""
    task = asyncio.ensure_future(work)
    # Read once it ends, however the wait ends: when the client leaves (or the handler is cancelled)
    # as it fails, nobody is left to hear its failure, which the build logs on its own.
    task.add_done_callback(retrieve)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=LOOK_EVERY)
            if done:
                return task.result()
            if client_left(request):
                raise ClientClosedRequest(f"the client hung up while {doing}")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its clean-up ends before the request's does
