"""The layer annotations that nix-snapshotter reads (NIXERY_NIX_ANNOTATIONS).

nix-snapshotter (github.com/pdtpartners/nix-snapshotter) is a containerd
snapshotter that, for a layer it recognises as a Nix layer, realises the layer's
store paths from the node's own Nix store or binary cache instead of unpacking
them. It recognises one by its descriptor's annotations, in the form its
docs/architecture.md shows and its `nix2container` package names
(`NixLayerAnnotation`, `NixStorePrefixAnnotation`):

    "containerd.io/snapshot/nix-layer":        "true"
    "containerd.io/snapshot/nix-store-path.0": "/nix/store/...-glibc-2.37-8"
    "containerd.io/snapshot/nix-store-path.1": "/nix/store/...-hello-2.12.1"

Since its v0.3.0 its own images carry one `containerd.io/snapshot/nix-closure`
annotation instead, naming a closure-info store path; it still reads the form
above, which needs no store path besides the layer's own (a registry has no
closure-info derivation to offer). Other clients ignore annotations.

Guarantees: a layer without store paths (the entry-point layer) gets none; the
paths are listed in the order given (the record's: sorted), numbered from 0.
"""

from __future__ import annotations

from collections.abc import Sequence

NIX_LAYER = "containerd.io/snapshot/nix-layer"
NIX_STORE_PATH_PREFIX = "containerd.io/snapshot/nix-store-path."


def nix_layer_annotations(store_paths: Sequence[str]) -> dict[str, str]:
    """The annotations of a layer that holds exactly `store_paths` (none for a layer that holds none)."""
    if not store_paths:
        return {}
    return {NIX_LAYER: "true", **{f"{NIX_STORE_PATH_PREFIX}{n}": path for n, path in enumerate(store_paths)}}
