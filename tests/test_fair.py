"""nixery.fair: round-robin by key, and no slot lost to a waiter that gives up."""

from __future__ import annotations

import asyncio

from nixery.fair import FairSlots


async def _enter(slots: FairSlots, key: str, order: list[str], release: asyncio.Event) -> None:
    async with slots.hold(key):
        order.append(key)
        await release.wait()


async def test_waiters_are_served_in_turn_by_key() -> None:
    slots, order, release = FairSlots(1), [], asyncio.Event()
    release.set()
    holder = asyncio.Event()
    first = asyncio.create_task(_enter(slots, "x", [], holder))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(_enter(slots, key, order, release)) for key in ("flood",) * 5 + ("other",)]
    await asyncio.sleep(0)
    holder.set()
    await asyncio.gather(first, *tasks)
    assert order == ["flood", "other", "flood", "flood", "flood", "flood"]


async def test_a_cancelled_waiter_gives_its_slot_on() -> None:
    slots, order, release = FairSlots(1), [], asyncio.Event()
    release.set()
    async with slots.hold("a"):
        waiting = asyncio.create_task(_enter(slots, "b", order, release))
        granted_then_cancelled = asyncio.create_task(_enter(slots, "c", order, release))
        last = asyncio.create_task(_enter(slots, "d", order, release))
        await asyncio.sleep(0)
        waiting.cancel()  # leaves while waiting
        await asyncio.sleep(0)
    # Leaving handed the slot to "c", which is cancelled before it runs: "d" must get the slot.
    granted_then_cancelled.cancel()
    async with asyncio.timeout(5):
        await last
        assert order == ["d"]
        async with slots.hold("e"):  # and the slot is free again
            pass
