"""What layering could score if it knew the whole sequence in advance (a bound, not a planner).

    .venv/bin/python bench/layering_hindsight.py       # images-public.json, about 30 s

The registry plans one image at a time and knows only package-wide popularity
and the layers it stored before.  This benchmark knows every image of the
sequence up front.  It starts from the *atoms*: the paths grouped by the exact
set of images that hold them, the finest split that never fetches a path twice.
Then it merges groups greedily, each time the pair that lowers the cold score
most per unit of warm score and dl/ideal it adds, while warm stays at most
1.10 and dl/ideal at most 1.03 (issue 23's goals).  Each image's layers are its
intersections with the groups.  Scores as bench/layering.py counts them (2 MB
a layer).  The point: whether the goals are reachable at all, and with which
groups.

A second table runs the registry's own planner with other popularity data:
how many images of the sequence hold each path (foresight), what a registry
could count from the images it served before (online), and counts from half
of a sequence applied to its other half (a registry that learned from a
similar period of traffic).  It shows how much of the gap is the planner and
how much is what the planner knows.  The last table does the same for the
registry's default, which has no package-wide data: learning online from the
images it served, with its own per-closure counts as the prior.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from layering import DATA, DATASET, MB, SCORE_LAYER_COST, simulate

from nixery.closure import ClosureGraph
from nixery.layers.cost import CostModel
from nixery.layers.grouping import LayerHistory, dependants_count, plan_layers
from nixery.layers.plan_cli import load_graph, load_images, load_popularity

GOAL_WARM, GOAL_DL = 1.10, 1.03


class Atoms:
    """The atoms of a sequence of images, and the scores of a grouping of them."""

    def __init__(self, closures: list[set[str]], size: dict[str, int]):
        holders: dict[str, frozenset[int]] = {}
        for image, closure in enumerate(closures):
            for path in closure:
                holders[path] = holders.get(path, frozenset()) | {image}
        atoms: dict[frozenset[int], list[str]] = {}
        for path in sorted(holders):
            atoms.setdefault(holders[path], []).append(path)
        self.images = len(closures)
        self.atoms = sorted(atoms.values())
        self.held_by = [holders[paths[0]] for paths in self.atoms]
        self.nbytes = [sum(size[p] for p in paths) for paths in self.atoms]
        self.ideal = sum(self.nbytes)
        image_bytes = sum(sum(size[p] for p in closure) for closure in closures)
        self.cold_base = image_bytes + SCORE_LAYER_COST * self.images

    def cost(self, group: frozenset[int]) -> tuple[int, int, int]:
        """(bytes a warm client downloads, layers it downloads, layers over all images) for one group."""
        layers = {frozenset(a for a in group if image in self.held_by[a]) for image in range(self.images)}
        layers.discard(frozenset())
        return sum(self.nbytes[a] for layer in layers for a in layer), len(layers), sum(
            1 for image in range(self.images) if any(image in self.held_by[a] for a in group)
        )

    def scores(self, totals: tuple[int, int, int]) -> tuple[float, float, float]:
        """(warm, cold, dl/ideal) from summed costs."""
        downloaded, fetched, uses = totals
        warm = (downloaded + SCORE_LAYER_COST * fetched) / (self.ideal + SCORE_LAYER_COST)
        cold = (self.cold_base - SCORE_LAYER_COST * self.images + SCORE_LAYER_COST * uses) / self.cold_base
        return warm, cold, downloaded / self.ideal


def merge_greedily(seq: Atoms) -> list[tuple[int, tuple[float, float, float], list[frozenset[int]]]]:
    """The groupings step by step, from the atoms on: (number of groups, (warm, cold, dl/ideal), the groups)."""
    groups = [frozenset([a]) for a in range(len(seq.atoms))]
    costs = {g: seq.cost(g) for g in groups}

    def total() -> tuple[int, int, int]:
        return tuple(sum(c[i] for c in costs.values()) for i in range(3))  # type: ignore[return-value]

    now = seq.scores(total())
    steps = [(len(groups), now, list(groups))]
    while True:
        base = total()
        best = None
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                merged = seq.cost(a | b)
                after = tuple(base[k] - costs[a][k] - costs[b][k] + merged[k] for k in range(3))
                warm, cold, dl = seq.scores(after)  # type: ignore[arg-type]
                if warm > GOAL_WARM or dl > GOAL_DL or cold >= now[1]:
                    continue
                worth = (now[1] - cold) / max(warm - now[0] + dl - now[2], 1e-9)
                if best is None or worth > best[0]:
                    best = (worth, a, b, merged, (warm, cold, dl))
        if best is None:
            return steps
        _, a, b, merged, now = best
        groups = [g for g in groups if g not in (a, b)] + [a | b]
        del costs[a], costs[b]
        costs[a | b] = merged
        steps.append((len(groups), now, list(groups)))


def traffic_popularity(
    counts: Mapping[str, int], package_wide: Mapping[str, int], prior_weight: float
) -> dict[str, int]:
    """Popularity as a registry could learn it from its traffic: how many served images held each
    path, plus `prior_weight` times its package-wide popularity as a share of the most popular
    path's (the prior for a path not seen yet). Scaled to integers; the planner compares ratios."""
    most = max(package_wide.values())
    return {
        p: max(1, round(1e6 * (counts.get(p, 0) + prior_weight * package_wide.get(p, 1) / most)))
        for p in set(counts) | set(package_wide)
    }


def same_for_all(popularity: Mapping[str, int]) -> Callable[[int], Mapping[str, int]]:
    return lambda _: popularity


def planned(
    graph: ClosureGraph, images: list[list[str]], popularity_for: Callable[[int], Mapping[str, int] | None],
    cost: CostModel,
) -> tuple[float, float, float]:
    """(warm, cold, dl/ideal) of the registry's planner, image `i` planned with `popularity_for(i)`."""
    history, plans = LayerHistory(), []
    for i, roots in enumerate(images):
        plan = plan_layers(graph, roots, max_layers=100, history=history, popularity=popularity_for(i), cost=cost)
        history.record(plan)
        plans.append(plan)
    score = simulate(graph, images, plans, [0.0] * len(images))
    return score.warm, score.cold, score.downloaded / score.ideal


def what_the_planner_knows(graph: ClosureGraph, images: list[list[str]], package_wide: Mapping[str, int]) -> str:
    """The registry's planner (2 MB a layer) given other popularity data than the package-wide counts."""
    cost = CostModel.for_layer_cost_mb(SCORE_LAYER_COST / MB)
    in_sequence = Counter(p for roots in images for p in graph.closure(roots))
    lines = ["| popularity given to the planner | warm | cold | dl/ideal |", "|---|---|---|---|"]
    for label, popularity, model in [
        ("package-wide (popularity.json: the issue's setting)", package_wide, cost),
        ("how many of these 40 images hold each path (foresight)", in_sequence, cost),
        ("the same, joins below 5% of a layer's price (join_share 0.05)", in_sequence,
         CostModel(layer_cost=cost.layer_cost, join_share=0.05)),
    ]:
        scores = planned(graph, images, same_for_all(popularity), model)
        lines.append("| {} | {:.3f} | {:.3f} | {:.3f} |".format(label, *scores))
    lines += [
        "",
        "Learned from traffic, on each sequence (warm, cold, dl/ideal). *Online*: each image planned with",
        "the counts of the images before it + 20 x package-wide. *Even images*: the 1st, 3rd, ... images",
        "alone, planned with package-wide popularity, or with the counts of the other images + w x",
        "package-wide (a registry that learned from a similar period of traffic).",
        "",
        "| sequence | all: package-wide | all: online | even: package-wide | even: learned, w = 5 | w = 20 |",
        "|---|---|---|---|---|---|",
    ]
    generated = ("images-mixed.json", "images-themed.json", "images-large.json")
    sequences = {"images-public.json": images} | {name: load_images(DATA / name, graph) for name in generated}
    for name, sequence in sequences.items():
        closures = [graph.closure(roots) for roots in sequence]
        before: list[Counter[str]] = [Counter()]
        for closure in closures[:-1]:
            before.append(before[-1] + Counter(closure))
        even, odd = sequence[0::2], closures[1::2]
        learned = Counter(p for closure in odd for p in closure)
        cells = [
            planned(graph, sequence, same_for_all(package_wide), cost),
            planned(graph, sequence, lambda i, b=before: traffic_popularity(b[i], package_wide, 20), cost),
            planned(graph, even, same_for_all(package_wide), cost),
        ] + [planned(graph, even, same_for_all(traffic_popularity(learned, package_wide, w)), cost) for w in (5, 20)]
        lines.append(f"| {name} | " + " | ".join("{:.3f}, {:.3f}, {:.3f}".format(*c) for c in cells) + " |")
    return "\n".join(lines)


def learned_by_the_registry(graph: ClosureGraph, images: list[list[str]]) -> str:
    """The registry's default (no package-wide data: the closure's own dependants counts), and the
    same planner given what a registry could learn online from the images it served before: the
    share of them that held each path, plus `w` times the path's share of its closure's most
    depended-on path (the prior, which weighs the same against the counts however many images
    were served)."""
    cost = CostModel.for_layer_cost_mb(SCORE_LAYER_COST / MB)
    weights = (0.2, 0.5, 1, 2)

    def online(w: float) -> Callable[[list[str]], Mapping[str, int] | None]:
        served: Counter[str] = Counter()
        count = 0

        def popularity(roots: list[str]) -> Mapping[str, int] | None:
            nonlocal count
            closure = sorted(graph.closure(roots))
            counts = dict(served)
            served.update(closure)  # counted after the plan: this image is not served yet
            count += 1
            if count == 1:
                return None  # nothing served yet: the default
            prior = dependants_count(closure, {p: graph.nodes[p].references for p in closure})
            most = max(prior.values())
            return {p: max(1, round(1e6 * (counts.get(p, 0) / (count - 1) + w * prior[p] / most))) for p in closure}

        return popularity

    lines = [
        "| sequence | registry default | " + " | ".join(f"online, w = {w:g}" for w in weights) + " |",
        "|---" * (2 + len(weights)) + "|",
    ]
    generated = ("images-mixed.json", "images-themed.json", "images-large.json")
    sequences = {"images-public.json": images} | {name: load_images(DATA / name, graph) for name in generated}
    for name, sequence in sequences.items():
        cells = [planned(graph, sequence, lambda _: None, cost)]
        for w in weights:
            learn = online(w)
            cells.append(planned(graph, sequence, lambda i, learn=learn, seq=sequence: learn(seq[i]), cost))
        lines.append(f"| {name} | " + " | ".join("{:.3f}, {:.3f}, {:.3f}".format(*c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graph", type=Path, default=DATASET / "graph.json.gz")
    parser.add_argument("--images", type=Path, default=DATASET / "images-public.json")
    parser.add_argument("--popularity", type=Path, default=DATASET / "popularity.json")
    args = parser.parse_args(argv)
    graph = load_graph(args.graph)
    images = load_images(args.images, graph)
    closures = [graph.closure(roots) for roots in images]
    seq = Atoms(closures, {p: graph.size(p) for closure in closures for p in closure})
    steps = merge_greedily(seq)
    print(f"{args.images.name}: {len(closures)} images, {len(seq.atoms)} atoms, ideal {seq.ideal / MB:.1f} MB")
    print("| groups | warm | cold | dl/ideal |\n|---|---|---|---|")
    shown = steps[:: max(1, len(steps) // 12)]
    for count, (warm, cold, dl), _ in shown + ([] if shown[-1] is steps[-1] else steps[-1:]):
        print(f"| {count} | {warm:.3f} | {cold:.3f} | {dl:.3f} |")
    print("\nThe final groups (MB, paths, images holding any, the most popular paths):")
    for group in sorted(steps[-1][2], key=lambda g: -sum(seq.nbytes[a] for a in g)):
        paths = [p for a in group for p in seq.atoms[a]]
        holders = set().union(*(seq.held_by[a] for a in group))
        print(f"  {sum(seq.nbytes[a] for a in group) / MB:7.1f} MB {len(paths):4d} paths in {len(holders):2d} images: "
              f"{', '.join(sorted(paths)[:4])}{' ...' if len(paths) > 4 else ''}")
    print("\nThe registry's planner with other popularity data:\n")
    print(what_the_planner_knows(graph, images, load_popularity(args.popularity)))
    print("\nWithout package-wide data (warm, cold, dl/ideal): the registry's default, and learning online\n")
    print(learned_by_the_registry(graph, images))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
