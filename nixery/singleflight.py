"""Run a piece of work once per key, however many callers ask for it at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class WorkStopped(Exception):
    """The work a caller waited for was stopped (`SingleFlight.stop`), not the caller cancelled."""


class SingleFlight(Generic[T]):
    """Callers asking for a key that is in flight wait for the same task.

    A caller that is cancelled (a client that hung up) stops waiting, but the
    task goes on for the others; the result is not cached once it is done.
    Work that is stopped (`stop_unwaited`, `stop`) ends its callers' waits at
    once with WorkStopped, whatever its own clean-up still takes.
    """

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task[T]] = {}
        #: Per key, the callers' waits (each a shield of the task, cancelled to release its caller).
        self._waits: dict[Hashable, set[asyncio.Future[T]]] = {}
        self._stopping = False

    def begin(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> None:
        """Start the work for `key` unless it is in flight, without waiting for it."""
        if key not in self._tasks:
            task = asyncio.ensure_future(work())
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        self.begin(key, work)
        wait = asyncio.shield(self._tasks[key])
        waits = self._waits.setdefault(key, set())
        waits.add(wait)
        try:
            return await wait
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._stopping and current is not None and current.cancelling() == 0:  # the work, not the caller
                raise WorkStopped() from None
            raise
        finally:
            waits.discard(wait)
            if not waits and self._waits.get(key) is waits:
                del self._waits[key]

    async def stop_unwaited(self) -> None:
        """Stop the work no caller waits for (started by `begin` alone), and return once it has ended;
        then the work only stopped work waited for (an image index's platforms), and so on."""
        while unwaited := [task for key, task in self._tasks.items() if not self._waits.get(key) and not task.done()]:
            await self._cancel(unwaited)

    async def stop(self) -> None:
        """Stop all the work in flight: its callers get WorkStopped at once; return once the work
        has ended (its clean-up done)."""
        self._stopping = True
        for waits in list(self._waits.values()):
            for wait in list(waits):
                wait.cancel()
        await self.cancel_all()

    async def cancel_all(self) -> None:
        """Cancel the work in flight, and return once it has ended (its clean-up done)."""
        while self._tasks:  # work that was starting as the rest was cancelled: cancelled too
            await self._cancel(list(self._tasks.values()))

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[T]]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _finished(self, key: Hashable, task: asyncio.Task[T]) -> None:
        self._tasks.pop(key, None)
        _retrieve(task)


class FreshRun(Generic[T]):
    """Callers share one run of `work`, but only a run that began after they asked.

    For reading state that changes (a directory tree): a caller cannot reuse a
    run already under way when it arrived, since that run may predate a change
    the caller must see. It waits for that run to end and shares the next one
    with everyone else who arrived in the meantime. However many callers ask,
    at most one run is under way and one waits to begin.
    """

    def __init__(self, work: Callable[[], Awaitable[T]]) -> None:
        self._work = work
        self._current: asyncio.Task[T] | None = None  # under way
        self._next: asyncio.Task[T] | None = None  # not begun: joinable

    async def run(self) -> T:
        if self._next is None:
            self._next = asyncio.ensure_future(self._begin_after(self._current))
            self._next.add_done_callback(_retrieve)
        return await asyncio.shield(self._next)

    async def _begin_after(self, previous: asyncio.Task[T] | None) -> T:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        # From here on, a new caller may see a change this run misses: it needs the next run.
        self._next, self._current = None, asyncio.current_task()
        return await self._work()


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved here so an unawaited failure is not logged as lost
