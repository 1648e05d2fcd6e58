"""The small shared helpers: background tasks (nixery.background) and the LRU mapping (nixery.lru)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
import structlog

from nixery.background import detach, spawn
from nixery.lru import LRU


async def test_a_spawned_task_is_kept_alive_while_nobody_else_holds_it() -> None:
    async def wait_for_nothing() -> None:
        await asyncio.get_running_loop().create_future()  # a future only this task knows

    task = weakref.ref(spawn(wait_for_nothing(), failure_event="test.failed"))
    await asyncio.sleep(0)  # it starts, and waits
    gc.collect()  # the loop holds waiting tasks weakly: without the helper's reference it goes here
    alive = task()
    assert alive is not None and not alive.done()
    alive.cancel()


async def test_a_failure_is_logged_once_with_the_callers_fields_and_a_cancellation_is_not() -> None:
    keep: set[asyncio.Task[Any]] = set()

    async def fail() -> None:
        raise OSError("disk on fire")

    async def wait_forever() -> None:
        await asyncio.Event().wait()

    with structlog.testing.capture_logs() as logs:
        failing = spawn(fail(), failure_event="test.failed", keep=keep, key="k1")
        waiting = spawn(wait_forever(), failure_event="test.cancelled", keep=keep)
        assert keep == {failing, waiting}
        waiting.cancel()
        await asyncio.gather(failing, waiting, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run after the awaiters wake
    assert keep == set()
    assert [(e["event"], e["error"], e["key"]) for e in logs] == [("test.failed", "disk on fire", "k1")]


async def test_a_detached_task_is_described_by_the_callers_function() -> None:
    async def fail() -> None:
        raise ValueError("x" * 1000)

    task = asyncio.ensure_future(fail())
    with structlog.testing.capture_logs() as logs:
        detach(task, failure_event="test.upload_failed", describe_error=lambda e: f"{type(e).__name__}!")
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    assert [(e["event"], e["error"]) for e in logs] == [("test.upload_failed", "ValueError!")]


def test_lru_drops_the_least_recently_used_and_hands_it_back() -> None:
    cache: LRU[str, int] = LRU(2)
    assert cache.put("a", 1) == [] and cache.put("b", 2) == []
    assert cache.get("a") == 1  # "a" is now the most recent
    assert cache.peek("b") == 2  # reading without using: "b" stays the oldest
    assert cache.put("c", 3) == [("b", 2)]
    assert list(cache) == ["a", "c"] and "b" not in cache and len(cache) == 2
    assert cache.put("a", 10) == [] and cache.values() == [3, 10]
    assert cache.pop("c") == 3 and cache.pop("c") is None
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        LRU(0)
