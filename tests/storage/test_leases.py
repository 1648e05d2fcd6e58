"""Leases whose holder is known to be gone are taken over at once, not after
they run out (30 s): one its own process could not release (the store was away
when it ended), and one held by a process of this machine that was killed.

Real stores (SeaweedFS, fake-gcs-server), real processes killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from nixery.storage.lease import LeasedStorage, _holder_gone, process_start_time, this_process
from tests.storage.conftest import Backend, lease_holder

#: The registry's lease length: what a waiter used to sit out.
TTL = LeasedStorage.lease_ttl
#: Well under TTL.
AT_ONCE = 5.0


async def test_lease_of_a_killed_process_is_taken_over_at_once(cloud_backend: Backend, tmp_path: Path) -> None:
    key = f"builds/{uuid.uuid4().hex}"
    async with lease_holder(cloud_backend, key, TTL) as holder:
        cloud_backend.storage_path = tmp_path / "restarted"  # the next process, with staging of its own
        store = cloud_backend.open()
        entered = asyncio.Event()

        async def take() -> None:
            async with store.exclusive(key):
                entered.set()

        waiter = asyncio.create_task(take())
        await asyncio.sleep(2.0)
        assert not entered.is_set(), "a live holder on this machine keeps its lease"
        holder.kill()
        await holder.wait()
        killed = time.monotonic()
        await asyncio.wait_for(waiter, AT_ONCE)
        assert time.monotonic() - killed < AT_ONCE < TTL


async def test_own_lease_that_could_not_be_released(cloud_backend: Backend, tmp_path: Path) -> None:
    """Releasing fails (the store refuses deletes): the same process takes the
    lease again at once, and once deletes work again the lease goes by itself."""
    key = f"builds/{uuid.uuid4().hex}"
    async with cloud_backend.proxied(tmp_path) as proxy:
        store = cloud_backend.open(endpoint=proxy.url)
        proxy.fail_request = is_delete
        async with store.exclusive(key):
            pass
        assert proxy.failed_requests, "the release failed"
        assert cloud_backend.object_names(f"locks/{key}") == [f"locks/{key}"]

        # Only taking the lease is timed: its release meets the refused deletes again.
        started = time.monotonic()
        async with contextlib.AsyncExitStack() as held:
            async with asyncio.timeout(AT_ONCE):
                await held.enter_async_context(store.exclusive(key))
            assert time.monotonic() - started < AT_ONCE < TTL

        proxy.fail_request = None  # the store is back: the retried release removes the lease
        deadline = time.monotonic() + 15
        while cloud_backend.object_names(f"locks/{key}"):
            assert time.monotonic() < deadline, "the lease is still there 15 s after the store came back"
            await asyncio.sleep(0.5)


async def test_a_lease_being_released_is_not_taken_over(cloud_backend: Backend, tmp_path: Path) -> None:
    """A second driver of the same process (a replica, as the conformance suite runs them) waits
    for the holder's release to finish: a lease is "left behind" only once releasing it failed.
    Taking it over while the release ran let that release, on an emulator that ignores the
    delete's condition (fake-gcs-server here), delete the new holder's lease: two holders."""
    key = f"builds/{uuid.uuid4().hex}"
    first = cloud_backend.open()
    cloud_backend.storage_path = tmp_path / "replica-2"
    second = cloud_backend.open()
    delete = first._lease_delete
    released_at: list[float] = []

    async def slow_delete(name: str, version: str) -> None:
        await asyncio.sleep(1.0)
        await delete(name, version)
        released_at.append(time.monotonic())

    first._lease_delete = slow_delete  # type: ignore[method-assign]
    entered_at: list[float] = []

    async def take() -> None:
        async with second.exclusive(key):
            entered_at.append(time.monotonic())

    async with first.exclusive(key):
        waiter = asyncio.create_task(take())
        await asyncio.sleep(0.5)  # the waiter is polling
    await asyncio.wait_for(waiter, AT_ONCE)
    assert released_at and entered_at[0] > released_at[0], "the waiter entered while the lease was released"


def is_delete(head: bytes) -> bool:
    """A DELETE, or S3's DeleteObjects (`POST /bucket?delete`), which obstore uses for one key too."""
    request_line = head.split(b"\r\n", 1)[0]
    return request_line.startswith(b"DELETE ") or (request_line.startswith(b"POST ") and b"?delete " in request_line)


def test_which_holders_are_gone() -> None:
    """A pid means the same process only with the same start time; a zombie runs no more;
    a process of another boot or pid namespace is never judged from here."""
    me = this_process()
    assert me is not None
    assert _holder_gone(me, "an-owner-that-no-lease-of-this-process-has") is not None  # left over by this process

    child = subprocess.Popen(["sleep", "60"])
    try:
        started = process_start_time(child.pid)
        assert started is not None
        alive = replace(me, pid=child.pid, started=started)
        assert _holder_gone(alive, "other") is None
        recycled = replace(alive, started=started - 1)  # the pid of a process that ended, given to `sleep`
        assert _holder_gone(recycled, "other") is not None
        assert _holder_gone(replace(alive, boot="another-boot", started=started - 1), "other") is None
        assert _holder_gone(replace(alive, pid_namespace="pid:[1]", started=started - 1), "other") is None
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_start_time(child.pid) is not None:  # a zombie until reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _holder_gone(alive, "other") is not None
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"owner": "x"}', b'{"process": {"pid": "x"}}'])
def test_leases_without_a_readable_holder_only_expire(body: bytes) -> None:
    from nixery.storage.lease import _holder

    assert _holder_gone(*_holder(body)) is None


async def test_gc_removes_the_leases_that_dead_holders_left(
    cloud_backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry killed mid-build left the image's lease in the bucket (locks/builds/<key>)
    until that image was built again: one object per crash. `nixery gc` removes the leases of
    holders known to be gone (killed on this machine) and those nobody renewed for an hour
    (a holder on another machine), and keeps the lease of a live holder."""
    killed_key, live_key, foreign_key = (f"builds/{uuid.uuid4().hex}" for _ in range(3))
    async with lease_holder(cloud_backend, live_key, TTL), lease_holder(cloud_backend, killed_key, TTL) as killed:
        killed.kill()
        await killed.wait()
        cloud_backend.storage_path = tmp_path / "gc"
        store = cloud_backend.open()
        assert isinstance(store, LeasedStorage)
        foreign = b'{"owner": "elsewhere-1-abcd", "write": 1, "at": 0, "ttl": 30, "process": null}'
        assert await store._lease_create(f"locks/{foreign_key}", foreign) is not None

        assert await store.remove_abandoned_locks() >= 1
        names = set(cloud_backend.object_names("locks/builds/"))
        assert f"locks/{killed_key}" not in names, "the killed holder's lease is still there"
        assert {f"locks/{live_key}", f"locks/{foreign_key}"} <= names, "a lease that may be in use went"

        monkeypatch.setattr("nixery.storage.lease.ABANDONED_LEASE_AGE", -1.0)  # as if an hour had passed
        await store.remove_abandoned_locks()
        assert f"locks/{foreign_key}" not in cloud_backend.object_names("locks/builds/"), (
            "a lease nobody renewed for an hour is still there"
        )
