"""A semaphore that serves its waiters round-robin by key.

`asyncio.Semaphore` serves waiters first come, first served: one client that
sends a hundred password checks at once (a guessing attack), or starts twenty
builds, makes every other client's wait for all of them. `FairSlots` keeps one
queue per key (a client's address) and hands a freed slot to the next key in
turn, so that a client waits for at most one check (or build) of each other
waiting client, however many each has queued. Nothing is refused: a busy client
only waits longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

#: Whom the work under way is for (a client's address; "" for the registry's own, such as a
#: declaration's prebuild). The HTTP layer sets it for each request; a task started for the
#: request (a build) keeps it, as tasks keep the context they were created in.
requester: contextvars.ContextVar[str] = contextvars.ContextVar("requester", default="")


class FairSlots:
    def __init__(self, parallel: int):
        self._free = parallel
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """At most `parallel` callers at once inside; the others wait, round-robin by `key`."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            turn = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(key, deque()).append(turn)
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # given the slot as it was cancelled: pass it on
                    self._release()
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            key, queue = next(iter(self._waiting.items()))
            turn = queue.popleft()
            if queue:
                self._waiting.move_to_end(key)  # this key's next waiter comes after the other keys'
            else:
                del self._waiting[key]
            if not turn.done():  # a cancelled waiter has left
                turn.set_result(None)
                return
        self._free += 1
