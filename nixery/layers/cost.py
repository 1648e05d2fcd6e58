"""What a plan costs the clients that pull it (`nixery.layers.grouping`).

Two prices, both in bytes:

- **Bytes fetched again.**  Joining piece `k` into the piece above it risks
  that a later image needs `k` without it: clients then fetch `k` again.  The
  cost of a join is `k`'s bytes at risk, plus the bytes of any stored layer the
  join breaks up (every client holding that layer fetches its paths again).
- **Layers.**  A client pays for every layer it pulls, whatever its size: a
  request, a decompression stream and, in podman and containerd, a storage
  commit.  Issue 23 measured about 50 ms per layer with podman, the time to
  download ~2 MB at 40 MB/s.  `layer_cost` is that price in bytes
  (`NIXERY_LAYER_COST_MB`).

With `layer_cost = 0` only bytes count, and the plans are exactly the byte
optimal ones the registry made before the layer cost existed (a 50 kB
threshold keeps tiny paths from taking a layer each).  With a layer cost, a
plan minimises `bytes + layers x layer_cost` for a client that pulls images in
turn (warm) and for one with an empty store (cold): see `CostModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MB = 1_000_000

DEFAULT_LAYER_COST_MB = 2.0
"""NIXERY_LAYER_COST_MB's default: what podman pays per layer on a 40 MB/s link (issue 23)."""

MAX_LAYER_COST_MB = 1000.0


def parse_layer_cost_mb(text: str) -> float:
    """A per-layer cost in MB (10^6 bytes) from a setting or flag: a number from 0 to 1000.

    Raises ValueError with a message that names the problem."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of megabytes") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_LAYER_COST_MB:
        raise ValueError(f"{text!r} is outside 0..{MAX_LAYER_COST_MB:g} MB")
    return value


@dataclass(frozen=True, slots=True)
class CostModel:
    """What a plan costs its clients: bytes they fetch again, and `layer_cost` per layer.

    `cost(k, p) = bytes(k) * risk(k, p) * new_bytes_weight` for a piece `k` joining
    piece `p`, plus the bytes of any stored layer the join breaks up, times
    `broken_layer_weight`. The defaults are the model `nixery.layers.grouping` describes.

    With a layer cost (`layer_cost > 0`) four things change, each because a layer
    now has a price that a join saves:

    1. `risk` also weighs how rare the piece is: a path few packages need is unlikely
       to be pulled again at all, so joining it risks little (`rarity_exponent`).
    2. Joins are made while they cost less than `join_share * layer_cost`
       (`closure_join_share` without package-wide popularity), instead of `merge_threshold`.
    3. New pieces still smaller than `pack_share * layer_cost` after the joins are
       packed together, in popularity order, into layers of at most
       `pack_limit * layer_cost` bytes: such a piece fetched again costs its clients
       less than the layer it would take.
    4. A stored layer is reused whole although it holds paths the image gets elsewhere
       (outside its closure, or in another stored layer it reuses), where those weigh
       little: `takes_stored_layer`.

    `join_share`, `closure_join_share`, `rarity_exponent`, `pack_share` and `pack_limit`
    were fitted on the layering benchmark's sequences (docs/benchmarks/layering.md,
    docs/layering.md): `rarity_exponent` 0.7 scores 0.01 better on the public sequence,
    but makes the themed one (runs of python3-*, node-*, ... images) worse."""

    merge_threshold: float = 50_000
    """Joins whose cost is below this many bytes are made even under the layer budget:
    a layer saved is worth that much waste. Above it, pieces join only to respect the budget."""

    new_bytes_weight: float = 1.0
    """Weight of the bytes of the joining piece that a later image may need without the
    piece it joins (`bytes(k) * risk(k, p)`)."""

    broken_layer_weight: float = 1.0
    """Weight of the bytes of a stored layer that a join breaks up: every client that
    holds that layer fetches its paths again in the new one."""

    layer_cost: float = 0.0
    """Bytes a client's wait for one layer is worth (NIXERY_LAYER_COST_MB x 10^6).
    0: bytes alone count, as before issue 23."""

    join_share: float = 0.45
    """With a layer cost and package-wide popularity: pieces join along owner links while the
    join costs less than this share of `layer_cost` (or `merge_threshold`, if larger)."""

    closure_join_share: float = 0.3
    """`join_share` where popularity is counted within the closure (no package-wide data, the
    registry's default): those counts tell less about other images, so joins risk more."""

    rarity_exponent: float = 0.55
    """With a layer cost: the risk of a join is multiplied by
    `(popularity(k) / popularity of the closure's most popular path) ** rarity_exponent`."""

    pack_share: float = 2.5
    """With a layer cost: new pieces smaller than this share of `layer_cost` are packed."""

    pack_limit: float = 6.0
    """With a layer cost: a packed layer holds at most this many times `layer_cost` bytes."""

    outside_share: float = 1.0
    """With a layer cost: a stored layer that also holds paths the image gets elsewhere (outside
    its closure, or in another stored layer it reuses) is reused when their bytes are at most this
    share of (the bytes only it holds of the closure + `outside_layers` x `layer_cost`):
    `takes_stored_layer`."""

    outside_layers: float = 1.0
    """See `outside_share`: the layers' worth that reusing such a layer saves, besides its bytes."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.layer_cost) and self.layer_cost >= 0):
            raise ValueError(f"layer_cost must be a finite number of bytes >= 0, not {self.layer_cost!r}")

    @classmethod
    def for_layer_cost_mb(cls, megabytes: float) -> CostModel:
        """The default model with a per-layer cost of `megabytes` x 10^6 bytes."""
        return cls(layer_cost=megabytes * MB)

    def join_threshold(self, *, package_wide: bool) -> float:
        """Joins along owner links cheaper than this are made without the budget forcing them;
        `package_wide`: the popularity is package-wide data, not counted within the closure."""
        if self.layer_cost:
            share = self.join_share if package_wide else self.closure_join_share
            return max(self.merge_threshold, share * self.layer_cost)
        return self.merge_threshold

    def risk(self, popularity_of_piece: int, popularity_of_parent: int, most_popular: int) -> float:
        """How likely a later image holds the piece without the parent's top path: 0 when the
        piece is exactly as popular as the parent (a dependency only its user needs). With a
        layer cost, scaled down for pieces much rarer than the closure's most popular path."""
        conditional = max(0.0, 1.0 - popularity_of_parent / popularity_of_piece)
        if not self.layer_cost:
            return conditional
        return conditional * (popularity_of_piece / most_popular) ** self.rarity_exponent

    def takes_stored_layer(self, inside_bytes: int, outside_bytes: int) -> bool:
        """Whether an image reuses a stored layer that holds `inside_bytes` of its closure that no
        other layer of the image holds, and `outside_bytes` of paths it gets elsewhere: paths it
        does not need, or that another stored layer it reuses holds too (served twice). A client
        that holds the layer fetches nothing and one layer less; one that does not fetches the
        outside bytes for nothing. Never without a layer cost: bytes alone, such a layer is a
        loss for every client without it."""
        if not self.layer_cost:
            return False
        return outside_bytes <= self.outside_share * (inside_bytes + self.outside_layers * self.layer_cost)

    def join(self, piece_bytes: int, risk: float, *broken_layers_bytes: int) -> float:
        """The cost of a join: the piece's bytes at risk plus the bytes of each stored layer broken up."""
        cost = piece_bytes * risk * self.new_bytes_weight
        for broken in broken_layers_bytes:  # added one by one: the sums, and so the plans, stay the same
            cost += broken * self.broken_layer_weight
        return cost


DEFAULT_COST = CostModel()
"""Bytes only: the byte-optimal plans (`nixery layers plan --layer-cost-mb 0`)."""
