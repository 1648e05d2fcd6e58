"""Plans that the byte-optimal layering makes, for tests/test_grouping.py.

`bytes-only-plans.json` holds the plans the code of main made before the
per-layer cost existed (commit 50dcad0), written by running this file against
that code:

    git archive 50dcad0 nixery | tar -x -C /tmp/main-tree
    PYTHONSAFEPATH=1 PYTHONPATH=/tmp/main-tree:. python tests/data/bytes_only_plans.py \\
        > tests/data/bytes-only-plans.json

The test plans the same cases with NIXERY_LAYER_COST_MB=0 and compares. This
file uses only what both versions have (`plan_layers` without `cost`, when
given no plan function), so that it runs against either.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from nixery.closure import ClosureGraph
from nixery.layers.grouping import LayerHistory, plan_layers

HERE = Path(__file__).resolve().parent
Plan = list[frozenset[str]]
PlanFunction = Callable[..., Plan]


def seeded_graph(seed: int, nodes: int) -> tuple[ClosureGraph, dict[str, int]]:
    """An acyclic graph shaped like a package set, and each node's popularity within it."""
    rng = random.Random(seed)
    names = [f"n{n:04d}" for n in range(nodes)]
    spec: dict[str, dict[str, object]] = {}
    for n, name in enumerate(names):
        refs = {names[int(n * rng.random() ** 2)] for _ in range(rng.randint(0, 5))} if n else set()
        spec[name] = {"size": int(10 ** rng.uniform(2.5, 7.5)), "refs": sorted(refs)}
    graph = ClosureGraph.from_mapping(spec)
    popularity = dict.fromkeys(names, 0)
    for name in names:
        for dep in graph.closure([name]):
            popularity[dep] += 1
    return graph, popularity


def cases() -> Iterator[tuple[str, ClosureGraph, dict[str, int] | None, list[list[str]], int]]:
    """(name, graph, popularity or None, images in order, layer budget)."""
    debian = json.loads((HERE / "debian-shell-graph.json").read_text())
    graph = ClosureGraph.from_mapping(debian["nodes"])
    shell = ["bash", "coreutils"]
    images = [shell + ["curl"], shell + ["jq"], shell + ["git"], shell + ["python3"], shell + ["curl", "jq"],
              ["python3", "git"], shell + ["curl"]]
    for budget in (99, 4):
        yield f"debian shell, popularity, {budget} layers", graph, debian["popularity"], images, budget
        yield f"debian shell, no popularity, {budget} layers", graph, None, images, budget
    graph, popularity = seeded_graph(seed=7, nodes=500)
    rng = random.Random(8)
    names = sorted(graph.nodes)
    images = [sorted(rng.sample(names[250:], rng.randint(1, 4))) for _ in range(10)]
    for budget in (100, 10):
        yield f"seeded graph, popularity, {budget} layers", graph, popularity, images, budget
        yield f"seeded graph, no popularity, {budget} layers", graph, None, images, budget


def plans(plan: PlanFunction = plan_layers) -> dict[str, list[list[list[str]]]]:
    """Every case's plans, each image's layers as sorted lists, with the history kept between images."""
    out = {}
    for name, graph, popularity, images, budget in cases():
        history = LayerHistory()
        planned = []
        for roots in images:
            layers = plan(graph, roots, max_layers=budget, history=history, popularity=popularity)
            history.record(layers)
            planned.append([sorted(layer) for layer in layers])
        out[name] = planned
    return out


if __name__ == "__main__":
    json.dump(plans(), sys.stdout, indent=0, sort_keys=True)
    sys.stdout.write("\n")
