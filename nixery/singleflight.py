"""Run a piece of work once per key, however many callers ask for it at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from nixery.background import retrieve

T = TypeVar("T")


class WorkStopped(Exception):
    """The work a caller waited for was stopped (`SingleFlight.stop`, `stop_unwaited`,
    `cancel_all`), not the caller cancelled; or, once stopping began, new work was refused."""


class SingleFlight(Generic[T]):
    """Callers asking for a key that is in flight wait for the same task.

    A caller that is cancelled (a client that hung up) stops waiting, but the
    task goes on for the others; the result is not cached once it is done.

    Stopping, for a registry's shutdown, comes in two steps. `stop_unwaited`
    stops the work no caller counts on (started by `begin`, or waited for with
    `run(counted=False)`), and from then on such work is refused. `stop` stops
    the rest, refuses all new work, and releases every caller at once, while the
    work's own clean-up may go on. A caller whose work was stopped gets
    WorkStopped, never a cancellation it did not ask for.
    """

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Task[T]] = {}
        #: Per key, the counted callers' waits (each a shield of the task, cancelled to release its caller).
        self._waits: dict[Hashable, set[asyncio.Future[T]]] = {}
        self._refusing_unwaited = False  # stop_unwaited was called
        self._refusing = False  # stop was called

    def begin(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> None:
        """Start the work for `key` unless it is in flight, without waiting for it (unwaited work)."""
        self._start(key, work, refused=self._refusing_unwaited)

    def _start(self, key: Hashable, work: Callable[[], Awaitable[T]], *, refused: bool) -> asyncio.Task[T]:
        task = self._tasks.get(key)
        # A task done but not yet forgotten (its done callback runs a loop turn later) is not
        # joined: a caller that came in between waited for nothing and was handed a build that
        # never ran (a progress page at "queued" for ever). Once stopping, its result will do.
        if task is None or (task.done() and not refused):
            if refused:
                raise WorkStopped("stopping: no new work is started")
            task = asyncio.ensure_future(work())
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return task

    def in_flight(self, key: Hashable) -> bool:
        return key in self._tasks

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]], *, counted: bool = True) -> T:
        """The work's result, started unless in flight. `counted`: the caller counts on it (a client
        waits), so `stop_unwaited` spares it."""
        task = self._start(key, work, refused=self._refusing or (self._refusing_unwaited and not counted))
        wait = asyncio.shield(task)
        waits = self._waits.setdefault(key, set()) if counted else set()
        waits.add(wait)
        try:
            return await wait
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling() == 0:  # the work was stopped, not the caller
                raise WorkStopped() from None
            raise
        finally:
            waits.discard(wait)
            if not waits and self._waits.get(key) is waits:
                del self._waits[key]

    async def stop_unwaited(self) -> None:
        """Stop the work no counted caller waits for, refuse such work from now on, and return once
        it has ended; then the work only stopped work waited for (an image index's platforms), and so on."""
        self._refusing_unwaited = True
        while unwaited := [task for key, task in self._tasks.items() if not self._waits.get(key) and not task.done()]:
            await self._cancel(unwaited)

    def stop(self) -> None:
        """Stop all the work in flight and refuse new work: every caller gets WorkStopped at once;
        the work's clean-up goes on (`cancel_all` waits for it)."""
        self._refusing_unwaited = self._refusing = True
        for waits in list(self._waits.values()):
            for wait in list(waits):
                wait.cancel()
        for task in self._tasks.values():
            _cancel_once(task)

    async def cancel_all(self) -> None:
        """Cancel the work in flight, and return once it has ended (its clean-up done)."""
        while self._tasks:  # work that was starting as the rest was cancelled: cancelled too
            await self._cancel(list(self._tasks.values()))

    @staticmethod
    async def _cancel(tasks: list[asyncio.Task[T]]) -> None:
        for task in tasks:
            _cancel_once(task)
        if tasks:
            await asyncio.wait(tasks)

    def _finished(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        retrieve(task)


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
            self._next.add_done_callback(retrieve)
        return await asyncio.shield(self._next)

    async def _begin_after(self, previous: asyncio.Task[T] | None) -> T:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        # From here on, a new caller may see a change this run misses: it needs the next run.
        self._next, self._current = None, asyncio.current_task()
        return await self._work()


def _cancel_once(task: asyncio.Task[T]) -> None:
    # A second cancellation would cut short the clean-up the first began (a Nix process
    # given seconds to end after SIGTERM).
    if not task.cancelling():
        task.cancel()
