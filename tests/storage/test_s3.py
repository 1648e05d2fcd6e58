"""S3 driver against SeaweedFS, which checks presigned URLs' signatures and expiry."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from nixery.registry.digest import Digest
from nixery.storage import BackendUnavailable, Redirect, Storage
from tests.storage.conftest import Backend
from tests.storage.test_conformance import MB, blob_key, fetch, put, stage


@pytest.fixture
def s3(make_backend) -> Backend:
    return make_backend("s3")


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def redirect_url(store: Storage, digest: Digest) -> str:
    source = await store.blob_source(digest, allow_redirect=True)
    assert isinstance(source, Redirect)
    return source.url


async def test_expired_url_refused_and_fresh_one_works(s3: Backend) -> None:
    store = s3.open(signed_url_ttl=2)
    data = os.urandom(1000)
    digest = await put(store, data)
    signed_at = time.time()
    old = await redirect_url(store, digest)
    assert dict(parse_qsl(urlsplit(old).query))["X-Amz-Expires"] == "2"
    assert await fetch(old) == (200, data)

    await asyncio.sleep(max(0.0, signed_at + 3.5 - time.time()))
    status, _ = await fetch(old)
    assert status == 403

    fresh = await redirect_url(store, digest)
    assert fresh != old
    assert await fetch(fresh) == (200, data)


async def test_tampered_urls_refused(s3: Backend) -> None:
    store = s3.open()
    data, other = os.urandom(1000), os.urandom(1000)
    digest, other_digest = await put(store, data), await put(store, other)
    url = await redirect_url(store, digest)
    assert await fetch(url) == (200, data)

    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    flipped = query["X-Amz-Signature"][:-1] + ("0" if query["X-Amz-Signature"][-1] != "0" else "1")
    tampered = {
        "other object": urlunsplit(parts._replace(path=parts.path.replace(digest.hex, other_digest.hex))),
        "longer expiry": with_query(url, **{"X-Amz-Expires": "604800"}),
        "changed signature": with_query(url, **{"X-Amz-Signature": flipped}),
        "no signature": urlunsplit(parts._replace(query="")),
    }
    for name, bad in tampered.items():
        status, body = await fetch(bad)
        assert status == 403, f"{name}: {status} {body[:200]!r}"
        assert data not in body and other not in body


async def test_upload_failing_midway_is_aborted(s3: Backend, tmp_path: Path) -> None:
    """A part the store keeps refusing: the upload fails with BackendUnavailable,
    nothing appears under the digest and the multipart upload is aborted (no
    hidden parts left to pay for)."""
    async with s3.proxied(tmp_path) as proxy:
        proxy.fail_request = lambda head: re.match(rb"PUT \S*[?&]partNumber=2[& ]", head) is not None
        store = s3.open(endpoint=proxy.url)
        data = os.urandom(20 * MB)
        digest = Digest.of(data)
        with pytest.raises(BackendUnavailable) as raised:
            await store.put_blob(digest, stage(store, data))
        assert raised.value.backend == "s3"
        assert proxy.failed_requests >= 1
        assert s3.object_names(blob_key(digest)) == []
        assert s3.pending_multipart_uploads(blob_key(digest)) == []
        # Once the store takes parts again, the same driver publishes the blob.
        proxy.fail_request = None
        await store.put_blob(digest, stage(store, data))
        assert await store.stat_blob(digest) == len(data)
