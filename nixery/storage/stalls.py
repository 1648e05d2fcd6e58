"""How long a call to an object store may take: bounded when nothing moves,
never cut off while it moves.

Small requests (a HEAD, a metadata document, a lease, a listing page) get short
connect and read timeouts from the drivers, so a stalled store (a process
stopped, a network that drops packets) turns into `BackendUnavailable` within
seconds. A download is bounded the same way per read, so a big blob relayed to
a slow client is never cut off while bytes keep coming.

Uploads cannot be bounded like that: the HTTP clients time a request body as a
whole, not per write, so a timeout short enough to catch a stall would cut off
a multi-megabyte part on a slow link. An upload therefore gets a generous bound
per request (per part), and `unless_store_stalls` watches it: every few
seconds while it runs, the store is asked something small; when that goes
unanswered, the caller gets the probe's `BackendUnavailable` at once. The
upload is left to finish or fail by itself (a failed multipart upload is then
aborted by the client), so a stall never leaves a partial object.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: Seconds between probes of the store while an upload runs.
PROBE_EVERY = 3.0


async def unless_store_stalls(
    upload: asyncio.Future[T], probe: Callable[[], Awaitable[object]], *, every: float = PROBE_EVERY
) -> T:
    """The upload's result, or what `probe` raises when the store stops answering.

    Neither a failing probe nor cancelling the caller stops the upload: the caller
    decides what happens to it (e.g. logs its outcome once it ends).
    """
    while True:
        done, _ = await asyncio.wait([upload], timeout=every)
        if done:
            return upload.result()
        await probe()
