"""Prometheus metrics: the metric objects, the request middleware and `/metrics`.

    nixery_http_requests_total{method,route,status}   one per request
    nixery_http_request_duration_seconds{method,route}
    nixery_builds_total{result}                       result: done | failed | not_found (names the package
                                                      set lacks) | stopped (the registry shut down
                                                      mid-build); builds run by this process
    nixery_build_duration_seconds{result}
    nixery_builds_running
    nixery_build_waits_total                          waits for a build another process ran (shared storage)
    nixery_cache_hits_total{cache} / _misses_total    cache: image | layer
    nixery_layers_total{outcome}                      outcome: reused | created
    nixery_layer_compressed_bytes_total
    nixery_blob_served_bytes_total                    bytes of blobs sent by this process (as they go out)
    nixery_nix_processes_running{command}
    nixery_storage_full_total                         requests refused as 507 STORAGE_FULL
    nixery_event_loop_lag_seconds                     how late the event loop ran what was due, every
                                                      0.1 s (nixery.loop_lag): a stall delays every client

With NIXERY_WORKERS above 1, each worker process counts into files of its own
(prometheus_client's multiprocess mode: `nixery.cli` sets PROMETHEUS_MULTIPROC_DIR
before the client library is imported) and `/metrics` answers with the sum over
all of them, whichever worker a scrape reaches; gauges are the sum over the live
workers. The client library's process metrics are then left out (they would
describe one worker picked at random).

Routes are labelled with their pattern (`/v2/{name}/blobs/{digest}`), never
the raw path, so a client cannot grow the label set; unmatched paths share one
label, and so do methods outside RFC 9110's (`other`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_BUILD_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
#: Most answers take milliseconds, but a pull by tag waits for its image's build (minutes, up
#: to NIX_TIMEOUT): the client library's default buckets end at 10 s.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

HTTP_REQUESTS = Counter(
    "nixery_http_requests", "HTTP requests answered, by route pattern and status", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "nixery_http_request_duration_seconds", "Time to answer a request (until the handler returns)", ["method", "route"],
    buckets=_REQUEST_BUCKETS,
)
BUILDS = Counter(
    "nixery_builds",
    "Image builds run by this process and finished, by result (not_found: names the package set lacks;"
    " stopped: the registry shut down mid-build)",
    ["result"],
)
BUILD_WAITS = Counter(
    "nixery_build_waits", "Images this process waited for while another process on the storage built them"
)
BUILD_DURATION = Histogram(
    "nixery_build_duration_seconds", "Image build time, by result", ["result"], buckets=_BUILD_BUCKETS
)
BUILDS_RUNNING = Gauge("nixery_builds_running", "Image builds in progress", multiprocess_mode="livesum")
CACHE_HITS = Counter("nixery_cache_hits", "Cache hits, by cache (image, layer)", ["cache"])
CACHE_MISSES = Counter("nixery_cache_misses", "Cache misses, by cache (image, layer)", ["cache"])
LAYERS = Counter("nixery_layers", "Layers of built images: reused from storage or created", ["outcome"])
LAYER_BYTES = Counter("nixery_layer_compressed_bytes", "Compressed bytes of the layers created")
BLOB_BYTES = Counter("nixery_blob_served_bytes", "Blob bytes sent to clients by this process (not redirects)")
STORAGE_FULL = Counter(
    "nixery_storage_full", "Requests refused because no space was left where storage writes (507 STORAGE_FULL)"
)
LOOP_LAG = Histogram(
    "nixery_event_loop_lag_seconds", "How late the event loop ran what was due, measured every 0.1 s",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
NIX_PROCESSES = Gauge(
    "nixery_nix_processes_running", "Nix processes running, by command", ["command"], multiprocess_mode="livesum"
)

for _cache in ("image", "layer"):  # present from the start, so rates work from zero
    CACHE_HITS.labels(_cache)
    CACHE_MISSES.labels(_cache)
BUILD_RESULTS = ("done", "failed", "not_found", "stopped")
for _result in BUILD_RESULTS:
    BUILDS.labels(_result)
for _outcome in ("reused", "created"):
    LAYERS.labels(_outcome)

UNMATCHED = "unmatched"


# ---- hooks called by the builder -------------------------------------------


def cache_lookup(cache: str, hit: bool) -> None:
    (CACHE_HITS if hit else CACHE_MISSES).labels(cache).inc()


def layer_stored(created: bool, size: int) -> None:
    cache_lookup("layer", hit=not created)
    LAYERS.labels("created" if created else "reused").inc()
    if created:
        LAYER_BYTES.inc(size)


def build_started() -> None:
    BUILDS_RUNNING.inc()


def build_finished(result: str, seconds: float) -> None:
    """`result`: one of BUILD_RESULTS."""
    BUILDS_RUNNING.dec()
    BUILDS.labels(result).inc()
    BUILD_DURATION.labels(result).observe(seconds)


def build_waited() -> None:
    """Another process built the image while this one waited for the storage's build lock."""
    BUILD_WAITS.inc()


# ---- hooks called by the error mapping -----------------------------------------


def storage_full() -> None:
    STORAGE_FULL.inc()


# ---- hooks called by the event loop's watch ------------------------------------


def loop_lag(seconds: float) -> None:
    LOOP_LAG.observe(seconds)


# ---- hooks called by the blob route ------------------------------------------


def blob_bytes_sent(count: int) -> None:
    """Bytes of a blob handed to the client's connection: of a download cut short, only those
    that went out (a response's Content-Length is what it would have been)."""
    BLOB_BYTES.inc(count)


# ---- HTTP ------------------------------------------------------------------


def malformed_request() -> None:
    """A request aiohttp could not parse, answered 400 before any middleware saw it: its
    method and path are unknown (or not to be trusted as labels)."""
    _request_metrics(OTHER_METHOD, UNMATCHED, 400)[0].inc()


def route_label(request: web.Request) -> str:
    """The route's pattern, e.g. `/v2/{name}/manifests/{reference}`."""
    match_info = request.match_info
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or getattr(match_info, "http_exception", None) is not None or resource.name == UNMATCHED:
        return UNMATCHED
    return resource.canonical


#: RFC 9110's methods. aiohttp's Python parser (used when its C extension is not installed,
#: or with AIOHTTP_NO_EXTENSIONS) takes any token as a method: a label per method sent would
#: let a client add series without end.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
OTHER_METHOD = "other"


def method_label(request: web.Request) -> str:
    return request.method if request.method in _METHODS else OTHER_METHOD


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = answered_status(request, response)
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        count_request(request, status, started)


def answered_status(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """The response's status, or nginx's 499 when the client hung up before it could be sent: a
    pull given up while its image was built was logged and counted as a 200 it never got."""
    if not response.prepared and client_left(request):
        return 499
    return response.status


def client_left(request: web.BaseRequest) -> bool:
    """The client has closed its connection: nobody will read an answer to `request`."""
    return request.transport is None or request.transport.is_closing()


def count_request(request: web.Request, status: int, started: float) -> None:
    """Count one answered request and its duration; `started` is a `time.monotonic()` reading.
    For the middleware, and for the server's answers given before the middlewares run."""
    requests, duration = _request_metrics(method_label(request), route_label(request), status)
    requests.inc()
    duration.observe(time.monotonic() - started)


#: The labelled children by (method, route, status): looking them up by labels
#: on every request costs more than the counting. Bounded: methods are RFC 9110's or
#: `other`, routes are patterns, statuses are few.
_REQUEST_METRICS: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def _request_metrics(method: str, route: str, status: int) -> tuple[Counter, Histogram]:
    key = (method, route, status)
    children = _REQUEST_METRICS.get(key)
    if children is None:
        children = _REQUEST_METRICS[key] = (
            HTTP_REQUESTS.labels(method, route, str(status)),
            HTTP_DURATION.labels(method, route),
        )
    return children


def _shared_directory() -> str | None:
    """Where every worker's metrics are, with NIXERY_WORKERS above 1 (see the module docstring)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def process_ended(pid: int) -> None:
    """A worker ended: its gauges no longer count (the files of its counters stay in the sums)."""
    if _shared_directory() is not None:
        multiprocess.mark_process_dead(pid)


def exposition() -> bytes:
    """The metrics in Prometheus's text format: this process's, or every worker's summed."""
    if _shared_directory() is None:
        return generate_latest(REGISTRY)
    workers = CollectorRegistry()
    multiprocess.MultiProcessCollector(workers)
    return generate_latest(workers)


async def metrics_handler(request: web.Request) -> web.Response:
    response = web.Response(body=exposition())
    # What `generate_latest` writes (names escaped to the classic alphabet) is the text format
    # 0.0.4; the library's CONTENT_TYPE_LATEST says version=1.0.0, which it writes only when a
    # scraper asks for it, with an escaping scheme.
    response.headers["Content-Type"] = CONTENT_TYPE_PLAIN_0_0_4
    return response


def setup(app: web.Application) -> None:
    """Serve `/metrics` (the middleware is added by create_app; the blob route counts its bytes)."""
    app.router.add_get("/metrics", metrics_handler)
