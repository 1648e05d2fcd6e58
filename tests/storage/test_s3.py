"""S3 driver against SeaweedFS, which checks presigned URLs' signatures and expiry."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from nixery.registry.digest import Digest
from nixery.storage import BackendUnavailable, Redirect, Storage
from tests.storage.conftest import Backend
from tests.storage.test_conformance import MB, blob_key, fetch, put, replicas, stage


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


async def test_a_conditional_write_the_store_holds_back_is_waited_for(
    s3: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS holds a conditional PUT back, in steps of a second, while another write to the
    same key finishes. Replicas racing for one image record or build lease must get the store's
    answer (won or lost), not BackendUnavailable because a small request's stall bound ran out.
    The bound is cut to 0.5 s here so that every loser of the race outlasts it."""
    import nixery.storage.s3 as s3_driver

    monkeypatch.setattr(s3_driver, "STALL_TIMEOUT", 0.5)
    first, second = replicas(s3, tmp_path)
    for round_ in range(3):
        key = f"images-{uuid.uuid4().hex}/raced"
        won = await asyncio.gather(*(
            (first if n % 2 else second).create_meta(key, f"writer {n} ".encode() * 100) for n in range(6)
        ))  # fmt: skip
        assert sorted(won) == [False] * 5 + [True], f"round {round_}: {won}"
        assert (await first.get_meta(key) or b"").startswith(f"writer {won.index(True)} ".encode())
        lease = f"leases-race-{uuid.uuid4().hex}"
        held = await asyncio.gather(*(
            (first if n % 2 else second)._lease_create(lease, f"holder {n}".encode()) for n in range(4)
        ))  # fmt: skip
        assert sum(version is not None for version in held) == 1, f"round {round_}: {held}"


async def test_a_bucket_that_is_gone_is_unavailable_not_an_internal_error(s3: Backend, tmp_path: Path) -> None:
    """AWS answers a write into a bucket that is gone (deleted, renamed, a wrong endpoint) with
    404 NoSuchBucket, which obstore raises as Python's FileNotFoundError: the driver let it through,
    and the registry answered 500 INTERNAL_ERROR with a traceback instead of 503 naming the bucket.
    A stand-in answers as AWS does: SeaweedFS, the S3 server these tests run, makes a missing
    bucket on a write instead."""
    import dataclasses

    from aiohttp import web

    from nixery.app import open_storage
    from tests.registry import free_port

    no_such_bucket = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchBucket</Code>'
                      "<Message>The specified bucket does not exist</Message></Error>")

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=404, text=None if request.method == "HEAD" else no_such_bucket,
                            content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    settings = s3.settings()
    assert settings.s3 is not None
    gone = dataclasses.replace(settings.s3, bucket="gone", endpoint=f"http://127.0.0.1:{port}")
    store = open_storage(dataclasses.replace(settings, s3=gone))
    try:
        data = b"a layer " + uuid.uuid4().bytes
        for call in (store.put_meta("manifests/after", b"lost"), store.put_meta("big", os.urandom(2 * MB)),
                     store.put_blob(Digest.of(data), stage(store, data))):
            with pytest.raises(BackendUnavailable, match="bucket gone"):
                await call
    finally:
        await store.close()
        await runner.cleanup()


def test_the_stores_error_message_is_read_as_text_not_xml() -> None:
    """The message of an S3 error body is XML text: it was shown with its escapes (`server&#39;s`),
    as `nixery gc` printed it for a clock skewed against the store's."""
    from nixery.storage.s3 import _describe

    said = (
        "Generic S3 error: Error performing DELETE http://127.0.0.1:8333/b/k in 2ms - Server returned non-2xx "
        "status code: 403 Forbidden: <?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>RequestTimeTooSkewed"
        "</Code><Message>The difference between the request time and the server&#39;s time is too large.</Message>"
        "</Error>"
    )
    assert _describe(RuntimeError(said)) == (
        "RequestTimeTooSkewed (403 Forbidden): The difference between the request time and the server's time is "
        "too large."
    )
