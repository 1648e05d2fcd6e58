"""NixImage objects from the Kubernetes API: list, watch, and report status.

Plain HTTP against the API server (aiohttp), no client library:

    list   GET   /apis/k8s.nixos.org/v1alpha/niximages?limit=500[&continue=…]
    watch  GET   …/niximages?watch=1&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T
    status PATCH …/niximages/NAME/status   (application/merge-patch+json)

The watch loop keeps the declaration store's `kubernetes` source equal to the
cluster's objects:

* a list replaces the whole table (objects deleted while we were away vanish)
  and gives the resourceVersion to watch from;
* ADDED / MODIFIED / DELETED events update it; BOOKMARK events only move the
  resourceVersion on;
* a watch that ends (the server's timeoutSeconds, a dropped connection, a
  read time-out) is opened again from the last resourceVersion seen;
* 410 Gone (as the response's status or as an ERROR event: our
  resourceVersion is too old) means list again;
* any other failure is retried with exponential back-off and jitter, up to
  `max_backoff` seconds; the registry keeps serving what it knows meanwhile.

Status (`status` subresource; NixImage is cluster-scoped, but namespaced
objects are addressed correctly too):

    phase: Pending | Ready | Failed | Invalid | Conflict
    image: curl-and-jq:v1        digest / ociDigest: manifest digests when Ready
    error: why Failed, Invalid or Conflict      observedGeneration, builtAt

An object's status is patched only when it differs from what we want it to
say, so our own patches (which come back as MODIFIED events) change nothing
and several replicas do not fight: `Pending` is written with the object's
resourceVersion as a precondition and never over a result another replica
wrote for the same generation, and the first result for a generation stays
(except that Ready replaces Failed): replicas or nodes whose builds differ
never take turns rewriting it. So `digest` is that of the generation's first
successful build.

Credentials: in a pod, the service account (token re-read on every request,
so rotated tokens work); elsewhere the kubeconfig (KUBECONFIG or
~/.kube/config: its current context's server, CA, token, token file, client
certificate, or user name and password; exec and auth-provider plugins are
not supported).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import structlog
import yaml

from nixery.declarations import (
    _SOURCE_RANK,
    GROUP,
    KUBERNETES,
    VERSION,
    Declaration,
    DeclarationStore,
    InvalidDeclaration,
    parse_declaration,
)
from nixery.registry.mediatypes import ManifestFormat

if TYPE_CHECKING:
    from nixery.images import ImageRecord

log = structlog.get_logger(__name__)

PLURAL = "niximages"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_EVENT_BYTES = 8 << 20


class KubeConfigError(Exception):
    """No usable cluster credentials; the message says what is missing."""


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Gone(ApiError):
    """410: the resourceVersion is too old (or a continue token expired): list again."""


# ---- credentials -------------------------------------------------------


@dataclass
class KubeConfig:
    server: str  # https://host:port, no trailing slash
    ssl: ssl.SSLContext | bool | None = None  # None: default verification; False: none (http or insecure)
    token: str | None = None
    token_file: Path | None = None
    basic_auth: tuple[str, str] | None = None
    description: str = ""

    def headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file is not None:
            token = self.token_file.read_text().strip()
        if token:
            return {"Authorization": f"Bearer {token}"}
        if self.basic_auth is not None:
            raw = f"{self.basic_auth[0]}:{self.basic_auth[1]}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}


def in_cluster_available(env: Mapping[str, str] | None = None, root: Path = SERVICE_ACCOUNT_DIR) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and (root / "token").is_file()


def in_cluster_config(env: Mapping[str, str] | None = None, root: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host or not (root / "token").is_file():
        raise KubeConfigError("not in a pod: KUBERNETES_SERVICE_HOST or the service account token is missing")
    if ":" in host:
        host = f"[{host}]"
    context = ssl.create_default_context(cafile=str(root / "ca.crt")) if (root / "ca.crt").is_file() else None
    return KubeConfig(
        server=f"https://{host}:{port}",
        ssl=context,
        token_file=root / "token",
        description="in-cluster service account",
    )


def _named(entries: Any, name: str, what: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            return dict(entry.get(what) or {})
    raise KubeConfigError(f"kubeconfig has no {what} named {name!r}")


def kubeconfig_config(path: Path, context_name: str | None = None) -> KubeConfig:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from None
    if not isinstance(config, Mapping):
        raise KubeConfigError(f"kubeconfig {path} is not a mapping")
    context_name = context_name or config.get("current-context")
    if not context_name:
        raise KubeConfigError(f"kubeconfig {path} has no current-context")
    context = _named(config.get("contexts"), context_name, "context")
    cluster = _named(config.get("clusters"), context.get("cluster", ""), "cluster")
    user = _named(config.get("users"), context.get("user", ""), "user") if context.get("user") else {}
    base = path.parent

    def file(value: str) -> Path:
        return Path(value) if os.path.isabs(value) else base / value

    server = str(cluster.get("server") or "").rstrip("/")
    if not server:
        raise KubeConfigError(f"kubeconfig cluster {context.get('cluster')!r} has no server")
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError(
            "kubeconfig user uses an exec or auth-provider plugin, which nixery does not run: "
            "use a token (e.g. a service account's), a token file or a client certificate"
        )
    tls: ssl.SSLContext | bool | None = None
    if server.startswith("https://"):
        if cluster.get("insecure-skip-tls-verify"):
            context_ssl = ssl.create_default_context()
            context_ssl.check_hostname = False
            context_ssl.verify_mode = ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
            context_ssl = ssl.create_default_context(cadata=pem)
        elif cluster.get("certificate-authority"):
            context_ssl = ssl.create_default_context(cafile=str(file(cluster["certificate-authority"])))
        else:
            context_ssl = ssl.create_default_context()
        if cluster.get("tls-server-name"):
            context_ssl.check_hostname = False  # the name differs from the address; the CA still verifies
        _load_client_certificate(context_ssl, user, file)
        tls = context_ssl
    token_file = file(user["tokenFile"]) if user.get("tokenFile") else None
    basic = (str(user["username"]), str(user.get("password", ""))) if user.get("username") else None
    return KubeConfig(
        server=server,
        ssl=tls,
        token=user.get("token"),
        token_file=token_file,
        basic_auth=basic,
        description=f"kubeconfig {path} context {context_name}",
    )


def _load_client_certificate(context: ssl.SSLContext, user: Mapping[str, Any], file: Any) -> None:
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        # ssl loads certificates from files only: write them to a private directory for the moment.
        with tempfile.TemporaryDirectory(prefix="nixery-kube-") as directory:
            cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
            for target, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(base64.b64decode(data))
            context.load_cert_chain(str(cert_path), str(key_path))
    elif user.get("client-certificate") and user.get("client-key"):
        context.load_cert_chain(str(file(user["client-certificate"])), str(file(user["client-key"])))


def load_kube_config(kubeconfig: Path | None = None, env: Mapping[str, str] | None = None) -> KubeConfig:
    """An explicit kubeconfig, else the pod's service account, else ~/.kube/config."""
    env = os.environ if env is None else env
    if kubeconfig is not None:
        return kubeconfig_config(kubeconfig)
    if in_cluster_available(env):
        return in_cluster_config(env)
    default = Path(env.get("HOME") or Path.home()) / ".kube" / "config"
    if default.is_file():
        return kubeconfig_config(default)
    raise KubeConfigError("no cluster credentials: not in a pod, KUBECONFIG is not set and ~/.kube/config is missing")


# ---- HTTP --------------------------------------------------------------


class KubeClient:
    """The few API calls the watch needs."""

    def __init__(self, config: KubeConfig, *, request_timeout: float = 30.0):
        self.config = config
        self.request_timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.config.ssl if self.config.ssl is not None else True)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def collection_path() -> str:
        return f"/apis/{GROUP}/{VERSION}/{PLURAL}"

    @staticmethod
    def status_path(name: str, namespace: str | None = None) -> str:
        scope = f"/namespaces/{quote(namespace, safe='')}" if namespace else ""
        return f"/apis/{GROUP}/{VERSION}{scope}/{PLURAL}/{quote(name, safe='')}/status"

    @staticmethod
    async def _error(response: aiohttp.ClientResponse) -> ApiError:
        text = await response.text(errors="replace")
        message = text[:500]
        with contextlib.suppress(ValueError, AttributeError):
            message = json.loads(text).get("message") or message
        return (Gone if response.status == 410 else ApiError)(response.status, message)

    async def list(self, *, limit: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every object (following `continue` pages) and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            params = {"limit": str(limit)}
            if token:
                params["continue"] = token
            async with self._client().get(
                self.config.server + self.collection_path(),
                params=params,
                headers={**self.config.headers(), "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            ) as response:
                if response.status != 200:
                    raise await self._error(response)
                body = await response.json(content_type=None)
            items.extend(item for item in body.get("items") or [] if isinstance(item, dict))
            metadata = body.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion") or "")

    async def watch(self, resource_version: str, *, timeout_seconds: int) -> AsyncIterator[dict[str, Any]]:
        """The events after `resource_version`, until the server ends the watch or the connection drops."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.request_timeout, sock_read=timeout_seconds + 30)
        async with self._client().get(
            self.config.server + self.collection_path(),
            params=params,
            headers={**self.config.headers(), "Accept": "application/json"},
            timeout=timeout,
        ) as response:
            if response.status != 200:
                raise await self._error(response)
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
                if len(buffer) > MAX_EVENT_BYTES:
                    raise ApiError(0, f"a watch event is larger than {MAX_EVENT_BYTES} bytes")
            if buffer.strip():
                yield json.loads(buffer)

    async def patch_status(
        self, name: str, namespace: str | None, status: dict[str, Any], *, resource_version: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}  # precondition: 409 if it moved on
        async with self._client().patch(
            self.config.server + self.status_path(name, namespace),
            data=json.dumps(body),
            headers={
                **self.config.headers(),
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
            timeout=aiohttp.ClientTimeout(total=self.request_timeout),
        ) as response:
            if response.status != 200:
                raise await self._error(response)
            return await response.json(content_type=None)


# ---- the watch ---------------------------------------------------------

_STATUS_FIELDS = ("phase", "image", "digest", "ociDigest", "error", "observedGeneration", "builtAt")


@dataclass
class _Object:
    key: str
    name: str
    namespace: str | None
    resource_version: str
    generation: int | None
    status: dict[str, Any]
    fingerprint: str  # what the declaration depends on: name, data, generation
    declaration: Declaration | None
    problem: str | None
    result: dict[str, Any] | None = None  # the last build's status fields, for `fingerprint`


def object_key(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    namespace = metadata.get("namespace")
    return f"{namespace}/{metadata.get('name')}" if namespace else str(metadata.get("name"))


def _object_origin(key: str) -> str:
    return f"niximage/{key}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _says(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the status `current` already says everything `wanted` does (absent fields are null)."""
    return all(current.get(name) == wanted.get(name) for name in _STATUS_FIELDS if name in wanted)


@dataclass
class _Backoff:
    base: float
    limit: float
    failures: int = 0

    def reset(self) -> None:
        self.failures = 0

    def next(self) -> float:
        delay = min(self.limit, self.base * (2**self.failures))
        self.failures += 1
        return delay * random.uniform(0.75, 1.25)


@dataclass
class NixImageWatch:
    """Keeps the store's `kubernetes` declarations in step with the cluster, and writes status."""

    client: KubeClient
    store: DeclarationStore
    min_backoff: float = 0.5
    max_backoff: float = 30.0
    watch_timeout: int = 300
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    objects: dict[str, _Object] = field(default_factory=dict)
    resource_version: str | None = None
    _winners: dict[str, Declaration] = field(default_factory=dict)
    _losers: dict[str, Declaration] = field(default_factory=dict)
    _status_queue: dict[str, tuple[dict[str, Any], bool]] = field(default_factory=dict)
    _status_ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: counters for tests and logs
    lists: int = 0
    watches: int = 0

    def __post_init__(self) -> None:
        self.store.add_reporter(KUBERNETES, self)

    # ---- list and watch --------------------------------------------

    async def run(self) -> None:
        backoff = _Backoff(self.min_backoff, self.max_backoff)
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                    backoff.reset()
                await self._watch(backoff)
            except asyncio.CancelledError:
                raise
            except Gone as exc:
                log.info("k8s.watch_expired", resource_version=self.resource_version, reason=exc.message)
                self.resource_version = None  # list again, at once
            except (aiohttp.ClientError, ApiError, OSError, TimeoutError, ValueError) as exc:
                delay = backoff.next()
                log.warning(
                    "k8s.watch_failed", error=str(exc) or type(exc).__name__, retry_in=round(delay, 2),
                    resource_version=self.resource_version,
                )
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        items, resource_version = await self.client.list()
        self.lists += 1
        previous = self.objects
        self.objects = {}
        for item in items:
            self._remember(item, previous.get(object_key(item)))
        self.resource_version = resource_version
        log.info("k8s.listed", objects=len(items), resource_version=resource_version)
        self._publish()
        self.synced.set()

    async def _watch(self, backoff: _Backoff) -> None:
        assert self.resource_version is not None
        self.watches += 1
        started, events = time.monotonic(), 0
        async for event in self.client.watch(self.resource_version, timeout_seconds=self.watch_timeout):
            events += 1
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                status = int(obj.get("code") or 0)
                message = str(obj.get("message") or obj.get("reason") or "watch error")
                raise (Gone if status == 410 else ApiError)(status, message)
            version = (obj.get("metadata") or {}).get("resourceVersion")
            if version:
                self.resource_version = str(version)
            backoff.reset()
            if kind == "BOOKMARK":
                continue
            key = object_key(obj)
            if kind in ("ADDED", "MODIFIED"):
                if not self._remember(obj, self.objects.get(key)):
                    self._update_status(self.objects[key])  # only its status or metadata changed
                    continue
            elif kind == "DELETED":
                if self.objects.pop(key, None) is not None:
                    log.info("k8s.object_deleted", object=_object_origin(key))
            else:
                continue
            self._publish()
        if events == 0 and time.monotonic() - started < 1.0:
            # Ended at once with nothing to say: don't spin on a server that closes every watch.
            await asyncio.sleep(backoff.next())
        else:
            log.debug("k8s.watch_ended", events=events, resource_version=self.resource_version)

    def _remember(self, obj: Mapping[str, Any], previous: _Object | None) -> bool:
        """Keep `obj`; True when what it declares may have changed."""
        metadata = obj.get("metadata") or {}
        key = object_key(obj)
        generation = metadata.get("generation")
        fingerprint = json.dumps(
            [metadata.get("uid"), generation, metadata.get("name"), obj.get("data"), obj.get("kind"),
             obj.get("apiVersion")],
            sort_keys=True,
            default=str,
        )
        status = dict(obj.get("status") or {})
        if previous is not None and previous.fingerprint == fingerprint:
            previous.resource_version = str(metadata.get("resourceVersion") or "")
            previous.status = status
            self.objects[key] = previous
            return False
        rank = (_SOURCE_RANK[KUBERNETES], str(metadata.get("creationTimestamp") or ""), key)
        declaration, problem = None, None
        try:
            declaration = parse_declaration(obj, origin=_object_origin(key), source=KUBERNETES, rank=rank, key=key)
        except InvalidDeclaration as exc:
            problem = str(exc)
            log.warning("declarations.invalid", object=_object_origin(key), name=metadata.get("name"), problem=problem)
        self.objects[key] = _Object(
            key=key,
            name=str(metadata.get("name")),
            namespace=metadata.get("namespace"),
            resource_version=str(metadata.get("resourceVersion") or ""),
            generation=generation if isinstance(generation, int) else None,
            status=status,
            fingerprint=fingerprint,
            declaration=declaration,
            problem=problem,
        )
        return True

    def _publish(self) -> None:
        self.store.set_source(KUBERNETES, [o.declaration for o in self.objects.values() if o.declaration])

    # ---- status (StatusReporter) -----------------------------------

    def table_changed(self, winners: Mapping[str, Declaration], losers: Mapping[str, Declaration]) -> None:
        self._winners, self._losers = dict(winners), dict(losers)
        for obj in self.objects.values():
            self._update_status(obj)

    def wants_build_result(self, declaration: Declaration) -> bool:
        obj = self.objects.get(declaration.key or "")
        if obj is None or obj.declaration is None or not obj.declaration.same_image(declaration):
            return False
        if obj.result is not None and obj.result["phase"] == "Ready":
            return False  # a failure is followed again: the next pull may succeed
        status = obj.status
        return not (
            status.get("phase") == "Ready"
            and status.get("observedGeneration") == obj.generation
            and status.get("image") == declaration.reference
        )

    def build_finished(self, declaration: Declaration, record: ImageRecord | None, error: str | None) -> None:
        obj = self.objects.get(declaration.key or "")
        if obj is None or obj.declaration is None or not obj.declaration.same_image(declaration):
            return  # changed or deleted meanwhile: this result is about something else
        if record is not None:
            oci = record.manifests.get(ManifestFormat.OCI)
            obj.result = {
                "phase": "Ready",
                "digest": str(record.default_manifest.digest),  # what pods get: OCI for zstd images
                "ociDigest": str(oci.digest) if oci else None,
                "error": None,
                "builtAt": datetime.fromtimestamp(record.built_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        else:
            obj.result = {"phase": "Failed", "digest": None, "ociDigest": None, "error": error, "builtAt": None}
        self._update_status(obj)

    def _desired_status(self, obj: _Object) -> tuple[dict[str, Any], bool] | None:
        """The status to write and whether it needs the resourceVersion precondition; None: leave it."""
        common = {"observedGeneration": obj.generation}
        if obj.problem is not None:
            return {**common, "phase": "Invalid", "error": obj.problem, "image": None, "digest": None,
                    "ociDigest": None, "builtAt": None}, False
        declaration = obj.declaration
        assert declaration is not None
        winner = self._losers.get(obj.key)
        if winner is not None:
            return {**common, "phase": "Conflict", "image": declaration.reference, "digest": None, "ociDigest": None,
                    "builtAt": None, "error": f"{declaration.reference} is already declared by {winner.origin}"}, False
        if obj.key not in self._winners:
            return None
        status = obj.status
        this_generation = (
            status.get("observedGeneration") == obj.generation and status.get("image") == declaration.reference
        )
        if obj.result is not None:
            # The first result for a generation stays, but Ready replaces Failed: replicas (or nodes)
            # whose builds differ, in a digest or an error message, must not take turns rewriting it.
            if this_generation and (
                status.get("phase") == "Ready" or (status.get("phase") == "Failed" and obj.result["phase"] == "Failed")
            ):
                return None
            return {**common, "image": declaration.reference, **obj.result}, False
        if this_generation and status.get("phase") in ("Pending", "Ready", "Failed"):
            return None  # already said, by us or another replica
        return {**common, "phase": "Pending", "image": declaration.reference, "digest": None, "ociDigest": None,
                "error": None, "builtAt": None}, True

    def _update_status(self, obj: _Object) -> None:
        desired = self._desired_status(obj)
        if desired is None:
            return
        status, conditional = desired
        if _says(obj.status, status):
            return
        self._status_queue[obj.key] = (status, conditional)
        self._status_ready.set()

    async def write_statuses(self) -> None:
        """Patch queued statuses, one object at a time; failures are retried with back-off."""
        backoff = _Backoff(self.min_backoff, self.max_backoff)
        while True:
            await self._status_ready.wait()
            self._status_ready.clear()
            while self._status_queue:
                key = next(iter(self._status_queue))
                status, conditional = self._status_queue.pop(key)
                obj = self.objects.get(key)
                if obj is None or _says(obj.status, status):
                    continue  # gone, or already says so (an earlier patch or another replica's)
                try:
                    updated = await self.client.patch_status(
                        obj.name, obj.namespace, status,
                        resource_version=obj.resource_version if conditional else None,
                    )
                except asyncio.CancelledError:
                    raise
                except ApiError as exc:
                    if exc.status in (404, 409):
                        # Deleted, or changed since we looked: the watch brings the news and we decide again.
                        log.info("k8s.status_skipped", object=_object_origin(key), status=exc.status)
                        continue
                    self._retry_status(key, status, conditional, exc, backoff)
                    await asyncio.sleep(backoff.next())
                    continue
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    self._retry_status(key, status, conditional, exc, backoff)
                    await asyncio.sleep(backoff.next())
                    continue
                backoff.reset()
                current = self.objects.get(key)
                if current is not None and isinstance(updated, dict):
                    current.status = dict(updated.get("status") or status)
                    version = (updated.get("metadata") or {}).get("resourceVersion")
                    if version:
                        current.resource_version = str(version)
                log.info(
                    "k8s.status_patched", object=_object_origin(key), phase=status.get("phase"),
                    digest=status.get("digest"), error=status.get("error"),
                )

    def _retry_status(
        self, key: str, status: dict[str, Any], conditional: bool, exc: Exception, backoff: _Backoff
    ) -> None:
        log.warning("k8s.status_failed", object=_object_origin(key), error=str(exc) or type(exc).__name__)
        self._status_queue.setdefault(key, (status, conditional))  # unless a newer one is already queued
        self._status_ready.set()


async def start_watch(
    settings: Any,
    store: DeclarationStore,
    *,
    config: KubeConfig | None = None,
    sync_timeout: float = 5.0,
    **options: Any,
) -> NixImageWatch:
    """Start watching NixImage objects; waits up to `sync_timeout` for the first list."""
    config = config or load_kube_config(getattr(settings, "kubeconfig", None))
    client = KubeClient(config)
    watch = NixImageWatch(client, store, **options)
    loop = asyncio.get_running_loop()
    store.add_task(loop.create_task(watch.run()))
    store.add_task(loop.create_task(watch.write_statuses()))
    store.add_task(loop.create_task(_close_on_cancel(client)))
    log.info("k8s.watch_started", server=config.server, credentials=config.description)
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(watch.synced.wait(), sync_timeout)
    if not watch.synced.is_set():
        log.warning("k8s.not_synced_yet", waited=round(time.monotonic() - started, 1))
    return watch


async def _close_on_cancel(client: KubeClient) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await client.close()
