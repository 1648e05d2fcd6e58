"""How late the event loop runs what is due: work done on the loop that should not be
(parsing, hashing, walking a big list) delays every client for as long as it runs.

A task asks to be woken every CHECK_EVERY seconds; how much later than asked it wakes
is the loop's lag. Every lag measured goes into `nixery_event_loop_lag_seconds`
(/metrics), so an operator sees stalls, and one of STALL_SECONDS or more is logged as
`loop.stalled` (a warning: at most one line every LOG_EVERY seconds, saying how many
stalls there were since the last line and how long the longest was). Nothing else
knew: a stall showed only as other requests being slow.
"""

from __future__ import annotations

import asyncio

import structlog

from nixery import metrics

log = structlog.get_logger(__name__)

CHECK_EVERY = 0.1
#: A lag worth a log line: twice the 50 ms the registry's answers to cheap requests aim for.
STALL_SECONDS = 0.1
LOG_EVERY = 10.0


async def watch(*, every: float = CHECK_EVERY) -> None:
    """Measure the loop's lag until cancelled."""
    loop = asyncio.get_running_loop()
    stalls, longest, last_logged = 0, 0.0, -LOG_EVERY
    while True:
        due = loop.time() + every
        await asyncio.sleep(every)
        now = loop.time()
        lag = max(0.0, now - due)
        metrics.loop_lag(lag)
        if lag >= STALL_SECONDS:
            stalls, longest = stalls + 1, max(longest, lag)
        if stalls and now - last_logged >= LOG_EVERY:
            log.warning("loop.stalled", stalls=stalls, longest_ms=round(longest * 1000))
            stalls, longest, last_logged = 0, 0.0, now
