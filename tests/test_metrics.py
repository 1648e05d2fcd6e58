"""`/metrics` against a real registry: it parses, and its counters follow pulls."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families

from tests.registry import RegistryProcess, busybox_set_with, slow_package_set

pytestmark = pytest.mark.nix

MANIFEST_ROUTE = "/v2/{name}/manifests/{reference}"
BLOB_ROUTE = "/v2/{name}/blobs/{digest}"


def scrape(registry: RegistryProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    status, headers, body = registry.request("/metrics", accept="text/plain")
    assert status == 200
    # The content type of the body, the classic text format 0.0.4 (it was `version=1.0.0`).
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert choose_encoder("")[1] == headers["Content-Type"]  # as prometheus_client labels what it writes
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples, name: str, **labels: str) -> float:
    """Sum over the samples whose labels include `labels`."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)
    )


def pull(registry: RegistryProcess, name: str) -> int:
    """Manifest, config and every layer, as a client pulls; returns the layer bytes received."""
    _, manifest = registry.manifest(name)
    received = 0
    for blob in [manifest["config"], *manifest["layers"]]:
        status, _, body = registry.request(f"/v2/{name}/blobs/{blob['digest']}", accept=None)
        assert status == 200 and len(body) == blob["size"]
        received += len(body)
    return received


def test_metrics_follow_pulls(registry: RegistryProcess) -> None:
    before = scrape(registry)
    assert value(before, "nixery_builds_total", result="done") == 0
    assert ("nixery_builds_total", (("result", "not_found"),)) in before  # present from the start
    assert value(before, "nixery_cache_hits_total", cache="image") == 0

    received = pull(registry, "shell/hello")
    after = scrape(registry)
    # Requests, by route pattern (never the raw path) and status.
    assert value(after, "nixery_http_requests_total", method="GET", route=MANIFEST_ROUTE, status="200") == 1
    assert value(after, "nixery_http_requests_total", method="GET", route=BLOB_ROUTE, status="200") >= 2
    assert not any("shell/hello" in dict(labels).get("route", "") for _, labels in after)
    # One build, its duration, its layers (all new in empty storage).
    assert value(after, "nixery_builds_total", result="done") == 1
    assert value(after, "nixery_builds_total", result="failed") == 0
    assert value(after, "nixery_build_duration_seconds_count", result="done") == 1
    assert value(after, "nixery_build_duration_seconds_sum", result="done") > 0
    assert value(after, "nixery_builds_running") == 0
    created = value(after, "nixery_layers_total", outcome="created")
    assert created >= 2
    assert value(after, "nixery_cache_misses_total", cache="layer") == created
    assert value(after, "nixery_layer_compressed_bytes_total") > 0
    assert value(after, "nixery_cache_misses_total", cache="image") == 1
    # Bytes served: the blobs just fetched, exactly.
    assert value(after, "nixery_blob_served_bytes_total") == received
    # Nix ran and nothing of it is left running but the long-running evaluator (nixery/nix/evaluator.py).
    assert value(after, "nixery_nix_processes_running", command="nix-repl") == 1
    assert total(after, "nixery_nix_processes_running") == 1

    # The second pull is an image cache hit: no new build, no new layer.
    received_again = pull(registry, "shell/hello")
    again = scrape(registry)
    hits = value(after, "nixery_cache_hits_total", cache="image")
    assert value(again, "nixery_cache_hits_total", cache="image") == hits + 1
    assert value(again, "nixery_builds_total", result="done") == 1
    assert value(again, "nixery_layers_total", outcome="created") == created
    assert value(again, "nixery_http_requests_total", method="GET", route=MANIFEST_ROUTE, status="200") == 2
    assert value(again, "nixery_blob_served_bytes_total") == received + received_again

    # A new image sharing layers with the first reuses them.
    pull(registry, "shell/fortune")
    third = scrape(registry)
    assert value(third, "nixery_builds_total", result="done") == 2
    assert value(third, "nixery_layers_total", outcome="reused") >= 1
    reused = value(third, "nixery_layers_total", outcome="reused")
    assert value(third, "nixery_cache_hits_total", cache="layer") == reused


def test_failures_unknown_names_and_unmatched_routes(start_registry) -> None:
    """A build that fails is counted as failed; names the package set lacks (typos) are
    counted apart, as not_found, so that an alert on failed builds means something."""
    registry = start_registry(NIXERY_PKGS_PATH=str(Path(__file__).parent / "data" / "failing"))
    status, _, body = registry.request("/v2/shell/nosuchpackage/manifests/latest")
    assert status == 404, body
    status, _, body = registry.request("/v2/broken/manifests/latest")  # its Nix build fails
    assert status == 500, body
    status, _, _ = registry.request("/no/such/page/12345")
    assert status == 404
    samples = scrape(registry)
    assert value(samples, "nixery_builds_total", result="not_found") == 1
    assert value(samples, "nixery_builds_total", result="failed") == 1
    assert value(samples, "nixery_build_duration_seconds_count", result="failed") == 1
    assert value(samples, "nixery_build_duration_seconds_count", result="not_found") == 1
    assert value(samples, "nixery_http_requests_total", method="GET", route=MANIFEST_ROUTE, status="404") == 1
    assert value(samples, "nixery_http_requests_total", method="GET", route=MANIFEST_ROUTE, status="500") == 1
    assert value(samples, "nixery_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert not any("12345" in json.dumps(labels) for _, labels in samples)


def test_an_image_of_several_platforms_counts_each_platforms_build(start_registry, tmp_path: Path) -> None:
    """On a registry of two platforms, each platform's build is counted, and not the index that
    joins them: one package that fails to build on arm64 was counted as two failed builds (the
    arm64 build's and the image's), and every image as three builds."""
    from tests.test_platforms import _set_whose_arm64_build_fails

    registry = start_registry(NIXERY_PKGS_PATH=str(_set_whose_arm64_build_fails(tmp_path)),
                              NIXERY_PLATFORMS="linux/amd64,linux/arm64")
    assert registry.request("/v2/armfail/manifests/latest")[0] == 500  # builds for amd64, fails for arm64
    assert registry.request("/v2/figlet/manifests/latest")[0] == 200
    assert registry.request("/v2/figlett/manifests/latest")[0] == 404  # a typo: each platform's list lacks it
    samples = scrape(registry)
    assert value(samples, "nixery_builds_total", result="failed") == 1  # armfail's arm64 build
    assert value(samples, "nixery_builds_total", result="done") == 3  # armfail's amd64 build, figlet's two
    assert value(samples, "nixery_builds_total", result="not_found") == 2
    assert value(samples, "nixery_build_duration_seconds_count", result="failed") == 1
    assert value(samples, "nixery_builds_running") == 0


def test_a_build_run_by_another_process_counts_as_a_wait(start_registry, tmp_path: Path) -> None:
    """Two processes on one storage asked for the same new image at once: one builds it, the
    other waits for the storage's build lock and serves the result. One build, one wait."""
    pkgs = slow_package_set(tmp_path / "pkgs", seconds=3)
    storage = tmp_path / "shared-storage"
    registries = [start_registry(storage, NIXERY_PKGS_PATH=str(pkgs)) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        digests = set(pool.map(lambda registry: registry.manifest("slowpoke")[0], registries))
    assert len(digests) == 1
    samples = [scrape(registry) for registry in registries]
    assert sum(value(s, "nixery_builds_total", result="done") for s in samples) == 1
    assert sum(value(s, "nixery_build_duration_seconds_count", result="done") for s in samples) == 1
    assert sum(value(s, "nixery_builds_total", result="failed") for s in samples) == 0
    assert sum(value(s, "nixery_build_waits_total") for s in samples) == 1


def test_a_download_cut_short_counts_only_the_bytes_sent(start_registry, tmp_path: Path) -> None:
    """A client that reads the start of a 32 MB layer and hangs up (a cancelled pull) received a
    few of its bytes, not 32 MB: nixery_blob_served_bytes_total is what went out. It used to be
    the response's Content-Length, counted before the first byte was sent."""
    pkgs = busybox_set_with(
        tmp_path / "pkgs", "noise", "noise-1.0", "$bb/mkdir -p $out; $bb/head -c 33554432 /dev/urandom > $out/noise"
    )
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs))
    _, manifest = registry.manifest("noise")
    layer = max(manifest["layers"], key=lambda blob: blob["size"])
    assert layer["size"] > 32 << 20  # random bytes do not compress
    counted_before = value(scrape(registry), "nixery_blob_served_bytes_total")
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the server cannot hand it all to the kernel
        client.connect(("127.0.0.1", registry.port))
        client.sendall(f"GET /v2/noise/blobs/{layer['digest']} HTTP/1.1\r\nHost: registry\r\n\r\n".encode())
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
    # Closed with bytes unread: the registry's next send fails, and it counts what went out.
    deadline = time.monotonic() + 30
    while (counted := value(scrape(registry), "nixery_blob_served_bytes_total") - counted_before) == 0:
        assert time.monotonic() < deadline, "the cut-short download was never counted"
        time.sleep(0.05)
    assert 0 < counted < layer["size"] / 2
    samples = scrape(registry)
    assert value(samples, "nixery_http_requests_total", method="GET", route=BLOB_ROUTE, status="200") == 1


def test_made_up_methods_share_one_label(start_registry) -> None:
    """aiohttp's Python parser (used without its C extension; AIOHTTP_NO_EXTENSIONS selects it
    here) answers any token as a method, with 405. Each such method used to get a series of its
    own, so a client sending made-up methods grew /metrics without end; they are now `other`."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", AIOHTTP_NO_EXTENSIONS="1")
    for number in range(20):
        status, _, _ = registry.request("/v2/", method=f"X{number}", accept=None)
        assert status == 405
    status, _, _ = registry.request("/v2/", method="PROPFIND", accept=None)
    assert status == 405
    samples = scrape(registry)
    methods = {dict(labels).get("method") for name, labels in samples if name == "nixery_http_requests_total"}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other"}
    assert value(samples, "nixery_http_requests_total", method="other", route="unmatched", status="405") == 21


def test_a_pull_that_waits_for_a_long_build_lands_in_a_bucket(start_registry, tmp_path: Path) -> None:
    """A pull by tag waits for its image's build, minutes on a real package set. The request
    histogram's buckets used to end at 10 s (the client library's default), so every pull that
    built for longer counted only in +Inf: one of 11 s looked the same as one of 10 minutes."""
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs", seconds=11)))
    registry.manifest("slowpoke")
    samples = scrape(registry)
    buckets = {
        float(dict(labels)["le"]): count for (name, labels), count in samples.items()
        if name == "nixery_http_request_duration_seconds_bucket"
        and dict(labels)["route"] == MANIFEST_ROUTE and dict(labels)["method"] == "GET"
    }
    assert buckets[10.0] == 0 and buckets[float("inf")] == 1  # the build alone sleeps 11 s
    assert min(le for le, count in buckets.items() if count == 1) < float("inf")


def test_requests_that_cannot_be_parsed_are_counted(registry: RegistryProcess) -> None:
    """A request aiohttp cannot parse (TLS sent to the plain-HTTP port, a header line without a
    colon, a request line past the limit) is answered 400 before the application sees it, and
    was in no counter: a flood of them left /metrics unchanged. Each is now one request."""
    for raw in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: registry\r\nno colon here\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: registry\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", registry.port)) as client:
            client.sendall(raw)
            assert client.recv(4096).startswith(b"HTTP/1.0 400")
    samples = scrape(registry)
    assert value(samples, "nixery_http_requests_total", method="other", route="unmatched", status="400") == 3


def test_refused_expectations_are_counted(registry: RegistryProcess) -> None:
    """aiohttp answers an `Expect` other than `100-continue` with 417 before any middleware runs,
    so a flood of them left /metrics unchanged. Each is now one request, under its route."""
    for path in ("/v2/", "/v2/shell/manifests/latest"):
        with socket.create_connection(("127.0.0.1", registry.port)) as client:
            client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: x\r\n\r\n".encode())
            assert client.recv(4096).startswith(b"HTTP/1.1 417 ")
    samples = scrape(registry)
    assert value(samples, "nixery_http_requests_total", method="GET", route="/v2/", status="417") == 1
    assert value(samples, "nixery_http_requests_total", method="GET", route=MANIFEST_ROUTE, status="417") == 1


def test_metric_names_follow_prometheus_conventions(registry: RegistryProcess) -> None:
    """Prometheus's naming rules: a counter ends in `_total`, and a name with a unit ends with that
    unit, in base units (before `_total` for a counter): `nixery_blob_served_bytes_total`. Two
    counters put the unit in the middle (`nixery_blob_bytes_served_total`,
    `nixery_layer_bytes_compressed_total`), which queries and recording rules that go by the
    suffix (`*_bytes_total`) miss."""
    pull(registry, "shell/hello")  # so that every family has samples
    status, _, body = registry.request("/metrics", accept="text/plain")
    assert status == 200
    families = [  # the client library's creation times (`_created`) come as gauges of their own
        f for f in text_string_to_metric_families(body.decode())
        if f.name.startswith("nixery_") and not f.name.endswith("_created")
    ]
    assert len(families) >= 12
    for family in families:
        words = family.name.split("_")
        if family.type == "counter":
            assert all(sample.name.endswith(("_total", "_created")) for sample in family.samples), family.name
        for unit in ("seconds", "bytes"):
            if unit in words:
                assert words[-1] == unit, f"{family.name}: the unit {unit} is not the last word"
        assert not {"milliseconds", "kilobytes", "megabytes", "minutes"} & set(words), family.name


def test_workers_answer_for_all_of_them(start_registry, tmp_path: Path, temporary: Path) -> None:
    """With NIXERY_WORKERS=2 the kernel hands each connection, scrapes included, to either worker.
    Each worker answered /metrics with its own counts, so successive scrapes went up and down
    (22, 19, 22, ...: Prometheus reads every fall as a counter reset, and rates as nonsense).
    Every scrape now gives the sum over both workers, and the files that takes are removed
    when the registry stops."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2", TMPDIR=str(temporary))
    for _ in range(40):  # a connection each: both workers get some
        assert registry.request("/v2/", accept=None)[0] == 200
    answers = [
        value(scrape(registry), "nixery_http_requests_total", method="GET", route="/v2/", status="200")
        for _ in range(8)
    ]
    assert len(set(answers)) == 1 and answers[0] >= 40, answers
    assert value(scrape(registry), "nixery_builds_running") == 0
    assert list(temporary.glob("nixery-run-*/nixery-metrics-*"))
    registry.stop()
    assert list(temporary.iterdir()) == []
