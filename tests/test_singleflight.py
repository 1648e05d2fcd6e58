"""SingleFlight's stopping, which a registry's shutdown relies on (nixery.http.shutdown)."""

from __future__ import annotations

import asyncio

import pytest

from nixery.singleflight import SingleFlight, WorkStopped


async def _endless(stopped: list[str], name: str) -> str:
    try:
        await asyncio.Event().wait()
    finally:
        stopped.append(name)
    return name


async def test_stopping_unwaited_work_stops_what_it_waited_for_and_spares_what_a_caller_waits_for() -> None:
    """A build no request waits for (a build form's; a declaration's prebuild, whose waits are
    not counted) is stopped at once when the registry begins to shut down, and so are the builds
    it alone waited for (an image index's platforms); a build a pull waits for goes on. New
    unwaited work is refused from then on; new work a caller waits for is not."""
    flight: SingleFlight[str] = SingleFlight()
    stopped: list[str] = []

    async def index() -> str:
        return await flight.run("platform", lambda: _endless(stopped, "platform"))

    flight.begin("index", index)
    flight.begin("form", lambda: _endless(stopped, "form"))
    prebuild = asyncio.ensure_future(flight.run("prebuild", lambda: _endless(stopped, "prebuild"), counted=False))
    pulled = asyncio.ensure_future(flight.run("pulled", lambda: _endless(stopped, "pulled")))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(flight.stop_unwaited(), 5)
    assert sorted(stopped) == ["form", "platform", "prebuild"] and not pulled.done()
    with pytest.raises(WorkStopped):
        await prebuild
    with pytest.raises(WorkStopped):
        flight.begin("another form", lambda: _endless(stopped, "another form"))
    with pytest.raises(WorkStopped):
        await flight.run("another prebuild", lambda: _endless(stopped, "another prebuild"), counted=False)
    late_pull = asyncio.ensure_future(flight.run("late pull", lambda: _endless(stopped, "late pull")))
    await asyncio.sleep(0.01)
    assert flight.in_flight("late pull")
    flight.stop()
    for waiting in (pulled, late_pull):
        with pytest.raises(WorkStopped):
            await asyncio.wait_for(waiting, 5)
    with pytest.raises(WorkStopped):  # once stopped, nothing new starts
        await flight.run("latest pull", lambda: _endless(stopped, "latest pull"))
    await asyncio.wait_for(flight.cancel_all(), 5)
    assert sorted(stopped) == ["form", "late pull", "platform", "prebuild", "pulled"]


async def test_stopping_releases_the_callers_at_once_with_work_stopped() -> None:
    """`stop` answers the callers waiting (a pull: 503 BUILD_STOPPED) before the work's own
    clean-up (a Nix process given time to end) is over; a caller that joins the work while it
    cleans up gets WorkStopped too, not a cancellation it did not ask for; a caller that was
    itself cancelled (a client that hung up) still gets CancelledError."""
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
    flight.stop()
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert [type(result) for result in results] == [WorkStopped, WorkStopped]
    assert hung_up.cancelled()
    await asyncio.wait_for(cleaning.wait(), 5)
    closing = asyncio.ensure_future(flight.cancel_all())
    await asyncio.sleep(0.01)
    assert not closing.done()  # returns once the work has ended
    release.set()
    await asyncio.wait_for(closing, 5)


async def test_a_caller_joining_work_that_stop_unwaited_is_cleaning_up_gets_work_stopped() -> None:
    """A pull that was still looking its image up when the shutdown began, then joins the build
    a build form had started, which `stop_unwaited` is stopping: WorkStopped (503), not the
    CancelledError of the build, which made aiohttp drop the connection without an answer."""
    flight: SingleFlight[str] = SingleFlight()
    release = asyncio.Event()

    async def slow_to_stop() -> str:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()
        return "built"

    flight.begin("image", slow_to_stop)
    await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(flight.stop_unwaited())
    await asyncio.sleep(0.01)
    joined = asyncio.ensure_future(flight.run("image", slow_to_stop))
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(WorkStopped):
        await asyncio.wait_for(joined, 5)
    await asyncio.wait_for(stopping, 5)


async def test_work_asked_for_as_the_last_run_ends_runs_again() -> None:
    """A task that has ended is forgotten one loop turn later (its done callback). A caller that
    came in that turn joined the ended task: the builder then handed it a build that never ran,
    whose progress page stayed at "queued". It now starts the work anew (which, for an image,
    finds it built)."""
    loop = asyncio.get_running_loop()
    flights: SingleFlight[str] = SingleFlight()
    release = loop.create_future()
    runs: list[str] = []

    async def work(name: str) -> str:
        if name == "first":
            await release
        runs.append(name)
        return name

    first = asyncio.ensure_future(flights.run("image", lambda: work("first")))
    await asyncio.sleep(0)
    release.set_result(None)  # the first run ends in the next turn; its done callback comes after
    loop.call_soon(flights.begin, "image", lambda: work("second"))
    assert await first == "first"
    for _ in range(3):
        await asyncio.sleep(0)
    assert runs == ["first", "second"]
