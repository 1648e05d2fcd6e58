"""Warm serving: nixery against the reference registry, and nginx for blobs.

    .venv/bin/python bench/serving.py            # full run (about 10 minutes)
    .venv/bin/python bench/serving.py --quick    # 3 s per row, 2 pulls per client

The same images are in both registries: nixery builds them (bench/data/pkgs:
`blob1m` and `blob50m` hold 1 MiB and 50 MiB of random bytes, so their big
layer is a ~1 MB and a ~50 MB blob), then `skopeo copy` pushes them,
byte-identical, into `docker-registry` (CNCF distribution 2.8, Debian's
package, its default settings: filesystem storage, in-memory blob descriptor
cache, a log line per request; nixery also logs every request). nginx serves
nixery's blob files from its storage directory (sendfile, no access log).

Each row loads each server with `wrk -t2 -c32` (`ab -k -c32` for HEAD: wrk
waits for a body after a HEAD answer with a Content-Length). The load is split
into rounds that alternate between the servers, so both see the same
background load on a shared machine; requests and bytes are summed over the
rounds and the p99 is the median of the rounds' p99. "CPU µs/req" is the
server's own CPU time (all its processes, from /proc) per request: a figure
the background load hardly changes.

End-to-end pulls: each client pulls the same image from each registry in
turn, its cache cleared before every pull (a fresh OCI directory for skopeo,
`rmi` for podman and docker, `image rm --sync` for containerd, each in private
storage).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import common as c

from tests import daemons

E2E_IMAGE = "shell/blob50m"


@dataclass
class Target:
    name: str
    url: str
    pids: Callable[[], list[int]]


@dataclass
class Row:
    label: str
    method: str
    path: str  # on the registries
    headers: dict[str, str] = field(default_factory=dict)
    nginx_path: str | None = None  # the same bytes from nginx


@dataclass
class Measured:
    result: c.WrkResult
    cpu_us: float  # server CPU per request


def load(target: Target, row: Row, *, duration: float, nginx: bool = False) -> tuple[c.WrkResult, float]:
    url = target.url + (row.nginx_path if nginx else row.path)
    pids = target.pids()
    cpu_before = c.cpu_seconds(pids)
    if row.method == "HEAD":
        result = c.ab_head(url, headers=row.headers, duration=duration)
    else:
        result = c.wrk(url, method=row.method, headers=row.headers, duration=duration)
    cpu = c.cpu_seconds(pids) - cpu_before
    return result, cpu


def measure(
    targets: list[Target], row: Row, *, duration: float, rounds: int, nginx: Target | None
) -> dict[str, Measured]:
    """Alternate the servers round by round; sum requests and bytes, median p99."""
    runs: dict[str, list[tuple[c.WrkResult, float]]] = {}
    order = [(t, False) for t in targets] + ([(nginx, True)] if nginx and row.nginx_path else [])
    for _ in range(rounds):
        for target, is_nginx in order:
            runs.setdefault(target.name, []).append(load(target, row, duration=duration / rounds, nginx=is_nginx))
    measured = {}
    for name, results in runs.items():
        total = sum(r.requests for r, _ in results)
        merged = c.WrkResult(
            requests=total,
            seconds=sum(r.seconds for r, _ in results),
            bytes=sum(r.bytes for r, _ in results),
            p50_ms=statistics.median(r.p50_ms for r, _ in results),
            p99_ms=statistics.median(r.p99_ms for r, _ in results),
            errors=sum(r.errors for r, _ in results),
        )
        measured[name] = Measured(merged, sum(cpu for _, cpu in results) / max(total, 1) * 1e6)
    return measured


# ---- end-to-end pulls --------------------------------------------------------------


class Client:
    name = ""

    def pull(self, reference: str) -> None: ...

    def clear(self, reference: str) -> None: ...


def _run(argv: list[str], timeout: float = 600) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {out.stderr[-1500:]}")


class Skopeo(Client):
    name = "skopeo copy (to an OCI dir)"

    def __init__(self, base: Path):
        self.layout = base / "skopeo-oci"

    def pull(self, reference: str) -> None:
        _run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{reference}", f"oci:{self.layout}:img"])

    def clear(self, reference: str) -> None:
        shutil.rmtree(self.layout, ignore_errors=True)


class Podman(Client):
    name = "podman pull"

    def __init__(self, base: Path):
        self.argv = ["podman", "--root", str(base / "podman-root"), "--runroot", str(base / "podman-run")]

    def pull(self, reference: str) -> None:
        _run([*self.argv, "pull", "-q", "--tls-verify=false", reference])

    def clear(self, reference: str) -> None:
        _run([*self.argv, "rmi", "-a", "-f"])


class Ctr(Client):
    name = "ctr image pull (containerd)"

    def __init__(self, socket: Path):
        self.argv = ["ctr", "--address", str(socket)]

    def pull(self, reference: str) -> None:
        _run([*self.argv, "image", "pull", "--plain-http", reference])

    def clear(self, reference: str) -> None:
        subprocess.run([*self.argv, "image", "rm", "--sync", reference], capture_output=True, timeout=120)


class Docker(Client):
    name = "docker pull (dockerd)"

    def __init__(self, socket: Path):
        self.argv = ["docker", "-H", f"unix://{socket}"]

    def pull(self, reference: str) -> None:
        _run([*self.argv, "pull", "-q", reference])

    def clear(self, reference: str) -> None:
        subprocess.run([*self.argv, "rmi", "-f", reference], capture_output=True, timeout=120)


@contextlib.contextmanager
def clients(base: Path, wanted: list[str]) -> Iterator[list[Client]]:
    base.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        found: list[Client] = []
        if "skopeo" in wanted and c.have("skopeo"):
            found.append(Skopeo(base))
        if "podman" in wanted and c.have("podman"):
            found.append(Podman(base))
        if "ctr" in wanted and c.have("containerd") and c.have("ctr"):
            found.append(Ctr(stack.enter_context(daemons.containerd(base / "containerd"))))
        if "docker" in wanted and c.have("dockerd"):
            found.append(Docker(stack.enter_context(daemons.dockerd(base / "docker"))))
        yield found


def pull_times(client: Client, targets: list[Target], image: str, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    for target in targets:  # one pull each first: daemons warm up, errors show early
        reference = f"{target.url.removeprefix('http://')}/{image}:latest"
        client.clear(reference)
        client.pull(reference)
        client.clear(reference)
    for _ in range(runs):
        for target in targets:
            reference = f"{target.url.removeprefix('http://')}/{image}:latest"
            client.clear(reference)
            started = time.perf_counter()
            client.pull(reference)
            times[target.name].append(time.perf_counter() - started)
            client.clear(reference)
    return times


# ---- the run ----------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s per row and server, 2 pulls per client")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of load per row and server")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds the duration is split into")
    parser.add_argument("--workers", default="1,2", help="NIXERY_WORKERS values to measure")
    parser.add_argument("--runs", type=int, default=5, help="timed pulls per client and registry")
    parser.add_argument("--clients", default="skopeo,podman,ctr,docker", help="end-to-end clients ('' for none)")
    parser.add_argument("--only", default="", help="comma-separated row labels to run (for iteration)")
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/benchmarks alone")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.runs = 3.0, 1, 2
    started = time.time()
    c.need("wrk", "ab", "docker-registry", "nginx", "skopeo", "nix-build")
    workers = [int(w) for w in args.workers.split(",") if w]

    base = c.SCRATCH / "serving"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    c.say("building the benchmark packages (bench/data/pkgs) ...")
    c.nix_build(["blob1m", "blob50m", "shell"])

    storage = base / "storage"
    ours = {w: c.registry(storage, workers=w) for w in workers}
    peer = c.docker_registry(base / "docker-registry")
    with contextlib.ExitStack() as stack:
        for server in ours.values():
            server.start()
            stack.callback(server.stop)
        stack.enter_context(peer)
        first = ours[workers[0]]
        c.say(f"nixery {[s.url for s in ours.values()]}, docker-registry {peer.url}")

        # Build in nixery, copy byte for byte into docker-registry, check the digests agree.
        digests: dict[str, str] = {}
        layers: dict[str, str] = {}
        for image in ("blob1m", "blob50m", E2E_IMAGE):
            digest, manifest = first.manifest(image, accept=c.MANIFEST_ACCEPT)
            digests[image] = digest
            layers[image] = max(manifest["layers"], key=lambda layer: layer["size"])["digest"]
            c.say(f"built {image}: {digest[:19]}, {sum(x['size'] for x in manifest['layers']) / c.MB:.1f} MB")
            subprocess.run(
                ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
                 f"docker://{first.host}/{image}:latest", f"docker://{peer.host}/{image}:latest"],
                check=True, capture_output=True, timeout=600,
            )
            status, headers, _ = c.request(peer.host, f"/v2/{image}/manifests/latest", accept=c.MANIFEST_ACCEPT)
            assert status == 200 and headers["Docker-Content-Digest"] == digest, (status, headers)

        nginx = c.nginx(base / "nginx", storage / "blobs")
        stack.enter_context(nginx)
        sizes = {image: (storage / "blobs" / "sha256" / layers[image][7:9] / layers[image][7:]).stat().st_size
                 for image in ("blob1m", "blob50m")}

        accept = {"Accept": c.MANIFEST_ACCEPT}
        rows = [
            Row("GET /v2/", "GET", "/v2/"),
            Row("GET manifest by tag", "GET", "/v2/blob1m/manifests/latest", accept),
            Row("HEAD manifest by tag", "HEAD", "/v2/blob1m/manifests/latest", accept),
            Row("GET manifest by digest", "GET", f"/v2/blob1m/manifests/{digests['blob1m']}", accept),
            Row("HEAD manifest by digest", "HEAD", f"/v2/blob1m/manifests/{digests['blob1m']}", accept),
        ]
        for image in ("blob1m", "blob50m"):
            digest = layers[image]
            rows.append(Row(
                f"GET blob {sizes[image] / c.MB:.1f} MB", "GET", f"/v2/{image}/blobs/{digest}",
                nginx_path=f"/sha256/{digest[7:9]}/{digest[7:]}",
            ))
        if args.only:
            rows = [r for r in rows if any(o.strip().lower() in r.label.lower() for o in args.only.split(","))]

        def tree(server: c.RegistryProcess | c.Daemon) -> Callable[[], list[int]]:
            return lambda: c.process_tree(server.process.pid)  # type: ignore[union-attr]

        peer_target = Target("docker-registry", peer.url, tree(peer))
        nginx_target = Target("nginx", nginx.url, tree(nginx))
        sections = []
        for w in workers:
            ours_target = Target("nixery", ours[w].url, tree(ours[w]))
            load_before = c.wait_for_quiet(max_load=1.5, timeout=60)
            c.say(f"\nNIXERY_WORKERS={w} (load average {load_before})")
            results = []
            for row in rows:
                m = measure([ours_target, peer_target], row, duration=args.duration, rounds=args.rounds,
                            nginx=nginx_target)
                results.append((row, m))
                o, p = m["nixery"].result, m["docker-registry"].result
                n = m.get("nginx")
                c.say(f"  {row.label:26} {o.rps:9.0f} vs {p.rps:9.0f} req/s ({_ratio(o.rps, p.rps)})"
                      + (f"  {o.mbps:7.0f} vs nginx {n.result.mbps:7.0f} MB/s" if n else "")
                      + (f"  ERRORS {o.errors}/{p.errors}" if o.errors or p.errors else ""))
            sections.append(serving_tables(w, results, load_before, c.load_average()))

        blob_rows = [row for row in rows if row.nginx_path]
        for front_kind in FRONTS if blob_rows else ():
            results, load_before = measure_front(front_kind, base, storage, blob_rows, nginx_target, args)
            sections.append(front_table(front_kind, results, load_before, c.load_average()))

        e2e = ""
        wanted = [x for x in args.clients.split(",") if x]
        if wanted:
            ours_targets = [Target(f"nixery (workers={w})", ours[w].url, tree(ours[w])) for w in workers]
            e2e = end_to_end(base, wanted, [*ours_targets, peer_target], args.runs)

    shutil.rmtree(base, ignore_errors=True)
    body = DESCRIPTION.format(
        duration=args.duration, rounds=args.rounds, peer=c.tool_version(["docker-registry", "--version"]),
        nginx=c.tool_version(["nginx", "-v"]), wrk=c.tool_version(["wrk", "--version"]),
    ) + "\n".join(sections) + e2e
    print("\n" + body)
    if not args.no_report:
        c.write_report("serving", "Warm serving: nixery vs docker-registry and nginx", body, started=started)
    return 0


DESCRIPTION = """\
Same images, byte-identical, in both registries (built by nixery, copied into
docker-registry with skopeo). `wrk -t2 -c32` ({duration:g} s per row and server,
in {rounds} rounds alternating between the servers; HEAD rows with `ab -k -c32`,
as wrk cannot load-test HEAD). Peer: {peer}, its Debian defaults (in-memory
blob descriptor cache, a log line per request; nixery logs every request
too). nginx ({nginx}) serves nixery's blob files from its storage directory,
with sendfile and no access log. docker-registry (Go) and nginx (2 worker
processes) use both CPUs; nixery with NIXERY_WORKERS=1 uses one. The load
generator runs on the same two CPUs. Ratios are nixery / peer: higher is
better for req/s and MB/s, lower for p99 and CPU per request.

"""


def _ratio(ours: float, peer: float) -> str:
    """`ours / peer` as "1.23x"; "-" when the peer finished nothing (a short --quick row on a busy machine)."""
    return f"{ours / peer:.2f}x" if peer else "-"


def serving_tables(
    workers: int, results: list[tuple[Row, dict[str, Measured]]], load_before: str, load_after: str
) -> str:
    head = ["request", "nixery req/s", "docker-registry req/s", "ratio (target ≥ 1.0)",
            "nixery p99 ms", "docker-registry p99 ms", "nixery MB/s", "docker-registry MB/s",
            "nginx MB/s", "nixery / nginx (target ≥ 0.8)"]
    rows, cpu_rows = [], []
    for row, m in results:
        o, p, n = m["nixery"], m["docker-registry"], m.get("nginx")
        met = "✓" if o.result.rps >= p.result.rps else "✗"
        ng_met = ""
        if n:
            ng_met = f"{_ratio(o.result.mbps, n.result.mbps)} {'✓' if o.result.mbps >= 0.8 * n.result.mbps else '✗'}"
        rows.append([
            row.label, f"{o.result.rps:,.0f}", f"{p.result.rps:,.0f}", f"{_ratio(o.result.rps, p.result.rps)} {met}",
            f"{o.result.p99_ms:.1f}", f"{p.result.p99_ms:.1f}",
            f"{o.result.mbps:,.1f}", f"{p.result.mbps:,.1f}",
            f"{n.result.mbps:,.1f}" if n else "-", ng_met or "-",
        ])
        cpu_rows.append([
            row.label, f"{o.cpu_us:,.0f}", f"{p.cpu_us:,.0f}", c.ratio(o.cpu_us, p.cpu_us),
            f"{n.cpu_us:,.0f}" if n else "-",
            f"{o.result.errors} / {p.result.errors}" + (f" / {n.result.errors}" if n else ""),
        ])
    return (
        f"## NIXERY_WORKERS={workers}\n\nLoad average before / after: {load_before} / {load_after}.\n\n"
        + c.table(head, rows)
        + "\n\nServer CPU time per request (µs; all the server's processes, user + system) and errors:\n\n"
        + c.table(["request", "nixery", "docker-registry", "ratio", "nginx",
                   "errors (nixery / docker-registry / nginx)"], cpu_rows)
        + "\n\n"
    )


@dataclass(frozen=True)
class Front:
    """A way of putting nginx in front of nixery (deploy/nginx/nixery.conf)."""

    name: str
    env: dict[str, str]
    title: str
    description: str


FRONTS = [
    Front(
        "accel", {"NIXERY_BLOB_ACCEL_REDIRECT": "/_nixery_blobs/"},
        "Blobs with nginx in front (`deploy/nginx/nixery.conf`, `NIXERY_BLOB_ACCEL_REDIRECT`)",
        "nixery (one worker) answers each blob request after its checks with `X-Accel-Redirect`; the nginx in "
        "front (2 workers, the shipped site config) sends the file.",
    ),
    Front(
        "verified", {"NIXERY_BLOB_ACCEL_REDIRECT": "/_nixery_blobs/", "NIXERY_VERIFIED_BLOB_LINKS": "true"},
        "Blobs with nginx in front and verified links (`NIXERY_VERIFIED_BLOB_LINKS=true`, for anonymous pulls)",
        "As above, and nixery hard-links each blob it has hashed and found intact under `STORAGE_PATH/verified`; "
        "the front sends those without asking nixery (the first request for each blob still goes to nixery).",
    ),
]


def measure_front(
    front_kind: Front, base: Path, storage: Path, rows: list[Row], nginx_target: Target, args: argparse.Namespace
) -> tuple[list[tuple[Row, dict[str, Measured]]], str]:
    """Start nixery behind a new nginx front on `storage`, load the blob rows, stop both."""
    behind = c.registry(storage, workers=1, **front_kind.env)
    behind.log_path = base / f"nixery-behind-nginx-{front_kind.name}.log"
    with contextlib.ExitStack() as stack:
        behind.start()  # opening the storage removes every verified link: each front starts from none
        stack.callback(behind.stop)
        front = stack.enter_context(c.nginx_front(base / f"nginx-front-{front_kind.name}", storage, behind.host))
        target = Target("nixery behind nginx", front.url,
                        lambda: c.process_tree(behind.process.pid) + c.process_tree(front.process.pid))
        load_before = c.wait_for_quiet(max_load=1.5, timeout=60)
        c.say(f"\nnginx in front of nixery, {front_kind.name} (load average {load_before})")
        results = []
        for row in rows:
            m = measure([target], row, duration=args.duration, rounds=args.rounds, nginx=nginx_target)
            results.append((row, m))
            f, n = m["nixery behind nginx"].result, m["nginx"].result
            c.say(f"  {row.label:26} {f.mbps:7.0f} vs nginx {n.mbps:7.0f} MB/s ({_ratio(f.mbps, n.mbps)})")
    return results, load_before


def front_table(
    front_kind: Front, results: list[tuple[Row, dict[str, Measured]]], load_before: str, load_after: str
) -> str:
    head = ["request", "nixery behind nginx req/s", "nginx req/s", "behind nginx MB/s", "nginx MB/s",
            "behind nginx / nginx (target ≥ 0.8)", "CPU µs/req (nixery + nginx front)", "CPU µs/req (nginx)", "errors"]
    rows = []
    for row, m in results:
        f, n = m["nixery behind nginx"], m["nginx"]
        met = "✓" if f.result.mbps >= 0.8 * n.result.mbps else "✗"
        rows.append([
            row.label, f"{f.result.rps:,.0f}", f"{n.result.rps:,.0f}", f"{f.result.mbps:,.1f}", f"{n.result.mbps:,.1f}",
            f"{_ratio(f.result.mbps, n.result.mbps)} {met}", f"{f.cpu_us:,.0f}", f"{n.cpu_us:,.0f}",
            f"{f.result.errors} / {n.result.errors}",
        ])
    return (
        f"## {front_kind.title}\n\n{front_kind.description} Compared with nginx serving the same file "
        f"directly. Load average before / after: {load_before} / {load_after}.\n\n"
        + c.table(head, rows) + "\n\n"
    )


def end_to_end(base: Path, wanted: list[str], targets: list[Target], runs: int) -> str:
    c.say(f"\nend-to-end pulls of {E2E_IMAGE} ({runs} runs per client and registry, interleaved)")
    rows = []
    with clients(base / "clients", wanted) as found:
        for client in found:
            times = pull_times(client, targets, E2E_IMAGE, runs)
            peer = statistics.median(times["docker-registry"])
            row = [client.name]
            for target in targets:
                t = c.Timing(times[target.name])
                row.append(f"{t.median:.2f} ({t.spread})")
            for target in targets[:-1]:
                r = statistics.median(times[target.name]) / peer
                row.append(f"{r:.3f}x {'✓' if r <= 1.0 else '✗'}")
            rows.append(row)
            c.say("  " + " | ".join(row))
    head = ["client", *[f"{t.name} s" for t in targets],
            *[f"{t.name} / docker-registry (target ≤ 1.0)" for t in targets[:-1]]]
    return (
        f"## End-to-end pull of `{E2E_IMAGE}` (one ~50 MB layer and two small ones)\n\n"
        f"Median seconds (min-max) of {runs} pulls per client and registry, interleaved, each client's "
        "cache cleared before every pull; the clients' own work (unpacking, storage) is in every figure.\n\n"
        + c.table(head, rows) + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
