"""containerd and dockerd started by the tests, each with private state.

Both run as root with their own sockets and directories under a temporary
directory, so they never touch a system daemon's images.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited ({process.returncode}): {log.read_text()[-3000:]}")
        if path.exists():
            return
        time.sleep(0.1)
    raise RuntimeError(f"daemon socket {path} did not appear: {log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
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
    process = subprocess.Popen(["containerd", "--config", str(config)], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        _wait_for(socket, process, log)
        yield socket
    finally:
        _stop(process)


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
        _wait_for(socket, process, log, timeout=60)
        deadline = time.monotonic() + 30
        while subprocess.run(["docker", "-H", f"unix://{socket}", "info"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not become ready: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield socket
    finally:
        _stop(process)
