"""An image's config, manifests and record, from its resolved packages and stored layers:
the builder's "assemble" step, and what the "attach" step hands on to publishing.

Pure: the same packages and layers give the same documents, byte for byte, so two
registries assemble the same digests for the same name and history.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from nixery.images import ImageRecord, ManifestRef
from nixery.layers.entrypoints import ENTRY_POINT_LAYERS, SSL_CERT_FILE
from nixery.layers.store import StoredLayer
from nixery.registry.descriptors import image_manifest
from nixery.registry.digest import Digest
from nixery.registry.image import DEFAULT_PATH, image_config
from nixery.registry.mediatypes import Compression
from nixery.registry.names import ImageRequest
from nixery.registry.nix_snapshotter import nix_layer_annotations
from nixery.resolver import ResolvedPackage, Revision


@dataclass(frozen=True, slots=True)
class AssembledImage:
    """An image ready to publish: its record, and what must be stored before the record appears."""

    record: ImageRecord
    blobs: tuple[bytes, ...]  # its config and manifests, and what the attach step adds
    layers: tuple[StoredLayer, ...]  # new ones are still being written (`stored`)


def image_cmd(request: ImageRequest, resolved: Sequence[ResolvedPackage]) -> list[str] | None:
    """`shell` images start the shell; a one-package image starts its main program."""
    for package in resolved:
        if package.name.lower() == "shell" and package.main_program:
            return [f"/bin/{package.main_program}"]
    if len(request.packages) == 1 and len(resolved) == 1 and resolved[0].main_program:
        return [f"/bin/{resolved[0].main_program}"]
    return None


def assemble(
    request: ImageRequest, revision: Revision, key: str, resolved: list[ResolvedPackage],
    plan: list[frozenset[str]], stored: list[StoredLayer], ca_bundle: str | None, compression: Compression,
    *, nix_annotations: bool = False,
) -> AssembledImage:
    """The image's config and manifests (one per format the layers' compression allows), and its
    record. `nix_annotations` (NIXERY_NIX_ANNOTATIONS): each layer's descriptor, in every format
    (containerd, which nix-snapshotter plugs into, takes the Docker one of a gzip image), lists
    the store paths it holds (`nixery.registry.nix_snapshotter`)."""
    layers = [layer.descriptor for layer in stored]
    # The entry-point layers hold no store path.
    layer_paths = tuple(tuple(sorted(paths)) for paths in plan) + ((),) * ENTRY_POINT_LAYERS
    annotations = [nix_layer_annotations(paths) for paths in layer_paths] if nix_annotations else []
    env = [f"PATH={DEFAULT_PATH}"]
    if ca_bundle:
        env.append(f"SSL_CERT_FILE={SSL_CERT_FILE}")
    config = image_config(
        layers,
        architecture=request.arch.oci_name,
        env=env,
        cmd=image_cmd(request, resolved),
        labels={"org.nixos.nixery.packages": " ".join(sorted(p.attr for p in resolved))},
        run=request.config,
    )
    formats = compression.manifest_formats
    documents = [image_manifest(fmt, config, layers, compression, layer_annotations=annotations) for fmt in formats]
    manifests = {
        fmt: ManifestRef(Digest.of(document), len(document))
        for fmt, document in zip(formats, documents, strict=True)
    }
    record = ImageRecord(
        key=key,
        name=request.display_name,
        source=revision.source,
        revision=revision.id,
        packages=tuple(sorted(p.attr for p in resolved)),
        architecture=request.arch.oci_name,
        config=Digest.of(config),
        manifests=manifests,
        layers=tuple(layers),
        built_at=time.time(),
        layer_paths=layer_paths,
    )
    return AssembledImage(record, (config, *documents), tuple(stored))
