"""Splitting an image's closure into layers that other images can share.

A client downloads a layer only when it lacks that exact layer: a layer is
identified by the exact set of store paths it holds.  Every path that a client
already holds but must fetch again, because it now sits in a layer with other
companions, is wasted.  The physical limit is to fetch each path once.  The
registry gets near that limit by doing two things:

1. **Reuse what is already stored.**  The registry remembers the layers it has
   built (`LayerHistory`).  A stored layer that lies wholly inside a new
   image's closure is used as it is: clients that pulled an earlier image have
   it, and the registry does not have to build it again.
2. **Group new paths so that later images can reuse them.**  Paths that always
   travel together may share a layer; a path that other packages pull in
   without its companions should not.

Grouping follows *owner* links.  The owner of a path is its most *popular*
referrer in the closure, where popularity is how many packages have the path
in their closure.  The requested packages have no owner.  The links form a
forest, and every layer is a set of *pieces* joined along it.  Joining piece
`k` to the piece above it, `p`, risks that a later image holds `k` without
`p`'s top path (the least popular one, on which the whole layer hangs):

    risk(k, p) = 1 - popularity(top of p) / popularity(top of k)
    cost(k, p) = bytes(k) * risk(k, p)    (+ bytes of a stored layer broken up)

These weights are a `CostModel` (`nixery.layers.cost`), a parameter of
`plan_layers`; the defaults are the ones described here, which count bytes
only.  The registry also gives each layer a price (`CostModel.layer_cost`,
NIXERY_LAYER_COST_MB): then the risk is scaled down for rare pieces, the
threshold of step 2 is a share of that price, and steps 1b and 2b run.

A dependency that only one package uses is exactly as popular as its user:
risk 0, it joins for free.  `libc` under `bash` has a risk near 1 and stays
apart.  The plan, step by step:

1. Take the stored layers that lie inside the closure, largest first, skipping
   any that overlap one already taken.  Every other path is a piece of its own.
1b. With a layer price, also take stored layers that hold paths the image
   gets elsewhere: outside the closure, or in a stored layer taken already.
   Where those weigh little against what only the layer holds of the closure
   (`CostModel.takes_stored_layer`), it is served whole: the image carries
   those paths too (a path in two layers: identical copies, unpacked one over
   the other), and clients that hold the layer fetch nothing.
2. Join new pieces to their owner's piece (skipping stored layers on the way
   up), cheapest first, while the cost is below `CostModel.merge_threshold`
   bytes: tiny paths do not take a layer each.
2b. With a layer price, pack the new pieces still smaller than 2.5 times it
   together, most popular first, into layers of at most 6 times the price.
3. While there are more pieces than `max_layers`, keep joining cheapest first;
   now a stored layer may be broken up too, which costs its bytes (clients
   that hold it fetch them again).
4. If pieces without an owner still exceed the budget, put the smallest
   together.

Order: stored layers come first, oldest first, then the new ones, most popular
first (base layers first).  Clients keep a layer under its *chain*: the layer
and every layer below it.  A layer a client holds is used again only where it
sits on the same layers below; elsewhere podman and containerd unpack it again
and docker downloads it again (docs/benchmarks/client-layers.md).  Ordering by
age is one order for every image: a layer's place among other stored layers
never changes, so two images that share their oldest layers share those chains.
Popularity alone does not give that: without popularity data it is counted
within each closure, and it ranks the same layers differently in each image.

Popularity comes from the caller when it has package-wide data (the layering
benchmark passes it).  The registry has none, so it counts, within the
closure, how many paths depend on each path: a weaker but useful signal.

Worked example (sizes in MB, popularity in parentheses):

    image 1: [app]                       image 2: [tool]

    app (2) ──────► libfoo (40) ──► libc (1000)
     │ 30            │ 0.3           ▲ 2.0
     └──► app-data (2)               │
            20                  tool (10) 1.0

Image 1's closure is {app, app-data, libfoo, libc}.  Owners: app-data and
libfoo -> app, libc -> libfoo (its only referrer here).

    app-data into app:  risk 1 - 2/2    = 0     cost 0        joins
    libfoo into app:    risk 1 - 2/40   = 0.95  cost 0.29 MB  stays apart
    libc into libfoo:   risk 1 - 40/1000 = 0.96 cost 1.92 MB  stays apart

    layers: {libc}  {libfoo}  {app, app-data}

With `max_layers=2` the budget forces the cheapest join, libfoo into app:
{libc} {app, app-data, libfoo}.  With `max_layers=1` libc joins as well.

Image 2's closure is {tool, libc}.  The stored layer {libc} lies inside it and
is reused; only {tool} is new.  A client that pulled image 1 downloads 1 MB.

Determinism: the plan depends only on the closure, the popularity of its paths
and the history, never on hash order, so replicas with the same history agree
(and registries with different histories may not: docs/layering.md, "What is
deterministic").  Ties are broken by path name and by the order in which layers
were recorded.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Mapping, Sequence

from nixery import json_pieces
from nixery.closure import ClosureGraph
from nixery.layers.cost import DEFAULT_COST, CostModel
from nixery.layers.popularity import is_count

__all__ = ["DEFAULT_COST", "DEFAULT_HISTORY_CAPACITY", "CostModel", "LayerHistory", "dependants_count", "plan_layers"]

# How many layers a history keeps; the least recently used are forgotten first.
DEFAULT_HISTORY_CAPACITY = 20_000

_FORMAT_VERSION = 1


class LayerHistory:
    """Layers the registry has already stored, in the order it made them.

    Each layer gets a serial number when first recorded; recording it again
    (because a plan reused it) refreshes its "last used" time.  When more than
    `capacity` layers are known, the least recently used are forgotten, so a
    registry that serves many thousands of images keeps a bounded history.

    A full history holds up to hundreds of thousands of paths and lives as long as
    the process: it is kept in tuples of strings and ints and in dicts of them,
    which the garbage collector stops tracking, so that no full collection walks
    it (a set per layer and per path added 14-62 ms to each, with the event loop
    stopped; docs/benchmarks/history_gc.md).

    Safe to use from several threads: the registry plans in worker threads
    while the event loop records finished builds.
    """

    def __init__(self, *, capacity: int = DEFAULT_HISTORY_CAPACITY):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._paths: dict[int, tuple[str, ...]] = {}  # layer id -> its paths
        self._last_used: dict[int, int] = {}  # layer id -> clock value of the last `record` that included it
        self._uses: dict[int, int] = {}
        self._bytes: dict[int, int] = {}  # layer id -> bytes of its paths, where the recorder said
        self._by_path: dict[str, tuple[int, ...]] = {}  # path -> ids of the layers that hold it
        self._next_id = 0
        self._clock = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, layer: object) -> bool:
        if not isinstance(layer, frozenset | set):
            return False
        with self._lock:
            return self._id_of(frozenset(layer)) is not None

    def layers(self) -> list[frozenset[str]]:
        """Known layers, oldest first."""
        with self._lock:
            return [frozenset(self._paths[i]) for i in sorted(self._paths)]

    def record(self, layers: Sequence[frozenset[str]], sizes: Sequence[int | None] | None = None) -> None:
        """Note that the registry now stores (and serves) these layers; `sizes`, where given,
        are the bytes of each layer's paths (a later plan weighs the paths of a stored layer
        that lie outside its closure by them: `CostModel.takes_stored_layer`)."""
        if sizes is not None and len(sizes) != len(layers):
            raise ValueError(f"{len(sizes)} sizes for {len(layers)} layers")
        with self._lock:
            self._clock += 1
            for n, layer in enumerate(layers):
                paths = frozenset(layer)
                if not paths:
                    continue
                size = None if sizes is None else sizes[n]
                known = self._id_of(paths)
                if known is not None:
                    self._last_used[known] = self._clock
                    self._uses[known] += 1
                else:
                    known = self._next_id
                    self._add(known, tuple(paths), self._clock, 1)
                    self._next_id += 1
                if size is not None:
                    self._bytes.setdefault(known, size)
            self._evict()

    def overlapping(self, closure: set[str] | frozenset[str]) -> list[tuple[frozenset[str], int, int, int, int | None]]:
        """(layer, last_used, id, how many of its paths lie in `closure`, its bytes if known) for
        every known layer that holds a path of `closure`."""
        with self._lock:
            hits: dict[int, int] = {}
            for path in closure:
                for layer_id in self._by_path.get(path, ()):
                    hits[layer_id] = hits.get(layer_id, 0) + 1
            return [
                (frozenset(self._paths[i]), self._last_used[i], i, count, self._bytes.get(i))
                for i, count in hits.items()
            ]

    def to_json(self) -> bytes:
        """A compact document: a path table, then layers as indices into it."""
        with self._lock:
            paths = sorted(self._by_path)
            index = {path: n for n, path in enumerate(paths)}
            layers = [
                [i, self._last_used[i], self._uses[i], sorted(index[p] for p in members)]
                for i, members in sorted(self._paths.items())
            ]
            document = {
                "version": _FORMAT_VERSION,
                "capacity": self.capacity,
                "clock": self._clock,
                "next_id": self._next_id,
                "paths": paths,
                "layers": layers,
                # Apart from the layers, so that a process that predates them reads the rest.
                "bytes": sorted(self._bytes.items()),
            }
        return json_pieces.dumps(document).encode()  # a layer at a time: other threads run meanwhile

    @classmethod
    def from_json(cls, data: bytes | str, *, capacity: int | None = None) -> LayerHistory:
        """Read what `to_json` wrote; `capacity` overrides the stored one."""
        try:
            # A layer at a time: json.loads would hold the event loop for the whole document.
            document = json_pieces.loads(data.decode() if isinstance(data, bytes) else data)
            if document.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unknown version {document.get('version')!r}")
            history = cls(capacity=capacity or int(document["capacity"]))
            paths = document["paths"]
            for layer_id, last_used, uses, members in document["layers"]:
                if not members or any(not isinstance(n, int) or n < 0 for n in members):
                    raise ValueError(f"layer {layer_id} has bad members")
                layer = frozenset(paths[n] for n in members)
                if int(layer_id) in history._paths or history._id_of(layer) is not None:
                    raise ValueError(f"layer {layer_id} appears twice")
                history._add(int(layer_id), tuple(layer), int(last_used), int(uses))
            for layer_id, size in document.get("bytes", ()):  # a damaged size: that layer's is unknown
                if is_count(layer_id) and layer_id in history._paths and is_count(size):
                    history._bytes[layer_id] = size
            history._clock = int(document["clock"])
            history._next_id = max(int(document["next_id"]), max(history._paths, default=-1) + 1)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
            raise ValueError(f"malformed layer history: {exc}") from exc
        history._evict()
        return history

    def _id_of(self, layer: frozenset[str]) -> int | None:
        """The id of the known layer that holds exactly these paths (sought among the layers
        that hold one of them)."""
        for layer_id in self._by_path.get(next(iter(layer)), ()) if layer else ():
            members = self._paths[layer_id]
            if len(members) == len(layer) and layer.issuperset(members):
                return layer_id
        return None

    def _add(self, layer_id: int, paths: tuple[str, ...], last_used: int, uses: int) -> None:
        self._paths[layer_id] = paths
        self._last_used[layer_id] = last_used
        self._uses[layer_id] = uses
        by_path = self._by_path
        alone = (layer_id,)  # one tuple for every path no other layer holds
        for path in paths:
            held = by_path.get(path)
            by_path[path] = alone if held is None else held + alone

    def _evict(self) -> None:
        if len(self._paths) <= self.capacity:
            return
        # Forget a tenth more than needed, so that a full history sorts rarely.
        excess = len(self._paths) - self.capacity + self.capacity // 10
        last_used = self._last_used
        oldest = set(sorted(last_used, key=lambda i: (last_used[i], i))[:excess])
        touched: set[str] = set()
        for layer_id in oldest:
            touched.update(self._paths.pop(layer_id))
            del self._last_used[layer_id], self._uses[layer_id]
            self._bytes.pop(layer_id, None)
        by_path = self._by_path
        for path in touched:
            kept = [i for i in by_path[path] if i not in oldest]
            if kept:
                by_path[path] = tuple(kept)
            else:
                del by_path[path]


def plan_layers(
    graph: ClosureGraph,
    roots: Sequence[str],
    *,
    max_layers: int,
    history: LayerHistory | None = None,
    popularity: Mapping[str, int] | None = None,
    cost: CostModel = DEFAULT_COST,
) -> list[frozenset[str]]:
    """Split closure(roots) into at most max_layers layers (each a non-empty frozenset),
    joining pieces as `cost` weighs them, in a deterministic order: the stored layers
    reused, oldest first, then the new ones, base first. A stored layer reused whole may
    also hold paths outside the closure, or paths another reused stored layer holds
    (step 1b); no other path is in two layers. Does not
    mutate history; the caller calls history.record(result, sizes) after storing the layers."""
    if max_layers < 1:
        raise ValueError("max_layers must be at least 1")
    missing = sorted({root for root in roots if root not in graph})
    if missing:
        raise KeyError(f"roots not in the graph: {missing[:5]}")
    closure = graph.closure(roots)
    if not closure:
        return []
    return _Planner(graph, closure, max_layers, history, popularity, cost).plan()


class _Planner:
    """One plan: pieces of the closure, joined along owner links."""

    def __init__(
        self,
        graph: ClosureGraph,
        closure: set[str],
        max_layers: int,
        history: LayerHistory | None,
        popularity: Mapping[str, int] | None,
        cost: CostModel,
    ):
        self.max_layers = max_layers
        self.cost = cost
        self.paths = sorted(closure)
        self.size = {p: graph.nodes[p].size for p in self.paths}
        self.refs = {p: graph.nodes[p].references for p in self.paths}
        self.package_wide = popularity is not None
        self.pop = (
            {p: max(1, int(popularity.get(p, 1))) for p in self.paths}
            if popularity is not None
            else dependants_count(self.paths, self.refs)
        )
        self.owner = self._owners()
        self.most_popular = max(self.pop.values())
        self.age: dict[frozenset[str], int] = {}  # each reused layer's serial number in the history
        # A reused layer's paths the image gets elsewhere: outside the closure, or in another reused layer.
        self.extra: dict[frozenset[str], frozenset[str]] = {}
        self.reused = self._pick_reused(history, closure) if history is not None else []

    def _owners(self) -> dict[str, str]:
        """Each path's most popular referrer (ties: the smallest name)."""
        owner: dict[str, str] = {}
        pop = self.pop
        for user in self.paths:  # sorted, so among equals the first name wins
            for dep in self.refs[user]:
                current = owner.get(dep)
                if current is None or pop[user] > pop[current]:
                    owner[dep] = user
        return owner

    def _pick_reused(self, history: LayerHistory, closure: set[str]) -> list[frozenset[str]]:
        """Stored layers to reuse: disjoint ones inside the closure, largest first, then most
        recently used; then, with a layer price, those that hold a few paths the image gets
        elsewhere (`_pick_with_extra_paths`). Returns the paths of the closure that each
        layer alone holds (its other paths: `self.extra`)."""
        candidates = history.overlapping(closure)
        inside = [(layer, used, i) for layer, used, i, count, _ in candidates if count == len(layer)]
        inside.sort(key=lambda c: (-sum(self.size[p] for p in c[0]), -c[1], c[2]))
        taken: set[str] = set()
        chosen = []
        for layer, _, layer_id in inside:
            if taken.isdisjoint(layer):
                taken |= layer
                chosen.append(layer)
                self.age[layer] = layer_id
        if self.cost.layer_cost:
            chosen += self._pick_with_extra_paths(candidates, closure, taken)
        return chosen

    def _pick_with_extra_paths(
        self, candidates: list[tuple[frozenset[str], int, int, int, int | None]], closure: set[str], taken: set[str]
    ) -> list[frozenset[str]]:
        """Stored layers that also hold paths the image gets elsewhere: paths outside the closure,
        or paths of a layer taken already, served twice. Taken where those extra bytes are worth
        the layer (`CostModel.takes_stored_layer`), most bytes of the closure for the fewest
        extra first. A client that pulled an earlier image holds the layer already; a new one
        would make it fetch those paths again, and pay for one more layer."""

        def worth(layer: frozenset[str], size: int) -> tuple[frozenset[str], int] | None:
            """The paths of the closure that only `layer` would bring and their bytes, if it pays."""
            part = frozenset(p for p in layer if p in closure and p not in taken)
            part_bytes = sum(self.size[p] for p in part)
            if part and self.cost.takes_stored_layer(part_bytes, max(0, size - part_bytes)):
                return part, part_bytes
            return None

        scored = []
        for layer, used, layer_id, count, size in candidates:
            if size is None and count == len(layer):
                size = sum(self.size[p] for p in layer)
            if size is not None and (weighed := worth(layer, size)) is not None:
                scored.append((size - 2 * weighed[1], -used, layer_id, size, layer))
        scored.sort(key=lambda s: s[:3])
        chosen = []
        for _, _, layer_id, size, layer in scored:
            # Layers taken meanwhile may hold some of its paths: weighed again without them.
            if (weighed := worth(layer, size)) is not None:
                part = weighed[0]
                taken |= layer
                chosen.append(part)
                self.age[part] = layer_id
                self.extra[part] = layer - part
        return chosen

    def plan(self) -> list[frozenset[str]]:
        # Pieces: the reused layers, then every other path on its own.
        self.members: list[list[str]] = []
        self.stored: list[bool] = []  # an intact reused layer
        self.piece_of: dict[str, int] = {}
        for layer in self.reused:
            self._new_piece(sorted(layer), stored=True)
        for path in self.paths:
            if path not in self.piece_of:
                self._new_piece([path], stored=False)
        self.union = list(range(len(self.members)))
        self.nbytes = [sum(self.size[p] for p in m) for m in self.members]
        self.top = [self._top_of(k) for k in range(len(self.members))]
        self.users: dict[str, list[str]] = {}
        for path in self.paths:
            if path in self.owner:
                self.users.setdefault(self.owner[path], []).append(path)
        self.count = len(self.members)

        self._join(forced=False)
        if self.cost.layer_cost:
            self._pack_small_pieces()
        if self.count > self.max_layers:
            self._join(forced=True)
        pieces = [k for k in range(len(self.members)) if self._find(k) == k]
        if len(pieces) > self.max_layers:
            # Only owner-less pieces are left: put the smallest together.
            pieces.sort(key=lambda k: (self.nbytes[k], self.top[k]))
            excess = len(pieces) - self.max_layers + 1
            for k in pieces[1:excess]:
                self._merge(k, pieces[0])
            self.top[pieces[0]] = max((self.top[k] for k in pieces[:excess]), key=self._rank)
            pieces = pieces[:1] + pieces[excess:]
        layer_of = {k: frozenset(self.members[k]) for k in pieces}
        stored = sorted((k for k in pieces if layer_of[k] in self.age), key=lambda k: self.age[layer_of[k]])
        new = sorted(
            (k for k in pieces if layer_of[k] not in self.age), key=lambda k: (-self.pop[self.top[k]], self.top[k])
        )
        # A reused layer is served whole: its extra paths come along. A stored piece whose paths
        # another reused layer brings may have been joined into a new one (steps 3 and 4): such
        # paths come with that layer, and the new one goes without them.
        brought = frozenset().union(*(self.extra.get(layer_of[k], frozenset()) for k in stored))
        kept_new = [layer for layer in (layer_of[k] - brought for k in new) if layer]
        return [layer_of[k] | self.extra.get(layer_of[k], frozenset()) for k in stored] + kept_new

    def _pack_small_pieces(self) -> None:
        """Step 2b: a small new piece would cost its clients a layer for fewer bytes than the
        layer's price; packed, and needed alone later, it costs them at most its bytes."""
        small, limit = self.cost.pack_share * self.cost.layer_cost, self.cost.pack_limit * self.cost.layer_cost
        pieces = [k for k, n in enumerate(self.nbytes) if self._find(k) == k and not self.stored[k] and n < small]
        pieces.sort(key=lambda k: (-self.pop[self.top[k]], self.top[k]))
        packing: int | None = None
        for k in pieces:
            if packing is not None and self.nbytes[packing] + self.nbytes[k] <= limit:
                self._merge(k, packing)
                self.top[packing] = min(self.top[packing], self.top[k], key=self._rank)
            else:
                packing = k

    def _new_piece(self, paths: list[str], *, stored: bool) -> None:
        for path in paths:
            self.piece_of[path] = len(self.members)
        self.members.append(paths)
        self.stored.append(stored)

    def _rank(self, path: str) -> tuple[int, str]:
        return self.pop[path], path

    def _find(self, k: int) -> int:
        union = self.union
        while union[k] != k:
            union[k] = union[union[k]]
            k = union[k]
        return k

    def _top_of(self, k: int) -> str:
        """The piece's least popular path whose owner lies outside it."""
        owner = self.owner
        outside = [p for p in self.members[k] if p not in owner or self._find(self.piece_of[owner[p]]) != k]
        return min(outside or self.members[k], key=self._rank)

    def _parent(self, k: int) -> tuple[int, str] | None:
        """The piece that `k` would join: the first open piece up the owner chain."""
        node = self.owner.get(self.top[k])
        while node is not None:
            p = self._find(self.piece_of[node])
            if p != k and not self.stored[p]:
                return p, node
            node = self.owner.get(node)
        return None

    def _cost(self, k: int, forced: bool) -> tuple[float, int] | None:
        """Expected bytes wasted by joining `k` to its parent, and the parent.

        Over budget, a piece may also break up the stored layer right above it.
        """
        if self.stored[k] and not forced:
            return None
        own = self.nbytes[k] if self.stored[k] else 0  # clients holding it fetch it again
        best = None
        up = self._parent(k)
        if up is not None:
            best = (self.cost.join(self.nbytes[k], self._risk(k, up[0]), own), up[0])
        if forced and self.top[k] in self.owner:
            p = self._find(self.piece_of[self.owner[self.top[k]]])
            if p != k and self.stored[p]:
                waste = self.cost.join(self.nbytes[k], self._risk(k, p), own, self.nbytes[p])
                if best is None or waste < best[0]:
                    best = (waste, p)
        return best

    def _risk(self, k: int, p: int) -> float:
        """How likely a later image holds piece k without piece p's top path."""
        return self.cost.risk(self.pop[self.top[k]], self.pop[self.top[p]], self.most_popular)

    def _merge(self, k: int, into: int) -> None:
        self.union[k] = into
        self.members[into].extend(self.members[k])
        self.nbytes[into] += self.nbytes[k]
        self.count -= 1

    def _join(self, *, forced: bool) -> None:
        """Join pieces to their parents, cheapest first.

        Unforced: only new pieces, and only while the expected waste is below the
        cost model's join threshold.  Forced: any piece, until the budget holds.
        """
        heap: list[tuple[float, int]] = []
        threshold = self.cost.join_threshold(package_wide=self.package_wide)

        def push(k: int) -> None:
            c = self._cost(k, forced)
            if c is not None:
                heapq.heappush(heap, (c[0], k))

        for k in range(len(self.members)):
            if self._find(k) == k:
                push(k)
        while heap:
            if forced and self.count <= self.max_layers:
                return
            c, k = heapq.heappop(heap)
            if self._find(k) != k:
                continue
            current = self._cost(k, forced)
            if current is None:
                continue
            if current[0] != c:  # stale: the piece grew or its way up changed
                heapq.heappush(heap, (current[0], k))
                continue
            if not forced and c >= threshold:
                return
            p = current[1]
            opened = [path for q in (k, p) if self.stored[q] for path in self.members[q]]
            self._merge(k, p)
            self.stored[p] = False
            up = self.owner.get(self.top[p])
            if opened or (up is not None and self._find(self.piece_of[up]) == p):
                self.top[p] = self._top_of(p)
            push(p)
            # A broken-up stored layer opens a shorter way up for pieces below it.
            for path in opened:
                for user in self.users.get(path, ()):
                    push(self._find(self.piece_of[user]))


def dependants_count(paths: Sequence[str], refs: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """For each path, how many paths of the closure have it in their closure (itself included)."""
    bit = {p: 1 << n for n, p in enumerate(paths)}
    users: dict[str, list[str]] = {p: [] for p in paths}
    pending = {p: 0 for p in paths}
    for p in paths:
        for dep in refs[p]:
            users[dep].append(p)
            pending[p] += 1
    # Dependencies before their users, so every user's set is complete when read.
    ready = [p for p in paths if pending[p] == 0]
    order = []
    while ready:
        dep = ready.pop()
        order.append(dep)
        for user in users[dep]:
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
    # Walk from the top down: a path's dependants are its users' dependants.
    dependants: dict[str, int] = {}
    for p in reversed(order):
        mask = bit[p]
        for user in users[p]:
            mask |= dependants[user]
        dependants[p] = mask
    return {p: mask.bit_count() for p, mask in dependants.items()}
