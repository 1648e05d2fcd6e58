"""Layering benchmark: how many bytes clients download, compared with the limit.

    .venv/bin/python bench/layering.py                      # all sequences, writes the report
    .venv/bin/python bench/layering.py --images my.json     # one sequence of your own
    .venv/bin/python bench/layering.py --layer-cost-mb 4    # plan at another NIXERY_LAYER_COST_MB

A client with an unbounded layer cache pulls the images of a sequence in
order and downloads a layer only if it lacks that exact layer (a layer is the
set of paths it holds).  dl/ideal = bytes downloaded / bytes of the union of
all closures (every path once: the physical limit).  "10 clients" replays the
same registry for ten clients that each pull a random 40 % of the images, and
reports the sum of their downloads over the sum of their own limits.

Each layer also costs its client time (issue 23: ~50 ms with podman, the time
to fetch ~2 MB), so two more scores charge 2 MB per layer:
- warm = (bytes downloaded + 2 MB x layers downloaded) / (ideal + 2 MB), for
  the one client pulling the images in order;
- cold = sum over images of (image bytes + 2 MB x its layers) / sum of
  (closure bytes + 2 MB): every image pulled into an empty store. An image's
  bytes are its layers': a stored layer it reuses may hold paths of other
  closures (`CostModel.takes_stored_layer`), and they count.

Algorithms, all run on the same data in the same process:
- ours: `nixery.layers.grouping.plan_layers` at the registry's default
  per-layer cost (`--layer-cost-mb`), with the history the registry keeps,
  and the popularity data; also without popularity data (what the registry
  has), without history (a registry that forgets everything), and counting
  bytes only (NIXERY_LAYER_COST_MB=0, the plans before issue 23);
- Nixery: its published layering (popularity + dominator tree, 94 layers);
- nixpkgs buildLayeredImage: its popularity contest (one layer each for the
  most popular paths, the rest in one layer);
- one layer per image.

The baselines are written here from their published descriptions.  The
generated sequences (bench/data/) come from seeded generators below;
`--regenerate` writes them again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nixery.closure import ClosureGraph
from nixery.layers.cost import DEFAULT_LAYER_COST_MB, CostModel
from nixery.layers.grouping import LayerHistory, plan_layers
from nixery.layers.plan_cli import load_graph, load_images, load_popularity

REPO = Path(__file__).resolve().parent.parent
DATASET = Path("/work/shared/layering")
DATA = REPO / "bench" / "data"
REPORT = REPO / "docs" / "benchmarks" / "layering.md"
MB = 1_000_000  # the table uses decimal megabytes (ideal 2384.1)
SCORE_LAYER_COST = 2 * MB  # what the warm and cold scores charge per layer (issue 23)

Plan = list[frozenset[str]]
Planner = Callable[[ClosureGraph, list[list[str]], Mapping[str, int], int], tuple[list[Plan], list[float]]]


# ---- algorithms --------------------------------------------------------------


def _timed(plan_one: Callable[[list[str]], Plan], images: list[list[str]]) -> tuple[list[Plan], list[float]]:
    plans, times = [], []
    for roots in images:
        started = time.perf_counter()
        plans.append(plan_one(roots))
        times.append(time.perf_counter() - started)
    return plans, times


def ours(cost: CostModel, *, popularity: bool = True, history: bool = True) -> Planner:
    def run(graph: ClosureGraph, images: list[list[str]], pop: Mapping[str, int], budget: int):
        kept = LayerHistory() if history else None

        def one(roots: list[str]) -> Plan:
            layers = plan_layers(
                graph, roots, max_layers=budget, history=kept, popularity=pop if popularity else None, cost=cost
            )
            if kept is not None:
                kept.record(layers, [sum(graph.size(p) for p in layer) for layer in layers])
            return layers

        return _timed(one, images)

    return run


def one_layer(graph: ClosureGraph, images: list[list[str]], pop: Mapping[str, int], budget: int):
    return _timed(lambda roots: [frozenset(graph.closure(roots))], images)


def build_layered_image(graph: ClosureGraph, images: list[list[str]], pop: Mapping[str, int], budget: int):
    """nixpkgs' popularity contest: maxLayers - 1 store layers (one is kept for customisation);
    the most popular paths get a layer each, the last layer holds the rest."""

    def one(roots: list[str]) -> Plan:
        closure = graph.closure(roots)
        score = _contest_scores(graph, closure)
        ordered = sorted(closure, key=lambda p: (-score[p], p))
        singles = max(budget - 2, 0)
        if len(ordered) <= singles + 1:
            return [frozenset([p]) for p in ordered]
        return [frozenset([p]) for p in ordered[:singles]] + [frozenset(ordered[singles:])]

    return _timed(one, images)


def _contest_scores(graph: ClosureGraph, closure: set[str]) -> dict[str, int]:
    """The popularity contest's score, computed within the image's own graph.

    The graph is unrolled into a tree from the paths nothing refers to.  Per
    subtree of node u, a descendant's score is the sum over u's children c of
    1 if it is c, plus (its score under c) + 1 if it lies below c.
    """
    memo: dict[str, dict[str, int]] = {}
    referenced = {ref for path in closure for ref in graph.nodes[path].references}

    def below(node: str) -> dict[str, int]:
        if node in memo:
            return memo[node]
        stack = [(node, False)]
        while stack:
            current, ready = stack.pop()
            if current in memo:
                continue
            refs = graph.nodes[current].references
            if not ready:
                stack.append((current, True))
                stack.extend((ref, False) for ref in refs if ref not in memo)
                continue
            scores: dict[str, int] = {}
            for child in refs:
                scores[child] = scores.get(child, 0) + 1
                for path, value in memo[child].items():
                    scores[path] = scores.get(path, 0) + value + 1
            memo[current] = scores
        return memo[node]

    total: dict[str, int] = {}
    for root in sorted(closure - referenced):
        total[root] = total.get(root, 0) + 1
        for path, value in below(root).items():
            total[path] = total.get(path, 0) + value + 1
    return total


def nixery_layers(graph: ClosureGraph, images: list[list[str]], pop: Mapping[str, int], budget: int):
    """Nixery: a virtual root points at the image's packages and at every path that
    is popular (count >= 100) or whose closure exceeds 100 MB; each subtree below
    the root of the dominator tree is a layer; over budget, the layers with the
    lowest rating (root popularity x summed closure sizes) are merged together."""
    closure_size: dict[str, int] = {}
    nixery_budget = min(94, budget)

    def size_of_closure(path: str) -> int:
        if path not in closure_size:
            closure_size[path] = sum(graph.size(p) for p in graph.closure([path]))
        return closure_size[path]

    def one(roots: list[str]) -> Plan:
        closure = graph.closure(roots)
        popularity = {p: pop.get(p, 1) for p in closure}
        top = "\0image-root"
        preds: dict[str, list[str]] = {p: [] for p in closure}
        for path in sorted(closure):
            for ref in graph.nodes[path].references:
                preds[ref].append(path)
        for path in sorted(closure):
            if path in roots or popularity[path] >= 100 or size_of_closure(path) > 100 * MB:
                preds[path].append(top)
        idom = _dominators(top, closure, preds, graph)
        children: dict[str, list[str]] = {}
        for path in sorted(closure):
            children.setdefault(idom[path], []).append(path)
        layers = []
        for head in children[top]:
            members, stack = [], [head]
            while stack:
                node = stack.pop()
                members.append(node)
                stack.extend(children.get(node, ()))
            rating = popularity[head] * sum(size_of_closure(p) for p in members)
            layers.append((rating, sorted(members)))
        layers.sort()
        while len(layers) > nixery_budget:
            low, nxt = layers[0], layers[1]
            layers[1] = (low[0] + nxt[0], low[1] + nxt[1])
            layers.pop(0)
        return [frozenset(members) for _, members in layers]

    return _timed(one, images)


def _dominators(top: str, closure: set[str], preds: dict[str, list[str]], graph: ClosureGraph) -> dict[str, str]:
    """Immediate dominators in an acyclic graph: the common dominator of all predecessors."""
    pending = {p: len(preds[p]) for p in closure}
    users_done: list[str] = [top]
    depth = {top: 0}
    idom = {top: top}
    succ: dict[str, list[str]] = {p: list(graph.nodes[p].references) for p in closure}
    succ[top] = sorted(p for p in closure if top in preds[p])
    while users_done:
        node = users_done.pop()
        for nxt in succ[node]:
            pending[nxt] -= 1
            if pending[nxt] == 0:
                candidates = preds[nxt]
                dom = candidates[0]
                for other in candidates[1:]:
                    a, b = dom, other
                    while a != b:
                        while depth[a] > depth[b]:
                            a = idom[a]
                        while depth[b] > depth[a]:
                            b = idom[b]
                        if a != b:
                            a, b = idom[a], idom[b]
                    dom = a
                idom[nxt] = dom
                depth[nxt] = depth[dom] + 1
                users_done.append(nxt)
    return idom


def algorithms(layer_cost_mb: float) -> list[tuple[str, Planner]]:
    cost = CostModel.for_layer_cost_mb(layer_cost_mb)
    return [
        (f"ours (history + popularity data), {layer_cost_mb:g} MB a layer", ours(cost)),
        ("ours, no popularity data (registry default)", ours(cost, popularity=False)),
        ("ours, no history (empty registry every time)", ours(cost, history=False)),
        ("ours, bytes only (NIXERY_LAYER_COST_MB=0)", ours(CostModel.for_layer_cost_mb(0))),
        ("Nixery (popularity + dominator tree, 94 layers)", nixery_layers),
        ("nixpkgs buildLayeredImage (popularity contest)", build_layered_image),
        ("one layer per image", one_layer),
    ]


# ---- the client simulation ---------------------------------------------------


@dataclass
class Score:
    downloaded: int
    ideal: int
    layers: list[int]
    times: list[float]
    clients: float  # dl/ideal summed over partial clients
    warm: float  # (downloaded + 2 MB x layers downloaded) / (ideal + 2 MB)
    cold: float  # sum of (image bytes + 2 MB x its layers) / sum of (closure bytes + 2 MB)
    chained: float  # of the layers each image shares with the one before, the share under the same chain ID


def simulate(graph: ClosureGraph, images: list[list[str]], plans: list[Plan], times: list[float]) -> Score:
    closures = [graph.closure(roots) for roots in images]
    for closure, plan in zip(closures, plans, strict=True):
        # A stored layer reused whole may bring paths of other closures, or paths another of the
        # image's layers holds (`CostModel.takes_stored_layer`): they count in its bytes.
        if len(set(plan)) != len(plan) or not closure <= {path for layer in plan for path in layer}:
            raise AssertionError("a plan does not hold its image's closure, or holds a layer twice")
    downloaded, union, fetched = _pull(graph, closures, plans, range(len(images)))
    ideal = sum(graph.size(p) for p in union)
    warm = (downloaded + SCORE_LAYER_COST * fetched) / (ideal + SCORE_LAYER_COST)
    closure_bytes = [sum(graph.size(p) for p in closure) for closure in closures]
    image_bytes = [sum(graph.size(p) for layer in plan for p in layer) for plan in plans]  # with outside paths
    cold = sum(b + SCORE_LAYER_COST * len(plan) for b, plan in zip(image_bytes, plans, strict=True)) / sum(
        b + SCORE_LAYER_COST for b in closure_bytes
    )
    rng = random.Random(2024)
    dl_sum = ideal_sum = 0
    for _ in range(10):
        picked = [i for i in range(len(images)) if rng.random() < 0.4]
        got, seen, _ = _pull(graph, closures, plans, picked)
        dl_sum += got
        ideal_sum += sum(graph.size(p) for p in seen)
    return Score(
        downloaded, ideal, [len(p) for p in plans], times, dl_sum / max(ideal_sum, 1), warm, cold, _chained(plans)
    )


def _chained(plans: list[Plan]) -> float:
    """Of the layers each image shares with the image before it, the share that a client holding
    that image holds under the same chain ID: they sit on the same layers below (the common
    bottom of both stacks). Clients unpack (podman, containerd) or fetch (docker) the others again."""
    shared = chained = 0
    for held, pulled in itertools.pairwise(plans):
        shared += len(set(held) & set(pulled))
        bottom = 0
        while bottom < min(len(held), len(pulled)) and held[bottom] == pulled[bottom]:
            bottom += 1
        chained += bottom
    return chained / max(shared, 1)


def _pull(graph: ClosureGraph, closures, plans, picked) -> tuple[int, set[str], int]:
    """Bytes one client downloads pulling the picked images in order, the paths it saw,
    and how many layers it downloaded."""
    cache: set[frozenset[str]] = set()
    seen: set[str] = set()
    downloaded = 0
    for i in picked:
        seen |= closures[i]
        for layer in plans[i]:
            if layer not in cache:
                cache.add(layer)
                downloaded += sum(graph.size(p) for p in layer)
    return downloaded, seen, len(cache)


# ---- generated sequences -----------------------------------------------------

_NOT_A_TOOL = re.compile(r"^lib|-(dev|doc|data|common|dbg|examples|l10n|locale|i18n)(-.*)?$")
_THEMES = re.compile(
    r"^(python3|node|golang|ruby|r-cran|php|texlive|perl|haskell|ocaml|gnome|kde|xfce4|fonts|rust|emacs|lua)-"
)


def _tools(graph: ClosureGraph, pop: Mapping[str, int]) -> list[str]:
    """Names a user might ask for: not libraries or data, used by a few packages at least."""
    return [n for n in sorted(graph.nodes) if not _NOT_A_TOOL.search(n) and 2 <= pop.get(n, 0) <= 20000]


def _vary(rng: random.Random, image: list[str], pick: Callable[[], str], base: Sequence[str]) -> list[str]:
    """The previous image with one package added, dropped or swapped (base packages stay)."""
    extra = [p for p in image if p not in base]
    roll = rng.random()
    if roll < 0.4 or len(extra) <= 1:
        extra.append(pick())
    elif roll < 0.7:
        extra.pop(rng.randrange(len(extra)))
    else:
        extra[rng.randrange(len(extra))] = pick()
    kept = [p for p in image if p in base]
    return list(dict.fromkeys(kept + extra))


def generate_mixed(graph: ClosureGraph, pop: Mapping[str, int], *, seed: int = 1, count: int = 60):
    """Unrelated requests of 1-4 tools (weighted towards popular ones), with re-pulls and variants."""
    rng = random.Random(seed)
    tools = _tools(graph, pop)
    weights = [pop[t] ** 0.5 for t in tools]
    base = ["bash", "coreutils"]

    def pick() -> str:
        return rng.choices(tools, weights)[0]

    images: list[list[str]] = []
    while len(images) < count:
        roll = rng.random()
        if images and roll < 0.2:
            images.append(list(rng.choice(images)))
        elif images and roll < 0.45:
            images.append(_vary(rng, images[-1], pick, base))
        else:
            head = base if rng.random() < 0.6 else []
            images.append(list(dict.fromkeys(head + [pick() for _ in range(rng.randint(1, 4))])))
    return images


def generate_themed(graph: ClosureGraph, pop: Mapping[str, int], *, seed: int = 2, count: int = 60):
    """Runs of 4-9 images from one ecosystem (python3-*, node-*, r-cran-*, ...)."""
    rng = random.Random(seed)
    tools = _tools(graph, pop)
    weights = [pop[t] ** 0.5 for t in tools]
    themes: dict[str, list[str]] = {}
    for tool in tools:
        match = _THEMES.match(tool)
        if match:
            themes.setdefault(match.group(1), []).append(tool)
    names = sorted(name for name, members in themes.items() if len(members) >= 5)
    images: list[list[str]] = []
    while len(images) < count:
        pool = themes[rng.choice(names)]

        def pick(pool: list[str] = pool) -> str:
            return rng.choice(pool)

        common = list(dict.fromkeys(rng.choices(tools, weights, k=rng.randint(0, 2))))
        run: list[list[str]] = []
        for _ in range(rng.randint(4, 9)):
            roll = rng.random()
            if run and roll < 0.25:
                run.append(list(rng.choice(run)))
            elif run and roll < 0.55:
                run.append(_vary(rng, run[-1], pick, common))
            else:
                picked = rng.sample(pool, min(len(pool), rng.randint(1, 3)))
                run.append(list(dict.fromkeys(common + picked)))
        images.extend(run)
    return images[:count]


def generate_large(graph: ClosureGraph, pop: Mapping[str, int], *, seed: int = 3, count: int = 24):
    """Desktop-sized images (closures of 300-2500 paths, up to several thousand together)."""
    rng = random.Random(seed)
    tools = _tools(graph, pop)
    big = [t for t in rng.sample(tools, min(3000, len(tools))) if 300 <= len(graph.closure([t])) <= 2500]
    images: list[list[str]] = []
    while len(images) < count:
        roll = rng.random()
        if images and roll < 0.2:
            images.append(list(rng.choice(images)))
        elif images and roll < 0.5:
            images.append(_vary(rng, images[-1], lambda: rng.choice(big), []))
        else:
            images.append(rng.sample(big, rng.randint(1, 3)))
    return images


GENERATORS = {
    "mixed": (generate_mixed, "60 unrelated requests of 1-4 tools, with re-pulls and one-package variants"),
    "themed": (generate_themed, "60 requests in runs from one ecosystem (python3-*, node-*, r-cran-*, ...)"),
    "large": (generate_large, "24 desktop-sized requests of one to three big applications"),
}


def generated_sequences(graph: ClosureGraph, pop: Mapping[str, int], *, regenerate: bool) -> dict[str, list]:
    sequences = {}
    for name, (generate, _) in GENERATORS.items():
        path = DATA / f"images-{name}.json"
        if regenerate or not path.exists():
            DATA.mkdir(parents=True, exist_ok=True)
            images = generate(graph, pop)
            path.write_text("[\n" + ",\n".join(json.dumps(image) for image in images) + "\n]\n")
        sequences[name] = load_images(path, graph)
    return sequences


# ---- the report ------------------------------------------------------------------


def table(
    graph: ClosureGraph, images: list[list[str]], pop: Mapping[str, int], budget: int, layer_cost_mb: float
) -> str:
    rows = [
        "| algorithm | dl MB | dl/ideal | warm | cold | layers/image mean / max | plan ms/image mean / max "
        "| 10 clients dl/ideal | same chain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ideal = 0
    for name, planner in algorithms(layer_cost_mb):
        plans, times = planner(graph, images, pop, budget)
        score = simulate(graph, images, plans, times)
        ideal = score.ideal
        rows.append(
            f"| {name} | {score.downloaded / MB:.1f} | {score.downloaded / score.ideal:.3f} "
            f"| {score.warm:.3f} | {score.cold:.3f} "
            f"| {sum(score.layers) / len(score.layers):.1f} / {max(score.layers)} "
            f"| {1000 * sum(times) / len(times):.1f} / {1000 * max(times):.1f} | {score.clients:.3f} "
            f"| {score.chained:.0%} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    rows.append(f"| ideal | {ideal / MB:.1f} | 1.000 | 1.000 | 1.000 | - | - | 1.000 | 100% |")
    return "\n".join(rows)


def scaling(graph: ClosureGraph, pop: Mapping[str, int], budget: int, layer_cost_mb: float) -> str:
    """Plan time for big closures against a history of thousands of layers."""
    cost = CostModel.for_layer_cost_mb(layer_cost_mb)
    history = LayerHistory()
    for roots in generate_mixed(graph, pop, seed=99, count=1000):
        plan = plan_layers(graph, roots, max_layers=budget, history=history, popularity=pop, cost=cost)
        history.record(plan, [sum(graph.size(p) for p in layer) for layer in plan])
    rng = random.Random(5)
    names = sorted(graph.nodes)
    rows = [
        "| closure paths | stored layers | plan ms, popularity data | plan ms, none | layers |",
        "|---|---|---|---|---|",
    ]
    roots: list[str] = []
    for target in (1000, 3000, 8000):
        while len(graph.closure(roots)) < target:
            roots.append(rng.choice(names))
        times, layers = [], 0
        for popularity in (pop, None):
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                plan = plan_layers(
                    graph, roots, max_layers=budget, history=history, popularity=popularity, cost=cost
                )
                best = min(best, time.perf_counter() - started)
            times.append(best)
            layers = len(plan)
        rows.append(
            f"| {len(graph.closure(roots))} | {len(history)} | {1000 * times[0]:.0f} | {1000 * times[1]:.0f} "
            f"| {layers} |"
        )
    return "\n".join(rows)


SWEEP_MB = (0, 0.5, 1, 2, 3, 4, 8)


def sweep(graph: ClosureGraph, images: list[list[str]], pop: Mapping[str, int], budget: int) -> str:
    """Ours (history + popularity data) at several per-layer costs: how NIXERY_LAYER_COST_MB
    moves the balance between bytes and layers."""
    rows = [
        "| NIXERY_LAYER_COST_MB | dl/ideal | warm | cold | layers/image mean / max |",
        "|---|---|---|---|---|",
    ]
    for megabytes in SWEEP_MB:
        plans, times = ours(CostModel.for_layer_cost_mb(megabytes))(graph, images, pop, budget)
        score = simulate(graph, images, plans, times)
        rows.append(
            f"| {megabytes:g} | {score.downloaded / score.ideal:.3f} | {score.warm:.3f} | {score.cold:.3f} "
            f"| {sum(score.layers) / len(score.layers):.1f} / {max(score.layers)} |"
        )
    return "\n".join(rows)


def describe(graph: ClosureGraph, images: list[list[str]]) -> str:
    sizes = [len(graph.closure(roots)) for roots in images]
    # Paths pulled by exactly the same images: a layering that knew the whole
    # sequence in advance would need one layer per such class to reach 1.000.
    pulled_by: dict[str, list[int]] = {}
    for n, roots in enumerate(images):
        for path in graph.closure(roots):
            pulled_by.setdefault(path, []).append(n)
    classes = {tuple(v) for v in pulled_by.values()}
    per_image = [sum(1 for c in classes if n in c) for n in range(len(images))]
    return (
        f"{len(images)} images, closures of {min(sizes)}-{max(sizes)} paths (mean {sum(sizes) / len(sizes):.0f}); "
        f"knowing the whole sequence in advance, dl/ideal = 1 needs {sum(per_image) / len(per_image):.1f} "
        f"layers per image on average, {max(per_image)} at most"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graph", type=Path, default=DATASET / "graph.json.gz")
    parser.add_argument("--popularity", type=Path, default=DATASET / "popularity.json")
    parser.add_argument(
        "--images", type=Path, action="append", help="an image sequence (repeatable); default: all sequences"
    )
    parser.add_argument("--max-layers", type=int, default=100)
    parser.add_argument(
        "--layer-cost-mb", type=float, default=DEFAULT_LAYER_COST_MB, help="the planner's per-layer cost (MB)"
    )
    parser.add_argument("--regenerate", action="store_true", help="write bench/data/ sequences again")
    parser.add_argument("--output", type=Path, default=None, help=f"report file (default {REPORT.relative_to(REPO)})")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args(argv)

    graph = load_graph(args.graph)
    pop = load_popularity(args.popularity)
    if args.images:
        sequences = {str(path): load_images(path, graph) for path in args.images}
        notes = {str(path): "" for path in args.images}
    else:
        sequences = {"images-public.json": load_images(DATASET / "images-public.json", graph)}
        notes = {"images-public.json": "The issue's benchmark"}
        for name, images in generated_sequences(graph, pop, regenerate=args.regenerate).items():
            sequences[f"bench/data/images-{name}.json"] = images
            notes[f"bench/data/images-{name}.json"] = GENERATORS[name][1]

    command = " ".join([".venv/bin/python", "bench/layering.py", *argv])
    parts = [
        "# Layering benchmark",
        "",
        f"Produced by `{command}` (Python {platform.python_version()}, {platform.machine()}; "
        f"load average {os.getloadavg()[0]:.1f} at the start: plan times vary with it).",
        "",
        "One client with an unbounded layer cache pulls the images in order; a layer is the exact",
        "set of paths it holds and is downloaded only if the client lacks it. dl/ideal = bytes",
        "downloaded / bytes of the union of all closures. MB = 10^6 bytes. Budget:",
        f'{args.max_layers} layers per image. Plan time is per image, on this machine. "10 clients"',
        "replays the same plans for ten clients that each pull a random 40 % of the images, in",
        "order: total downloaded / total of their own limits. warm and cold charge 2 MB per layer",
        "(issue 23): warm = (downloaded + 2 MB x layers downloaded) / (ideal + 2 MB) for the one",
        "client; cold = sum of (image bytes + 2 MB x its layers) / sum of (closure bytes + 2 MB), where",
        "an image's bytes are its layers', with the paths of other closures a stored layer it reuses holds.",
        '"same chain": of the layers each image shares with the image before it, the share a client',
        "holding that image holds under the same chain ID (on the same layers below): podman and",
        "containerd unpack the others again, docker fetches them again (docs/benchmarks/client-layers.md).",
        f"Ours plans at {args.layer_cost_mb:g} MB a layer (NIXERY_LAYER_COST_MB) unless the row says otherwise.",
        "",
    ]
    for label, images in sequences.items():
        print(f"== {label}", file=sys.stderr, flush=True)
        note = f"{notes[label]}: " if notes[label] else ""
        parts += [
            f"## {label}",
            "",
            f"{note}{describe(graph, images)}.",
            "",
            table(graph, images, pop, args.max_layers, args.layer_cost_mb),
            "",
        ]
    if not args.images:
        parts += [
            "## The per-layer cost",
            "",
            "`images-public.json`, ours with history and popularity data, planned at each",
            "NIXERY_LAYER_COST_MB; the scores still charge 2 MB per layer.",
            "",
            sweep(graph, sequences["images-public.json"], pop, args.max_layers),
            "",
            "## Plan time for big closures",
            "",
            "Random packages until the closure reaches the size; the history holds the layers of",
            "1000 planned requests. Best of three runs.",
            "",
            scaling(graph, pop, args.max_layers, args.layer_cost_mb),
            "",
        ]
    parts += NOTES
    report = "\n".join(parts)
    print(report)
    if not args.no_write:
        output = args.output or REPORT
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report)
    return 0


NOTES = [
    "## Notes",
    "",
    "- The baselines are reimplemented in `bench/layering.py` from their published",
    "  descriptions. On `images-public.json` they reproduce the issue's table exactly:",
    "  buildLayeredImage 3247.7 MB (1.362, 63.5 / 99 layers), Nixery 2934.7 MB (1.231,",
    "  60.7 / 94 layers). buildLayeredImage ranks paths by nixpkgs' own popularity contest",
    "  on the image's graph (ranking by `popularity.json` instead gives 1.299).",
    "- Nixery and the first row of ours get `popularity.json`. The registry has no such data:",
    "  it counts, within each closure, how many paths depend on each path (second row).",
    "- The algorithm is described, with a worked example, in the docstring of",
    "  `nixery/layers/grouping.py`, its cost model in `nixery/layers/cost.py` and",
    "  docs/layering.md. NIXERY_LAYER_COST_MB trades layers for bytes (the sweep above).",
    "  Bytes only, `CostModel.merge_threshold` (50 kB) does: at 100 kB the public sequence",
    "  needs 34.8 layers per image for 1.006, at 30 kB 41.4 for 1.002.",
    "- Where the closures are so large that the budget binds for nearly every image",
    "  (`images-large.json`), every layering must re-send bytes; even one that knew the",
    "  future would need more than 100 layers for some images.",
    "",
]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
