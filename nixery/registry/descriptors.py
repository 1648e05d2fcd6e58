"""Descriptors, and the manifest and index documents made of them.

A `Descriptor` names one piece of content by media type, digest and size, as
the OCI image spec's descriptor does (descriptor.md), with the optional
platform an index entry carries (image-index.md), an artifact type and
annotations. It is what an image record hands out for each document a client
can be given (`nixery.registry.negotiation` picks one), and what manifests,
indexes and a manifest's `subject` are made of.

Guarantees: documents are canonical JSON (sorted keys, no spaces), so the same
content always has the same digest; `image_manifest` without a subject gives
exactly the bytes this registry wrote before descriptors existed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nixery.errors import DigestInvalid
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor, canonical_json
from nixery.registry.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Compression,
    ManifestFormat,
)

_INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
_IMAGES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})


def is_index(media_type: str) -> bool:
    """An OCI image index or a Docker manifest list: a document naming other manifests."""
    return media_type in _INDEXES


def is_image(media_type: str) -> bool:
    """A Docker schema 2 or OCI image manifest: a document naming a config and layers."""
    return media_type in _IMAGES


@dataclass(frozen=True, slots=True)
class Platform:
    """What an image runs on, as an index entry states it (OCI names: `amd64`, `arm64`)."""

    os: str
    architecture: str
    variant: str | None = None

    def to_json(self) -> dict[str, str]:
        document = {"os": self.os, "architecture": self.architecture}
        if self.variant is not None:
            document["variant"] = self.variant
        return document

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        variant = data.get("variant")
        return cls(str(data["os"]), str(data["architecture"]), None if variant is None else str(variant))


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    artifact_type: str | None = None
    #: Left out of the hash (a dict is not hashable); still compared.
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The descriptor's JSON fields; optional ones only when set."""
        document: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.platform is not None:
            document["platform"] = self.platform.to_json()
        if self.artifact_type is not None:
            document["artifactType"] = self.artifact_type
        if self.annotations:
            document["annotations"] = dict(self.annotations)
        return document

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Descriptor:
        """Raises KeyError, TypeError, ValueError or DigestInvalid for a document that is no descriptor."""
        size, platform, annotations = data["size"], data.get("platform"), data.get("annotations") or {}
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"a descriptor's size is a non-negative integer, not {size!r}")
        if not isinstance(annotations, dict):
            raise TypeError("a descriptor's annotations are an object")
        artifact_type = data.get("artifactType")
        return cls(
            media_type=str(data["mediaType"]),
            digest=Digest.parse(data["digest"]),
            size=size,
            platform=None if platform is None else Platform.from_json(platform),
            artifact_type=None if artifact_type is None else str(artifact_type),
            annotations={str(key): str(value) for key, value in annotations.items()},
        )


def image_manifest(
    fmt: ManifestFormat,
    config: bytes,
    layers: Sequence[LayerDescriptor],
    compression: Compression = Compression.GZIP,
    *,
    subject: Descriptor | None = None,
    layer_annotations: Sequence[Mapping[str, str]] = (),
) -> bytes:
    """An image manifest; `subject` (OCI only) names the manifest this one refers to, e.g. a
    signature's or an SBOM's image; `layer_annotations`, when given, one mapping per layer
    (empty: none for that layer)."""
    if subject is not None and fmt is not ManifestFormat.OCI:
        raise ValueError("only OCI manifests have a subject")
    if layer_annotations and len(layer_annotations) != len(layers):
        raise ValueError("layer annotations are given one per layer")
    layer_type = fmt.layer_type(compression)
    annotations = layer_annotations or [{}] * len(layers)
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": fmt.value,
        "config": Descriptor(fmt.config_type, Digest.of(config), len(config)).to_json(),
        "layers": [
            Descriptor(layer_type, layer.digest, layer.size, annotations=annotated).to_json()
            for layer, annotated in zip(layers, annotations, strict=True)
        ],
    }
    if subject is not None:
        document["subject"] = subject.to_json()
    return canonical_json(document)


def artifact_manifest(
    artifact_type: str, document: Descriptor, subject: Descriptor, annotations: Mapping[str, str]
) -> bytes:
    """An OCI artifact manifest (image-spec 1.1, "artifacts guidance"): an image manifest of
    `artifact_type` whose one layer is `document` (an SBOM, a statement), whose config is the
    empty descriptor (`EMPTY_JSON`, which must be stored too) and whose `subject` is the
    manifest it is about (found by the referrers API)."""
    empty = Descriptor(OCI_EMPTY, Digest.of(EMPTY_JSON), len(EMPTY_JSON)).to_json()
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {**empty, "data": "e30="},  # base64 of `{}`: clients need not fetch it
        "layers": [document.to_json()],
        "subject": subject.to_json(),
        "annotations": dict(annotations),
    })


def image_index(descriptors: Sequence[Descriptor], media_type: str = OCI_INDEX) -> bytes:
    """An OCI image index (or, with `media_type` DOCKER_MANIFEST_LIST, a Docker manifest list,
    the same document under Docker's media type) of the given manifests, each with its
    platform when it has one, in the order given."""
    if not is_index(media_type):
        raise ValueError(f"{media_type} is not an index media type")
    return canonical_json(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": [d.to_json() for d in descriptors]}
    )


def parse_manifest(document: bytes) -> tuple[str, tuple[Digest, ...]] | None:
    """The media type a stored manifest or index declares and the blobs it names (an image's
    config, then its layers; an index's manifests), or None if the bytes are neither.
    A manifest's `subject` is not among them: it may be stored later, or never."""
    try:
        parsed = json.loads(document)
        if not isinstance(parsed, dict) or parsed.get("schemaVersion") != 2:
            return None
        media_type = parsed.get("mediaType")
        if not isinstance(media_type, str):
            return None
        if is_image(media_type):
            named = [parsed["config"], *parsed.get("layers", ())]
        elif is_index(media_type):
            named = parsed["manifests"]
        else:
            return None
        blobs = tuple(Digest.parse(entry["digest"]) for entry in named)
    except (ValueError, KeyError, TypeError, DigestInvalid):
        return None
    return media_type, blobs
