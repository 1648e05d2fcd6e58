"""Registry processes on a SeaweedFS of their own (no other test's buckets):
which buckets they write to, how they answer while the store is stalled, and
what their readiness endpoint says.

The registry reaches the store as operators set it up for an S3-compatible
store: S3_ENDPOINT, and no S3_PATH_STYLE.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from nixery import auth
from nixery.registry.digest import Digest
from tests.daemons import fetch
from tests.registry import RegistryProcess, check_blob_ranges, slow_package_set
from tests.storage.proxy import TCPProxy
from tests.storage.servers import S3Server, seaweedfs


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs-own")) as server:
        yield server


def s3_env(server: S3Server, endpoint: str | None = None, **extra: str) -> dict[str, str]:
    return {
        "NIXERY_STORAGE_BACKEND": "s3",
        "NIXERY_BUNDLED_SET": "busybox",
        "S3_BUCKET": server.bucket,
        "S3_ENDPOINT": endpoint or server.endpoint,  # and no S3_PATH_STYLE
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        **extra,
    }


def all_objects(server: S3Server) -> dict[str, list[str]]:
    """Every object in every bucket of the store, by bucket."""
    client = server.client()
    found: dict[str, list[str]] = {}
    for bucket in client.list_buckets()["Buckets"]:
        keys = found.setdefault(bucket["Name"], [])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            keys += [item["Key"] for item in page.get("Contents", [])]
    return found


def test_every_object_is_in_the_bucket(own_s3: S3Server, start_registry) -> None:
    registry = start_registry(**s3_env(own_s3))
    _, manifest = registry.manifest("shell/hello")
    layer = manifest["layers"][0]["digest"]

    status, headers, _ = registry.request(f"/v2/shell/hello/blobs/{layer}", accept=None)
    assert status == 307
    location = urlsplit(headers["Location"])
    assert f"{location.scheme}://{location.netloc}" == own_s3.endpoint
    assert location.path == f"/{own_s3.bucket}/blobs/sha256/{Digest.parse(layer).hex}"
    status, body = fetch(headers["Location"])
    assert status == 200 and str(Digest.of(body)) == layer

    objects = all_objects(own_s3)
    assert set(objects) == {own_s3.bucket}, f"buckets other than S3_BUCKET appeared: {sorted(objects)}"
    prefixes = {key.split("/", 1)[0] for key in objects[own_s3.bucket]}
    assert {"blobs", "meta"} <= prefixes <= {"blobs", "meta", "locks", "touched", "probes"}


def test_streamed_blobs_answer_ranges_and_conditions(own_s3: S3Server, start_registry) -> None:
    """With NIXERY_BLOB_REDIRECT=false the registry relays blobs from the bucket; a
    range is then answered as for a blob file (206, 416, 304, 412), not with the whole blob."""
    registry = start_registry(**s3_env(own_s3, NIXERY_BLOB_REDIRECT="false"))
    check_blob_ranges(registry, "shell/hello")


def timed_request(registry: RegistryProcess, method: str, path: str) -> tuple[int, bytes, float]:
    started = time.monotonic()
    status, _, body = registry.request(path, method=method, accept=None, timeout=120)
    return status, body, time.monotonic() - started


def wait_for_readiness(registry: RegistryProcess, status: int, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        answer, body, elapsed = timed_request(registry, "GET", "/readyz")
        assert elapsed < 5.0, f"the readiness probe waited {elapsed:.1f}s"
        if answer == status:
            return json.loads(body)
        assert time.monotonic() < deadline, f"/readyz still answers {answer} after {within}s"
        time.sleep(0.5)


async def noting_proxy(own_s3: S3Server) -> tuple[TCPProxy, list[bytes]]:
    """A started proxy in front of the store that notes the head of every request (and fails none)."""
    proxy = TCPProxy(int(own_s3.endpoint.rsplit(":", 1)[1]))
    heads: list[bytes] = []
    proxy.fail_request = lambda head: bool(heads.append(head))
    await proxy.start()
    return proxy, heads


async def test_readiness_is_cheap_open_and_discreet(own_s3: S3Server, start_registry, tmp_path: Path) -> None:
    """With access control on, the kubelet (no credentials) reaches /readyz; many
    probes cost the store one request; "not ready" names nothing of the store."""
    users = tmp_path / "users"
    users.write_text(f"alice:{auth.hash_password('alice-secret', log_n=10)}:pull,build\n")
    proxy, heads = await noting_proxy(own_s3)
    registry: RegistryProcess | None = None
    try:
        env = s3_env(own_s3, proxy.url, NIXERY_AUTH="basic", NIXERY_AUTH_USERS=str(users))
        registry = await asyncio.to_thread(start_registry, **env)
        assert (await asyncio.to_thread(timed_request, registry, "GET", "/v2/"))[0] == 401

        def listings() -> int:
            return sum(b"list-type=2" in head for head in heads)

        assert await asyncio.to_thread(wait_for_readiness, registry, 200, 10) == {"ready": True}
        before = listings()
        for _ in range(20):
            status, _, _ = await asyncio.to_thread(timed_request, registry, "GET", "/readyz")
            assert status == 200
        assert listings() - before <= 1, "probes within a few seconds share one check of the store"

        proxy.stall()
        answer = await asyncio.to_thread(wait_for_readiness, registry, 503, 15)
        assert answer == {"ready": False, "reason": "storage unavailable"}
        _, _, body = await asyncio.to_thread(registry.request, "/readyz", accept=None)
        port = own_s3.endpoint.rsplit(":", 1)[1]
        assert own_s3.bucket.encode() not in body and str(proxy.port).encode() not in body and port.encode() not in body
        basic = base64.b64encode(b"alice:alice-secret").decode()
        status, _, _ = await asyncio.to_thread(registry.request, "/v2/", headers={"Authorization": f"Basic {basic}"})
        assert status == 200  # alive all along

        proxy.resume()
        assert await asyncio.to_thread(wait_for_readiness, registry, 200, 30) == {"ready": True}
        assert registry.log_events("readiness.storage_unavailable"), "the operator finds the reason in the log"
    finally:
        proxy.resume()
        if registry is not None:
            await asyncio.to_thread(registry.stop)
        await proxy.stop()


#: The longest a client should wait for a 503 while the store is stalled (the
#: registry gives up after about 10 s; it used to take 60 s).
QUICKLY = 20.0


def test_stalled_store_answers_503_quickly_then_serves_again(own_s3: S3Server, start_registry) -> None:
    """SeaweedFS stopped (SIGSTOP): it accepts connections and answers nothing.
    Manifest, blob and build requests answer 503 (kind STORAGE_UNAVAILABLE) within
    seconds, readiness says "not ready" while liveness (/v2/) still answers,
    and the same process serves again once the store continues."""
    registry = start_registry(**s3_env(own_s3))
    manifest_digest, manifest = registry.manifest("shell/hello")
    layer = manifest["layers"][0]["digest"]
    registry.stop()
    registry.start()  # nothing in memory: every answer below needs the store

    assert own_s3.process is not None
    os.kill(own_s3.process.pid, signal.SIGSTOP)
    try:
        requests = [
            ("GET", "/v2/shell/hello/manifests/latest"),
            ("GET", f"/v2/shell/hello/manifests/{manifest_digest}"),
            ("GET", f"/v2/shell/hello/blobs/{layer}"),
            ("HEAD", f"/v2/shell/hello/blobs/{layer}"),
            ("GET", "/v2/cowsay/figlet/manifests/latest"),  # not built: a build
        ]
        with ThreadPoolExecutor(len(requests) + 1) as pool:  # at once: each is timed on its own
            readiness = pool.submit(timed_request, registry, "GET", "/readyz")
            answers = list(pool.map(lambda request: timed_request(registry, *request), requests))
            ready_status, ready_body, ready_elapsed = readiness.result()
        for (method, path), (status, body, elapsed) in zip(requests, answers, strict=True):
            assert status == 503, (method, path, status, body[:500])
            assert elapsed < QUICKLY, f"{method} {path} took {elapsed:.1f}s to answer 503"
            if method == "GET":
                (error,) = json.loads(body)["errors"]
                assert error["code"] == "UNAVAILABLE"
                assert error["detail"] == {"backend": "s3", "kind": "STORAGE_UNAVAILABLE"}
        assert (ready_status, json.loads(ready_body)) == (503, {"ready": False, "reason": "storage unavailable"})
        assert ready_elapsed < 5.0, f"the readiness probe waited {ready_elapsed:.1f}s"
        assert timed_request(registry, "GET", "/v2/")[0] == 200  # alive: no restart needed
    finally:
        os.kill(own_s3.process.pid, signal.SIGCONT)

    wait_for_readiness(registry, 200, within=30)
    status, headers, _ = registry.request(f"/v2/shell/hello/blobs/{layer}", accept=None)
    assert status == 307
    assert registry.manifest("shell/hello")[0] == manifest_digest


async def test_a_blob_asked_for_as_a_manifest_is_read_from_the_store_once(
    own_s3: S3Server, start_registry
) -> None:
    """A layer or a config asked for by digest as a manifest is 404 MANIFEST_UNKNOWN; each such
    request downloaded the blob from the bucket again (up to 4 MiB for a 200-byte answer)."""
    proxy, heads = await noting_proxy(own_s3)
    registry: RegistryProcess | None = None
    try:
        registry = await asyncio.to_thread(start_registry, **s3_env(own_s3, proxy.url))
        _, manifest = await asyncio.to_thread(registry.manifest, "shell/hello")
        for blob in (manifest["config"]["digest"], manifest["layers"][0]["digest"]):
            key = f"/blobs/sha256/{Digest.parse(blob).hex}".encode()
            before = len(heads)
            for _ in range(10):
                status, _, body = await asyncio.to_thread(registry.request, f"/v2/shell/hello/manifests/{blob}")
                assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN", body
            reads = [head for head in heads[before:] if head.startswith(b"GET ") and key in head.split(b"\r\n")[0]]
            assert len(reads) <= 1, f"{blob} was read from the store {len(reads)} times"
    finally:
        if registry is not None:
            await asyncio.to_thread(registry.stop)
        await proxy.stop()


#: The Nix build of `slowpoke` (tests.registry.slow_package_set): the store is first needed after it.
SLOW_BUILD = 3


async def test_a_store_stalled_mid_build_answers_503_without_waiting_for_the_lease(
    own_s3: S3Server, start_registry, tmp_path: Path
) -> None:
    """The store stalls while a build holds its lease (as Nix builds). The build's first store
    call after it gives up within about 10 s, and the pull is answered 503 then: it used to wait
    on for the lease's renewal in flight (due 10 s after the lease was taken) and its release to
    give up too (8-10 s each; 29 s in the operators' audit). The release goes on in the
    background, and once the store is back the lease is released and the image built by the
    same process, with no restart."""
    pkgs = slow_package_set(tmp_path / "pkgs", seconds=SLOW_BUILD)
    proxy = TCPProxy(int(own_s3.endpoint.rsplit(":", 1)[1]))
    await proxy.start()
    registry: RegistryProcess | None = None
    try:
        env = s3_env(own_s3, proxy.url, NIXERY_PKGS_PATH=str(pkgs))
        registry = await asyncio.to_thread(start_registry, **env)
        pull = asyncio.ensure_future(
            asyncio.to_thread(timed_request, registry, "GET", "/v2/slowpoke/manifests/latest")
        )
        deadline = time.monotonic() + 30
        while not registry.log_events("build.realising"):  # the build holds its lease, and Nix builds
            assert time.monotonic() < deadline and not pull.done(), "the build did not start"
            await asyncio.sleep(0.02)
        proxy.stall()
        stalled_at = time.monotonic()
        status, body, _ = await pull
        waited = time.monotonic() - stalled_at
        assert status == 503, body[:500]
        (error,) = json.loads(body)["errors"]
        assert error["detail"] == {"backend": "s3", "kind": "STORAGE_UNAVAILABLE"}, error
        # The Nix build, then the documented ~10 s for the store call that finds the store stalled.
        assert waited < SLOW_BUILD + 12, f"the pull was answered {waited:.1f}s after the store stalled"
        assert registry.log_events("build.failed")

        proxy.resume()
        status, body, elapsed = await asyncio.to_thread(timed_request, registry, "GET", "/v2/slowpoke/manifests/latest")
        assert status == 200, body[:500]
        assert not registry.log_events("lease.taken_over"), "the lease was released, not left to run out"
    finally:
        proxy.resume()
        if registry is not None:
            await asyncio.to_thread(registry.stop)
        await proxy.stop()
