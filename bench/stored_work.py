"""Costs that grow with stored work: builds with a full layering history, the
registry's memory over thousands of images, and what gc leaves behind.

    .venv/bin/python bench/stored_work.py             # 2,000 images; 100 builds per history (about 5 minutes)
    .venv/bin/python bench/stored_work.py --quick     # 300 images; 50 builds per history

Every image is a pair of packages of the busybox set's scale set
(`scale-I/scale-J`, pairs in a seeded order), built on first pull by a
`nixery serve` on filesystem storage (`NIXERY_WORKERS=1`, default settings),
asked for by 4 client threads at once. The set's packages are built with
nix-build first, so the images cost evaluation (the long-running `nix repl`),
layering, compression of the layers not stored yet, and storage writes.

1. History: the same images built by two registries, each into fresh
   storage: one with an empty layering history, one with a seeded one of
   20,000 layers (the history's cap; ~90,000 store paths, 7 MB, written as
   the `layering/history.json` snapshot before the registry starts, so that
   it is loaded at start-up as a registry that has served for long loads
   it). They build in alternating batches of 10 images, so that both see
   the same background load.
2. Memory: one registry builds the images one pull after another (the
   manifest and config are fetched; layers are HEAD requests, their bytes
   do not matter here); the server process's VmRSS after 100, 500, 1,000 and
   every image.
3. gc: half of those images (every other one) and all blobs are made 4 hours
   old, `nixery gc --older-than 3h` runs against the storage while the
   registry serves, and the lock files left under `locks/` are listed;
   `nixery check` must pass and the collected images must pull again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common as c

from nixery.images import ImageRecord
from nixery.layers.grouping import LayerHistory

CLIENTS = 4
FOUR_HOURS = 4 * 3600


def image_names(count: int, seed: int = 11) -> list[str]:
    pairs = [(i, j) for i in range(300) for j in range(i + 1, 300)]
    random.Random(seed).shuffle(pairs)
    return [f"scale-{i}/scale-{j}" for i, j in pairs[:count]]


def seeded_history(layers: int, seed: int = 3) -> bytes:
    rng = random.Random(seed)
    history = LayerHistory(capacity=layers)
    for n in range(0, layers, 10):  # as builds record them: ten layers at a time
        history.record([
            frozenset(f"/nix/store/{rng.getrandbits(160):032x}-seeded-{n + k}-{p}" for p in range(rng.randint(1, 8)))
            for k in range(min(10, layers - n))
        ])
    return history.to_json()


def ready(storage: Path) -> c.RegistryProcess:
    registry = c.ready_registry(storage, pkgs=c.BUSYBOX_PKGS)
    deadline = time.monotonic() + 120
    while '"history.loaded"' not in registry.log():
        if time.monotonic() > deadline:
            registry.stop()
            raise RuntimeError(f"the history did not load: {registry.log()[-2000:]}")
        time.sleep(0.05)
    return registry


def pull(registry: c.RegistryProcess, name: str) -> float:
    """Manifest (builds on first pull), config, HEAD of every layer; returns the manifest's seconds."""
    started = time.perf_counter()
    status, _, body = c.request(registry.host, f"/v2/{name}/manifests/latest", accept=c.MANIFEST_ACCEPT)
    seconds = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"{name}: {status} {body[:300]!r}")
    manifest = json.loads(body)
    status, _, _ = c.request(registry.host, f"/v2/{name}/blobs/{manifest['config']['digest']}")
    assert status == 200, (name, status)
    for layer in manifest["layers"]:
        status, _, _ = c.request(registry.host, f"/v2/{name}/blobs/{layer['digest']}", method="HEAD")
        assert status == 200, (name, layer, status)
    return seconds


def pull_all(registry: c.RegistryProcess, names: list[str]) -> tuple[float, list[float]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        latencies = list(pool.map(lambda name: pull(registry, name), names))
    return time.perf_counter() - started, latencies


def history_rows(base: Path, names: list[str], layers: int) -> list[list[object]]:
    """Both registries run at once and build the same images in alternating batches of 10 (so
    both see the same background load), each into its own fresh storage."""
    runs = {"empty": (base / "history-empty", None), f"{layers:,} layers": (base / "history-seeded",
                                                                           seeded_history(layers))}
    registries, seconds, latencies = {}, dict.fromkeys(runs, 0.0), {label: [] for label in runs}
    try:
        for label, (storage, seed) in runs.items():
            if seed is not None:
                (storage / "meta" / "layering").mkdir(parents=True)
                (storage / "meta" / "layering" / "history.json").write_bytes(seed)
            registries[label] = ready(storage)
        for round_, start in enumerate(range(0, len(names), 10)):
            for label in list(runs)[:: 1 if round_ % 2 == 0 else -1]:
                took, each = pull_all(registries[label], names[start:start + 10])
                seconds[label] += took
                latencies[label] += each
    finally:
        for registry in registries.values():
            registry.stop()
    rows = []
    for label, (storage, _) in runs.items():
        entries = len(list((storage / "meta" / "layering" / "history").glob("*")))
        snapshot = storage / "meta" / "layering" / "history.json"
        snapshot_mb = snapshot.stat().st_size / c.MB if snapshot.exists() else 0.0
        rows.append([label, len(names), f"{len(names) / seconds[label]:.1f}",
                     f"{statistics.median(latencies[label]):.3f}",
                     f"{statistics.quantiles(latencies[label], n=10)[-1]:.3f}", entries, f"{snapshot_mb:.1f}"])
        c.say(f"  {rows[-1]}")
        shutil.rmtree(storage, ignore_errors=True)
    return rows


def rss_mb(registry: c.RegistryProcess) -> float:
    return c.rss_bytes([registry.process.pid]) / c.MB  # type: ignore[union-attr]


def memory_and_gc(base: Path, names: list[str]) -> tuple[list[list[object]], list[list[object]]]:
    storage = base / "many"
    registry = ready(storage)
    rows: list[list[object]] = [["idle", 0, f"{rss_mb(registry):.1f}", "-"]]
    checkpoints = [n for n in (100, 500, 1000) if n < len(names)] + [len(names)]
    done = 0
    try:
        for checkpoint in checkpoints:
            seconds, _ = pull_all(registry, names[done:checkpoint])
            rate = (checkpoint - done) / seconds
            done = checkpoint
            time.sleep(1)  # background writes (uses, evaluations) settle
            rows.append([f"after {checkpoint:,} images", checkpoint, f"{rss_mb(registry):.1f}", f"{rate:.1f}"])
            c.say(f"  {rows[-1]}")
        gc_rows = collect_while_serving(registry, storage, names)
    finally:
        registry.stop()
        shutil.rmtree(storage, ignore_errors=True)
    return rows, gc_rows


def collect_while_serving(registry: c.RegistryProcess, storage: Path, names: list[str]) -> list[list[object]]:
    then = time.time() - FOUR_HOURS
    collected_names = names[::2]
    # Records name images by their packages, sorted.
    collected = {tuple(sorted(name.split("/"))) for name in collected_names}
    aged: dict[str, str] = {}  # key -> image name
    for path in (storage / "meta" / "images").iterdir():
        record = ImageRecord.from_json(path.read_bytes())
        if tuple(sorted(record.name.split("/"))) in collected:
            document = json.loads(path.read_bytes())
            document["built_at"] = then
            path.write_text(json.dumps(document))
            aged[path.name] = record.name
    for path in (storage / "meta").glob("usage/*"):
        if path.name in aged:
            path.write_text(json.dumps({"last_used": then}))
    for path in (storage / "blobs" / "sha256").glob("*/*"):
        os.utime(path, (then, then))
    locks_before = len(list((storage / "locks").iterdir()))
    env = {**os.environ, "STORAGE_PATH": str(storage), "NIXERY_PKGS_PATH": str(c.BUSYBOX_PKGS)}
    started = time.perf_counter()
    gc = subprocess.run([sys.executable, "-m", "nixery", "gc", "--older-than", "3h"], env=env, cwd=c.REPO,
                        capture_output=True, text=True, check=True)
    gc_seconds = time.perf_counter() - started
    left = [p.name for p in (storage / "locks").iterdir()]
    left_of_collected = [name for name in left if any(key in name for key in aged)]
    check = subprocess.run([sys.executable, "-m", "nixery", "check"], env=env, cwd=c.REPO,
                           capture_output=True, text=True)
    again = collected_names[:20]
    seconds, _ = pull_all(registry, again)  # collected: rebuilt by the same running registry
    check_after = subprocess.run([sys.executable, "-m", "nixery", "check"], env=env, cwd=c.REPO,
                                 capture_output=True, text=True)
    c.say(f"  gc: {gc.stdout.strip()}")
    return [
        ["images collected (of the stored)", f"{len(aged):,} of {len(names):,}"],
        ["`nixery gc` output", gc.stdout.strip()],
        ["gc time (includes its wait for registries to drop what they hold)", f"{gc_seconds:.1f} s"],
        ["lock files under `locks/` before gc / after gc", f"{locks_before} / {len(left)}"],
        ["lock files of collected images left", len(left_of_collected)],
        ["`nixery check` after gc", check.stdout.strip().splitlines()[-1] if check.stdout else check.stderr[-300:]],
        [f"{len(again)} collected images pulled again from the running registry", f"all 200 in {seconds:.1f} s"],
        ["`nixery check` after those rebuilds",
         check_after.stdout.strip().splitlines()[-1] if check_after.stdout else check_after.stderr[-300:]],
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 images, 50 builds per history")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--history-builds", type=int, default=100)
    parser.add_argument("--history-layers", type=int, default=20000)
    parser.add_argument("--only", choices=["history", "memory"], help="run one part (no report is written)")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.history_builds = 300, 50
    started = time.time()
    base = c.SCRATCH / "stored-work"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    names = image_names(args.images)

    c.say("building the scale set's packages with nix-build ...")
    c.nix_build([f"scale-{i}" for i in range(300)], pkgs=c.BUSYBOX_PKGS, timeout=1800)
    c.say(f"load before: {c.wait_for_quiet()}")
    if args.only != "memory":
        c.say(f"{args.history_builds} builds, empty history and {args.history_layers:,} layers ...")
        history = history_rows(base, names[: args.history_builds], args.history_layers)
    if args.only != "history":
        c.say(f"{args.images:,} images, one registry ...")
        memory, gc_rows = memory_and_gc(base, names)
    shutil.rmtree(base, ignore_errors=True)
    if args.only:
        return 0

    ratio = float(history[0][2]) / float(history[1][2])
    growth = float(memory[-1][2]) - float(memory[1][2])
    body = (
        "## Builds with an empty and a full layering history (target: within 1.5x)\n\n"
        f"{args.history_builds} images (`scale-I/scale-J`), {CLIENTS} clients at once, two registries (each "
        "into fresh storage) in alternating batches of 10 images. Latency: of the manifest request that "
        "builds the image. \"entries\": the per-build documents under `layering/history/` afterwards; "
        "\"snapshot\": `layering/history.json` (seeded, never rewritten by a build).\n\n"
        + c.table(["history", "images", "images/s", "p50 s", "p90 s", "entries", "snapshot MB"], history)
        + f"\n\nThroughput, empty over full history: **{ratio:.2f}x**.\n\n"
        "## Server memory over stored images (target: RSS after all within 20 MB of after 100)\n\n"
        f"One registry (`NIXERY_WORKERS=1`, default `NIXERY_RECORD_CACHE`), {CLIENTS} clients; VmRSS of the "
        "server process (its layer writers and Nix processes apart) after each step; builds/s of the step.\n\n"
        + c.table(["point", "images built", "server RSS MB", "images/s in the step"], memory)
        + f"\n\nRSS growth from 100 images to {args.images:,}: **{growth:+.1f} MB**.\n\n"
        "## gc while the registry serves\n\n"
        + c.table(["what", "result"], gc_rows)
        + "\n"
    )
    print("\n" + body)
    if not args.no_report:
        c.write_report("stored_work", "Stored work: history, memory and gc at thousands of images", body,
                       started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
