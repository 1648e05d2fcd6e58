"""A pull's wait for its build (`nixery.http.departures.unless_client_leaves`), without a server."""

from __future__ import annotations

import asyncio
import gc
from unittest import mock

import pytest

from nixery.http import departures


async def test_work_that_fails_as_its_wait_is_cancelled_is_not_reported_as_lost() -> None:
    """The handler cancelled in the loop turn its work failed (a registry stopping as the build
    it stops raises): the work's failure was left unread, and asyncio logged "Task exception was
    never retrieved" with its traceback, in plain text, among the JSON log lines."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(str(context.get("message"))))
    waiting: asyncio.Task[None] | None = None

    async def work() -> None:
        await asyncio.sleep(0.01)
        assert waiting is not None
        loop.call_soon(waiting.cancel)
        raise RuntimeError("the build was stopped")

    with mock.patch.object(departures, "client_left", lambda request: False):
        waiting = asyncio.ensure_future(departures.unless_client_leaves(mock.Mock(), work(), "testing"))
        with pytest.raises((asyncio.CancelledError, RuntimeError)):
            await waiting
    waiting = None
    gc.collect()
    await asyncio.sleep(0)
    assert reported == []
