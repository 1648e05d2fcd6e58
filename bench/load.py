"""Load: minutes of mixed pulls with zero errors, while an image builds and GC runs.

    .venv/bin/python bench/load.py                  # 2 minutes, 16 concurrent clients
    .venv/bin/python bench/load.py --quick          # 20 s

A Python load generator (aiohttp client, 127.0.0.1 only, bounded in time)
pulls already built images: manifests by tag and by digest, small blobs
(configs and small layers), a 1 MB and a 50 MB layer, in a fixed random mix.
Every answer is checked: status 200, the manifest digest the registry
announced at the start, and for blobs the exact length (and the sha256 of
those under 2 MB). Half-way through, a client asks for an image that is not
built yet (Nix evaluates, layers are compressed and stored while the pulls go
on) and `nixery gc --older-than 3h` runs against the same storage. Any error
fails the run (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import aiohttp
import common as c

BUILT = ["shell", "shell/hello", "fortune/cowsay", "blob1m", "blob50m"]
NEW_IMAGE = "shell/extra10m/scale-150"
MIX = [("manifest by tag", 30), ("manifest by digest", 30), ("blob < 2 MB", 25), ("blob 1 MB", 12), ("blob 50 MB", 3)]


@dataclass
class Target:
    kind: str
    path: str
    accept: str | None = None
    digest: str | None = None  # expected Docker-Content-Digest (manifests) or content digest (blobs)
    size: int | None = None


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: list[str] = field(default_factory=list)
    bytes: int = 0

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        if len(self.messages) < 20:
            self.messages.append(f"{kind}: {message}")


def targets_of(registry: c.RegistryProcess) -> dict[str, list[Target]]:
    import json

    found: dict[str, list[Target]] = defaultdict(list)
    for image in BUILT:
        status, headers, body = c.request(registry.host, f"/v2/{image}/manifests/latest", accept=c.MANIFEST_ACCEPT)
        assert status == 200, (image, status, body[:300])
        digest = headers["Docker-Content-Digest"]
        found["manifest by tag"].append(
            Target("manifest by tag", f"/v2/{image}/manifests/latest", c.MANIFEST_ACCEPT, digest))
        found["manifest by digest"].append(
            Target("manifest by digest", f"/v2/{image}/manifests/{digest}", c.MANIFEST_ACCEPT, digest))
        manifest = json.loads(body)
        for blob in [manifest["config"], *manifest["layers"]]:
            size = blob["size"]
            kind = "blob < 2 MB" if size < 900_000 else "blob 1 MB" if size < 2_000_000 else "blob 50 MB"
            found[kind].append(Target(kind, f"/v2/{image}/blobs/{blob['digest']}", None, blob["digest"], size))
    return found


async def fetch(session: aiohttp.ClientSession, base: str, target: Target, stats: Stats) -> None:
    headers = {"Accept": target.accept} if target.accept else {}
    started = time.perf_counter()
    try:
        async with session.get(base + target.path, headers=headers) as response:
            if response.status != 200:
                stats.error(target.kind, f"{response.status} {target.path[:80]} {(await response.read())[:200]!r}")
                return
            hasher = hashlib.sha256() if target.size is None or target.size < 2_000_000 else None
            got = 0
            async for chunk in response.content.iter_chunked(1 << 20):
                got += len(chunk)
                if hasher:
                    hasher.update(chunk)
            if target.kind.startswith("manifest"):
                if response.headers.get("Docker-Content-Digest") != target.digest:
                    announced = response.headers.get("Docker-Content-Digest")
                    stats.error(target.kind, f"digest {announced} != {target.digest}")
                    return
            elif got != target.size or (hasher and f"sha256:{hasher.hexdigest()}" != target.digest):
                stats.error(target.kind, f"{target.path[:80]}: {got} bytes, expected {target.size}")
                return
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
        stats.error(target.kind, f"{type(exc).__name__}: {exc}"[:300])
        return
    stats.latencies[target.kind].append(time.perf_counter() - started)
    stats.bytes += got


async def run_load(registry: c.RegistryProcess, duration: float, concurrency: int, seed: int) -> tuple[Stats, dict]:
    targets = targets_of(registry)
    kinds = [k for k, _ in MIX if targets.get(k)]
    weights = [w for k, w in MIX if targets.get(k)]
    stats = Stats()
    events: dict[str, object] = {}
    deadline = time.monotonic() + duration
    timeout = aiohttp.ClientTimeout(total=300)

    async def worker(n: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(seed * 1000 + n)
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            await fetch(session, registry.url, rng.choice(targets[kind]), stats)

    async def build_new(session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(duration / 2)
        started = time.perf_counter()
        try:
            async with session.get(f"{registry.url}/v2/{NEW_IMAGE}/manifests/latest",
                                   headers={"Accept": c.MANIFEST_ACCEPT}) as response:
                await response.read()
                if response.status != 200:
                    stats.error("new image build", f"{response.status}")
                else:
                    stats.latencies["new image build"].append(time.perf_counter() - started)
        except (TimeoutError, aiohttp.ClientError) as exc:
            stats.error("new image build", f"{type(exc).__name__}: {exc}")
        events["build_s"] = time.perf_counter() - started

    async def gc() -> None:
        await asyncio.sleep(duration / 2)
        env = {**os.environ, **registry.env, "STORAGE_PATH": str(registry.storage)}
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nixery", "gc", "--older-than", "3h", env=env, cwd=c.REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await process.communicate()
        events["gc_s"] = time.perf_counter() - started
        events["gc"] = out.decode().strip().splitlines()[-1] if out else ""
        if process.returncode != 0:
            stats.error("gc", out.decode()[-300:])

    connector = aiohttp.TCPConnector(limit=concurrency + 2)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(n, session) for n in range(concurrency)), build_new(session), gc())
        events["seconds"] = time.perf_counter() - started
    return stats, events


def percentile(ordered: list[float], q: float) -> float:
    """The q-quantile of sorted seconds, in milliseconds (0 when empty)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--quick", action="store_true", help="20 s of load")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="NIXERY_WORKERS of the registry")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.duration = 20.0
    started = time.time()
    base = c.SCRATCH / "load"
    shutil.rmtree(base, ignore_errors=True)
    c.say("building the benchmark packages ...")
    c.nix_build(["shell", "hello", "fortune", "cowsay", "blob1m", "blob50m", "extra10m", "scale-150"])
    registry = c.registry(base / "storage", workers=args.workers).start()
    try:
        for image in BUILT:
            registry.manifest(image, accept=c.MANIFEST_ACCEPT)
        c.say(f"{args.duration:g} s of load, {args.concurrency} clients; at {args.duration / 2:g} s: "
              f"a new image ({NEW_IMAGE}) and `nixery gc --older-than 3h` (load average {c.load_average()})")
        stats, events = asyncio.run(run_load(registry, args.duration, args.concurrency, args.seed))
        check = subprocess.run([sys.executable, "-m", "nixery", "check"], env={**os.environ, **registry.env,
                               "STORAGE_PATH": str(registry.storage)}, cwd=c.REPO, capture_output=True, text=True)
        events["check"] = (check.stdout.strip().splitlines() or [""])[-1]
        if check.returncode != 0:
            stats.error("check", check.stdout[-300:])
    finally:
        registry.stop()
        shutil.rmtree(base, ignore_errors=True)

    seconds = float(events["seconds"])  # type: ignore[arg-type]
    rows = []
    total_requests = total_errors = 0
    for kind in [k for k, _ in MIX] + ["new image build"]:
        lat = sorted(stats.latencies.get(kind, []))
        errors = stats.errors.get(kind, 0)
        total_requests += len(lat) + errors
        total_errors += errors
        if not lat and not errors:
            continue
        rows.append([kind, f"{len(lat) + errors:,}", errors, f"{(len(lat) + errors) / seconds:,.1f}",
                     f"{percentile(lat, 0.5):,.1f}", f"{percentile(lat, 0.99):,.1f}"])
    rows.append(["all", f"{total_requests:,}", total_errors, f"{total_requests / seconds:,.1f}", "", ""])
    body = (
        f"Registry: `NIXERY_WORKERS={args.workers}`, fresh storage, images {', '.join(f'`{i}`' for i in BUILT)} built "
        f"before the load. {args.concurrency} concurrent aiohttp clients for {seconds:.0f} s "
        f"({stats.bytes / 1e9:.1f} GB received). At {args.duration / 2:g} s a client asks for `{NEW_IMAGE}`, not "
        f"built yet (answered after {float(events.get('build_s', 0)):.1f} s), and `nixery gc --older-than 3h` "
        f"runs ({float(events.get('gc_s', 0)):.1f} s: \"{events.get('gc', '')}\"). After the load, `nixery check`: "
        f"\"{events.get('check', '')}\".\n\n"
        "Every answer is checked (status, manifest digest, blob length, sha256 of blobs under 2 MB); an error is any "
        "failed check, connection error or timeout.\n\n"
        + c.table(["kind", "requests", "errors", "req/s", "p50 ms", "p99 ms"], rows)
        + "\n"
    )
    if stats.messages:
        body += "\nFirst errors:\n\n" + "\n".join(f"- {m}" for m in stats.messages) + "\n"
    print("\n" + body)
    if not args.no_report:
        c.write_report("load", "Load: mixed pulls while an image builds and GC runs", body, started=started)
    return 1 if total_errors else 0


if __name__ == "__main__":
    sys.exit(main())
