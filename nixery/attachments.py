"""What is published with an image besides its config and manifests: the builder's
"attach" step.

Documents about an image (signatures, SBOMs: referrers whose subject is one of its
manifests) join its blobs here, so that they are stored before its record appears
and garbage collection keeps them with it.

For an image built from a closure, each of its manifests (one per format: the Docker
and the OCI manifest have different digests, and a client asks the referrers API
about the one it pulled) gets two OCI artifact manifests whose `subject` it is:

* its SBOM (`nixery.sbom`, artifactType `application/spdx+json`), and
* its provenance (`nixery.provenance`, artifactType `application/vnd.in-toto+json`).

The SBOM and the statement are one blob each, shared by both formats' artifact
manifests. An `Attached` without a tag is a referrer: the referrers API lists it
under its subject (`nixery.images.ImageStore.referrers`); one with a tag is
served under that tag as well (cosign's `sha256-<hex>.sig`).

Reads the store (the SBOM's Debian facts): blocking, the builder runs it in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from nixery import provenance, sbom
from nixery.assembly import AssembledImage
from nixery.closure import ClosureGraph
from nixery.images import Attached
from nixery.registry.descriptors import Descriptor, artifact_manifest
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import EMPTY_JSON, OCI_MANIFEST
from nixery.resolver import ResolvedPackage

#: The annotations each artifact manifest carries (the referrers API lists them).
SBOM_ANNOTATIONS = {"org.opencontainers.image.description": "SPDX 2.3 SBOM made from the image's Nix closure"}
PROVENANCE_ANNOTATIONS = {
    "org.opencontainers.image.description": "in-toto statement with a SLSA provenance v1 predicate"
}


@dataclass(frozen=True, slots=True)
class Closure:
    """What an image was built from (the builder's `resolved` and `graph`)."""

    resolved: Sequence[ResolvedPackage]
    graph: ClosureGraph
    system: str  # the Nix system it was built for


def attach(image: AssembledImage, closure: Closure | None = None) -> AssembledImage:
    """The image with the documents about it among its blobs: with its `closure`, an SBOM and
    a provenance statement for each of its manifests. Blocking (reads the store)."""
    if closure is None:  # an index: its platforms' images carry their own
        return image
    record = image.record
    facts = sbom.ImageFacts(
        name=record.name, architecture=record.architecture, source=record.source, revision=record.revision,
        config=str(record.config), requested=record.packages,
    )
    spdx = sbom.spdx_document(facts, closure.graph, sbom.read_store_paths(closure.graph.nodes))
    statement = provenance.statement(
        record.name, closure.system, record.source, record.revision, closure.resolved,
        {fmt.value: ref.digest for fmt, ref in record.manifests.items()},
    )
    documents = [
        (sbom.MEDIA_TYPE, spdx, {**SBOM_ANNOTATIONS, "org.opencontainers.image.title": "sbom.spdx.json"}),
        (provenance.MEDIA_TYPE, statement, {"org.opencontainers.image.title": "provenance.intoto.json"}),
    ]
    attached, blobs = [], [EMPTY_JSON, spdx, statement]
    for fmt, ref in record.manifests.items():
        subject = Descriptor(fmt.value, ref.digest, ref.size)
        for artifact_type, document, title in documents:
            layer = Descriptor(artifact_type, Digest.of(document), len(document), annotations=title)
            annotations = SBOM_ANNOTATIONS if artifact_type == sbom.MEDIA_TYPE else PROVENANCE_ANNOTATIONS
            manifest = artifact_manifest(artifact_type, layer, subject, annotations)
            blobs.append(manifest)
            attached.append(Attached(
                manifest=Descriptor(
                    OCI_MANIFEST, Digest.of(manifest), len(manifest),
                    artifact_type=artifact_type, annotations=annotations,
                ),
                subject=ref.digest,
                blobs=(Digest.of(EMPTY_JSON), layer.digest),
            ))
    return AssembledImage(
        replace(record, attached=(*record.attached, *attached)), (*image.blobs, *blobs), image.layers
    )
