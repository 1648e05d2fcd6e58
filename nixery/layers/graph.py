"""The closure graph, as layering takes it (defined in `nixery.closure`, which Nix
fills without depending on layering)."""

from nixery.closure import ClosureGraph, GraphError, Node

__all__ = ["ClosureGraph", "GraphError", "Node"]
