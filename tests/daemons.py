"""containerd, dockerd and nginx started by the tests, each with private state.

Each runs as root with its own sockets, configuration and directories under a
temporary directory, so none touches a system daemon's images or settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class LoopbackServer:
    """A server of the tests or benchmarks listening on 127.0.0.1 at `port`."""

    port: int

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"


def http_request(
    host: str, path: str, *, method: str = "GET", accept: str | None = None, timeout: float = 300,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to HOST:PORT; returns (status, headers, body)."""
    import http.client

    hostname, port = host.rsplit(":", 1)
    connection = http.client.HTTPConnection(hostname, int(port), timeout=timeout)
    try:
        connection.request(method, path, headers={**({"Accept": accept} if accept else {}), **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def fetch(url: str) -> tuple[int, bytes]:
    """GET any URL (a signed redirect's, say): status and body, error statuses included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str,
               timeout: float = 30.0) -> None:
    """Wait for `ready()`; fail at once, with the end of its log, if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {log.read_text(errors='replace')[-3000:]}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} was not ready within {timeout:g} s: {log.read_text(errors='replace')[-3000:]}")


def answers_http(url: str) -> Callable[[], bool]:
    """True once `url` gives any HTTP answer (an error status counts: the server is up)."""
    import urllib.error
    import urllib.request

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    return ready


def start_http_server(argv: list[str], log: Path, ready_url: str, what: str, *, timeout: float = 20.0,
                      **popen: Any) -> subprocess.Popen[bytes]:
    """Start a server logging to `log`; return once `ready_url` answers (stopped again if it never does)."""
    process = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, **popen)
    try:
        wait_until(answers_http(ready_url), process, log, what, timeout=timeout)
    except RuntimeError:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen[bytes] | None, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def containerd(base: Path) -> Iterator[Path]:
    """Yields the socket of a private containerd."""
    base.mkdir(parents=True, exist_ok=True)
    socket = base / "containerd.sock"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base / "root"}"\nstate = "{base / "state"}"\n'
        f'[grpc]\n  address = "{socket}"\n'
        '[plugins."io.containerd.grpc.v1.cri"]\n  disable_tcp_service = true\n'
    )
    log = base / "containerd.log"
    process = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=open(log, "ab"), stderr=subprocess.STDOUT
    )
    try:
        wait_until(socket.exists, process, log, "containerd")
        yield socket
    finally:
        stop(process)


@contextlib.contextmanager
def dockerd(base: Path) -> Iterator[Path]:
    """Yields the socket of a private dockerd that trusts plain HTTP on loopback."""
    base.mkdir(parents=True, exist_ok=True)
    socket = base / "docker.sock"
    config = base / "daemon.json"
    config.write_text(json.dumps({"insecure-registries": ["127.0.0.0/8"]}))
    log = base / "dockerd.log"
    process = subprocess.Popen(
        [
            "dockerd", "--config-file", str(config), "--data-root", str(base / "data"),
            "--exec-root", str(base / "exec"), "--pidfile", str(base / "docker.pid"),
            "-H", f"unix://{socket}", "--iptables=false", "--ip6tables=false", "--bridge=none",
        ],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "DOCKER_CONFIG": str(base / "client")},
    )
    try:
        wait_until(socket.exists, process, log, "dockerd", timeout=60)
        deadline = time.monotonic() + 30
        while subprocess.run(["docker", "-H", f"unix://{socket}", "info"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not become ready: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield socket
    finally:
        stop(process)


#: nixery's nginx front, as shipped (deploy/nginx/nixery.conf).
NGINX_FRONT = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "nixery.conf"


def nginx_config(root: Path, server_blocks: str, *, workers: str = "auto") -> Path:
    """A whole nginx.conf around `server_blocks`, with every path under `root` (no access log)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "nginx.conf"
    # As root, workers run as root too: test directories are private to root.
    user = "user root;\n" if os.geteuid() == 0 else ""
    config.write_text(
        f"{user}worker_processes {workers};\ndaemon off;\npid {root / 'nginx.pid'};\n"
        f"error_log {root / 'error.log'} warn;\n"
        "events { worker_connections 1024; }\n"
        "http {\n  sendfile on;\n  tcp_nopush on;\n  access_log off;\n"
        "  default_type application/octet-stream;\n"
        f"  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n"
        f"  fastcgi_temp_path {root}/fastcgi;\n  uwsgi_temp_path {root}/uwsgi;\n  scgi_temp_path {root}/scgi;\n"
        f"{server_blocks}\n}}\n"
    )
    return config


def nginx_front_site(*, listen: int, upstream: str, storage: Path) -> str:
    """deploy/nginx/nixery.conf with its site values replaced (each must be there)."""
    site = NGINX_FRONT.read_text()
    for default, value in (
        ("listen 80;", f"listen 127.0.0.1:{listen};"),
        ("server 127.0.0.1:8080;", f"server {upstream};"),
        ("alias /var/lib/nixery/", f"alias {storage}/"),
        ("root /var/lib/nixery/verified;", f"root {storage}/verified;"),
    ):
        if default not in site:
            raise AssertionError(f"{NGINX_FRONT} no longer has {default!r}: update the tests and benchmarks")
        site = site.replace(default, value)
    return site


@contextlib.contextmanager
def nginx(root: Path, config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Runs nginx with `config` until the context ends; waits until it accepts on `port`."""
    log = root / "nginx.log"
    argv = ["nginx", "-c", str(config), "-p", str(root)]
    process = subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _accepts(port), process, log, "nginx", timeout=20)
        yield process
    finally:
        stop(process)


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def process_tree(pid: int) -> list[int]:
    """The pid and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    return tree


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie counts: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
