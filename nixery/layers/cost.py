"""What joining two pieces of a closure into one layer costs (`nixery.layers.grouping`).

The cost of a join is the bytes clients are expected to fetch again because of
it: the joining piece's bytes at risk (a later image needs the piece without
the piece it joins), plus the bytes of any stored layer the join breaks up.
`plan_layers` takes a `CostModel`; the defaults are the model that module's
docstring describes and its worked example uses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModel:
    """What a join of two pieces costs: the expected bytes clients fetch again because of it.

    `cost(k, p) = bytes(k) * risk(k, p) * new_bytes_weight` for a piece `k` joining
    piece `p`, plus the bytes of any stored layer the join breaks up, times
    `broken_layer_weight`. The defaults are the model `nixery.layers.grouping` describes.
    """

    merge_threshold: float = 50_000
    """Joins whose cost is below this many bytes are made even under the layer budget:
    a layer saved is worth that much waste. Above it, pieces join only to respect the budget."""

    new_bytes_weight: float = 1.0
    """Weight of the bytes of the joining piece that a later image may need without the
    piece it joins (`bytes(k) * risk(k, p)`)."""

    broken_layer_weight: float = 1.0
    """Weight of the bytes of a stored layer that a join breaks up: every client that
    holds that layer fetches its paths again in the new one."""

    @staticmethod
    def risk(popularity_of_piece: int, popularity_of_parent: int) -> float:
        """How likely a later image holds the piece without the parent's top path: 0 when the
        piece is exactly as popular as the parent (a dependency only its user needs)."""
        return max(0.0, 1.0 - popularity_of_parent / popularity_of_piece)

    def join(self, piece_bytes: int, risk: float, *broken_layers_bytes: int) -> float:
        """The cost of a join: the piece's bytes at risk plus the bytes of each stored layer broken up."""
        cost = piece_bytes * risk * self.new_bytes_weight
        for broken in broken_layers_bytes:  # added one by one: the sums, and so the plans, stay the same
            cost += broken * self.broken_layer_weight
        return cost


DEFAULT_COST = CostModel()
