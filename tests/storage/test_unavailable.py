"""Cloud drivers when the store is unreachable or failing, and after it is back.

A TCP proxy stands between driver and server (tests/storage/proxy.py), so the
store can go away and come back on the same address while the driver lives on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from nixery.registry.digest import Digest
from nixery.storage import BackendUnavailable, Storage, StorageInaccessible
from tests.storage.conftest import Backend
from tests.storage.test_conformance import MB, blob_key, stage

#: How long a user may wait for the 503 when the bucket is unreachable.
QUICKLY = 12.0


async def unavailable(call, backend: Backend) -> BackendUnavailable:
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as raised:
        await call
    elapsed = time.monotonic() - started
    assert elapsed < QUICKLY, f"took {elapsed:.1f}s to give up"
    assert raised.value.backend == backend.name
    assert backend.name in str(raised.value)
    return raised.value


async def test_unreachable_store_then_recovers(cloud_backend: Backend, tmp_path: Path) -> None:
    async with cloud_backend.proxied(tmp_path) as proxy:
        store: Storage = cloud_backend.open(endpoint=proxy.url)
        key = f"manifests/{uuid.uuid4().hex}"
        await store.put_meta(key, b"before the outage")
        digest = await store.put_blob_bytes(b"layer " + uuid.uuid4().bytes)

        await proxy.stop()
        await unavailable(store.stat_blob(digest), cloud_backend)
        await unavailable(store.put_meta(key, b"during the outage"), cloud_backend)

        await proxy.start()  # same port: the store is back
        assert await store.get_meta(key) == b"before the outage"
        assert await store.stat_blob(digest) is not None
        await store.put_meta(key, b"after the outage")
        assert await store.get_meta(key) == b"after the outage"


async def test_server_errors_are_unavailable(cloud_backend: Backend, tmp_path: Path) -> None:
    async with cloud_backend.proxied(tmp_path) as proxy:
        store = cloud_backend.open(endpoint=proxy.url)
        key = f"manifests/{uuid.uuid4().hex}"
        await store.put_meta(key, b"stored")
        proxy.mode = "503"
        await proxy.stop()  # drop pooled connections so new ones get the 503s
        await proxy.start()
        await unavailable(store.get_meta(key), cloud_backend)
        proxy.mode = "forward"
        assert await store.get_meta(key) == b"stored"


async def test_cancelled_put_ends_complete_or_absent(cloud_backend: Backend, tmp_path: Path) -> None:
    """A put_blob cancelled mid-upload (e.g. its request went away) must not
    leave a partial blob: the upload either completes or leaves nothing."""
    async with cloud_backend.proxied(tmp_path, rate=16 * MB) as proxy:
        store = cloud_backend.open(endpoint=proxy.url)
        data = os.urandom(24 * MB)
        digest = Digest.of(data)
        task = asyncio.create_task(store.put_blob(digest, stage(store, data)))
        await proxy.wait_upstream_bytes(4 * MB, timeout=20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 20
        while (size := await store.stat_blob(digest)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        # Both drivers let the upload finish in the background.
        assert size == len(data)
        assert hashlib.sha256(await store.read_blob(digest)).hexdigest() == digest.hex
        if cloud_backend.name == "s3":
            assert cloud_backend.pending_multipart_uploads(blob_key(digest)) == []


async def test_stalled_store_answers_quickly_then_recovers(cloud_backend: Backend, tmp_path: Path) -> None:
    """A store that accepts connections but answers nothing (its process stopped):
    every kind of call gives up within seconds, not after a minute."""
    async with cloud_backend.proxied(tmp_path) as proxy:
        store = cloud_backend.open(endpoint=proxy.url)
        key = f"manifests/{uuid.uuid4().hex}"
        await store.put_meta(key, b"before the stall")
        layer = b"layer " + uuid.uuid4().bytes
        digest = await store.put_blob_bytes(layer)

        async def readiness_check() -> BackendUnavailable:
            started = time.monotonic()
            with pytest.raises(StorageInaccessible) as raised:
                await store.check_access(write=False)
            assert time.monotonic() - started < QUICKLY
            return raised.value

        proxy.stall()
        try:
            calls = [store.stat_blob(digest), store.get_meta(key), store.put_meta(key, b"during the stall")]
            # At once: each is timed on its own.
            errors = await asyncio.gather(*(unavailable(call, cloud_backend) for call in calls), readiness_check())
            assert isinstance(errors[-1], StorageInaccessible)
        finally:
            proxy.resume()
        assert await store.get_meta(key) in (b"before the stall", b"during the stall")
        assert await store.read_blob(digest) == layer


async def test_upload_stalled_midway_gives_up_quickly(cloud_backend: Backend, tmp_path: Path) -> None:
    """A store that stalls in the middle of a big upload: put_blob gives up within
    seconds (the upload's own bound is minutes); what the abandoned upload leaves
    is the whole blob or nothing, and the next put publishes it."""
    async with cloud_backend.proxied(tmp_path, rate=4 * MB) as proxy:
        store = cloud_backend.open(endpoint=proxy.url)
        data = os.urandom(20 * MB)
        digest = Digest.of(data)
        upload = asyncio.create_task(store.put_blob(digest, stage(store, data)))
        await proxy.wait_upstream_bytes(2 * MB, timeout=20)
        proxy.stall()
        stalled = time.monotonic()
        try:
            with pytest.raises(BackendUnavailable):
                await upload
            elapsed = time.monotonic() - stalled
            assert elapsed < 2 * QUICKLY, f"gave up after {elapsed:.1f}s"
        finally:
            proxy.resume()
        assert await store.stat_blob(digest) in (None, len(data))
        await store.put_blob(digest, stage(store, data))
        assert hashlib.sha256(await store.read_blob(digest)).hexdigest() == digest.hex


async def test_slow_upload_that_moves_is_not_cut_off(cloud_backend: Backend, tmp_path: Path) -> None:
    """One upload request (an S3 part, a GCS upload) that takes longer than a
    stalled store is given, because the link is slow, not stalled: it completes."""
    async with cloud_backend.proxied(tmp_path, rate=1.2 * MB) as proxy:
        store = cloud_backend.open(endpoint=proxy.url)
        data = os.urandom(7 * MB)  # S3: a 6 MiB part (~5 s here) and a small one; GCS: one request
        digest = Digest.of(data)
        started = time.monotonic()
        await store.put_blob(digest, stage(store, data))
        assert time.monotonic() - started > 5.0, "the link was slow, as the test needs"
        assert hashlib.sha256(await store.read_blob(digest)).hexdigest() == digest.hex
