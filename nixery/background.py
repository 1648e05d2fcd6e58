"""Work that runs on while nobody awaits it: kept alive, and its failure logged.

The event loop keeps only a weak reference to a task, so a task nobody holds
may vanish mid-way; and a failure nobody retrieves is reported late, as
"Task exception was never retrieved", far from its cause. `spawn` starts such
work and `detach` takes over a task already running (an upload left to finish
when its request gave up). Either keeps the task referenced until it ends (in
the owner's `keep` set, so the owner can wait for or cancel what it started,
else here) and logs a failure as one structured line: the `failure_event`,
`error`, and the caller's fields. A cancelled task is not a failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

_RUNNING: set[asyncio.Future[Any]] = set()  # tasks whose owner keeps no reference

ERROR_CHARS = 200  # of an error's text in the log line


def spawn(
    work: Awaitable[T],
    *,
    failure_event: str,
    keep: set[asyncio.Task[Any]] | None = None,
    describe_error: Callable[[Exception], str] | None = None,
    on_failure: Callable[[], None] | None = None,
    **fields: Any,
) -> asyncio.Task[T]:
    """Start `work` in the background; its failure is logged as `failure_event` with `fields`,
    then `on_failure` is called."""
    task = asyncio.ensure_future(work)
    detach(task, failure_event=failure_event, keep=keep, describe_error=describe_error, on_failure=on_failure,
           **fields)
    return task


def retrieve(task: asyncio.Future[Any]) -> None:
    """A done callback for a task whose failure is reported elsewhere: its exception is read, so
    that asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def detach(
    task: asyncio.Future[T],
    *,
    failure_event: str,
    keep: set[Any] | None = None,
    describe_error: Callable[[Exception], str] | None = None,
    on_failure: Callable[[], None] | None = None,
    **fields: Any,
) -> asyncio.Future[T]:
    """Let a running task finish on its own: referenced until done, its failure logged
    (with `describe_error`'s account of the error: a backend's says what matters in its errors)."""
    running = _RUNNING if keep is None else keep
    described = describe_error or describe
    running.add(task)

    def done(finished: asyncio.Future[T]) -> None:
        running.discard(finished)
        if finished.cancelled():
            return
        error = finished.exception()
        if error is not None:
            text = described(error) if isinstance(error, Exception) else describe(error)
            log.warning(failure_event, error=text, **fields)
            if on_failure is not None:
                on_failure()

    task.add_done_callback(done)
    return task


def describe(error: BaseException) -> str:
    """An error for a log line: its text, or its type when it has none, cut short."""
    return (str(error) or type(error).__name__)[:ERROR_CHARS]
