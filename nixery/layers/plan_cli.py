"""`nixery layers plan`: run the layering on a dependency graph and a list of images.

    nixery layers plan --graph G --popularity P --images I [--max-layers N] [--layer-cost-mb C] > plan.json

Prints a JSON list with one entry per image, in order; each entry is a list of
layers (the stored ones it reuses first, oldest first, then new ones, base first),
each layer a sorted list of node names.  The layer history is kept from one image
to the next, as the registry keeps it.  The per-layer cost is the registry's: `--layer-cost-mb`, else
NIXERY_LAYER_COST_MB, else its default (`nixery.layers.cost`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nixery.closure import ClosureGraph, GraphError
from nixery.layers.cost import DEFAULT_COST, DEFAULT_LAYER_COST_MB, CostModel, parse_layer_cost_mb
from nixery.layers.grouping import LayerHistory, plan_layers
from nixery.layers.popularity import is_count


class InputError(ValueError):
    """An input file is missing or does not have the expected shape."""


#: The most a JSON input may hold, uncompressed: a whole package set's graph is tens of MB;
#: a small gzip file that unpacks to gigabytes (a "gzip bomb") is refused, not unpacked into memory.
MAX_INPUT_BYTES = 256 << 20


def read_json(path: Path) -> Any:
    """A JSON document from a plain or gzip-compressed file."""
    try:
        with path.open("rb") as file:
            compressed = file.peek(2)[:2] == b"\x1f\x8b"  # peeked, not read: a pipe cannot seek back
            opened = gzip.GzipFile(fileobj=file) if compressed else file
            raw = opened.read(MAX_INPUT_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: broken gzip data: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_INPUT_BYTES:
        raise InputError(f"{path}: more than {MAX_INPUT_BYTES >> 20} MiB{' uncompressed' if compressed else ''}")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not JSON: {exc}") from exc
    except RecursionError:  # arrays or objects nested thousands deep: no input of ours is
        raise InputError(f"{path}: JSON nested too deeply to be a graph, popularity or image list") from None


def load_graph(path: Path) -> ClosureGraph:
    """`{"nodes": {name: {"size": bytes, "refs": [names]}}}` (the `nodes` wrapper is optional)."""
    document = read_json(path)
    nodes = document.get("nodes", document) if isinstance(document, dict) else None
    if not isinstance(nodes, dict):
        raise InputError(f"{path}: expected an object of nodes")
    for name, node in nodes.items():  # each node's shape first: `"refs": "libc"` was read as the names l, i, b, c
        if not isinstance(node, dict):
            raise InputError(f"{path}: bad graph: {name!r} is not an object with a size and refs: "
                             f"{json.dumps(node)[:200]}")
        size, refs = node.get("size"), node.get("refs", [])
        if isinstance(size, bool) or not isinstance(size, int):  # 1.5 and true were taken as 1 (negatives: below)
            raise InputError(f"{path}: bad graph: a size is not a whole number of bytes: {name!r} has "
                             f"{json.dumps(size)}")
        if not isinstance(refs, list) or not all(isinstance(ref, str) for ref in refs):
            raise InputError(f"{path}: bad graph: the refs of {name!r} are not a list of node names: "
                             f"{json.dumps(refs)[:200]}")
    try:
        return ClosureGraph.from_mapping(nodes)
    except OverflowError:  # a size of 1e400 (infinity): int() cannot take it
        raise InputError(f"{path}: bad graph: a size is not a whole number of bytes") from None
    except (GraphError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{path}: bad graph: {exc}") from exc


def load_popularity(path: Path) -> dict[str, int]:
    """`{name: count}`, each count a non-negative integer, as the registry reads NIX_POPULARITY_URL."""
    document = read_json(path)
    if not isinstance(document, dict):
        raise InputError(f"{path}: expected an object of integer counts")
    for name, count in document.items():
        if not is_count(count):
            raise InputError(f"{path}: the count of {name[:200]!r} is not a non-negative integer: {count!r:.50}")
    return document


def load_images(path: Path, graph: ClosureGraph) -> list[list[str]]:
    document = read_json(path)
    if not isinstance(document, list) or not all(
        isinstance(image, list) and all(isinstance(root, str) for root in image) for image in document
    ):
        raise InputError(f"{path}: expected a list of images, each a list of names")
    unknown = sorted({root for image in document for root in image if root not in graph})
    if unknown:
        raise InputError(f"{path}: names not in the graph: {', '.join(unknown[:5])}")
    return document


def plan_sequence(
    graph: ClosureGraph,
    images: list[list[str]],
    *,
    max_layers: int,
    popularity: Mapping[str, int] | None,
    history: LayerHistory | None,
    cost: CostModel = DEFAULT_COST,
) -> list[list[frozenset[str]]]:
    """Plan each image in order, recording each plan as the registry does."""
    plans = []
    for roots in images:
        layers = plan_layers(graph, roots, max_layers=max_layers, history=history, popularity=popularity, cost=cost)
        if history is not None:
            history.record(layers, [sum(graph.size(path) for path in layer) for layer in layers])
        plans.append(layers)
    return plans


FORMATS = """\
input files (JSON, plain or gzip-compressed; names are any strings, e.g. store paths):
  --graph       every node of the dependency graph, its size in bytes and the nodes it refers to
                (the "nodes" wrapper is optional; every name in "refs" must be a node):
                  {"nodes": {"app": {"size": 2000000, "refs": ["libc"]},
                             "tool": {"size": 500000, "refs": ["libc"]},
                             "libc": {"size": 30000000, "refs": []}}}
  --popularity  how many packages (of a whole package set) need each node, a whole number of 0
                or more (as NIX_POPULARITY_URL's); without it, the nodes of each image's
                closure that depend on it are counted:
                  {"app": 1, "tool": 3, "libc": 900}
  --images      the images to plan, in order, each a list of its roots (nodes of the graph):
                  [["app"], ["tool"], ["app", "tool"]]

output: one entry per image, in order; each a list of layers (the stored ones it reuses
first, oldest first, then new ones, base first), each layer a sorted list of node names.
Each plan is remembered for the next image's, as the registry remembers the layers it
stored (--no-history: plan each as if nothing were stored). With a layer cost, a stored
layer may be reused whole although it holds nodes of another image's closure, or nodes
another stored layer of the image holds too (such a node is then in two of its layers).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nixery layers plan",
        description="Split each image's closure into layers, as the registry does; print the plan\nas JSON.",
        epilog=FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--graph", type=Path, required=True, help="graph JSON (.json or .json.gz), see below")
    parser.add_argument("--popularity", type=Path, help="popularity JSON, see below")
    parser.add_argument("--images", type=Path, required=True, help="JSON list of images, see below")
    parser.add_argument("--max-layers", type=int, default=100, help="layer budget per image (default 100)")
    parser.add_argument("--no-history", action="store_true", help="plan every image as if the registry were empty")
    parser.add_argument(
        "--layer-cost-mb",
        metavar="MB",
        help="what a client's wait for one layer is worth, in MB (10^6 bytes): the layering trades bytes for "
        f"layers at it; 0 counts bytes only (default: NIXERY_LAYER_COST_MB, else {DEFAULT_LAYER_COST_MB:g})",
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.max_layers < 1:
        print("nixery layers plan: --max-layers must be at least 1", file=sys.stderr)
        return 2
    raw_cost = args.layer_cost_mb if args.layer_cost_mb is not None else os.environ.get("NIXERY_LAYER_COST_MB", "")
    try:
        layer_cost_mb = parse_layer_cost_mb(raw_cost) if raw_cost.strip() else DEFAULT_LAYER_COST_MB
    except ValueError as exc:
        source = "--layer-cost-mb" if args.layer_cost_mb is not None else "NIXERY_LAYER_COST_MB"
        print(f"nixery layers plan: {source}={exc}", file=sys.stderr)
        return 2
    try:
        graph = load_graph(args.graph)
        popularity = load_popularity(args.popularity) if args.popularity else None
        images = load_images(args.images, graph)
    except InputError as exc:
        print(f"nixery layers plan: {exc}", file=sys.stderr)
        return 2
    history = None if args.no_history else LayerHistory()
    plans = plan_sequence(
        graph,
        images,
        max_layers=args.max_layers,
        popularity=popularity,
        history=history,
        cost=CostModel.for_layer_cost_mb(layer_cost_mb),
    )
    out = [[sorted(layer) for layer in layers] for layers in plans]
    json.dump(out, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
