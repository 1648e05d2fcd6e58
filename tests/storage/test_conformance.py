"""What every storage driver promises (nixery/storage/base.py), checked on all
three: filesystem, S3 (SeaweedFS) and GCS (fake-gcs-server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from structlog.testing import capture_logs

from nixery.registry.digest import Digest
from nixery.storage import (
    BlobNotFound,
    ByteStream,
    FilesystemStorage,
    InvalidKey,
    LocalFile,
    Redirect,
    Storage,
)
from tests.storage.conftest import Backend, lease_holder
from tests.storage.worker import expected_digest

MB = 1024 * 1024


def stage(store: Storage, data: bytes) -> Path:
    path = store.staging_dir() / f"test-{uuid.uuid4().hex}"
    path.write_bytes(data)
    return path


async def put(store: Storage, data: bytes) -> Digest:
    digest = Digest.of(data)
    staged = stage(store, data)
    try:
        await store.put_blob(digest, staged)
    finally:
        staged.unlink(missing_ok=True)
    return digest


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


async def fetch_digest(url: str) -> tuple[int, str, int]:
    """Status, sha256 and size of a download, hashed as it streams in."""
    hasher, size = hashlib.sha256(), 0
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        async for chunk in response.content.iter_chunked(MB):
            hasher.update(chunk)
            size += len(chunk)
        return response.status, hasher.hexdigest(), size


def url_expiry(url: str) -> int:
    query = parse_qs(urlsplit(url).query)
    return int((query.get("X-Amz-Expires") or query["X-Goog-Expires"])[0])


def blob_key(digest: Digest) -> str:
    return f"blobs/sha256/{digest.hex}"


async def test_put_stat_read_round_trip(store: Storage) -> None:
    data = os.urandom(3000)
    digest = await put(store, data)
    assert await store.stat_blob(digest) == len(data)
    assert await store.read_blob(digest) == data
    small = b'{"schemaVersion": 2, "' + uuid.uuid4().hex.encode() + b'": 1}'
    assert await store.put_blob_bytes(small) == Digest.of(small)
    assert await store.read_blob(Digest.of(small)) == small


async def test_blob_put_twice_is_one_blob_and_not_rewritten(store: Storage, backend: Backend) -> None:
    original = os.urandom(5000)
    digest = await store.put_blob_bytes(original)
    assert await store.put_blob_bytes(original) == digest
    # A second put under the same digest is skipped, even if (wrongly) given
    # other bytes: what is stored under a digest never changes.
    await store.put_blob(digest, stage(store, b"something else entirely"))
    assert await store.read_blob(digest) == original
    assert len(backend.object_names(blob_key(digest))) == 1


async def test_missing_blob_and_meta(store: Storage) -> None:
    missing = Digest.of(uuid.uuid4().bytes)
    assert await store.stat_blob(missing) is None
    with pytest.raises(BlobNotFound):
        await store.read_blob(missing)
    for allow_redirect in (True, False):
        with pytest.raises(BlobNotFound):
            await store.blob_source(missing, allow_redirect=allow_redirect)
    assert await store.get_meta(f"manifests/{uuid.uuid4().hex}") is None


async def test_blob_servable_when_stored_with_the_size_a_record_gives(store: Storage) -> None:
    """Asked before a manifest naming the blob is handed out (nixery.images)."""
    data = os.urandom(3000)
    digest = await put(store, data)
    assert await store.blob_servable(digest) and await store.blob_servable(digest, len(data))
    assert not await store.blob_servable(digest, len(data) + 1)
    assert not await store.blob_servable(Digest.of(uuid.uuid4().bytes))
    assert await store.remove_quarantined(0) == 0  # nothing was set aside


async def test_meta_put_get_replace(store: Storage) -> None:
    key = f"manifests/{uuid.uuid4().hex}/shell/latest"
    neighbour = f"manifests/{uuid.uuid4().hex}/other"
    assert await store.get_meta(key) is None
    await store.put_meta(key, b"first")
    await store.put_meta(neighbour, b"neighbour")
    assert await store.get_meta(key) == b"first"
    await store.put_meta(key, b"second, longer than the first")
    assert await store.get_meta(key) == b"second, longer than the first"
    await store.put_meta(key, b"")
    assert await store.get_meta(key) == b""
    assert await store.get_meta(neighbour) == b"neighbour"


async def test_meta_put_after_appears_only_once_stored(store: Storage) -> None:
    """An image record is put `after` the blobs it names: never visible before them."""
    key = f"images/{uuid.uuid4().hex}"
    await store.put_meta(key, b"old")
    release = asyncio.Event()
    put = asyncio.ensure_future(store.put_meta_after(key, b"new", release.wait()))
    await asyncio.sleep(0.3)
    assert await store.get_meta(key) == b"old"
    release.set()
    await asyncio.wait_for(put, 30)
    assert await store.get_meta(key) == b"new"

    async def not_stored() -> None:
        raise OSError(28, "No space left on device (injected)")

    with pytest.raises(OSError, match="No space left"):
        await store.put_meta_after(key, b"never", not_stored())
    assert await store.get_meta(key) == b"new"
    assert [p.name for p in store.staging_dir().iterdir() if p.name.startswith("meta-")] == []


async def test_meta_created_only_if_absent(backend: Backend, tmp_path: Path) -> None:
    """An image record is created only if absent: of writers racing on two replicas exactly one
    wins, what is there is never replaced, and a losing write leaves nothing behind."""
    first, second = replicas(backend, tmp_path)
    run = uuid.uuid4().hex
    key = f"images-{run}/one"
    assert await first.create_meta(key, b"first") is True
    assert await second.create_meta(key, b"second, longer than the first") is False
    assert await first.get_meta(key) == await second.get_meta(key) == b"first"

    race = f"images-{run}/raced"
    bodies = [f"writer {n} ".encode() * 1000 for n in range(6)]
    won = await asyncio.gather(*(
        (first if n % 2 else second).create_meta(race, body) for n, body in enumerate(bodies)
    ))  # fmt: skip
    assert won.count(True) == 1
    assert await first.get_meta(race) == await second.get_meta(race) == bodies[won.index(True)]

    # Bigger than one small request (the drivers upload documents above 1 MiB otherwise).
    big, document = f"images-{run}/big", os.urandom(2 * MB)
    assert await second.create_meta(big, document) is True
    assert await first.create_meta(big, os.urandom(2 * MB)) is False
    assert await first.get_meta(big) == document

    await first.delete_meta(key)  # gone: created anew
    assert await second.create_meta(key, b"again") is True
    assert await first.get_meta(key) == b"again"
    assert sorted(backend.object_names(f"meta/images-{run}/")) == [f"meta/images-{run}/{name}" for name in (
        "big", "one", "raced")]  # fmt: skip
    for store in (first, second):
        assert [p.name for p in store.staging_dir().iterdir()] == []


async def test_meta_create_after_appears_only_once_stored(store: Storage) -> None:
    """An image record is created `after` the blobs it names: never visible before them, not
    at all if they fail, and not over a record that another process stored meanwhile."""
    key = f"images/{uuid.uuid4().hex}"
    waiting, release = asyncio.Event(), asyncio.Event()

    async def blobs_stored() -> None:
        waiting.set()
        await release.wait()

    create = asyncio.ensure_future(store.create_meta_after(key, b"record", blobs_stored()))
    await asyncio.wait_for(waiting.wait(), 30)
    assert await store.get_meta(key) is None
    release.set()
    assert await asyncio.wait_for(create, 30) is True
    assert await store.get_meta(key) == b"record"
    assert await store.create_meta_after(key, b"another record", asyncio.sleep(0)) is False
    assert await store.get_meta(key) == b"record"

    async def not_stored() -> None:
        raise OSError(28, "No space left on device (injected)")

    failed = f"images/{uuid.uuid4().hex}"
    with pytest.raises(OSError, match="No space left"):
        await store.create_meta_after(failed, b"never", not_stored())
    assert await store.get_meta(failed) is None
    assert [p.name for p in store.staging_dir().iterdir()] == []


async def test_meta_replaced_only_at_the_version_read(backend: Backend, tmp_path: Path) -> None:
    """A damaged image record is replaced only if it is still the version read: of writers on
    two replicas that read one version exactly one replaces it, and a document written since,
    or removed, stays as it is."""
    first, second = replicas(backend, tmp_path)
    run = uuid.uuid4().hex
    key = f"images-{run}/one"
    assert await first.get_versioned_meta(key) is None
    assert await first.create_meta(key, b"damaged") is True
    damaged = await second.get_versioned_meta(key)
    assert damaged is not None and damaged.data == b"damaged"
    assert await first.replace_meta(key, b"first replacement", damaged.version) is True
    assert await second.replace_meta(key, b"second replacement", damaged.version) is False
    replaced = await second.get_versioned_meta(key)
    assert replaced is not None and replaced.data == b"first replacement"
    assert replaced.version != damaged.version
    await second.put_meta(key, b"written since")  # a version neither replacement read
    assert await first.replace_meta(key, b"stale", replaced.version) is False
    assert await first.get_meta(key) == b"written since"

    race = f"images-{run}/raced"
    assert await second.create_meta(race, b"damaged") is True
    version = (await first.get_versioned_meta(race) or pytest.fail("not stored")).version
    bodies = [f"writer {n} ".encode() * 1000 for n in range(6)]
    won = await asyncio.gather(*(
        (first if n % 2 else second).replace_meta(race, body, version) for n, body in enumerate(bodies)
    ))  # fmt: skip
    assert won.count(True) == 1
    assert await first.get_meta(race) == await second.get_meta(race) == bodies[won.index(True)]

    # Bigger than one small request (the drivers upload documents above 1 MiB otherwise).
    big = f"images-{run}/big"
    assert await first.create_meta(big, os.urandom(2 * MB)) is True
    version = (await second.get_versioned_meta(big) or pytest.fail("not stored")).version
    document = os.urandom(2 * MB)
    assert await second.replace_meta(big, document, version) is True
    assert await first.replace_meta(big, os.urandom(2 * MB), version) is False
    assert await first.get_meta(big) == document

    for removed, body in ((key, b"replacement"), (big, os.urandom(2 * MB))):
        version = (await first.get_versioned_meta(removed) or pytest.fail("not stored")).version
        await second.delete_meta(removed)  # removed (by gc): not brought back
        assert await first.replace_meta(removed, body, version) is False
        assert await first.get_meta(removed) is None
    assert backend.object_names(f"meta/images-{run}/") == [f"meta/images-{run}/raced"]
    for store in (first, second):
        assert [p.name for p in store.staging_dir().iterdir()] == []
    if backend.name == "filesystem":  # the lock that replacements take is gone with them
        assert backend.object_names("locks/") == []


@pytest.mark.parametrize(
    "key", ["", "../escape", "/absolute", "Upper", "a//b", "a/../b", "a b", "a/", "x" * 513, "caf\u00e9"]
)
async def test_invalid_meta_keys_rejected(store: Storage, backend: Backend, key: str) -> None:
    with pytest.raises(InvalidKey):
        await store.put_meta(key, b"nope")
    with pytest.raises(InvalidKey):
        await store.get_meta(key)
    if backend.name == "filesystem":
        assert not (backend.storage_path / "escape").exists()


async def test_blob_source_redirects_or_streams(store: Storage, backend: Backend) -> None:
    data = os.urandom(300_000)
    digest = await put(store, data)

    redirected = await store.blob_source(digest, allow_redirect=True)
    relayed = await store.blob_source(digest, allow_redirect=False)
    if backend.name == "filesystem":
        for source in (redirected, relayed):
            assert isinstance(source, LocalFile)
            assert source.size == len(data)
            assert source.path.read_bytes() == data
        return

    assert isinstance(redirected, Redirect)
    assert url_expiry(redirected.url) == 300  # settings.signed_url_ttl
    assert await fetch(redirected.url) == (200, data)

    assert isinstance(relayed, ByteStream)
    assert relayed.size == len(data)
    assert b"".join([chunk async for chunk in relayed.chunks]) == data
    for start, count in ((0, 1), (1000, 5000), (len(data) - 7, 7)):
        part = await relayed.read_range(start, count)
        assert b"".join([chunk async for chunk in part]) == data[start : start + count]


async def test_big_blob_uploads_in_bounded_memory_and_streams(backend: Backend, run_worker) -> None:
    size = 64 * MB
    # A fixed malloc mmap threshold makes freed upload buffers go back to the
    # system at once, so RSS shows what the upload holds rather than what
    # glibc's per-thread arenas keep cached (bounded, but noisy).
    env = dict(backend.emulator_env(), MALLOC_MMAP_THRESHOLD_="131072")
    worker = await run_worker(backend.worker_spec(size=size, seed=7), env)
    digest = Digest.parse((await worker.wait_for("staged"))["digest"])
    done = await worker.wait_for("done", timeout=60)
    # The upload reads the staged file a few chunks at a time: resident memory
    # must not grow with the layer (buffering it would add >= 64 MB).
    assert done["rss_growth"] < size // 2, f"memory grew by {done['rss_growth'] / MB:.1f} MB"

    store = backend.open()
    assert await store.stat_blob(digest) == size
    relayed = await store.blob_source(digest, allow_redirect=False)
    hasher, largest = hashlib.sha256(), 0
    if isinstance(relayed, LocalFile):
        with open(relayed.path, "rb") as handle:
            while chunk := handle.read(MB):
                hasher.update(chunk)
    else:
        assert isinstance(relayed, ByteStream) and relayed.size == size
        async for chunk in relayed.chunks:
            hasher.update(chunk)
            largest = max(largest, len(chunk))
        assert largest <= 16 * MB  # relayed piece by piece, not as one buffer
    assert hasher.hexdigest() == digest.hex
    if backend.name != "filesystem":
        redirect = await store.blob_source(digest, allow_redirect=True)
        assert isinstance(redirect, Redirect)
        assert await fetch_digest(redirect.url) == (200, digest.hex, size)


@pytest.mark.parametrize("size", [200_000, 12 * MB], ids=["small", "multipart"])
async def test_concurrent_puts_of_one_digest(store: Storage, backend: Backend, size: int) -> None:
    data = os.urandom(size)
    digest = Digest.of(data)
    staged = [stage(store, data) for _ in range(5)]
    await asyncio.gather(*(store.put_blob(digest, path) for path in staged))
    assert await store.stat_blob(digest) == size
    assert hashlib.sha256(await store.read_blob(digest)).hexdigest() == digest.hex
    assert len(backend.object_names(blob_key(digest))) == 1


async def test_second_instance_shares_blobs_and_meta(backend: Backend, tmp_path: Path) -> None:
    """Replicas on one store: what one writes, the other finds."""
    first = backend.open()
    if backend.name != "filesystem":  # own local staging, same bucket
        backend.storage_path = tmp_path / "replica-2"
    second = backend.open()
    digest = await first.put_blob_bytes(b"layer from replica one " + uuid.uuid4().bytes)
    key = f"manifests/{uuid.uuid4().hex}"
    await first.put_meta(key, b"manifest from replica one")
    assert await second.stat_blob(digest) is not None
    assert await second.read_blob(digest) == await first.read_blob(digest)
    assert await second.get_meta(key) == b"manifest from replica one"


async def test_corruption_listeners_belong_to_their_instance(backend: Backend, tmp_path: Path) -> None:
    """Every driver starts with its own empty list of corruption listeners (Storage.__init__):
    a listener hears the blobs its instance reports, not those of another instance."""
    first = backend.open()
    if backend.name != "filesystem":
        backend.storage_path = tmp_path / "replica-2"
    second = backend.open()
    heard: list[tuple[str, Digest]] = []
    first.on_corrupt_blob(lambda digest: heard.append(("first", digest)))
    second.on_corrupt_blob(lambda digest: heard.append(("second", digest)))
    digest = Digest.of(b"reported corrupt")
    first._report_corrupt_blob(digest)
    assert heard == [("first", digest)]


async def test_crash_mid_upload_leaves_no_blob(backend: Backend, run_worker, tmp_path: Path) -> None:
    """kill -9 while a 32 MB layer is being written or uploaded: nothing appears
    under its digest, and the next start removes the dead process's staging."""
    size, seed = 32 * MB, 11
    digest = expected_digest(size, seed)
    if backend.name == "filesystem":
        # Publishing is one rename; the long part is writing the staged file.
        worker = await run_worker(backend.worker_spec(size=size, seed=seed, slow_staging=True), {})
        staged = Path((await worker.wait_for("staging", written=4 * MB))["path"])
        await worker.kill()
        assert 0 < staged.stat().st_size < size
    else:
        async with backend.proxied(tmp_path / "proxied", rate=8 * MB) as proxy:
            spec = backend.worker_spec(endpoint=proxy.url, size=size, seed=seed)
            worker = await run_worker(spec, backend.emulator_env(proxy.url))
            staged = Path((await worker.wait_for("staged"))["path"])
            await worker.wait_for("uploading")
            start = proxy.upstream_bytes
            await proxy.wait_upstream_bytes(start + 6 * MB, timeout=20)
            await worker.kill()
            assert proxy.upstream_bytes - start < size, "the upload had finished before the kill"
            assert staged.stat().st_size == size
            if backend.name == "s3":
                # Evidence that the kill hit a multipart upload in flight.
                assert backend.pending_multipart_uploads(blob_key(digest))
            await asyncio.sleep(0.5)  # let the server settle whatever it received
            assert backend.object_names(blob_key(digest)) == []
            store = backend.open()
            assert await store.stat_blob(digest) is None
            with pytest.raises(BlobNotFound):
                await store.blob_source(digest, allow_redirect=True)

    assert [event["event"] for event in worker.events if event["event"] == "done"] == []
    assert backend.object_names(blob_key(digest)) == []
    # The next start on this STORAGE_PATH removes the dead process's staging.
    restarted = backend.open()
    assert not staged.parent.exists()
    assert await restarted.stat_blob(digest) is None
    with pytest.raises(BlobNotFound):
        await restarted.read_blob(digest)
    if isinstance(restarted, FilesystemStorage):
        assert not restarted.blob_path(digest).exists()


# ---- optional capabilities (garbage collection, checks, one build per image) ----

#: Lease length for the tests: short, so that a dead holder's lease runs out quickly.
TEST_LEASE = 2.0


def with_lease(store: Storage, ttl: float = TEST_LEASE) -> Storage:
    store.lease_ttl = ttl  # type: ignore[attr-defined] (leased drivers read it; the filesystem ignores it)
    return store


def replicas(backend: Backend, tmp_path: Path, ttl: float = TEST_LEASE) -> tuple[Storage, Storage]:
    """Two drivers on one store, as two registry processes have."""
    first = backend.open()
    if backend.name != "filesystem":  # own local staging, same bucket
        backend.storage_path = tmp_path / "replica-2"
    return with_lease(first, ttl), with_lease(backend.open(), ttl)


async def listed(store: Storage) -> dict[Digest, float]:
    return {blob.digest: blob.modified async for blob in store.list_blobs()}


async def test_list_touch_and_delete_blobs(store: Storage, backend: Backend) -> None:
    data = [os.urandom(1000 + i) for i in range(3)]
    digests = [await put(store, item) for item in data]
    sizes = {blob.digest: blob.size async for blob in store.list_blobs()}
    assert [sizes.get(digest) for digest in digests] == [len(item) for item in data]
    before = await listed(store)
    assert all(abs(before[digest] - time.time()) < 120 for digest in digests)

    await asyncio.sleep(1.1)  # S3 dates have whole seconds
    assert await store.touch_blob(digests[0]) == len(data[0]), "a touch tells the size of the blob it found"
    after = await listed(store)
    assert after[digests[0]] > before[digests[0]], "a touched blob looks reused"
    assert after[digests[1]] == before[digests[1]]

    await store.delete_blob(digests[0])
    await store.delete_blob(digests[0])  # deleting what is gone is no error
    assert await store.stat_blob(digests[0]) is None
    assert backend.object_names(blob_key(digests[0])) == []
    assert digests[0] not in await listed(store)
    assert await store.read_blob(digests[1]) == data[1]
    missing = Digest.of(uuid.uuid4().bytes)
    assert await store.touch_blob(missing) is None  # no error, "not stored", and nothing appears
    assert await store.stat_blob(missing) is None and missing not in await listed(store)


async def test_a_blob_put_again_looks_reused(store: Storage) -> None:
    """A layer compressed again (its layer record was lost: a crash between the blob and the
    record) is put under a digest already stored: gc must see it in use, as if touched."""
    data = os.urandom(3000)
    digest = await put(store, data)
    before = (await listed(store))[digest]
    await asyncio.sleep(1.1)  # S3 dates have whole seconds
    await put(store, data)
    assert (await listed(store))[digest] > before


async def test_delete_unused_blob_goes_by_the_dates_it_reads_itself(store: Storage, backend: Backend) -> None:
    """gc's sweep lists blobs, then deletes the old ones: one reused in between stays."""
    old, reused = [await put(store, os.urandom(500 + i)) for i in range(2)]
    await asyncio.sleep(1.1)  # S3 dates have whole seconds
    cutoff = time.time()
    listing = await listed(store)
    assert listing[old] < cutoff and listing[reused] < cutoff, "both look unused to the listing"
    await asyncio.sleep(1.1)
    await store.touch_blob(reused)  # a build finds it in the layer cache
    fresh = await put(store, os.urandom(700))

    assert await store.delete_unused_blob(reused, cutoff) is False
    assert await store.delete_unused_blob(fresh, cutoff) is False
    assert await store.delete_unused_blob(old, cutoff) is True
    assert await store.delete_unused_blob(old, cutoff) is False  # gone already: nothing deleted
    assert await store.stat_blob(old) is None and backend.object_names(blob_key(old)) == []
    assert await store.stat_blob(reused) is not None and await store.stat_blob(fresh) is not None


#: Where each driver's `delete_unused_blob` reads the blob's dates (tests below run a build's
#: touch right after it).
DATE_READ = {"filesystem": "_blob_modified", "s3": "_blob_dates", "gcs": "_stat"}


async def test_a_blob_gc_deletes_just_before_a_build_reuses_it_is_stored_again(backend: Backend) -> None:
    """A build reusing a stored blob (a config, a manifest, a layer) while `nixery gc`, another
    process, deletes it: once `put_blob_bytes` / `put_blob` return, the blob is stored. (They used
    to check that it was there, then touch it: gc deleting in between left it gone.)"""
    build, gc = backend.open(), backend.open()
    data = [b'{"config": "' + uuid.uuid4().hex.encode() + b'"}', os.urandom(2000)]
    digests = [await build.put_blob_bytes(data[0]), await put(build, data[1])]
    await asyncio.sleep(1.1)  # S3 dates have whole seconds
    cutoff = time.time()  # both are older: gc finds them unused
    ran: dict[Digest, bool] = {}
    touch = build.touch_blob

    async def gc_deletes_it_first(digest: Digest) -> int | None:
        if digest not in ran:  # meanwhile, in the gc process: the blob's image was collected
            ran[digest] = await gc.delete_unused_blob(digest, cutoff)
        return await touch(digest)

    build.touch_blob = gc_deletes_it_first  # type: ignore[method-assign]
    assert await build.put_blob_bytes(data[0]) == digests[0]
    assert await build.read_blob(digests[0]) == data[0], "put_blob_bytes returned, but gc had deleted the blob"
    assert ran == {digests[0]: True}
    await put(build, data[1])
    assert await build.stat_blob(digests[1]) == len(data[1]), "put_blob returned, but gc had deleted the blob"
    if backend.name != "filesystem":  # the filesystem checks and touches in one step (`_publish`)
        assert ran[digests[1]] is True


async def test_a_blob_touched_after_gc_read_its_date_is_kept_or_the_toucher_told(backend: Backend) -> None:
    """`nixery gc` reads a blob's dates, finds it unused, and deletes it; a build touches it in
    between (it reuses it): gc keeps it, or the touch answers that it is gone (the build then writes
    it again). S3 has no delete conditional on the touch marker: there gc deletes the blob, finds
    the new marker, puts the blob back from its parked copy and logs the race (`storage.gc_race`);
    tests/storage/test_s3.py goes through the other interleavings."""
    build, gc = backend.open(), backend.open()
    data = os.urandom(1500)
    digest = await put(build, data)
    await asyncio.sleep(1.1)  # S3 dates have whole seconds
    cutoff = time.time()
    await asyncio.sleep(1.1)  # the touch is dated after the cutoff, in whole seconds too
    read_dates = getattr(gc, DATE_READ[backend.name])
    touched: list[int | None] = []

    async def then_a_build_touches(*args: object) -> object:
        dates = await read_dates(*args)
        if not touched:
            touched.append(await build.touch_blob(digest))
        return dates

    setattr(gc, DATE_READ[backend.name], then_a_build_touches)
    with capture_logs() as logs:
        deleted = await gc.delete_unused_blob(digest, cutoff)
    assert touched, "gc did not read the blob's dates"
    stored = await build.stat_blob(digest)
    if backend.name == "s3":
        assert [entry["digest"] for entry in logs if entry["event"] == "storage.gc_race"] == [str(digest)]
        assert backend.object_names(f"parked/sha256/{digest.hex}") == [], "the parked copy is removed"
    assert touched == [None] or (stored == len(data) and not deleted), (
        f"the touch said {touched[0]} (stored), but gc deleted the blob"
    )
    assert touched == [len(data)], "a touch after gc read the date, before it deleted: the blob is kept"
    assert await build.read_blob(digest) == data


async def test_list_and_delete_meta(store: Storage) -> None:
    run = uuid.uuid4().hex[:8]
    keys = [f"images-{run}/a", f"images-{run}/b/c"]
    await store.put_meta(f"images-{run}x/neighbour", b"not under the prefix")
    for key in keys:
        await store.put_meta(key, b"record")
    assert await store.list_meta(f"images-{run}") == keys
    assert await store.list_meta(f"images-{run}/") == keys
    assert await store.list_meta(f"nothing-{run}") == []
    await store.delete_meta(keys[0])
    await store.delete_meta(keys[0])
    assert await store.get_meta(keys[0]) is None
    assert await store.list_meta(f"images-{run}") == [keys[1]]
    assert await store.get_meta(f"images-{run}x/neighbour") == b"not under the prefix"


async def test_exclusive_admits_one_holder_across_replicas(backend: Backend, tmp_path: Path) -> None:
    first, second = replicas(backend, tmp_path)
    key, other = f"builds/{uuid.uuid4().hex}", f"builds/{uuid.uuid4().hex}"
    inside, most, entered = 0, 0, []

    async def hold(store: Storage, who: int) -> None:
        nonlocal inside, most
        async with store.exclusive(key):
            inside += 1
            most = max(most, inside)
            entered.append(who)
            await asyncio.sleep(0.3)
            inside -= 1

    async with asyncio.timeout(30):
        await asyncio.gather(*(hold(store, who) for who, store in enumerate([first, second, first, second])))
    assert most == 1 and sorted(entered) == [0, 1, 2, 3]
    # A held key does not hold up another one.
    async with first.exclusive(key), asyncio.timeout(5), second.exclusive(other):
        pass
    if backend.name != "filesystem":
        assert backend.object_names("locks/builds/") == [], "released leases are deleted"
    else:
        assert list((backend.storage_path / "locks").iterdir()) == [], "released locks leave no file"


async def test_exclusive_is_kept_by_a_live_holder(backend: Backend, tmp_path: Path) -> None:
    """A holder that works for longer than the lease renews it: nobody takes it over."""
    first, second = replicas(backend, tmp_path, ttl=1.5)
    key = f"builds/{uuid.uuid4().hex}"
    events: list[str] = []

    async def long_holder() -> None:
        async with first.exclusive(key):
            events.append("first in")
            await asyncio.sleep(4.0)  # more than twice the lease
            events.append("first out")

    async def waiter() -> None:
        await asyncio.sleep(0.2)
        async with second.exclusive(key):
            events.append("second in")

    async with asyncio.timeout(30):
        await asyncio.gather(long_holder(), waiter())
    assert events == ["first in", "first out", "second in"]


async def test_exclusive_is_cancellation_safe(backend: Backend, tmp_path: Path) -> None:
    """Cancelled waiters and holders leave no lock behind: with a lease far
    longer than the test, the next holder gets in at once."""
    first, second = replicas(backend, tmp_path, ttl=120.0)
    key = f"builds/{uuid.uuid4().hex}"
    holding = asyncio.Event()

    async def hold_forever(store: Storage) -> None:
        async with store.exclusive(key):
            holding.set()
            await asyncio.sleep(3600)

    holder = asyncio.create_task(hold_forever(first))
    await asyncio.wait_for(holding.wait(), 10)
    waiter = asyncio.create_task(hold_forever(second))
    await asyncio.sleep(0.5)
    assert not waiter.done()
    waiter.cancel()
    holder.cancel()
    for task in (holder, waiter):
        with pytest.raises(asyncio.CancelledError):
            await task
    async with asyncio.timeout(5), second.exclusive(key):
        pass
    holding.clear()
    holder = asyncio.create_task(hold_forever(second))
    await asyncio.sleep(0)  # cancelled before or while taking the lock
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    await asyncio.sleep(1.0)  # a lock that landed after the cancellation is removed in the background
    async with asyncio.timeout(5), first.exclusive(key):
        pass


async def test_exclusive_is_lost_by_a_dead_holder(backend: Backend, tmp_path: Path) -> None:
    """kill -9 of the holder: the others wait while it lives, and get the lock
    once its lease runs out (at once on the filesystem: flock dies with it)."""
    key = f"builds/{uuid.uuid4().hex}"
    async with lease_holder(backend, key, TEST_LEASE) as holder:
        if backend.name != "filesystem":
            backend.storage_path = tmp_path / "replica-2"
        store = with_lease(backend.open())
        entered = asyncio.Event()

        async def wait_for_lock() -> None:
            async with store.exclusive(key):
                entered.set()

        waiter = asyncio.create_task(wait_for_lock())
        await asyncio.sleep(1.5 * TEST_LEASE)  # longer than a lease: the holder lives and renews
        assert not entered.is_set()
        holder.kill()
        await holder.wait()
        killed = time.monotonic()
        await asyncio.wait_for(waiter, 4 * TEST_LEASE + 5)
        assert time.monotonic() - killed <= 2 * TEST_LEASE + 3
