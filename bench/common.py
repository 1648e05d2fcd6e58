"""Shared helpers of the benchmarks: processes to compare against, wrk, reports.

Every benchmark runs on 127.0.0.1 only, bounds each load loop in time, and
writes its tables to docs/benchmarks/<name>.md together with the command that
produced them and the machine they ran on.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the tests' process helpers are reused here
    sys.path.insert(0, str(REPO))

from tests import daemons  # noqa: E402
from tests.daemons import process_tree  # noqa: E402
from tests.registry import DOCKER_MANIFEST, OCI_MANIFEST, RegistryProcess, free_port  # noqa: E402

__all__ = ["DOCKER_MANIFEST", "OCI_MANIFEST", "RegistryProcess", "free_port", "process_tree"]

DOCS = REPO / "docs" / "benchmarks"
BENCH_PKGS = REPO / "bench" / "data" / "pkgs"
BUSYBOX_PKGS = REPO / "pkgs" / "busybox"
#: Generated data and scratch directories (never in git).
SCRATCH = Path(os.environ.get("NIXERY_BENCH_SCRATCH") or REPO / ".cache" / "bench")
MB = 1_000_000
MANIFEST_ACCEPT = f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"


# ---- the machine ---------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    mem = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024 // 1024
    return (
        f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, {mem} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def wait_for_quiet(max_load: float = 1.0, timeout: float = 120.0) -> str:
    """Wait (bounded) for the 1-minute load average to drop; returns it either way."""
    deadline = time.monotonic() + timeout
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(5)
    return load_average()


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def need(*tools: str) -> None:
    missing = [t for t in tools if not have(t)]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (run `bash scripts/install-system-deps.sh`)")


# ---- Nix -----------------------------------------------------------------------


def nix_build(attrs: Sequence[str], pkgs: Path = BENCH_PKGS, timeout: float = 900) -> list[str]:
    """Build attributes of a package set; returns their output paths (no GC roots)."""
    argv = ["nix-build", str(pkgs), "--no-out-link"]
    for attr in attrs:
        argv += ["-A", attr]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"nix-build failed: {out.stderr[-3000:]}")
    return out.stdout.split()


def closure(paths: Sequence[str]) -> list[str]:
    out = subprocess.run(["nix-store", "--query", "--requisites", *paths], capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


def path_size(paths: Sequence[str]) -> int:
    """Bytes of regular files under the paths (what a tar of them holds)."""
    total = 0
    for root in paths:
        for directory, _, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(directory, name))
                    if not os.path.islink(os.path.join(directory, name)):
                        total += st.st_size
    return total


# ---- processes -----------------------------------------------------------------


def registry(storage: Path, *, workers: int = 1, pkgs: Path = BENCH_PKGS, **env: str) -> RegistryProcess:
    """A `nixery serve` on a free port, on the benchmarks' package set."""
    settings = {"NIXERY_PKGS_PATH": str(pkgs), "NIXERY_WORKERS": str(workers), **env}
    storage.mkdir(parents=True, exist_ok=True)
    return RegistryProcess(storage=storage, env=settings, log_path=storage.parent / f"nixery-{storage.name}.log")


def ready_registry(storage: Path, *, pkgs: Path = BENCH_PKGS, **env: str) -> RegistryProcess:
    """`registry(...)` started, with its layer writers and Nix evaluator warmed up, as on a
    registry that has been running."""
    registry_process = registry(storage, pkgs=pkgs, **env).start()
    ready = ['"layers.writers_ready"']
    if env.get("NIXERY_NIX_EVALUATOR", "repl") == "repl":
        ready.append('"nix.evaluator_ready"')
    deadline = time.monotonic() + 60
    while not all(event in registry_process.log() for event in ready):
        if time.monotonic() > deadline:
            registry_process.stop()
            raise RuntimeError(f"the registry did not warm up: {registry_process.log()[-2000:]}")
        time.sleep(0.02)
    return registry_process


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


class Daemon(daemons.LoopbackServer):
    """A peer server started by a benchmark and stopped by pid (never by name)."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path, ready_path: str = "/"):
        self.name, self.argv, self.port, self.log, self.ready_path = name, argv, port, log, ready_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> Daemon:
        self.process = daemons.start_http_server(self.argv, self.log, self.url + self.ready_path, self.name,
                                                 timeout=timeout)
        return self

    def stop(self) -> None:
        daemons.stop(self.process, grace=10)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def docker_registry(root: Path, *, access_log: bool = True, level: str = "info") -> Daemon:
    """The CNCF reference registry (distribution 2.8, Debian's `docker-registry`)
    with the Debian package's default settings (a log line per request, an
    in-memory blob descriptor cache), on filesystem storage, without auth."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"log:\n  level: {level}\n"
        f"  accesslog:\n    disabled: {'false' if access_log else 'true'}\n"
        "storage:\n  cache:\n    blobdescriptor: inmemory\n"
        f"  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  headers:\n    X-Content-Type-Options: [nosniff]\n"
    )
    return Daemon("docker-registry", ["docker-registry", "serve", str(config)], port, root / "registry.log", "/v2/")


def nginx(root: Path, files: Path, *, workers: str = "auto") -> Daemon:
    """nginx serving the files under `files` (sendfile on, no access log)."""
    port = free_port()
    site = f"  server {{\n    listen 127.0.0.1:{port};\n    root {files};\n  }}"
    config = daemons.nginx_config(root, site, workers=workers)
    return Daemon("nginx", ["nginx", "-c", str(config), "-p", str(root)], port, root / "nginx.log")


def nginx_front(root: Path, storage: Path, upstream: str, *, workers: str = "auto") -> Daemon:
    """nginx in front of a nixery on `upstream`, as deploy/nginx/nixery.conf sets it up:
    nixery answers blob requests with X-Accel-Redirect, nginx sends the files."""
    port = free_port()
    site = daemons.nginx_front_site(listen=port, upstream=upstream, storage=storage)
    config = daemons.nginx_config(root, site, workers=workers)
    return Daemon("nginx front", ["nginx", "-c", str(config), "-p", str(root)], port, root / "nginx.log", "/v2/")


def request(host: str, path: str, *, method: str = "GET", accept: str | None = None,
            timeout: float = 600) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request to HOST:PORT on loopback; returns (status, headers, body)."""
    return daemons.http_request(host, path, method=method, accept=accept, timeout=timeout)


# ---- wrk -----------------------------------------------------------------------

_WRK_LUA = """
wrk.method = {method}
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,"
    .. "\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d}}\\n",
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors and non-2xx/3xx answers

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / MB


def wrk(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None, duration: float = 15,
    threads: int = 2, connections: int = 32, scratch: Path | None = None,
) -> WrkResult:
    lines = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in (headers or {}).items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", dir=scratch, delete=False) as script:
        script.write(_WRK_LUA.format(method=json.dumps(method), headers=lines))
    try:
        argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
                "-s", script.name, url]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    finally:
        os.unlink(script.name)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON "):])
            errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
            return WrkResult(
                requests=data["requests"], seconds=data["duration_us"] / 1e6, bytes=data["bytes"],
                p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000, errors=errors,
            )
    raise RuntimeError(f"wrk gave no result: {out.stdout[-1500:]} {out.stderr[-1500:]}")


def ab_head(
    url: str, *, headers: dict[str, str] | None = None, duration: float = 15, connections: int = 32
) -> WrkResult:
    """HEAD requests with ApacheBench (keep-alive): wrk waits for a body after a
    HEAD answer that carries a Content-Length, so it cannot load-test HEAD."""
    argv = ["ab", "-k", "-i", "-q", "-c", str(connections), "-t", f"{duration:g}", "-n", "1000000", "-s", "10"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 60)
    fields: dict[str, float] = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(":")
        key, words = key.strip(), value.split()
        if key in ("Complete requests", "Failed requests", "Non-2xx responses", "Time taken for tests",
                   "Total transferred") and words:
            fields[key] = float(words[0])
        elif key in ("50%", "99%") or (line.strip().startswith(("50%", "99%"))):
            pct, number = line.split()[:2]
            fields[pct] = float(number)
    if "Complete requests" not in fields:
        raise RuntimeError(f"ab gave no result: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    return WrkResult(
        requests=int(fields["Complete requests"]), seconds=fields["Time taken for tests"],
        bytes=int(fields.get("Total transferred", 0)), p50_ms=fields.get("50%", 0.0), p99_ms=fields.get("99%", 0.0),
        errors=int(fields.get("Failed requests", 0) + fields.get("Non-2xx responses", 0)),
    )


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes so far (from /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


# ---- timing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread(self) -> str:
        return f"{min(self.runs):.2f}-{max(self.runs):.2f}"


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    box: list[float] = []
    started = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - started)


# ---- reports ---------------------------------------------------------------------


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], REPO)
    return " ".join([".venv/bin/python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


def write_report(name: str, title: str, body: str, *, started: float) -> Path:
    """docs/benchmarks/<name>.md: the tables, the command and the machine."""
    DOCS.mkdir(parents=True, exist_ok=True)
    path = DOCS / f"{name}.md"
    header = (
        f"# {title}\n\n"
        f"Produced by `{command_line()}` on {time.strftime('%Y-%m-%d', time.gmtime())} "
        f"in {time.time() - started:.0f} s.\n\n"
        f"Machine: {machine()}. The CPUs are shared with other work (other engineers' "
        "test runs): compare the ratios of one run, not absolute figures across runs.\n\n"
    )
    path.write_text(header + body.rstrip() + "\n")
    print(f"\nwrote {path.relative_to(REPO)}")
    return path


def say(text: str) -> None:
    print(text, flush=True)
