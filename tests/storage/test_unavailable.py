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
from nixery.storage import BackendUnavailable, Storage
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
