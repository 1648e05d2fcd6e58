"""What is published with an image besides its config and manifests: the builder's
"attach" step.

Documents about an image (SBOMs, provenance: referrers whose subject is one of its
manifests) join its blobs here, so that they are stored before its record appears
and garbage collection keeps them with it.

For an image built from a closure, each of its manifests (one per format: the Docker
and the OCI manifest have different digests, and a client asks the referrers API
about the one it pulled) gets three OCI artifact manifests whose `subject` it is:

* its SBOM (`nixery.sbom`), as SPDX (artifactType `application/spdx+json`) and as
  CycloneDX (`application/vnd.cyclonedx+json`), and
* its provenance (`nixery.provenance`, artifactType `application/vnd.in-toto+json`).

Each document is one blob, shared by both formats' artifact manifests; the referrers
API lists them under their subject (`nixery.images.ImageStore.referrers`).
Signatures are not made here: they name the repository a client pulls through,
which a build does not know (`nixery.signatures`, on the first pull of a tag).

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

TITLE = "org.opencontainers.image.title"
DESCRIPTION = "org.opencontainers.image.description"


@dataclass(frozen=True, slots=True)
class Closure:
    """What an image was built from (the builder's `resolved` and `graph`)."""

    resolved: Sequence[ResolvedPackage]
    graph: ClosureGraph
    system: str  # the Nix system it was built for
    outside: Sequence[str] = ()  # paths its layers hold besides the closure (a stored layer reused whole)


def attach(image: AssembledImage, closure: Closure | None = None) -> AssembledImage:
    """The image with the documents about it among its blobs: with its `closure`, SBOMs and
    a provenance statement for each of its manifests. Blocking (reads the store)."""
    if closure is None:  # an index: its platforms' images carry their own
        return image
    record = image.record
    facts = sbom.ImageFacts(
        name=record.name, architecture=record.architecture, source=record.source, revision=record.revision,
        config=str(record.config), packages=record.packages,
    )
    store = sbom.read_store_paths(closure.graph.nodes, closure.outside)
    spdx = sbom.spdx_document(facts, closure.graph, store)
    cyclonedx = sbom.cyclonedx_document(facts, closure.graph, store)
    statement = provenance.statement(
        record.name, closure.system, record.source, record.revision, closure.resolved,
        {fmt.value: ref.digest for fmt, ref in record.manifests.items()},
    )
    # Each document with its artifact type, the description its artifact manifests carry (the
    # referrers API lists it) and its file name (the layer's title: what oras saves it as).
    documents = [
        (spdx, sbom.MEDIA_TYPE, "SPDX 2.3 SBOM made from the image's Nix closure", "sbom.spdx.json"),
        (cyclonedx, sbom.CYCLONEDX_MEDIA_TYPE, "CycloneDX 1.5 SBOM made from the image's Nix closure",
         "sbom.cdx.json"),
        (statement, provenance.MEDIA_TYPE, "in-toto statement with a SLSA provenance v1 predicate",
         "provenance.intoto.json"),
    ]
    attached, blobs = [], [EMPTY_JSON, *(document for document, *_ in documents)]
    for fmt, ref in record.manifests.items():
        subject = Descriptor(fmt.value, ref.digest, ref.size)
        for document, artifact_type, description, title in documents:
            layer = Descriptor(artifact_type, Digest.of(document), len(document), annotations={TITLE: title})
            annotations = {DESCRIPTION: description}
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
