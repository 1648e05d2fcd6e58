"""Scale: layering time and memory by closure size; the registry's memory
while it builds a 2 GiB layer and while it serves 32 downloads of a 200 MB blob.

    .venv/bin/python bench/scale.py            # everything (about a minute; 2 GiB in the store meanwhile)
    .venv/bin/python bench/scale.py --quick    # no 2 GiB build, 8 downloads

Layering: synthetic closure graphs of 10 to 10,000 store paths (seeded: each
path refers to 0-10 earlier ones, sizes log-normal, roots are the paths
nothing refers to), planned with `plan_layers` into 99 layers as the registry
does: first with an empty history, then a second image (the same graph
without one root) with the first image's layers in the history. Time: median
of repeated runs; memory: tracemalloc's peak during one plan.

Memory: the registry's resident set (VmRSS from /proc, sampled every 20 ms,
and the kernel's high-water mark VmHWM, reset before each phase) of the
server process itself; its layer writers and the Nix processes it starts
are reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import common as c

from nixery.closure import ClosureGraph, Node
from nixery.layers.cost import DEFAULT_LAYER_COST_MB, CostModel
from nixery.layers.grouping import LayerHistory, plan_layers

MAX_LAYERS = 99  # NIXERY_MAX_LAYERS (100) minus the entry-point layer
COST = CostModel.for_layer_cost_mb(DEFAULT_LAYER_COST_MB)  # NIXERY_LAYER_COST_MB's default, as the registry plans


# ---- layering --------------------------------------------------------------------


def synthetic_graph(n: int, seed: int = 7) -> tuple[ClosureGraph, list[str]]:
    rng = random.Random(seed)
    names = [f"/nix/store/{rng.getrandbits(128):032x}-pkg-{i}" for i in range(n)]
    nodes, referenced = [], set()
    for i, name in enumerate(names):
        k = min(i, rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 7, 10]))
        window = range(max(0, i - 3000), i)  # mostly recent dependencies, as in nixpkgs' layering of stdenv
        refs = tuple(names[j] for j in rng.sample(window, min(k, len(window))))
        referenced.update(refs)
        nodes.append(Node(name, int(rng.lognormvariate(11, 2)) + 100, refs))
    roots = [name for name in names if name not in referenced]
    return ClosureGraph(nodes), roots


def layering_rows(sizes: list[int], repeats: int) -> list[list[object]]:
    rows = []
    for n in sizes:
        graph, roots = synthetic_graph(n)
        edges = sum(len(node.references) for node in graph.nodes.values())
        runs = repeats if n <= 1000 else max(2, repeats // 3)
        first, second, layers = [], [], 0
        for _ in range(runs):
            history = LayerHistory()
            started = time.perf_counter()
            plan = plan_layers(graph, roots, max_layers=MAX_LAYERS, history=history, cost=COST)
            first.append(time.perf_counter() - started)
            history.record(plan)
            layers = len(plan)
            started = time.perf_counter()
            plan_layers(graph, roots[1:] or roots, max_layers=MAX_LAYERS, history=history, cost=COST)
            second.append(time.perf_counter() - started)
        tracemalloc.start()
        plan_layers(graph, roots, max_layers=MAX_LAYERS, history=LayerHistory(), cost=COST)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        graph_mb = _graph_bytes(n)
        rows.append([f"{n:,}", f"{edges:,}", f"{len(roots):,}", layers, f"{statistics.median(first) * 1000:.1f}",
                     f"{statistics.median(second) * 1000:.1f}", f"{peak / c.MB:.2f}", f"{graph_mb:.1f}"])
        c.say(f"  {n:>6} paths: {rows[-1]}")
    return rows


def _graph_bytes(n: int) -> float:
    tracemalloc.start()
    graph = synthetic_graph(n)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del graph
    return current / c.MB


# ---- registry memory -------------------------------------------------------------


def _status(pid: int, field: str, file: str = "status") -> int:
    """Bytes of a kB field of /proc/<pid>/<file> (status, smaps_rollup); 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak(pid: int) -> None:
    """Reset the kernel's VmHWM (peak RSS) of a process (Linux >= 4.0, own or root)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _is_layer_writer(pid: int) -> bool:
    try:
        return b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class RssSampler:
    """Samples the server's VmRSS and its children's total RSS in the background: its layer
    writers (worker processes and their fork server) apart from Nix's processes."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.server: list[int] = []
        self.writers: list[int] = []
        self.writers_pss: list[int] = []
        self.nix: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.server.append(_status(self.pid, "VmRSS"))
            children = [p for p in c.process_tree(self.pid) if p != self.pid]
            writers = [p for p in children if _is_layer_writer(p)]
            self.writers.append(c.rss_bytes(writers))
            # PSS: a page shared by n processes counts 1/n in each.
            self.writers_pss.append(sum(_status(p, "Pss", "smaps_rollup") for p in writers))
            self.nix.append(c.rss_bytes([p for p in children if p not in writers]))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        reset_peak(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm = _status(self.pid, "VmHWM")


def _writers(sampler: RssSampler) -> str:
    return f"{max(sampler.writers) / c.MB:.0f} ({max(sampler.writers_pss) / c.MB:.0f})"


def build_big(base: Path) -> list[object]:
    usage = shutil.disk_usage(base)
    if usage.free < 8 << 30:
        raise SystemExit(f"the 2 GiB benchmark needs 8 GiB free, {usage.free >> 30} GiB left")
    c.say("building big2g (2 GiB, compressible) with nix-build ...")
    started = time.perf_counter()
    (path,) = c.nix_build(["big2g"], timeout=1800)
    c.say(f"  built {path} in {time.perf_counter() - started:.0f} s")
    storage = base / "big-storage"
    registry = c.registry(storage).start()
    try:
        pid = registry.process.pid  # type: ignore[union-attr]
        idle = _status(pid, "VmRSS")
        with RssSampler(pid) as sampler:
            started = time.perf_counter()
            status, _, body = c.request(registry.host, "/v2/big2g/manifests/latest", accept=c.MANIFEST_ACCEPT)
            seconds = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"big2g: {status} {body[:300]!r}")
        import json

        layer = max(json.loads(body)["layers"], key=lambda x: x["size"])["size"]
        return ["build of `big2g`: one 2 GiB store path → one layer", f"{layer / c.MB:,.0f} MB blob in {seconds:.1f} s",
                f"{idle / c.MB:.0f}", f"{max(sampler.server) / c.MB:.0f}", f"{sampler.hwm / c.MB:.0f}",
                _writers(sampler), f"{max(sampler.nix) / c.MB:.0f}"]
    finally:
        registry.stop()
        shutil.rmtree(storage, ignore_errors=True)
        deleted = subprocess.run(["nix-store", "--delete", path], capture_output=True, text=True)
        c.say(f"  deleted {path}: {'ok' if deleted.returncode == 0 else deleted.stderr.strip()[-300:]}")


async def _download(url: str, concurrency: int) -> tuple[int, float]:
    import aiohttp

    async def one(session: aiohttp.ClientSession) -> int:
        got = 0
        async with session.get(url) as response:
            response.raise_for_status()
            async for chunk in response.content.iter_chunked(1 << 20):
                got += len(chunk)
        return got

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sizes = await asyncio.gather(*(one(session) for _ in range(concurrency)))
    return sum(sizes), time.perf_counter() - started


def serve_concurrent(base: Path, concurrency: int) -> list[object]:
    c.nix_build(["blob200m"])
    storage = base / "serve-storage"
    registry = c.registry(storage).start()
    try:
        pid = registry.process.pid  # type: ignore[union-attr]
        _, manifest = registry.manifest("blob200m", accept=c.MANIFEST_ACCEPT)
        layer = max(manifest["layers"], key=lambda x: x["size"])
        url = f"{registry.url}/v2/blob200m/blobs/{layer['digest']}"
        asyncio.run(_download(url, 1))  # the first serve hashes the blob once (corruption check)
        idle = _status(pid, "VmRSS")
        with RssSampler(pid) as sampler:
            total, seconds = asyncio.run(_download(url, concurrency))
        expected = layer["size"] * concurrency
        if total != expected:
            raise RuntimeError(f"downloaded {total} bytes, expected {expected}")
        return [f"{concurrency} concurrent downloads of a {layer['size'] / c.MB:.0f} MB blob (aiohttp client)",
                f"{total / c.MB:,.0f} MB in {seconds:.1f} s ({total / c.MB / seconds:,.0f} MB/s)",
                f"{idle / c.MB:.0f}", f"{max(sampler.server) / c.MB:.0f}", f"{sampler.hwm / c.MB:.0f}",
                _writers(sampler), "-"]
    finally:
        registry.stop()
        shutil.rmtree(storage, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="no 2 GiB build; 8 downloads; fewer repeats")
    parser.add_argument("--no-big", action="store_true", help="skip the 2 GiB layer")
    parser.add_argument("--downloads", type=int, default=32)
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    if args.quick:
        args.no_big, args.downloads = True, 8
    started = time.time()
    base = c.SCRATCH / "scale"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)

    c.say("layering synthetic closures ...")
    layering = layering_rows([10, 100, 1000, 10000], repeats)
    memory = []
    if not args.no_big:
        memory.append(build_big(base))
    c.say(f"{args.downloads} concurrent downloads ...")
    memory.append(serve_concurrent(base, args.downloads))
    shutil.rmtree(base, ignore_errors=True)

    body = (
        "## Layering time and memory by closure size\n\n"
        f"`plan_layers` into {MAX_LAYERS} layers; median of {repeats} runs ({max(2, repeats // 3)} for 10,000 "
        "paths). \"with history\": the next image (one root fewer) planned against the first image's layers. "
        "Peak: tracemalloc's peak of one plan (allocations made while planning; the graph itself is the last "
        "column).\n\n"
        + c.table(["paths", "references", "roots", "layers", "plan ms (empty history)", "plan ms (with history)",
                   "peak MB while planning", "graph MB"], layering)
        + "\n\n## The registry's resident memory (target: flat, < 200 MB)\n\n"
        "VmRSS of the server process (`NIXERY_WORKERS=1`), sampled every 20 ms, and VmHWM (the kernel's "
        "exact peak, reset before the phase). Apart: the layer writers (the worker processes that write "
        "layer tarballs, their fork server and multiprocessing's resource tracker: the sum of their VmRSS, "
        "which counts the pages they share once per process, and in brackets of their PSS, which counts "
        "them once) and Nix's own processes (the long-running evaluator, builds).\n\n"
        + c.table(["phase", "work", "RSS idle MB", "RSS max sampled MB", "peak RSS (VmHWM) MB",
                   "layer writers max MB (PSS)", "Nix processes max MB"], memory)
        + "\n"
    )
    print("\n" + body)
    if not args.no_report:
        c.write_report("scale", "Scale: layering by closure size, registry memory", body, started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
