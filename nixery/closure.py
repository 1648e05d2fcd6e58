"""The closure graph of an image: store paths, their sizes and references.

Nodes are plain strings (store paths in the registry, package names in the
layering benchmark), so grouping code never depends on where the graph came from.
"""

from __future__ import annotations

import base64
import graphlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class GraphError(ValueError):
    """The closure data is malformed (not what `nix path-info --json` prints)."""


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    size: int
    references: tuple[str, ...]  # other nodes only; a self-reference is dropped


class ClosureGraph:
    """An acyclic graph of nodes closed under references."""

    def __init__(self, nodes: Iterable[Node]):
        self.nodes: dict[str, Node] = {node.name: node for node in nodes}
        dangling = {
            ref for node in self.nodes.values() for ref in node.references if ref not in self.nodes
        }
        if dangling:
            raise GraphError(f"references outside the graph: {sorted(dangling)[:5]}")

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def size(self, name: str) -> int:
        return self.nodes[name].size

    def closure(self, roots: Iterable[str]) -> set[str]:
        """Every node reachable from `roots`, the roots included."""
        seen: set[str] = set()
        stack = list(roots)
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            stack.extend(self.nodes[name].references)
        return seen

    @classmethod
    def from_mapping(cls, nodes: Mapping[str, Mapping[str, Any]]) -> ClosureGraph:
        """From `{name: {"size": int, "refs": [names]}}` (the benchmark's format); raises
        GraphError for a negative size or a cycle (Nix's graphs have none: a self-reference aside)."""
        graph = cls(
            Node(name, int(data["size"]), _without(name, data.get("refs", ())))
            for name, data in nodes.items()
        )
        negative = sorted(node.name for node in graph.nodes.values() if node.size < 0)
        if negative:
            raise GraphError(f"negative sizes: {negative[:5]}")
        cycle = graph._a_cycle()
        if cycle:
            raise GraphError(f"a cycle: {' -> '.join(cycle[:10])}{' -> ...' if len(cycle) > 10 else ''}")
        return graph

    def _a_cycle(self) -> list[str]:
        """The names along one cycle of references, its first name repeated at its end; [] if none."""
        try:
            graphlib.TopologicalSorter({name: node.references for name, node in self.nodes.items()}).prepare()
        except graphlib.CycleError as exc:
            return list(reversed(exc.args[1]))  # graphlib names each node before the one that refers to it
        return []

    @classmethod
    def from_path_info(cls, text: str | bytes) -> ClosureGraph:
        """From `nix path-info --json --recursive`.

        Nix 2.8 to 2.18 print a list of objects that carry their `path`; Nix 2.19
        and later print an object keyed by path. Both carry `narSize` and
        `references` (which may include the path itself).
        """
        nodes = []
        for path, info in _path_info_items(text):
            if not isinstance(path, str) or not isinstance(info, dict):
                raise GraphError(f"path-info entry without a path: {info!r:.200}")
            if info.get("valid") is False:
                raise GraphError(f"store path is not valid (not built): {path}")
            try:
                nodes.append(Node(path, int(info["narSize"]), _without(path, info.get("references", ()))))
            except (KeyError, TypeError, ValueError) as exc:
                raise GraphError(f"path-info entry for {path} lacks narSize") from exc
        return cls(nodes)


@dataclass(frozen=True, slots=True)
class Registration:
    """What Nix's store database records of one valid path: a Nix database in an image is made of these."""

    path: str
    nar_hash: str  # "sha256:<base16>", as Nix's database keeps it
    nar_size: int
    references: tuple[str, ...]  # sorted; the path itself too when it refers to itself


#: Nix's own base-32 alphabet (no e, o, t, u), as `nix path-info` (Nix 2.8-2.18) prints hashes.
_NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
_SHA256_BYTES = 32


def _nix_base32_bytes(text: str) -> bytes:
    """Nix's base 32 is read from the last character on, five bits each, least significant first."""
    value = bytearray(_SHA256_BYTES)
    for n, char in enumerate(reversed(text)):
        digit = _NIX_BASE32.index(char)
        bit = n * 5
        index, shift = divmod(bit, 8)
        value[index] |= (digit << shift) & 0xFF
        if shift > 3:
            if index + 1 >= _SHA256_BYTES:
                if digit >> (8 - shift):
                    raise ValueError("more bits than a sha256")
                continue
            value[index + 1] |= digit >> (8 - shift)
    return bytes(value)


def base16_nar_hash(text: str) -> str:
    """`sha256:<hex>` of a NAR hash as Nix prints one: `sha256:` and hex (its database), Nix's
    base 32 (`nix path-info` up to 2.18) or base 64, or SRI `sha256-<base64>` (2.19 on)."""
    try:
        if text.startswith("sha256-"):
            digest = base64.b64decode(text[7:], validate=True)
        elif text.startswith("sha256:"):
            encoded = text[7:]
            if len(encoded) == 64:
                digest = bytes.fromhex(encoded)
            elif len(encoded) == 52:
                digest = _nix_base32_bytes(encoded)
            else:
                digest = base64.b64decode(encoded, validate=True)
        else:
            raise ValueError("not a sha256 hash")
    except ValueError as exc:  # binascii.Error is one
        raise GraphError(f"not a NAR hash Nix prints: {text[:100]!r} ({exc})") from None
    if len(digest) != _SHA256_BYTES:
        raise GraphError(f"not a NAR hash Nix prints: {text[:100]!r} (not 32 bytes)")
    return "sha256:" + digest.hex()


def _path_info_items(text: str | bytes) -> list[tuple[Any, Any]]:
    """(path, entry) for each entry of `nix path-info --json` output, in either form (a list of
    objects that carry their path, or an object keyed by path: see `ClosureGraph.from_path_info`)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphError(f"path-info output is not JSON: {exc}") from exc
    if isinstance(data, list):
        return [(entry.get("path") if isinstance(entry, dict) else None, entry) for entry in data]
    if isinstance(data, dict):
        return list(data.items())
    raise GraphError("path-info output is neither a list nor an object")


def registrations_from_path_info(text: str | bytes) -> list[Registration]:
    """The registrations in `nix path-info --json` output."""
    found = []
    for path, info in _path_info_items(text):
        try:
            found.append(Registration(
                path, base16_nar_hash(info["narHash"]), int(info["narSize"]), tuple(sorted(set(info["references"])))
            ))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GraphError(f"path-info entry for {path!r:.200} lacks narHash or narSize: {exc}") from exc
    return found


def _without(name: str, refs: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({ref for ref in refs if ref != name}))
