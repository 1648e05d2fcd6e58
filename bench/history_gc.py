"""Full garbage collections with a full layering history in memory.

    .venv/bin/python bench/history_gc.py              # writes docs/benchmarks/history_gc.md
    .venv/bin/python bench/history_gc.py --no-report  # prints only

The registry freezes what start-up made (`gc.freeze()` in nixery/app.py) and
loads the layering history later, on the first plan; the history then lives as
long as the process. A full (generation 2) collection walks every object the
collector tracks, with the event loop stopped, so whatever the history keeps
tracked, requests wait for whenever one runs. Two histories near the cap
(20,000 layers):

- planned: the layers `plan_layers` made for requests drawn as
  bench/layering.py draws its mixed, themed and large sequences (more seeds),
  on the layering data set (/work/shared/layering, names turned into store
  paths), recorded until the history holds 19,000 layers;
- synthetic: 20,000 layers of 1 to 19 paths from 150,000 store paths (the
  full history of tests/test_history.py).

Each is written with `to_json` and loaded with `from_json` after `gc.freeze()`,
as the registry does. Reported: the GC-tracked objects the loaded history adds,
a full collection's time (median of 15) without and with it, loading time,
memory (tracemalloc), and for the planned one the plan time of a 10,000-path
closure against it and the time to record that plan (the registry records on
the event loop). Then bench/scale.py's layering rows for 10,000 paths (empty
history, and one image's layers).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import statistics
import sys
import time
import tracemalloc

import common as c
import layering
import scale

from nixery.closure import ClosureGraph, Node
from nixery.layers.cost import DEFAULT_LAYER_COST_MB, CostModel
from nixery.layers.grouping import DEFAULT_HISTORY_CAPACITY, LayerHistory, plan_layers
from nixery.layers.plan_cli import load_graph, load_popularity

COST = CostModel.for_layer_cost_mb(DEFAULT_LAYER_COST_MB)
MAX_LAYERS = 99
PLANNED_LAYERS = DEFAULT_HISTORY_CAPACITY * 95 // 100  # a full history: between its cap and the 90 % it trims to
COLLECTIONS = 15


def store_path(name: str) -> str:
    return f"/nix/store/{hashlib.sha1(name.encode()).hexdigest()[:32]}-{name}"


def planned_history() -> tuple[LayerHistory, ClosureGraph, dict[str, int], int]:
    """The history, the data set's graph and popularity with store-path names (the registry's
    names are store paths), and how many requests were planned."""
    names = load_graph(layering.DATASET / "graph.json.gz")
    names_pop = load_popularity(layering.DATASET / "popularity.json")
    graph = ClosureGraph(
        Node(store_path(n.name), n.size, tuple(map(store_path, n.references))) for n in names.nodes.values()
    )
    pop = {store_path(name): count for name, count in names_pop.items()}
    history = LayerHistory()
    planned = 0
    for seed in range(1, 1000):
        for generate in (layering.generate_mixed, layering.generate_themed, layering.generate_large):
            for image in generate(names, names_pop, seed=seed * 10 + 1):
                roots = [store_path(name) for name in image]
                plan = plan_layers(graph, roots, max_layers=MAX_LAYERS, history=history, popularity=pop, cost=COST)
                history.record(plan)
                planned += 1
                if len(history) >= PLANNED_LAYERS:
                    return history, graph, pop, planned
    raise AssertionError("the requests ran out")


def synthetic_history() -> LayerHistory:
    """The test suite's full history: 20,000 layers of 1-19 paths from 150,000 long store paths."""
    from tests.test_history import full_history

    return full_history()


def full_collection_ms() -> float:
    times = []
    for _ in range(COLLECTIONS):
        started = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(name: str, data: bytes, big_closure: tuple[ClosureGraph, dict[str, int], list[str]] | None) -> list[object]:
    gc.collect()
    gc.freeze()  # start-up's objects, and this script's (nixery/app.py)
    without = full_collection_ms()
    tracked_before = len(gc.get_objects())
    started = time.perf_counter()
    history = LayerHistory.from_json(data)
    load_ms = (time.perf_counter() - started) * 1000
    gc.collect()
    tracked = len(gc.get_objects()) - tracked_before
    with_history = full_collection_ms()
    plan_ms = record_ms = "-"
    if big_closure is not None:
        graph, pop, roots = big_closure
        times, plan = [], []
        for _ in range(3):
            started = time.perf_counter()
            plan = plan_layers(graph, roots, max_layers=MAX_LAYERS, history=history, popularity=pop, cost=COST)
            times.append(time.perf_counter() - started)
        plan_ms = f"{min(times) * 1000:.0f}"
        times = []
        for _ in range(5):  # each into the history as loaded
            fresh = LayerHistory.from_json(data)
            started = time.perf_counter()
            fresh.record(plan)
            times.append(time.perf_counter() - started)
        record_ms = f"{statistics.median(times) * 1000:.1f}"
    del history
    gc.collect()
    gc.unfreeze()
    tracemalloc.start()
    kept = LayerHistory.from_json(data)
    gc.collect()
    memory = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    row: list[object] = [name, f"{len(kept):,}", f"{len(data) / c.MB:.1f}", f"{tracked:,}", f"{without:.3f}",
                         f"{with_history:.3f}", f"{load_ms:.0f}", f"{memory / c.MB:.0f}", plan_ms, record_ms]
    c.say(f"  {row}")
    return row


def big_closure(graph: ClosureGraph, pop: dict[str, int], target: int = 10_000) -> list[str]:
    rng = random.Random(5)
    names = sorted(graph.nodes)
    roots: list[str] = []
    while len(graph.closure(roots)) < target:
        roots.append(rng.choice(names))
    return roots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    started = time.time()

    c.say("planning requests until the history is full ...")
    history, graph, pop, planned = planned_history()
    planned_json = history.to_json()
    del history
    c.say(f"  {planned} requests")
    synthetic_json = synthetic_history().to_json()
    roots = big_closure(graph, pop)
    rows = [
        measure(f"planned ({planned:,} requests)", planned_json, (graph, pop, roots)),
        measure("synthetic", synthetic_json, None),
    ]
    c.say("layering synthetic closures (bench/scale.py) ...")
    layering_rows = scale.layering_rows([10000], 3)

    body = (
        "## A full collection with the history loaded\n\n"
        f"After `gc.freeze()`; full collection: median of {COLLECTIONS} `gc.collect()` calls, without and "
        "with the loaded history. Tracked objects: `len(gc.get_objects())` after loading and one collection, "
        "less before. Memory: tracemalloc's count of what the loaded history holds. Plan: best of three plans "
        f"of a {len(graph.closure(roots)):,}-path closure against the history (popularity data, "
        f"{MAX_LAYERS} layers); record: recording that plan (median of five).\n\n"
        + c.table(["history", "layers", "JSON MB", "GC-tracked objects", "full collection ms, without",
                   "full collection ms, with", "load ms", "memory MB", "plan ms", "record ms"], rows)
        + "\n\n## Layering time (bench/scale.py's rows)\n\n"
        + c.table(["paths", "references", "roots", "layers", "plan ms (empty history)", "plan ms (with history)",
                   "peak MB while planning", "graph MB"], layering_rows)
        + "\n"
    )
    print("\n" + body)
    if not args.no_report:
        c.write_report("history_gc", "The layering history and the garbage collector", body, started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
