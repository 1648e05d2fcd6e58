"""SingleFlight's stopping, which a registry's shutdown relies on (nixery.http.shutdown)."""

from __future__ import annotations

import asyncio

import pytest

from nixery.singleflight import SingleFlight, WorkStopped


async def test_stopping_unwaited_work_stops_what_it_waited_for_and_spares_what_a_caller_waits_for() -> None:
    """A build no request waits for (a build form's) is stopped at once when the registry begins
    to shut down, and so are the builds it alone waited for (an image index's platforms); a
    build a pull waits for goes on."""
    flight: SingleFlight[str] = SingleFlight()
    stopped: list[str] = []

    async def endless(name: str) -> str:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(name)
        return name

    async def index() -> str:
        return await flight.run("platform", lambda: endless("platform"))

    flight.begin("index", index)
    flight.begin("form", lambda: endless("form"))
    pulled = asyncio.ensure_future(flight.run("pulled", lambda: endless("pulled")))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(flight.stop_unwaited(), 5)
    assert sorted(stopped) == ["form", "platform"] and not pulled.done()
    await flight.cancel_all()
    assert sorted(stopped) == ["form", "platform", "pulled"]
    with pytest.raises(asyncio.CancelledError):  # stopped by cancel_all, not stop: as before
        await pulled


async def test_stopping_releases_the_callers_at_once_with_work_stopped() -> None:
    """`stop` answers the callers waiting (a pull: 503 BUILD_STOPPED) before the work's own
    clean-up (a Nix process given time to end) is over; a caller that was itself cancelled (a
    client that hung up) still gets CancelledError."""
    flight: SingleFlight[str] = SingleFlight()
    cleaning = asyncio.Event()
    release = asyncio.Event()

    async def slow_to_stop() -> str:
        try:
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            await release.wait()  # as a Nix process given seconds to end
        return "built"

    waiting = [asyncio.ensure_future(flight.run("image", slow_to_stop)) for _ in range(2)]
    hung_up = asyncio.ensure_future(flight.run("image", slow_to_stop))
    await asyncio.sleep(0.01)
    hung_up.cancel()
    await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(flight.stop())
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert [type(result) for result in results] == [WorkStopped, WorkStopped]
    assert hung_up.cancelled()
    await asyncio.wait_for(cleaning.wait(), 5)
    assert not stopping.done()  # returns once the work has ended
    release.set()
    await asyncio.wait_for(stopping, 5)
