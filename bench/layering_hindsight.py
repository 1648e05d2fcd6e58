"""What layering could score if it knew the whole sequence in advance (a bound, not a planner).

    .venv/bin/python bench/layering_hindsight.py       # images-public.json, a few minutes

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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from layering import DATASET, MB, SCORE_LAYER_COST

from nixery.layers.plan_cli import load_graph, load_images

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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graph", type=Path, default=DATASET / "graph.json.gz")
    parser.add_argument("--images", type=Path, default=DATASET / "images-public.json")
    args = parser.parse_args(argv)
    graph = load_graph(args.graph)
    closures = [graph.closure(roots) for roots in load_images(args.images, graph)]
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
