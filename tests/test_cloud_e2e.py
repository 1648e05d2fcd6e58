"""The registry on cloud storage, end to end: real `nixery serve` processes,
real container clients, real object stores (S3: SeaweedFS, which checks
signatures and expiry of presigned URLs; GCS: fake-gcs-server).

Every registry reaches its bucket through a TCP proxy run by the test (in a
thread of its own: the tests themselves block on clients). The proxy notes
each HTTP request line that goes through it, so the tests see which objects
clients download with a signed URL and what the registries upload; stopping
it takes the bucket away while the registry keeps running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from nixery import maintenance
from nixery.app import open_storage
from nixery.config import load
from nixery.registry.digest import Digest
from tests.daemons import fetch
from tests.registry import (
    BASELINE_EVALUATIONS,
    PODMAN_RUN_FLAGS,
    RegistryProcess,
    busybox_set_with,
    have,
    nix_calls_of,
    run,
    skopeo_to_oci,
    unpack_oci,
)
from tests.storage.conftest import make_signing_key
from tests.storage.proxy import TCPProxy
from tests.storage.servers import GCSServer, S3Server, fake_gcs, seaweedfs

pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(not (have("skopeo") and have("umoci") and have("podman")), reason="needs skopeo, umoci, podman"),
]

#: The longest a user should wait for the 503 when the bucket is unreachable.
QUICKLY = 20.0
_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n")


# ---- a proxy in front of the object store, in its own thread ---------------


class SniffingProxy(TCPProxy):
    """tests/storage/proxy.py's proxy, also noting request lines and bytes sent back."""

    def __init__(self, upstream_port: int):
        super().__init__(upstream_port)
        self.requests: list[tuple[str, str]] = []
        self.downstream_bytes = 0

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool) -> None:
        pending = b""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(64 * 1024):
                writer.write(data)
                await writer.drain()
                if not count:
                    self.downstream_bytes += len(data)
                    continue
                self.upstream_bytes += len(data)
                pending += data
                consumed = 0
                for match in _REQUEST_LINE.finditer(pending):
                    self.requests.append((match[1].decode(), match[2].decode()))
                    consumed = match.end()
                pending = pending[consumed:][-8192:]
            if writer.can_write_eof():
                writer.write_eof()


class ProxyThread:
    def __init__(self, upstream_port: int):
        self.proxy = SniffingProxy(upstream_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="store-proxy", daemon=True)
        self._thread.start()
        self.start()

    def _run(self, work: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(30)

    @property
    def url(self) -> str:
        return self.proxy.url

    def start(self) -> None:
        """Listen (again, on the same port): the bucket is reachable."""
        self._run(self.proxy.start())

    def stop(self) -> None:
        """Refuse connections and cut open ones: the bucket is unreachable."""
        self._run(self.proxy.stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def mark(self) -> int:
        return len(self.proxy.requests)

    def requests_since(self, mark: int) -> list[tuple[str, str]]:
        return list(self.proxy.requests[mark:])


# ---- the two clouds ---------------------------------------------------------


@dataclass
class Cloud:
    name: str
    proxy: ProxyThread
    bucket: str
    s3: S3Server | None = None
    gcs: GCSServer | None = None
    key_dir: Path | None = None

    @property
    def signature_param(self) -> str:
        return "X-Amz-Signature" if self.name == "s3" else "X-Goog-Signature"

    def env(self, bucket: str | None = None, **extra: str) -> dict[str, str]:
        """A registry's environment for this bucket; the registry reaches it through the proxy."""
        env = {"NIXERY_STORAGE_BACKEND": self.name, "NIXERY_BUNDLED_SET": "busybox"}
        if self.s3 is not None:
            env |= {
                "S3_BUCKET": bucket or self.bucket, "S3_ENDPOINT": self.proxy.url, "S3_PATH_STYLE": "true",
                "S3_REGION": self.s3.region, "AWS_ACCESS_KEY_ID": self.s3.access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            }  # fmt: skip
        else:
            assert self.key_dir is not None
            key = make_signing_key(self.key_dir)
            env |= {
                "GCS_BUCKET": bucket or self.bucket, "STORAGE_EMULATOR_HOST": self.proxy.url,
                "GCS_SIGNING_KEY": str(key.pem_path), "GCS_SIGNING_ACCOUNT": key.account,
            }  # fmt: skip
        return env | extra

    def object_versions(self, prefix: str) -> dict[str, str]:
        """Objects under `prefix` with their ETag or generation, asked of the store directly."""
        if self.s3 is not None:
            listing = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
            return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}
        assert self.gcs is not None
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="test",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=self.gcs.endpoint),
        )
        try:
            return {blob.name: str(blob.generation) for blob in client.list_blobs(self.bucket, prefix=prefix)}
        finally:
            client.close()

    def signed_downloads(self, mark: int) -> set[str]:
        """Hex digests of the blobs fetched from the bucket with a signed URL since `mark`."""
        fetched = set()
        for method, target in self.proxy.requests_since(mark):
            path, _, query = target.partition("?")
            found = re.fullmatch(rf"/{self.bucket}/blobs/sha256/([0-9a-f]{{64}})", path)
            if method == "GET" and found and self.signature_param in query:
                fetched.add(found[1])
        return fetched

    def blob_writes(self, mark: int) -> list[tuple[str, str]]:
        """Requests since `mark` that write (or start writing) a blob into the bucket."""
        return [(m, t) for m, t in self.proxy.requests_since(mark) if m in ("PUT", "POST") and "blobs/" in unquote(t)]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def s3_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        proxy = ProxyThread(_port(server.endpoint))
        try:
            yield Cloud("s3", proxy, server.bucket, s3=server)
        finally:
            proxy.close()


@pytest.fixture(scope="module")
def gcs_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    proxy = ProxyThread(0)
    try:
        # The emulator advertises the proxy (resumable upload sessions go through it too).
        with fake_gcs(tmp_path_factory.mktemp("fake-gcs"), external_url=proxy.url) as server:
            proxy.proxy.upstream_port = _port(server.endpoint)
            yield Cloud("gcs", proxy, server.bucket, gcs=server, key_dir=tmp_path_factory.mktemp("gcs-key"))
    finally:
        proxy.close()


@pytest.fixture(params=["s3", "gcs"])
def cloud(request: pytest.FixtureRequest) -> Cloud:
    return request.getfixturevalue(f"{request.param}_cloud")


# ---- what the registry says about itself --------------------------------------


def blob_responses(registry: RegistryProcess, method: str = "GET") -> list[tuple[str, int]]:
    """(digest, status) of the blob requests in the registry's request log."""
    seen = []
    for line in registry.log().splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == "http.request" and entry["method"] == method and "/blobs/" in entry["path"]:
                seen.append((entry["path"].rsplit("/", 1)[1], entry["status"]))
    return seen


def blob_bytes_served(registry: RegistryProcess) -> float:
    status, _, body = registry.request("/metrics", accept=None)
    assert status == 200
    found = re.search(rb"^nixery_blob_served_bytes_total ([0-9.e+]+)$", body, re.MULTILINE)
    assert found, "the metrics lack nixery_blob_served_bytes_total"
    return float(found[1])


def image_blobs(manifest: dict[str, Any]) -> set[str]:
    return {Digest.parse(d["digest"]).hex for d in [manifest["config"], *manifest["layers"]]}


def registry_error(body: bytes) -> dict[str, Any]:
    (error,) = json.loads(body)["errors"]
    return error


def podman(root: Path, *args: str) -> str:
    """podman with storage of its own, so no layer is already there from other runs."""
    # podman wants its run root short (at most 50 characters).
    with tempfile.TemporaryDirectory(prefix="nixery-podman-", dir="/tmp") as runroot:
        return run(["podman", "--root", str(root), "--runroot", runroot, *args], timeout=300).stdout


def pull_unpack_and_run(registry: RegistryProcess, image: str, where: Path, *command: str) -> str:
    where.mkdir(parents=True, exist_ok=True)
    skopeo_to_oci(f"{registry.host}/{image}", where / "layout")
    rootfs = unpack_oci(where / "layout", where / "bundle")
    return run(["chroot", str(rootfs), *command]).stdout


# ---- the tests ----------------------------------------------------------------


def test_clients_pull_through_signed_redirects(cloud: Cloud, start_registry, tmp_path: Path) -> None:
    """podman and skopeo pull through 307s to signed URLs, get every layer from
    the bucket, and run the image; the registry sends no layer bytes."""
    registry = start_registry(**cloud.env())
    mark, from_bucket = cloud.proxy.mark(), cloud.proxy.proxy.downstream_bytes
    image = f"{registry.host}/shell/hello"
    output = podman(tmp_path / "podman", "run", "--rm", "--tls-verify=false", *PODMAN_RUN_FLAGS, image,
                    "sh", "-c", "hello && echo ok")  # fmt: skip
    assert output.splitlines()[-2:] == ["Hello, world!", "ok"]
    _, manifest = registry.manifest("shell/hello")
    assert cloud.signed_downloads(mark) >= image_blobs(manifest), "podman got every blob from the bucket"
    assert cloud.proxy.proxy.downstream_bytes - from_bucket >= sum(layer["size"] for layer in manifest["layers"])

    mark = cloud.proxy.mark()
    assert pull_unpack_and_run(registry, "shell/hello", tmp_path / "skopeo", "/bin/sh", "-c", "hello") == (
        "Hello, world!\n"
    )
    assert cloud.signed_downloads(mark) >= image_blobs(manifest), "skopeo got every blob from the bucket"

    answered = blob_responses(registry)
    assert answered and {status for _, status in answered} == {307}
    assert blob_bytes_served(registry) == 0
    # The redirect itself: to the bucket's host, signed, short-lived.
    layer = manifest["layers"][0]["digest"]
    status, headers, _ = registry.request(f"/v2/shell/hello/blobs/{layer}", accept=None)
    assert status == 307
    location = urlsplit(headers["Location"])
    assert f"{location.scheme}://{location.netloc}" == cloud.proxy.url
    query = parse_qs(location.query)
    assert cloud.signature_param in query
    assert (query.get("X-Amz-Expires") or query["X-Goog-Expires"]) == ["300"]


def test_registry_streams_when_redirects_are_off(cloud: Cloud, start_registry, tmp_path: Path) -> None:
    registry = start_registry(**cloud.env(NIXERY_BLOB_REDIRECT="false"))
    mark = cloud.proxy.mark()
    assert "##### hi #####" in pull_unpack_and_run(registry, "shell/figlet", tmp_path, "/bin/sh", "-c", "figlet hi")
    _, manifest = registry.manifest("shell/figlet")
    answered = blob_responses(registry)
    assert answered and {status for _, status in answered} == {200}
    assert cloud.signed_downloads(mark) == set(), "the client never went to the bucket"
    layer_bytes = sum(layer["size"] for layer in manifest["layers"])
    assert blob_bytes_served(registry) >= layer_bytes


def test_a_relayed_download_cut_short_is_not_a_server_error(s3_cloud: Cloud, start_registry, tmp_path: Path) -> None:
    """With redirects off the registry relays each blob from the bucket. A client that hangs up
    in the middle of one (a cancelled pull) was answered as an internal error: counted as a 500
    in nixery_http_requests_total and logged as http.internal_error with a traceback, so an alert
    on server errors fired for cancelled pulls. It is now the 200 that was under way, cut short."""
    pkgs = busybox_set_with(
        tmp_path / "pkgs", "noise", "noise-1.0", "$bb/mkdir -p $out; $bb/head -c 33554432 /dev/urandom > $out/noise"
    )
    registry = start_registry(**s3_cloud.env(NIXERY_BLOB_REDIRECT="false", NIXERY_PKGS_PATH=str(pkgs)))
    _, manifest = registry.manifest("noise")
    layer = max(manifest["layers"], key=lambda blob: blob["size"])
    assert layer["size"] > 32 << 20
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", registry.port))
        client.sendall(f"GET /v2/noise/blobs/{layer['digest']} HTTP/1.1\r\nHost: registry\r\n\r\n".encode())
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 60
    while not blob_responses(registry):  # logged once the registry is done with the request
        assert time.monotonic() < deadline, "the cut-short download never ended"
        time.sleep(0.05)
    assert blob_responses(registry) == [(layer["digest"], 200)]
    assert not registry.log_events("http.internal_error")
    status, _, body = registry.request("/metrics", accept=None)
    assert status == 200
    assert b'nixery_http_requests_total{method="GET",route="/v2/{name}/blobs/{digest}",status="500"}' not in body
    assert b'nixery_http_requests_total{method="GET",route="/v2/{name}/blobs/{digest}",status="200"} 1.0' in body
    assert blob_bytes_served(registry) < layer["size"] / 2  # whole chunks handed to the connection


def test_second_replica_serves_without_build_or_upload(
    cloud: Cloud, start_registry, nix_calls: tuple[str, Path], tmp_path: Path
) -> None:
    """Replicas on one bucket, each with its own STORAGE_PATH: asked at once,
    they build an image once; what one built, the other serves as it is."""
    path, calls = nix_calls
    first = start_registry(**cloud.env(PATH=path))
    second = start_registry(**cloud.env(PATH=path))
    assert first.storage != second.storage
    evaluations = len(nix_calls_of(calls, "nix-instantiate"))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        digests = list(pool.map(lambda registry: registry.manifest("fortune/cowsay")[0], [first, second]))
    assert digests[0] == digests[1]
    # One build: its names, and the baseline's (looked up by the process that builds).
    built_once = evaluations + 1 + BASELINE_EVALUATIONS
    assert len(nix_calls_of(calls, "nix-instantiate")) == built_once, "one build for both replicas"

    first.manifest("shell/greet")  # built by the first only
    evaluations = len(nix_calls_of(calls, "nix-instantiate"))
    blobs_before = cloud.object_versions("blobs/")
    mark = cloud.proxy.mark()
    output = pull_unpack_and_run(second, "shell/greet", tmp_path, "/bin/sh", "-c", "greet")
    assert output.strip()
    assert len(nix_calls_of(calls, "nix-instantiate")) == evaluations, "the second replica built nothing"
    assert cloud.blob_writes(mark) == [], "the second replica uploaded nothing"
    assert cloud.object_versions("blobs/") == blobs_before
    assert first.manifest("shell/greet")[0] == second.manifest("shell/greet")[0]


def test_expired_signed_url_is_refused_and_a_new_request_gets_a_fresh_one(s3_cloud: Cloud, start_registry) -> None:
    registry = start_registry(**s3_cloud.env(NIXERY_SIGNED_URL_TTL="10"))
    _, manifest = registry.manifest("shell/hello")
    digest = Digest.parse(max(manifest["layers"], key=lambda layer: layer["size"])["digest"])
    signed_at = time.time()
    status, headers, _ = registry.request(f"/v2/shell/hello/blobs/{digest}", accept=None)
    assert status == 307
    old = headers["Location"]
    assert parse_qs(urlsplit(old).query)["X-Amz-Expires"] == ["10"]
    status, body = fetch(old)
    assert status == 200 and Digest.of(body) == digest

    time.sleep(max(0.0, signed_at + 11.5 - time.time()))
    status, body = fetch(old)
    assert status == 403, "SeaweedFS refuses the expired URL"
    assert b"AccessDenied" in body or b"expired" in body.lower()

    status, headers, _ = registry.request(f"/v2/shell/hello/blobs/{digest}", accept=None)
    assert status == 307 and headers["Location"] != old
    status, body = fetch(headers["Location"])
    assert status == 200 and Digest.of(body) == digest


def test_unreachable_bucket_answers_503_quickly_and_the_registry_recovers(cloud: Cloud, start_registry) -> None:
    registry = start_registry(**cloud.env())
    _, manifest = registry.manifest("shell/hello")
    layer = manifest["layers"][0]["digest"]
    unbuilt = "cowsay/figlet"

    cloud.proxy.stop()
    try:
        for method, path in [
            ("GET", f"/v2/{unbuilt}/manifests/latest"),
            ("GET", f"/v2/shell/hello/blobs/{layer}"),
            ("HEAD", f"/v2/shell/hello/blobs/{layer}"),
        ]:
            started = time.monotonic()
            status, _, body = registry.request(path, method=method, timeout=60)
            elapsed = time.monotonic() - started
            assert status == 503, (method, path, status, body[:500])
            assert elapsed < QUICKLY, f"{method} {path} took {elapsed:.1f}s to fail"
            if method == "GET":
                error = registry_error(body)
                assert error["code"] == "UNAVAILABLE"
                assert error["detail"] == {"backend": cloud.name, "kind": "STORAGE_UNAVAILABLE"}
                assert f"storage backend {cloud.name} is unavailable" in error["message"]
    finally:
        cloud.proxy.start()

    # The same process, once the bucket is back: no restart needed.
    digest, rebuilt = registry.manifest(unbuilt)
    assert rebuilt["layers"]
    status, headers, _ = registry.request(f"/v2/shell/hello/blobs/{layer}", accept=None)
    assert status == 307
    status, body = fetch(headers["Location"])
    assert status == 200 and "sha256:" + hashlib.sha256(body).hexdigest() == layer


def test_check_and_garbage_collection_on_s3(
    s3_cloud: Cloud, start_registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nixery check` and `nixery gc` on a bucket: an image nobody used for
    40 days goes, with the blobs only it used; a used one stays whole."""
    assert s3_cloud.s3 is not None
    bucket = "nixery-gc"
    s3 = s3_cloud.s3.client()
    s3.create_bucket(Bucket=bucket)
    env = s3_cloud.env(bucket=bucket)
    registry = start_registry(**env)
    _, kept = registry.manifest("shell/hello")
    _, dropped = registry.manifest("bigdata")
    registry.stop()

    cli_env = {**env, "STORAGE_PATH": str(tmp_path / "cli")}
    checked = run([sys.executable, "-m", "nixery", "check"], env_extra=cli_env).stdout
    assert "and 2 images: ok" in checked
    dry = run([sys.executable, "-m", "nixery", "gc", "--dry-run"], env_extra=cli_env).stdout
    assert "would remove 0 images and 0 blobs" in dry  # everything is fresh

    later = time.time() + 40 * 86400
    monkeypatch.setattr(maintenance.time, "time", lambda: later)

    def big_layer_exists() -> bool:
        big = Digest.parse(max(dropped["layers"], key=lambda layer: layer["size"])["digest"])
        return bool(s3.list_objects_v2(Bucket=bucket, Prefix=f"blobs/sha256/{big.hex}").get("KeyCount"))

    async def collect() -> maintenance.GarbageReport:
        storage = open_storage(load(cli_env))
        try:
            records, _ = await maintenance._records(storage)
            kept_key = next(key for key, record in records.items() if record.name == "shell/hello")
            usage_key = maintenance.USAGE_PREFIX + kept_key.removeprefix("images/")
            await storage.put_meta(usage_key, json.dumps({"last_used": later - 3600}).encode())
            return await maintenance.collect_garbage(storage, older_than=30 * 86400)
        finally:
            await storage.close()

    assert big_layer_exists()
    report = asyncio.run(collect())
    assert (report.images_removed, report.images_kept) == (1, 1)
    assert report.bytes_freed >= max(layer["size"] for layer in dropped["layers"])
    assert not big_layer_exists(), "the big layer is gone from the bucket"
    remaining = set(object_keys(s3, bucket, "blobs/sha256/"))
    assert {f"blobs/sha256/{hex_}" for hex_ in image_blobs(kept)} <= remaining
    assert "and 1 image: ok" in run([sys.executable, "-m", "nixery", "check"], env_extra=cli_env).stdout

    registry.start()  # the collected image is built again on request
    _, again = registry.manifest("bigdata")
    for layer in again["layers"]:
        assert registry.request(f"/v2/bigdata/blobs/{layer['digest']}", method="HEAD")[0] == 200


def object_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys
