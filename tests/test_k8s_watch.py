"""NixImage objects from the Kubernetes API: list, watch, status.

No Kubernetes API server can run on these machines, so these tests run the
registry against `FakeKubeApi`, a small stand-in written here that speaks the
parts of the API the registry uses, as the real server does:

* list (`GET /apis/k8s.nixos.org/v1alpha/niximages`, with `limit`/`continue`
  pages and the list's resourceVersion),
* watch (`?watch=1&resourceVersion=RV`: newline-delimited JSON events ADDED,
  MODIFIED, DELETED, BOOKMARK, every event after RV from its history, then
  live ones until `timeoutSeconds`; 410 Gone, as an ERROR event or as the
  response's status, for a resourceVersion older than its history; an ERROR
  event 504 "Too large resource version" for one it has not reached, as the
  API server's watch cache answers once it has waited for it in vain),
* the status subresource (`PATCH …/niximages/NAME/status`, JSON merge patch,
  a `metadata.resourceVersion` precondition answered with 409), and bearer
  token authentication.

It can drop every open watch connection and forget its history, which is how
the tests make the registry reconnect and relist, put a line that is not a
valid event into the stream (`send_raw`), and hold values nested deeper than
Python's JSON parser allows (`RawJSON`), as the API server can. What it does not do (schema
validation, generation bookkeeping beyond `data` changes, field selectors) is
not used by the registry. The end-to-end tests run a real `nixery serve`
process that pulls through this stand-in; the others run the watch in the
test's own event loop.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import gc
import ipaddress
import json
import ssl
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

import nixery.declarations.parsing
import nixery.declarations.store
import nixery.k8s.watch
from nixery.declarations import FILES, DeclarationStore, parse_declaration
from nixery.images import ImageRecord, ManifestRef
from nixery.k8s import (
    ApiError,
    KubeClient,
    KubeConfig,
    KubeConfigError,
    NixImageWatch,
    in_cluster_config,
    kubeconfig_config,
    load_kube_config,
)
from nixery.k8s.client import MAX_EVENT_BYTES
from nixery.k8s.decoding import read_json, too_deep_fields
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import ManifestFormat
from nixery.registry.names import ImageRequest
from tests.registry import RegistryProcess, free_port, have, run, skopeo_to_oci, unpack_oci
from tests.test_catalog import longest_pause

TOKEN = "stand-in-token"
COLLECTION = "/apis/k8s.nixos.org/v1alpha/niximages"


# ---- the stand-in --------------------------------------------------------


class RawJSON:
    """A value the stand-in stores and sends as this JSON text: JSON nested deeper than Python's
    json module can write or read, which the API server stores."""

    def __init__(self, text: str):
        self.text = text


def dumps(value: Any) -> str:
    """`json.dumps`, with `RawJSON` values written as their text."""
    raw: dict[str, str] = {}

    def placeholder(o: Any) -> str:
        if not isinstance(o, RawJSON):
            raise TypeError(f"{type(o).__name__} is not JSON")
        token = f"raw-json-{uuid.uuid4()}"
        raw[json.dumps(token)] = o.text
        return token

    text = json.dumps(value, default=placeholder)
    for token, replacement in raw.items():
        text = text.replace(token, replacement)
    return text


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKubeApi:
    """Stand-in for the API server's NixImage endpoints (cluster-scoped objects)."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version = 1000
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.oldest = 0  # a watch from a resourceVersion below this gets 410 Gone
        self.gone_as_status = False  # 410 as the HTTP status instead of an ERROR event
        self.list_requests = 0
        self.watch_requests: list[int] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.reject_patches = 0  # answer this many status patches with 500 first
        self.patch_answers: list[bytes] = []  # bodies to answer the next status patches with (after applying them)
        self._changed = asyncio.Event()
        self._open_watches: dict[int, web.Request] = {}
        self._drop = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get(COLLECTION, self._collection)
        self.app.router.add_patch(COLLECTION + "/{name}/status", self._patch_status)

    # ---- control (call on the server's event loop) -------------------

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        self.history.append((self.resource_version, kind, copy.deepcopy(obj)))
        self._changed.set()
        self._changed = asyncio.Event()

    def _bump(self, obj: dict[str, Any]) -> None:
        self.resource_version += 1
        obj["metadata"]["resourceVersion"] = str(self.resource_version)

    def create(self, name: str, data: Any, **extra: Any) -> dict[str, Any]:
        obj = {
            "apiVersion": "k8s.nixos.org/v1alpha",
            "kind": "NixImage",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "generation": 1,
                "creationTimestamp": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
            "data": data,
            **extra,
        }
        self._bump(obj)
        self.objects[name] = obj
        self._event("ADDED", obj)
        return obj

    def modify(self, name: str, data: Any) -> None:
        obj = self.objects[name]
        obj["data"] = data
        obj["metadata"]["generation"] += 1
        self._bump(obj)
        self._event("MODIFIED", obj)

    def delete(self, name: str) -> None:
        obj = self.objects.pop(name)
        self._bump(obj)
        self._event("DELETED", obj)

    def bookmark(self) -> None:
        self.resource_version += 1
        self._event("BOOKMARK", {"kind": "NixImage", "apiVersion": "k8s.nixos.org/v1alpha",
                                 "metadata": {"resourceVersion": str(self.resource_version)}})

    def send_raw(self, line: bytes) -> None:
        """Put `line` into the watch stream as it is (a malformed or unexpected event), at a
        resourceVersion of its own: a watch from an older one gets it, as a replayed event."""
        self.resource_version += 1
        self.history.append((self.resource_version, "RAW", line))
        self._changed.set()
        self._changed = asyncio.Event()

    def compact(self) -> None:
        """Forget the history: a watch from any older resourceVersion than the current one gets 410."""
        self.oldest = self.resource_version
        self.history.clear()

    def restore(self, resource_version: int, objects: dict[str, dict[str, Any]]) -> None:
        """Be a server restored from an older etcd backup: `objects` at `resource_version`, no history.
        Watches from a later resourceVersion (the registry's) get 504 Too large resource version."""
        self.resource_version = self.oldest = resource_version
        self.objects = objects
        self.history.clear()

    def drop_watches(self) -> int:
        """Cut every open watch connection, as a restarting API server or a load balancer would."""
        dropped = len(self._open_watches)
        for request in list(self._open_watches.values()):
            if request.transport is not None:
                request.transport.abort()
        self._drop.set()
        self._drop = asyncio.Event()
        return dropped

    def drop_then(self, change: Callable[[FakeKubeApi], Any], *, forget: bool = False) -> None:
        """Drop every watch, then apply `change` before any client can reconnect (same loop
        callback); with `forget`, the history is lost too, so a reconnect gets 410."""
        self.drop_watches()
        change(self)
        if forget:
            self.compact()

    def status(self, name: str) -> dict[str, Any]:
        obj = self.objects.get(name)
        return dict(obj.get("status") or {}) if obj else {}

    @property
    def open_watches(self) -> int:
        return len(self._open_watches)

    # ---- HTTP --------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                "message": message}

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response(self._status(401, "Unauthorized", "Unauthorized"), status=401)
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request)
        self.list_requests += 1
        names = sorted(self.objects)
        limit = int(request.query.get("limit") or 0) or len(names) or 1
        start = int(request.query.get("continue") or 0)
        page = names[start : start + limit]
        metadata: dict[str, Any] = {"resourceVersion": str(self.resource_version)}
        if start + limit < len(names):
            metadata["continue"] = str(start + limit)
        return web.json_response({
            "apiVersion": "k8s.nixos.org/v1alpha", "kind": "NixImageList", "metadata": metadata,
            "items": [self.objects[n] for n in page],
        }, dumps=dumps)

    async def _watch(self, request: web.Request) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self.resource_version)
        self.watch_requests.append(since)
        if since < self.oldest:
            gone = self._status(410, "Expired", f"too old resource version: {since} ({self.oldest})")
            if self.gone_as_status:
                return web.json_response(gone, status=410)
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return response
        if since > self.resource_version:
            too_large = self._status(504, "Timeout", f"Too large resource version: {since}, current: "
                                     f"{self.resource_version}")
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(json.dumps({"type": "ERROR", "object": too_large}).encode() + b"\n")
            return response
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        self._open_watches[id(request)] = request
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds") or 300)
        drop = self._drop
        sent = since
        try:
            while not drop.is_set():
                for version, kind, obj in list(self.history):
                    if version > sent:
                        line = obj if kind == "RAW" else dumps({"type": kind, "object": obj}).encode()
                        await response.write(line + b"\n")
                        sent = version
                changed = self._changed
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(drop.wait())]
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._open_watches.pop(id(request), None)
        return response

    async def _patch_status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response(self._status(401, "Unauthorized", "Unauthorized"), status=401)
        assert request.content_type == "application/merge-patch+json", request.content_type
        name = request.match_info["name"]
        body = await request.json()
        self.patches.append((name, body))
        if self.reject_patches > 0:
            self.reject_patches -= 1
            return web.json_response(self._status(500, "InternalError", "try again"), status=500)
        obj = self.objects.get(name)
        if obj is None:
            return web.json_response(self._status(404, "NotFound", f"niximages {name!r} not found"), status=404)
        precondition = (body.get("metadata") or {}).get("resourceVersion")
        if precondition and precondition != obj["metadata"]["resourceVersion"]:
            return web.json_response(
                self._status(409, "Conflict", "the object has been modified; please apply your changes to the "
                             "latest version and try again"), status=409,
            )
        obj["status"] = merge_patch(obj.get("status") or {}, body.get("status") or {})
        self._bump(obj)
        self._event("MODIFIED", obj)
        if self.patch_answers:
            return web.Response(body=self.patch_answers.pop(0), content_type="application/json")
        return web.json_response(obj, dumps=dumps)


class ThreadedKubeApi:
    """The stand-in on its own thread and event loop, for a registry in another process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.api: FakeKubeApi | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self.call(self._start)

    async def _start(self) -> None:
        self.api = FakeKubeApi()
        self._runner = web.AppRunner(self.api.app, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def invoke() -> Any:
            result = fn(*args, **kwargs)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(invoke(), self.loop).result(30)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.api, name)
        if callable(attribute):
            return lambda *args, **kwargs: self.call(attribute, *args, **kwargs)
        return self.call(lambda: getattr(self.api, name))

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "nixery", "user": {"token": TOKEN}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "nixery"}}],
        }))
        return path

    def close(self) -> None:
        async def stop() -> None:
            self.api.drop_watches()
            await self._runner.cleanup()

        self.call(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


async def eventually(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# ---- end to end: a real registry process --------------------------------


@pytest.fixture
def kube_api() -> Iterator[ThreadedKubeApi]:
    api = ThreadedKubeApi()
    yield api
    api.close()


def manifest_status(registry: RegistryProcess, name: str, tag: str) -> tuple[int, str | None]:
    status, headers, _ = registry.request(f"/v2/{name}/manifests/{tag}")
    return status, headers.get("Docker-Content-Digest")


def test_watch_end_to_end(start_registry, kube_api: ThreadedKubeApi, tmp_path: Path) -> None:
    """ADDED → pullable, status patched with the digest; MODIFIED → new contents; a dropped
    watch connection → reconnects from its resourceVersion and sees later events; DELETED →
    the name is read as packages again (404); 410 Gone → relists; invalid objects → status."""
    kube_api.create("greeter", {"tag": "v1", "contents": ["shell", "hello"]})
    registry = start_registry(
        NIXERY_BUNDLED_SET="busybox", NIXERY_K8S_WATCH="true", KUBECONFIG=str(kube_api.kubeconfig(tmp_path / "kc")),
    )
    assert kube_api.list_requests == 1

    # ADDED: the declared contents, as the same packages in a path would give.
    digest, _ = registry.manifest("greeter", "v1")
    assert digest == registry.manifest("shell/hello", "v1")[0]
    status = wait_until(lambda: kube_api.status("greeter").get("phase") == "Ready" and kube_api.status("greeter"),
                        what="status Ready")
    assert status["digest"] == digest
    assert status["image"] == "greeter:v1" and status["observedGeneration"] == 1 and "error" not in status
    assert status["ociDigest"].startswith("sha256:") and status["ociDigest"] != digest

    # MODIFIED: the next pull builds the new contents.
    kube_api.modify("greeter", {"tag": "v1", "contents": ["shell", "figlet"]})
    figlet = registry.manifest("shell/figlet", "v1")[0]
    wait_until(lambda: manifest_status(registry, "greeter", "v1") == (200, figlet), what="modified contents")
    wait_until(lambda: kube_api.status("greeter").get("digest") == figlet, what="status of generation 2")
    assert kube_api.status("greeter")["observedGeneration"] == 2

    # A dropped watch connection: the registry watches again from where it was, without a list.
    watches = len(kube_api.watch_requests)
    assert kube_api.drop_watches() == 1
    kube_api.create("cow", {"tag": "2024.1", "contents": ["cowsay", "fortune"]})
    cow = registry.manifest("cowsay/fortune", "2024.1")[0]
    wait_until(lambda: manifest_status(registry, "cow", "2024.1") == (200, cow), what="object added after the drop")
    assert len(kube_api.watch_requests) > watches
    assert kube_api.list_requests == 1
    assert registry.log_events("k8s.watch_failed")  # the drop was noticed, and logged

    # DELETED: greeter is no longer declared, so greeter:v1 asks for a package called greeter.
    kube_api.delete("greeter")
    wait_until(lambda: manifest_status(registry, "greeter", "v1")[0] == 404, what="deleted object gone")

    # 410 Gone: the connection drops, cow is deleted meanwhile and the history forgotten → list again.
    kube_api.drop_then(lambda api: api.delete("cow"), forget=True)
    wait_until(lambda: kube_api.list_requests >= 2, what="relist after 410")
    wait_until(lambda: manifest_status(registry, "cow", "2024.1")[0] == 404, what="deleted while away")
    assert registry.log_events("k8s.watch_expired")

    # Invalid objects are reported in the log and in their status, and nothing else stops.
    kube_api.create("bad", {"tag": "v1", "contents": ["hello world"]})
    status = wait_until(lambda: kube_api.status("bad").get("phase") == "Invalid" and kube_api.status("bad"),
                        what="status Invalid")
    assert "hello world" in status["error"]
    assert any(e.get("object") == "niximage/bad" for e in registry.log_events("declarations.invalid"))
    kube_api.create("later", {"tag": "v2", "contents": ["greet"]})
    wait_until(lambda: manifest_status(registry, "later", "v2")[0] == 200, what="valid object after an invalid one")


@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
def test_prebuilt_declared_image_runs(start_registry, kube_api: ThreadedKubeApi, tmp_path: Path) -> None:
    """NIXERY_PREBUILD: an object is built when it appears, its status carries the digest before any
    pull, and the image pulled by skopeo has the declared programs in /bin."""
    registry = start_registry(
        NIXERY_BUNDLED_SET="busybox", NIXERY_K8S_WATCH="true", NIXERY_PREBUILD="true",
        KUBECONFIG=str(kube_api.kubeconfig(tmp_path / "kc")),
    )
    kube_api.create("hello-tools", {"tag": "v1", "contents": ["shell", "hello", "tools.jqlite"]})
    status = wait_until(lambda: kube_api.status("hello-tools").get("phase") == "Ready" and
                        kube_api.status("hello-tools"), what="prebuilt status")
    assert not any(e["path"].startswith("/v2/hello-tools") for e in registry.log_events("http.request"))
    assert registry.log_events("declarations.prebuild")
    assert registry.manifest("hello-tools", "v1")[0] == status["digest"]
    skopeo_to_oci(f"{registry.host}/hello-tools:v1", tmp_path / "layout")
    rootfs = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    assert (rootfs / "bin" / "hello").exists() and (rootfs / "bin" / "sh").exists()
    assert not (rootfs / "bin" / "figlet").exists()
    assert run(["chroot", str(rootfs), "/bin/sh", "-c", "hello"]).stdout == "Hello, world!\n"


# ---- in process: the watch against the stand-in -------------------------


def fake_record(request: ImageRequest, salt: str = "") -> ImageRecord:
    name = "/".join(request.packages)
    docker, oci = Digest.of(f"docker {name}{salt}".encode()), Digest.of(f"oci {name}{salt}".encode())
    return ImageRecord(
        key=name, name=name, source="test", revision="r", packages=request.packages, architecture="amd64",
        config=Digest.of(name.encode()),
        manifests={ManifestFormat.DOCKER: ManifestRef(docker, 1), ManifestFormat.OCI: ManifestRef(oci, 1)},
        layers=(), built_at=1_700_000_000.0,
    )


class FakeBuilder:
    """Builds instantly; `fail` names packages whose builds fail."""

    def __init__(self, fail: tuple[str, ...] = (), salt: str = ""):
        self.fail = fail
        self.salt = salt  # builders with different salts make different digests (nodes with their own stores)
        self.images: list[tuple[tuple[str, ...], str]] = []
        self.started: list[tuple[tuple[str, ...], str]] = []

    async def start(self, request: ImageRequest, tag: str) -> Any:
        self.started.append((request.packages, tag))
        return type("Build", (), {"id": "b1"})()

    async def image(self, request: ImageRequest, tag: str, **_: Any) -> ImageRecord:
        self.images.append((request.packages, tag))
        await asyncio.sleep(0)
        missing = [p for p in request.packages if p in self.fail]
        if missing:
            from nixery.errors import ManifestUnknown

            raise ManifestUnknown(f"packages not found: {', '.join(missing)}")
        return fake_record(request, self.salt)


class Harness:
    def __init__(self, api: FakeKubeApi, store: DeclarationStore, watch: NixImageWatch, tasks: list[asyncio.Task]):
        self.api, self.store, self.watch, self.tasks = api, store, watch, tasks

    def contents(self, name: str, tag: str) -> tuple[str, ...] | None:
        declaration = self.store.lookup(name, tag)
        return declaration.request.packages if declaration else None


@pytest.fixture
async def harness(aiohttp_server) -> Any:
    started: list[Harness] = []

    async def start(builder: Any = None, prebuild: bool = False, api: FakeKubeApi | None = None) -> Harness:
        api = api or FakeKubeApi()
        server = await aiohttp_server(api.app)
        config = KubeConfig(server=str(server.make_url("")).rstrip("/"), token=TOKEN)
        store = DeclarationStore(builder=builder, prebuild=prebuild)
        watch = NixImageWatch(KubeClient(config), store, min_backoff=0.01, max_backoff=0.05, watch_timeout=30)
        tasks = [asyncio.create_task(watch.run()), asyncio.create_task(watch.write_statuses())]
        harness = Harness(api, store, watch, tasks)
        started.append(harness)
        await asyncio.wait_for(watch.synced.wait(), 5)
        return harness

    yield start
    for h in started:
        for task in h.tasks:
            task.cancel()
        await asyncio.gather(*h.tasks, return_exceptions=True)
        h.api.drop_watches()
        await h.watch.client.close()
        await h.store.close()


async def test_list_then_added_modified_deleted(harness) -> None:
    api = FakeKubeApi()
    api.create("one", {"tag": "v1", "contents": ["hello", "shell", "hello"]})
    h = await harness(api=api)
    assert h.contents("one", "v1") == ("hello", "shell")
    api.create("two", {"tag": "v2", "contents": ["figlet"], "arch": "arm64"})
    await eventually(lambda: h.contents("two", "v2") == ("figlet",), what="ADDED")
    assert h.store.lookup("two", "v2").request.arch.oci_name == "arm64"
    api.modify("one", {"tag": "v1", "contents": ["cowsay"]})
    await eventually(lambda: h.contents("one", "v1") == ("cowsay",), what="MODIFIED")
    api.modify("one", {"tag": "v3", "contents": ["cowsay"]})
    await eventually(lambda: h.contents("one", "v3") == ("cowsay",), what="MODIFIED tag")
    assert h.contents("one", "v1") is None
    api.delete("two")
    await eventually(lambda: h.contents("two", "v2") is None, what="DELETED")
    assert await h.store.resolve("two", "v2") is None
    assert (await h.store.resolve("one", "v3")).packages == ("cowsay",)
    assert api.list_requests == 1 and len(api.watch_requests) == 1


async def test_dropped_connection_resumes_from_resource_version(harness) -> None:
    h = await harness()
    h.api.create("a", {"tag": "v1", "contents": ["hello"]})
    await eventually(lambda: h.contents("a", "v1"), what="a")
    seen = h.watch.resource_version
    assert h.api.drop_watches() == 1
    h.api.create("b", {"tag": "v1", "contents": ["figlet"]})  # while the connection is down
    await eventually(lambda: h.contents("b", "v1"), what="event after the drop")
    assert h.api.watch_requests[-1] == int(seen)
    assert h.api.list_requests == 1
    # a bookmark moves the resourceVersion on without changing anything
    h.api.bookmark()
    await eventually(lambda: h.watch.resource_version == str(h.api.resource_version), what="bookmark")


@pytest.mark.parametrize("as_status", [False, True], ids=["error-event", "http-410"])
async def test_gone_relists_and_forgets_objects_deleted_meanwhile(harness, as_status: bool) -> None:
    h = await harness()
    h.api.gone_as_status = as_status
    h.api.create("keep", {"tag": "v1", "contents": ["hello"]})
    h.api.create("drop", {"tag": "v1", "contents": ["figlet"]})
    await eventually(lambda: h.contents("drop", "v1"), what="drop")
    # While the connection is down (no await in between: the watch cannot reconnect), objects
    # change and the server forgets that history.
    assert h.api.drop_watches() == 1
    h.api.delete("drop")
    h.api.modify("keep", {"tag": "v1", "contents": ["cowsay"]})
    h.api.compact()
    await eventually(lambda: h.api.list_requests == 2, what="relist")
    await eventually(lambda: h.contents("keep", "v1") == ("cowsay",), what="relisted state")
    assert h.contents("drop", "v1") is None
    # and it watches on from the new list
    h.api.create("new", {"tag": "v1", "contents": ["greet"]})
    await eventually(lambda: h.contents("new", "v1"), what="watch after relist")


async def test_a_server_restored_from_a_backup_is_listed_again(harness) -> None:
    """An API server restored from an older etcd backup has not reached the resourceVersion the
    registry watches from; each watch from there fails (504 Too large resource version, from the
    stand-in as from the API server's watch cache). The registry asked again from the same point
    with back-off for as long as the server was behind (for ever, if nothing is written), serving
    objects the cluster no longer has and missing those it does. It now lists again."""
    h = await harness()
    h.api.create("lost", {"tag": "v1", "contents": ["hello"]})
    h.api.create("kept", {"tag": "v1", "contents": ["figlet"]})
    await eventually(lambda: h.contents("kept", "v1"), what="kept")
    watched_from = int(h.watch.resource_version)
    backup = {"kept": json.loads(json.dumps(h.api.objects["kept"]))}
    backup["kept"]["data"] = {"tag": "v1", "contents": ["cowsay"]}  # as it was when the backup was made
    h.api.drop_then(lambda api: api.restore(watched_from - 5, backup))
    await eventually(lambda: h.contents("kept", "v1") == ("cowsay",), what="the restored objects")
    assert h.contents("lost", "v1") is None
    assert h.api.list_requests == 2
    h.api.create("new", {"tag": "v1", "contents": ["greet"]})
    await eventually(lambda: h.contents("new", "v1"), what="watch after the relist")


async def test_api_unavailable_backs_off_and_recovers(aiohttp_server) -> None:
    api = FakeKubeApi(token="other")  # our token is refused: 401 until the token matches
    server = await aiohttp_server(api.app)
    store = DeclarationStore()
    watch = NixImageWatch(KubeClient(KubeConfig(server=str(server.make_url("")).rstrip("/"), token=TOKEN)), store,
                          min_backoff=0.01, max_backoff=0.05)
    api.create("x", {"tag": "v1", "contents": ["hello"]})
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(watch.run())
        await eventually(lambda: sum(e["event"] == "k8s.watch_failed" for e in logs) >= 3, what="retries")
        api.token = TOKEN
        await eventually(lambda: store.lookup("x", "v1"), what="recovered")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await watch.client.close()
    assert any("401" in e.get("error", "") for e in logs if e["event"] == "k8s.watch_failed")


# A line the parser rejects, JSON nested deeper than it allows, and JSON that is not an event.
UNREADABLE_EVENTS = {
    "malformed": (b'{"type": "ADDED", "object": {"metadata": ', "JSONDecodeError"),
    "nested-too-deep": (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
    "not-an-event": (b'["ADDED", {"metadata": {"name": "x"}}]', "AttributeError"),
}


@pytest.mark.parametrize("unreadable", UNREADABLE_EVENTS, ids=list(UNREADABLE_EVENTS))
async def test_the_watch_goes_on_after_an_event_it_cannot_read(harness, unreadable: str) -> None:
    """An event the watch could not read ended it for good (but for a malformed line, which was
    retried from the same resourceVersion, so the server sent the same line again, for ever): the
    registry served the table of that moment until restarted. It now logs the error with its type,
    and lists again after the back-off; the changes after the event are applied."""
    line, error_type = UNREADABLE_EVENTS[unreadable]
    h = await harness()
    with structlog.testing.capture_logs() as logs:
        h.api.send_raw(line)
        h.api.create("after", {"tag": "v1", "contents": ["hello"]})
        await eventually(lambda: h.contents("after", "v1") == ("hello",), what="the change after the event")
    failures = [e for e in logs if e["event"] == "k8s.watch_failed"]
    assert failures and failures[0]["error_type"] == error_type, failures
    assert h.api.list_requests == 2
    h.api.create("later", {"tag": "v1", "contents": ["figlet"]})
    await eventually(lambda: h.contents("later", "v1") == ("figlet",), what="a change watched after the relist")


async def test_a_burst_of_events_rebuilds_the_table_once_per_batch(harness) -> None:
    """2,000 objects, then 500 created at once: each event rebuilt the whole declaration table (a
    walk over every object), and the 500 that arrived together held the event loop for as many
    rebuilds (about 2 s here; 81 ms against a real server, which sends them in smaller pieces).
    The events that arrive together are now applied as one batch, with one rebuild."""
    api = FakeKubeApi()
    for n in range(2000):
        api.create(f"img-{n}", {"tag": "v1", "contents": ["hello", f"p{n}"]})
    with structlog.testing.capture_logs():  # 2,500 image_declared lines would be most of the time measured
        h = await harness(api=api)
        rebuilds = 0
        update_source = h.store.update_source

        async def counted(*args: Any, **kwargs: Any) -> None:
            nonlocal rebuilds
            rebuilds += 1
            await update_source(*args, **kwargs)

        h.store.update_source = counted  # type: ignore[method-assign]
        gc.collect()
        gc.freeze()  # as in test_catalog: the pauses measured are the watch's, not the collector's
        try:
            single = []
            for _ in range(5):
                started = time.perf_counter()
                await h.watch._publish()
                single.append(time.perf_counter() - started)
            rebuild = statistics.median(single)
            rebuilds = 0
            for n in range(500):
                api.create(f"new-{n}", {"tag": "v1", "contents": ["figlet", f"n{n}"]})
            _, pause, _ = await longest_pause(
                eventually(lambda: h.contents("new-499", "v1"), what="the burst applied"), tick=0.001
            )
        finally:
            gc.unfreeze()
    assert all(h.contents(f"new-{n}", "v1") == ("figlet", f"n{n}") for n in range(500))
    assert rebuilds <= 10, f"{rebuilds} rebuilds for 500 events"
    assert pause < 50 * rebuild, f"the loop was held {pause * 1000:.1f} ms; one rebuild takes {rebuild * 1000:.2f} ms"


async def test_a_burst_of_events_is_read_while_the_registry_answers(harness, monkeypatch) -> None:
    """The objects of a burst of watch events were read and checked, and the declaration table
    rebuilt, on the event loop: while 500 new objects were taken in, pulls waited. A batch is now
    read, and the table rebuilt, in a thread, in the events' order: here the reading of one object
    of the burst is held up, and a pull by tag is answered meanwhile."""
    loop_thread = threading.get_ident()
    readers: set[int] = set()
    rebuilders: set[int] = set()
    holding, release = threading.Event(), threading.Event()
    check_contents, build_table = nixery.declarations.parsing._check_contents, nixery.declarations.store._build_table

    def held_check(contents: Any) -> Any:
        readers.add(threading.get_ident())
        if "n250" in contents and threading.get_ident() != loop_thread:
            holding.set()
            release.wait(30)
        return check_contents(contents)

    def counted_build(declarations: Any) -> Any:
        rebuilders.add(threading.get_ident())
        return build_table(declarations)

    monkeypatch.setattr(nixery.declarations.parsing, "_check_contents", held_check)
    monkeypatch.setattr(nixery.declarations.store, "_build_table", counted_build)
    api = FakeKubeApi()
    api.create("served", {"tag": "v1", "contents": ["hello"]})
    with structlog.testing.capture_logs():
        h = await harness(api=api)
        try:
            for n in range(500):
                api.create(f"new-{n}", {"tag": "v1", "contents": ["figlet", f"n{n}"]})
            await eventually(holding.is_set, what="the burst being read off the event loop")
            assert (await h.store.resolve("served", "v1")).packages == ("hello",)  # answered meanwhile
        finally:
            release.set()
        await eventually(lambda: h.contents("new-499", "v1"), what="the burst applied")
    assert all(h.contents(f"new-{n}", "v1") == ("figlet", f"n{n}") for n in range(500))
    assert readers and rebuilders and loop_thread not in readers | rebuilders


# Deeper than Python's json reads or writes (as in UNREADABLE_EVENTS); the API server stores it.
TOO_DEEP = "[" * 100_000 + "]" * 100_000


async def test_an_object_nested_too_deep_is_invalid_and_the_others_are_served(harness) -> None:
    """A NixImage nested deeper than Python's JSON parser allows (here in data.arch, a field that
    keeps unknown values) made the whole list unreadable (RecursionError): the watch listed again
    and again and served no change at all until someone deleted that object. That object is now
    reported Invalid, alone; the others are served, and watched on."""
    api = FakeKubeApi()
    api.create("before", {"tag": "v1", "contents": ["hello"]})
    api.create("deep", {"tag": "v1", "contents": ["hello"], "arch": RawJSON(TOO_DEEP)})
    api.create("after", {"tag": "v1", "contents": ["figlet"]})
    with structlog.testing.capture_logs() as logs:
        h = await harness(builder=FakeBuilder(), api=api)  # waits for the first list
        assert h.contents("before", "v1") == ("hello",) and h.contents("after", "v1") == ("figlet",)
        assert h.contents("deep", "v1") is None
        await eventually(lambda: api.status("deep").get("phase") == "Invalid", what="deep reported Invalid")
        # watched on: a change, and another such object arriving in a watch event
        api.modify("before", {"tag": "v1", "contents": ["cowsay"]})
        api.create("deeper", {"tag": "v2", "contents": ["hello"], "env": [RawJSON(TOO_DEEP)]})
        await eventually(lambda: h.contents("before", "v1") == ("cowsay",), what="a change watched")
        await eventually(lambda: api.status("deeper").get("phase") == "Invalid", what="deeper reported Invalid")
        await h.store.resolve("after", "v1")
        await eventually(lambda: api.status("after").get("phase") == "Ready", what="the others' status")
    assert api.status("deep")["error"] == "data.arch: nested too deep to read"
    assert api.status("deeper")["error"] == "data.env: nested too deep to read"
    invalid = {e["object"]: e["problem"] for e in logs if e["event"] == "declarations.invalid"}
    assert invalid == {"niximage/deep": api.status("deep")["error"], "niximage/deeper": api.status("deeper")["error"]}
    assert not [e for e in logs if e["event"] in ("k8s.watch_failed", "k8s.status_failed")]
    assert api.list_requests == 1


async def test_status_follows_builds_and_is_not_rewritten(harness) -> None:
    builder = FakeBuilder(fail=("broken",))
    h = await harness(builder=builder)
    h.api.create("img", {"tag": "v1", "contents": ["hello"]})
    await eventually(lambda: h.api.status("img").get("phase") == "Pending", what="Pending")
    pending_rv = h.api.patches[0][1]["metadata"]["resourceVersion"]  # written with a precondition
    assert pending_rv
    # a pull resolves the declaration; the result is reported once it is built
    request = await h.store.resolve("img", "v1")
    assert request.packages == ("hello",)
    await eventually(lambda: h.api.status("img").get("phase") == "Ready", what="Ready")
    status = h.api.status("img")
    assert status["digest"] == str(fake_record(request).manifests[ManifestFormat.DOCKER].digest)
    assert status["builtAt"] == "2023-11-14T22:13:20Z" and status["observedGeneration"] == 1
    patches = len(h.api.patches)
    # further pulls and our own status events don't write again
    await h.store.resolve("img", "v1")
    await asyncio.sleep(0.2)
    assert len(h.api.patches) == patches
    # a failing build is reported as Failed with the error; fixing it clears the error
    h.api.modify("img", {"tag": "v1", "contents": ["hello", "broken"]})
    await eventually(lambda: h.contents("img", "v1") == ("broken", "hello"), what="modified")
    await h.store.resolve("img", "v1")
    await eventually(lambda: h.api.status("img").get("phase") == "Failed", what="Failed")
    assert "broken" in h.api.status("img")["error"] and "digest" not in h.api.status("img")
    # a failure may pass (say, the package source was unreachable): the next pull that works says so
    builder.fail = ()
    await h.store.resolve("img", "v1")
    await eventually(lambda: h.api.status("img").get("phase") == "Ready", what="Ready after Failed")
    assert h.api.status("img")["observedGeneration"] == 2 and "error" not in h.api.status("img")
    h.api.modify("img", {"tag": "v1", "contents": ["figlet"]})
    await eventually(lambda: h.contents("img", "v1") == ("figlet",), what="fixed")
    await h.store.resolve("img", "v1")
    await eventually(lambda: h.api.status("img").get("phase") == "Ready", what="Ready again")
    assert "error" not in h.api.status("img") and h.api.status("img")["observedGeneration"] == 3


async def test_prebuild_and_status_retries(harness) -> None:
    builder = FakeBuilder()
    api = FakeKubeApi()
    api.reject_patches = 2  # the API server fails the first two status patches
    await harness(builder=builder, prebuild=True, api=api)
    api.create("pre", {"tag": "v1", "contents": ["figlet"]})
    await eventually(lambda: api.status("pre").get("phase") == "Ready", what="prebuilt and reported")
    assert builder.started == [(("figlet",), "v1")]
    assert api.reject_patches == 0 and len(api.patches) >= 3


async def test_the_status_writer_goes_on_after_an_answer_it_cannot_read(harness) -> None:
    """An answer to a status patch nested deeper than the JSON parser allows stopped the status
    writer for good: no object's status was written again. It is now logged with its type and the
    writer goes on."""
    api = FakeKubeApi()
    api.patch_answers = [b"[" * 100_000 + b"]" * 100_000]
    h = await harness(builder=FakeBuilder(), api=api)
    with structlog.testing.capture_logs() as logs:
        api.create("first", {"tag": "v1", "contents": ["hello"]})
        await eventually(lambda: any(e["event"] == "k8s.status_failed" for e in logs), what="the unreadable answer")
        await h.store.resolve("first", "v1")
        await eventually(lambda: api.status("first").get("phase") == "Ready", what="a status written after it")
    (failure,) = [e for e in logs if e["event"] == "k8s.status_failed"]
    assert failure["error_type"] == "RecursionError"


async def test_replicas_with_different_builds_do_not_fight_over_status(harness) -> None:
    """Two registries (say, nodes of the DaemonSet with their own stores) prebuild the same object
    and get different digests: the first result stays, and nobody rewrites it."""
    api = FakeKubeApi()
    first = await harness(builder=FakeBuilder(salt="node-1"), prebuild=True, api=api)
    second = await harness(builder=FakeBuilder(salt="node-2"), prebuild=True, api=api)
    api.create("shared", {"tag": "v1", "contents": ["hello"]})
    await eventually(lambda: api.status("shared").get("phase") == "Ready", what="Ready")
    await eventually(lambda: all(h.watch.objects.get("shared") and h.watch.objects["shared"].result
                                 for h in (first, second)), what="both built")
    await asyncio.sleep(0.3)
    settled = len(api.patches)
    digest = api.status("shared")["digest"]
    await asyncio.sleep(0.5)
    assert len(api.patches) == settled and api.status("shared")["digest"] == digest
    assert settled <= 4  # at most a Pending and a result each


async def test_invalid_and_conflicting_objects_get_status(harness) -> None:
    h = await harness(builder=FakeBuilder())
    with structlog.testing.capture_logs() as logs:
        h.api.create("first", {"tag": "v1", "contents": ["hello"]})
        await eventually(lambda: h.contents("first", "v1"), what="first")
        h.api.create("bad-tag", {"tag": "..", "contents": ["hello"]})
        h.api.create("no-data", {}, spec={"tag": "v1", "contents": ["hello"]})
        h.api.create("bad-pkg", {"tag": "v1", "contents": ["../etc"]})
        for name in ("bad-tag", "no-data", "bad-pkg"):
            await eventually(lambda n=name: h.api.status(n).get("phase") == "Invalid", what=f"{name} Invalid")
    assert "data.tag" in h.api.status("bad-tag")["error"]
    assert "spec" in h.api.status("no-data")["error"]
    assert "data.contents[0]" in h.api.status("bad-pkg")["error"]
    invalid = {e["object"]: e["problem"] for e in logs if e["event"] == "declarations.invalid"}
    assert set(invalid) == {"niximage/bad-tag", "niximage/no-data", "niximage/bad-pkg"}
    # A file declaring the same name:tag wins over the object, which is told so.
    h.store.set_source(FILES, [parse_declaration(
        {"apiVersion": "k8s.nixos.org/v1alpha", "kind": "NixImage", "metadata": {"name": "first"},
         "data": {"tag": "v1", "contents": ["figlet"]}}, origin="file /x.yaml#0")])
    assert h.contents("first", "v1") == ("figlet",)
    await eventually(lambda: h.api.status("first").get("phase") == "Conflict", what="Conflict")
    assert "file /x.yaml#0" in h.api.status("first")["error"]
    h.store.set_source(FILES, [])
    await eventually(lambda: h.api.status("first").get("phase") == "Pending", what="conflict resolved")
    assert h.contents("first", "v1") == ("hello",)


def file_declaring(name: str, contents: list[str]) -> Any:
    return parse_declaration(
        {"apiVersion": "k8s.nixos.org/v1alpha", "kind": "NixImage", "metadata": {"name": name},
         "data": {"tag": "v1", "contents": contents}}, origin=f"file /{name}.yaml#0")


async def test_the_status_walk_runs_off_the_event_loop(harness) -> None:
    """Every change of the declaration table walked every object to work out its status, on the
    event loop: 7-20 ms at 10,000 objects, each time any object or file changed, during which no
    request was answered. The walk now runs in a thread; the loop only files what it found."""
    count = 300
    api = FakeKubeApi()
    for n in range(count):
        api.create(f"img-{n}", {"tag": "v1", "contents": ["hello", f"p{n}"]})
    with structlog.testing.capture_logs():
        h = await harness(api=api)
        await eventually(lambda: all(api.status(f"img-{n}").get("phase") == "Pending" for n in range(count)),
                         what="every object Pending")
        await eventually(lambda: all(o.status.get("phase") == "Pending" for o in h.watch.objects.values()),
                         what="the watch seeing every status it wrote")  # none replaced by an event below
    patched = len(api.patches)
    loop_thread = threading.get_ident()
    readers: list[int] = []

    class RecordedStatus(dict[str, Any]):
        """An object's status, recording the threads that read it."""

        def get(self, *args: Any) -> Any:
            readers.append(threading.get_ident())
            return super().get(*args)

    for obj in h.watch.objects.values():
        obj.status = RecordedStatus(obj.status)
    h.store.set_source(FILES, [file_declaring("img-7", ["figlet"])])  # a new table: every status is looked at
    await eventually(lambda: api.status("img-7").get("phase") == "Conflict", what="img-7 in Conflict")
    on_the_loop = readers.count(loop_thread)
    assert len(readers) - on_the_loop >= count and on_the_loop < 20, (
        f"{on_the_loop} of {len(readers)} reads of a status on the event loop"
    )
    # The same statuses as before: only img-7's changed.
    assert "file /img-7.yaml#0" in api.status("img-7")["error"]
    assert [name for name, _ in api.patches[patched:]] == ["img-7"]
    assert all(api.status(f"img-{n}").get("phase") == "Pending" for n in range(count) if n != 7)


async def test_a_status_walk_overtaken_by_a_newer_table_writes_nothing(harness, monkeypatch) -> None:
    """The walk runs in a thread while the table may change again: what it found for a table that
    is no longer served is dropped, not written (here a Conflict that a file no longer causes)."""
    h = await harness()
    h.api.create("x", {"tag": "v1", "contents": ["hello"]})
    await eventually(lambda: h.api.status("x").get("phase") == "Pending", what="Pending")
    patched = len(h.api.patches)
    loop_thread = threading.get_ident()
    holding, release = threading.Event(), threading.Event()
    says = nixery.k8s.watch._says

    def held_says(current: Any, wanted: Any) -> bool:
        if threading.get_ident() != loop_thread and not holding.is_set():
            holding.set()  # the first walk only
            release.wait(30)
        return says(current, wanted)

    monkeypatch.setattr(nixery.k8s.watch, "_says", held_says)
    try:
        h.store.set_source(FILES, [file_declaring("x", ["figlet"])])  # x in conflict: its walk is held
        await eventually(holding.is_set, what="the walk held in its thread")
        h.store.set_source(FILES, [])  # and out of it again
    finally:
        release.set()
    await eventually(lambda: h.watch._walked == h.watch._table_changes, what="the walks done")
    await asyncio.sleep(0.2)  # a Conflict queued would be written by now
    assert h.api.patches[patched:] == [] and h.api.status("x")["phase"] == "Pending"


async def test_conflicting_pending_write_is_skipped(harness) -> None:
    """A Pending status is only written over the version it was decided on (another replica may
    have written a result meanwhile): a 409 is not retried."""
    h = await harness()
    h.api.create("x", {"tag": "v1", "contents": ["hello"]})
    await eventually(lambda: h.api.status("x").get("phase") == "Pending", what="Pending")
    patched = len(h.api.patches)
    with pytest.raises(ApiError) as caught:
        await h.watch.client.patch_status("x", None, {"phase": "Pending"}, resource_version="1")
    assert caught.value.status == 409
    assert len(h.api.patches) == patched + 1


async def test_list_follows_continue_pages(aiohttp_server) -> None:
    api = FakeKubeApi()
    for n in range(5):
        api.create(f"img{n}", {"tag": "v1", "contents": ["hello"]})
    server = await aiohttp_server(api.app)
    client = KubeClient(KubeConfig(server=str(server.make_url("")).rstrip("/"), token=TOKEN))
    items, version = await client.list(limit=2)
    await client.close()
    assert [i["metadata"]["name"] for i in items] == [f"img{n}" for n in range(5)]
    assert version == str(api.resource_version) and api.list_requests == 3


def piecewise_watch_server(stream: bytes, piece: int) -> web.Application:
    """An API server whose watch (from resourceVersion 1) sends `stream` in pieces of `piece` bytes,
    as a network delivers a large event: a segment at a time."""

    async def collection(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(stream), piece):
            await response.write(stream[start : start + piece])
            await asyncio.sleep(0)  # each piece its own read
        return response

    app = web.Application()
    app.router.add_get(COLLECTION, collection)
    return app


async def test_a_large_event_arriving_in_pieces_is_read_in_linear_time(aiohttp_server) -> None:
    """A 7 MiB event (an object with a large label; under the 8 MiB limit) in 1,400-byte pieces:
    the watch joined each piece to the line so far, copying it again for every piece (18 GB,
    3.8 s of the event loop's time, 6 s before the object was seen). Pieces are now joined once,
    when the line ends; a line past the limit still ends the watch."""
    big = {"type": "ADDED", "object": {"metadata": {"name": "big"}, "data": {"labels": {"a": "x" * (7 << 20)}}}}
    stream = json.dumps(big).encode() + b"\n" + json.dumps({"type": "BOOKMARK", "object": {}}).encode() + b"\n"
    server = await aiohttp_server(piecewise_watch_server(stream, 1400))
    client = KubeClient(KubeConfig(server=str(server.make_url("")).rstrip("/"), token=TOKEN))
    started = time.monotonic()
    try:
        lines = [line async for batch in client.watch("1", timeout_seconds=30) for line in batch]
    finally:
        await client.close()
    assert time.monotonic() - started < 2.0, f"{time.monotonic() - started:.1f} s to read the event"
    assert [json.loads(line)["type"] for line in lines] == ["ADDED", "BOOKMARK"]
    assert lines[0] == stream.split(b"\n")[0]

    server = await aiohttp_server(piecewise_watch_server(b"[" * (MAX_EVENT_BYTES + 1), 1 << 16))
    client = KubeClient(KubeConfig(server=str(server.make_url("")).rstrip("/"), token=TOKEN))
    try:
        with pytest.raises(ApiError, match="larger than"):
            [batch async for batch in client.watch("1", timeout_seconds=30)]
    finally:
        await client.close()


def test_json_nested_too_deep_is_read_around() -> None:
    """Only the values json cannot read are left out; brackets in strings do not count, and what is
    not an object, or not JSON, fails as json.loads does."""
    tricky = {"name": "deep", "note": 'brackets ]}[{ and a quote \\" in a string'}
    document = dumps({
        "items": [{"metadata": tricky, "data": {"arch": RawJSON(TOO_DEEP), "tag": "v1"}}, {"metadata": {"name": "ok"}}],
        "metadata": {"resourceVersion": "7"},
    })
    read = read_json(document.encode())
    assert read["metadata"] == {"resourceVersion": "7"} and read["items"][1] == {"metadata": {"name": "ok"}}
    assert read["items"][0]["metadata"] == tricky and read["items"][0]["data"]["tag"] == "v1"
    assert too_deep_fields(read["items"][0]["data"], "data") == ["data.arch[0][0]"]
    with pytest.raises(RecursionError):
        read_json(TOO_DEEP)
    with pytest.raises(ValueError):
        read_json('{"a": ' + TOO_DEEP[:1000] + "}")


def _self_signed(tmp_path: Path) -> tuple[Path, Path, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stand-in")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem", pem


async def test_kubeconfig_with_tls_and_token_file(tmp_path: Path) -> None:
    cert, key, pem = _self_signed(tmp_path)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)
    api = FakeKubeApi()
    api.create("tls", {"tag": "v1", "contents": ["hello"]})
    server = TestServer(api.app, host="127.0.0.1")
    await server.start_server(ssl=server_ssl)
    try:
        (tmp_path / "kube").mkdir()
        (tmp_path / "kube" / "token").write_text(TOKEN + "\n")
        kubeconfig = tmp_path / "kube" / "config"
        kubeconfig.write_text(yaml.safe_dump({
            "current-context": "c",
            "clusters": [{"name": "k", "cluster": {
                "server": f"https://127.0.0.1:{server.port}",
                "certificate-authority-data": base64.b64encode(pem).decode()}}],
            "users": [{"name": "u", "user": {"tokenFile": "token"}}],  # relative to the kubeconfig
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        }))
        client = KubeClient(load_kube_config(kubeconfig))
        items, _ = await client.list()
        assert [i["metadata"]["name"] for i in items] == ["tls"]
        await client.close()
        # without the CA the server is not trusted
        untrusted = KubeClient(KubeConfig(server=f"https://127.0.0.1:{server.port}", token=TOKEN))
        with pytest.raises(Exception, match="certificate verify failed|CERTIFICATE_VERIFY_FAILED"):
            await untrusted.list()
        await untrusted.close()
    finally:
        await server.close()


def test_kubeconfig_rules(tmp_path: Path) -> None:
    def write(user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
        path = tmp_path / "config"
        path.write_text(yaml.safe_dump({
            "current-context": "c",
            "clusters": [{"name": "k", "cluster": cluster or {"server": "http://127.0.0.1:1/"}}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        }))
        return path

    config = kubeconfig_config(write({"token": "abc"}))
    assert config.server == "http://127.0.0.1:1" and config.headers() == {"Authorization": "Bearer abc"}
    config = kubeconfig_config(write({"username": "me", "password": "pw"}))
    assert config.headers()["Authorization"] == "Basic " + base64.b64encode(b"me:pw").decode()
    with pytest.raises(KubeConfigError, match="exec"):
        kubeconfig_config(write({"exec": {"command": "aws"}}))
    with pytest.raises(KubeConfigError, match="no server"):
        kubeconfig_config(write({"token": "t"}, {"insecure-skip-tls-verify": True}))
    insecure = kubeconfig_config(write({"token": "t"}, {"server": "https://h:6443", "insecure-skip-tls-verify": True}))
    assert isinstance(insecure.ssl, ssl.SSLContext) and insecure.ssl.verify_mode == ssl.CERT_NONE


def test_in_cluster_config(tmp_path: Path) -> None:
    cert, _, _ = _self_signed(tmp_path)
    (tmp_path / "sa").mkdir()
    (tmp_path / "sa" / "token").write_text("first")
    (tmp_path / "sa" / "ca.crt").write_bytes(cert.read_bytes())
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    config = in_cluster_config(env, root=tmp_path / "sa")
    assert config.server == "https://[fd00::1]:443"
    assert config.headers() == {"Authorization": "Bearer first"}
    (tmp_path / "sa" / "token").write_text("rotated")  # projected tokens rotate: read on every request
    assert config.headers() == {"Authorization": "Bearer rotated"}
    with pytest.raises(KubeConfigError):
        in_cluster_config({}, root=tmp_path / "sa")


def test_settings_for_the_watch(tmp_path: Path) -> None:
    from nixery.config import ConfigError, load

    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text("{}")
    settings = load({"NIXERY_K8S_WATCH": "true", "KUBECONFIG": f"{kubeconfig}:/other", "HOME": str(tmp_path)})
    assert settings.k8s_watch and settings.kubeconfig == kubeconfig
    with pytest.raises(ConfigError, match="NIXERY_K8S_WATCH"):
        load({"NIXERY_K8S_WATCH": "true", "HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="KUBECONFIG"):
        load({"NIXERY_K8S_WATCH": "true", "KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path)})
    assert load({"HOME": str(tmp_path)}).k8s_watch is False
