"""S3 driver against SeaweedFS, which checks presigned URLs' signatures and expiry."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
from structlog.testing import capture_logs

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


# ---- gc parks a blob before deleting it (S3Storage.delete_unused_blob) ----


class Turns:
    """Steps of two concurrent calls run in a given order: a step waits until every step named
    before it is done; a step not named runs when it comes."""

    def __init__(self, order: list[str]):
        self.order = order
        self.done: set[str] = set()
        self.changed = asyncio.Condition()

    async def wait(self, name: str) -> None:
        if name in self.order:
            before = self.order[: self.order.index(name)]
            async with self.changed:
                await self.changed.wait_for(lambda: all(step in self.done for step in before))

    async def finish(self, name: str) -> None:
        async with self.changed:
            self.done.add(name)
            self.changed.notify_all()

    async def step(self, name: str, call: Any) -> Any:
        await self.wait(name)
        try:
            return await call
        finally:
            await self.finish(name)


def interleave(gc: Storage, build: Storage, digest: Digest, order: list[str]) -> None:
    """Make gc's `delete_unused_blob` and build's `touch_blob` take turns as `order` says.

    gc: dates (G1: HEAD blob and marker), park (copy to parked/), delete (DELETE the blob),
    head (HEAD the marker again), restore (copy back). build: T1 (HEAD the blob), marker (PUT the
    marker: from T1's end to the start of T3), T3 (HEAD the blob again)."""
    turns = Turns(order)
    blob, marker = blob_key(digest), f"touched/sha256/{digest.hex}"
    read_dates, copy, delete, head, stat = gc._blob_dates, gc._copy, gc._delete, gc._head, build.stat_blob  # type: ignore[attr-defined]

    async def dates(wanted: Digest) -> Any:
        return await turns.step("dates", read_dates(wanted))

    async def copy_(source: str, target: str) -> bool:
        return await turns.step("park" if target.startswith("parked/") else "restore", copy(source, target))

    async def delete_(key: str) -> None:
        await (turns.step("delete", delete(key)) if key == blob else delete(key))

    async def head_(key: str) -> Any:
        second = key == marker and "dates" in turns.done
        return await (turns.step("head", head(key)) if second else head(key))

    calls: list[str] = []

    async def stat_(wanted: Digest) -> int | None:
        calls.append("stat")
        if len(calls) == 1:
            size = await turns.step("T1", stat(wanted))
            await turns.wait("marker")  # the touch PUTs its marker once this returns
            return size
        await turns.finish("marker")
        return await turns.step("T3", stat(wanted))

    gc._blob_dates, gc._copy, gc._delete, gc._head = dates, copy_, delete_, head_  # type: ignore[attr-defined]
    build.stat_blob = stat_  # type: ignore[method-assign]


#: Orders of gc's and a build's steps (see `interleave`), what the touch answers (stored?) and
#: whether gc deletes the blob.
INTERLEAVINGS = {
    "touch before the park": (["dates", "T1", "marker", "T3", "park", "delete", "head"], True, False),
    "touch between park and DELETE": (["dates", "park", "T1", "marker", "T3", "delete", "head"], True, False),
    "marker before the DELETE, T3 after it": (["dates", "park", "T1", "marker", "delete", "T3", "head"], False, False),
    "T1 before the DELETE, marker after it, T3 before the restore": (
        ["dates", "park", "T1", "delete", "marker", "head", "T3", "restore"], False, False),
    "T1 before the DELETE, marker after it, T3 after the restore": (
        ["dates", "park", "T1", "delete", "marker", "head", "restore", "T3"], True, False),
    "marker after gc's HEAD": (["dates", "park", "T1", "delete", "head", "marker", "T3"], False, True),
    "T1 after the DELETE": (["dates", "park", "delete", "T1", "head"], False, True),
}  # fmt: skip


@pytest.mark.parametrize("case", INTERLEAVINGS)
async def test_a_touch_anywhere_in_gcs_delete_never_leaves_it_told_stored_and_deleted(s3: Backend, case: str) -> None:
    """A build's `touch_blob` (HEAD, PUT marker, HEAD) at each point of gc's `delete_unused_blob`
    (read dates, park, DELETE, HEAD marker, restore or clean up): a touch that answers with the
    blob's size leaves it stored, with its bytes; one that answers None (its build writes the blob
    again) may find it deleted. No parked copy is left either way."""
    order, told_stored, deleted_expected = INTERLEAVINGS[case]
    build, gc = s3.open(), s3.open()
    data = os.urandom(2500)
    digest = await put(build, data)
    interleave(gc, build, digest, order)
    cutoff = time.time() + 60  # the blob was written before: unused, as far as dates go
    with capture_logs() as logs:
        deleted, touched = await asyncio.wait_for(
            asyncio.gather(gc.delete_unused_blob(digest, cutoff), build.touch_blob(digest)), 30
        )
    stored = await gc.stat_blob(digest)
    assert touched == (len(data) if told_stored else None)
    assert deleted is deleted_expected
    if touched is not None:
        assert stored == len(data) and await gc.read_blob(digest) == data, "told stored, but gc deleted it"
    assert (stored is None) is deleted
    raced = [entry for entry in logs if entry["event"] == "storage.gc_race"]
    assert [entry["digest"] for entry in raced] == ([] if deleted else [str(digest)])
    assert all(entry["log_level"] == "warning" for entry in raced)
    assert s3.object_names(f"parked/sha256/{digest.hex}") == []


async def test_an_unused_blob_is_deleted_with_its_marker_and_no_parked_copy_left(s3: Backend) -> None:
    """The blob is parked (copied aside) before its DELETE, and the parked copy deleted after."""
    store = s3.open()
    digest = await put(store, os.urandom(1200))
    await store.touch_blob(digest)  # an old reuse: the marker goes with the blob
    assert s3.object_names(f"touched/sha256/{digest.hex}") != []
    copies: list[tuple[str, str]] = []
    copy = store._copy  # type: ignore[attr-defined]

    async def recorded(source: str, target: str) -> bool:
        copies.append((source, target))
        return bool(await copy(source, target))

    store._copy = recorded  # type: ignore[attr-defined]
    assert await store.delete_unused_blob(digest, time.time() + 60) is True
    assert [(source, target.rsplit("/", 1)[0]) for source, target in copies] == [
        (blob_key(digest), f"parked/sha256/{digest.hex}")
    ], "parked once, not restored"
    assert await store.stat_blob(digest) is None
    for prefix in (blob_key(digest), f"touched/sha256/{digest.hex}", f"parked/sha256/{digest.hex}"):
        assert s3.object_names(prefix) == [], prefix


async def test_a_blob_a_dead_gc_parked_is_put_back_by_the_next(s3: Backend) -> None:
    """gc dies after it parked and deleted the blob, before it read the marker again (the build
    that touched meanwhile was told the blob is there): the parked copy stays, is not listed as a
    blob, and the next gc copies it back once it is older than a running gc's; a parked copy
    whose blob is stored is only removed."""
    build, dying, next_gc = s3.open(), s3.open(), s3.open()
    lost, kept = os.urandom(3000), os.urandom(1000)
    digest, other = await put(build, lost), await put(build, kept)
    delete = dying._delete  # type: ignore[attr-defined]

    async def dies_after_the_delete(key: str) -> None:
        await delete(key)
        if key == blob_key(digest):
            raise RuntimeError("gc killed")

    dying._delete = dies_after_the_delete  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="gc killed"):
        await dying.delete_unused_blob(digest, time.time() + 60)
    assert await build.stat_blob(digest) is None
    assert len(s3.object_names(f"parked/sha256/{digest.hex}/")) == 1
    # A parked copy of a blob that is stored, as a gc killed between park and DELETE leaves.
    await next_gc._copy(blob_key(other), f"parked/sha256/{other.hex}/left")  # type: ignore[attr-defined]
    listing = {blob.digest async for blob in next_gc.list_blobs()}
    assert digest not in listing and other in listing, "parked copies are no blobs"

    assert await next_gc.restore_parked_blobs() == 0, "a parked copy this fresh may be a running gc's"
    assert await build.stat_blob(digest) is None
    with capture_logs() as logs:
        assert await next_gc.restore_parked_blobs(older_than=0) == 1  # type: ignore[call-arg]
    assert await build.read_blob(digest) == lost and await build.read_blob(other) == kept
    assert [entry["digest"] for entry in logs if entry["event"] == "storage.gc_parked_restored"] == [str(digest)]
    assert s3.object_names(f"parked/sha256/{digest.hex}") == s3.object_names(f"parked/sha256/{other.hex}") == []


async def test_gc_puts_back_what_a_dead_gc_parked_before_it_lists_blobs(
    s3: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nixery gc` (maintenance.collect_garbage) does the restoring, before it lists blobs: the
    blob is back, and dated now, so this run keeps it."""
    import nixery.storage.s3 as s3_driver
    from nixery import maintenance

    monkeypatch.setattr(s3_driver, "PARKED_AGE", 0.0)
    store = s3.open()
    data = os.urandom(2000)
    digest = await put(store, data)
    await store._copy(blob_key(digest), f"parked/sha256/{digest.hex}/left")  # type: ignore[attr-defined]
    await store.delete_blob(digest)
    await maintenance.collect_garbage(store, older_than=maintenance.MIN_AGE)
    assert await store.read_blob(digest) == data
    assert s3.object_names(f"parked/sha256/{digest.hex}") == []


async def test_a_blob_too_big_to_park_is_deleted_as_before(s3: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """One CopyObject copies at most 5 GiB: a bigger blob is deleted without parking, and a touch
    between gc's date read and its DELETE is only logged (`storage.gc_race`). The limit is cut
    to 0 here."""
    import nixery.storage.s3 as s3_driver

    monkeypatch.setattr(s3_driver, "COPY_LIMIT", 0)
    build, gc = s3.open(), s3.open()
    digest = await put(build, os.urandom(1500))
    interleave(gc, build, digest, ["dates", "T1", "marker", "T3", "delete", "head"])
    with capture_logs() as logs:
        deleted, touched = await asyncio.wait_for(
            asyncio.gather(gc.delete_unused_blob(digest, time.time() + 60), build.touch_blob(digest)), 30
        )
    assert deleted is True and touched == 1500 and await gc.stat_blob(digest) is None
    assert [entry["digest"] for entry in logs if entry["event"] == "storage.gc_race"] == [str(digest)]
    assert s3.object_names(f"parked/sha256/{digest.hex}") == []


async def test_a_blob_whose_parking_copy_fails_is_kept_and_the_sweep_goes_on(s3: Backend) -> None:
    """A server-side copy of a big blob can outlast the request timeout on a slow store: that blob
    is kept this time (warning `storage.gc_park_failed`), not deleted unparked, and gc is not
    stopped (it stopped every later run at the same blob)."""
    store = s3.open()
    data = os.urandom(1300)
    digest = await put(store, data)

    async def times_out(source: str, target: str) -> bool:
        raise BackendUnavailable("s3", "bucket images: the copy timed out")

    store._copy = times_out  # type: ignore[attr-defined]
    with capture_logs() as logs:
        assert await store.delete_unused_blob(digest, time.time() + 60) is False
    assert await store.read_blob(digest) == data
    assert [entry["digest"] for entry in logs if entry["event"] == "storage.gc_park_failed"] == [str(digest)]


async def test_a_raced_blob_whose_parked_copy_vanished_is_said_to_be_lost(s3: Backend) -> None:
    """The parked copy gone before gc puts it back (a lifecycle rule on parked/, another gc's
    clean-up with its clock an hour ahead): gc says, as an error, that the blob a build was told
    about is gone, and answers that it deleted it; it said "gc put it back, nothing is lost"."""
    build, gc = s3.open(), s3.open()
    digest = await put(build, os.urandom(1400))
    copy = gc._copy  # type: ignore[attr-defined]

    async def parked_copy_vanishes(source: str, target: str) -> bool:
        if source.startswith("parked/"):
            await gc._delete(source)  # type: ignore[attr-defined]
        return bool(await copy(source, target))

    gc._copy = parked_copy_vanishes  # type: ignore[attr-defined]
    interleave(gc, build, digest, ["dates", "T1", "marker", "T3", "park", "delete", "head", "restore"])
    with capture_logs() as logs:
        deleted, touched = await asyncio.wait_for(
            asyncio.gather(gc.delete_unused_blob(digest, time.time() + 60), build.touch_blob(digest)), 30
        )
    assert deleted is True and touched == 1400 and await gc.stat_blob(digest) is None
    raced = [entry for entry in logs if entry["event"] == "storage.gc_race"]
    assert [(entry["digest"], entry["log_level"]) for entry in raced] == [(str(digest), "error")], raced
    assert "nothing is lost" not in raced[0]["note"]
