"""Image configs and layer descriptions, serialised byte-for-byte deterministically
(manifests and indexes: `nixery.registry.descriptors`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nixery.registry.digest import Digest
from nixery.registry.mediatypes import LAYER_COMPRESSION, Compression
from nixery.registry.runconfig import RunConfig

#: Every image claims this creation time, so identical content gives identical digests.
CREATED = "1970-01-01T00:00:01Z"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class LayerDescriptor:
    digest: Digest
    diff_id: Digest
    size: int
    description: str  # for the config's history: what the layer holds

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": str(self.digest),
            "diff_id": str(self.diff_id),
            "size": self.size,
            "description": self.description,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerDescriptor:
        return cls(
            Digest.parse(data["digest"]),
            Digest.parse(data["diff_id"]),
            int(data["size"]),
            str(data["description"]),
        )


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def image_config(
    layers: Sequence[LayerDescriptor],
    *,
    architecture: str,
    env: Sequence[str],
    cmd: Sequence[str] | None,
    labels: dict[str, str],
    run: RunConfig | None = None,
) -> bytes:
    """The config of an image; `run` (a declared image's settings) over the registry's own."""
    container_config: dict[str, Any] = {"Env": list(env), "Labels": labels}
    if cmd:
        container_config["Cmd"] = list(cmd)
    if run is not None:
        container_config = run.apply(container_config)
    return canonical_json(
        {
            "architecture": architecture,
            "os": "linux",
            "created": CREATED,
            "author": "nixery",
            "config": container_config,
            "rootfs": {"type": "layers", "diff_ids": [str(layer.diff_id) for layer in layers]},
            "history": [
                {"created": CREATED, "created_by": f"nixery: {layer.description}", "comment": "built by Nix"}
                for layer in layers
            ],
        }
    )


def layer_compression(document: bytes) -> Compression:
    """How the layers of a stored manifest (one this registry wrote) are compressed."""
    layers = json.loads(document).get("layers") or [{}]
    return LAYER_COMPRESSION.get(layers[0].get("mediaType"), Compression.GZIP)
