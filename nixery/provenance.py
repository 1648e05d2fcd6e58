"""An image's provenance: an in-toto statement (https://in-toto.io/Statement/v1) with a
SLSA provenance v1 predicate (https://slsa.dev/provenance/v1).

It names what the build took: the package set (source and revision), the names the
image was asked for and the attribute paths they resolved to, the system, each
resolved package's derivation (its `.drv` store path) and outputs, and the registry
that built it (nixery-py and its version). Its subjects are the image's manifests, one
per format (their digests differ; the image is the same).

Deterministic, like the manifests: no build times or build ids, so every registry that
builds the same image from the same package set makes the same statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nixery import __version__
from nixery.registry.digest import Digest
from nixery.registry.image import canonical_json
from nixery.resolver import ResolvedPackage

MEDIA_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
#: What the parameters mean: docs/sbom.md#provenance (URNs: neither pretends to be a page).
BUILD_TYPE = "urn:nixery-py:build-type:image:v1"
BUILDER_ID = "urn:nixery-py:registry"


def statement(
    name: str, system: str, source: str, revision: str,
    resolved: Sequence[ResolvedPackage], manifests: Mapping[str, Digest],
) -> bytes:
    """The statement for an image `name` built for `system` (a Nix system) from the package set
    `source` at `revision`; `manifests`: the image's manifest digests by media type."""
    return canonical_json({
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": name, "digest": {"sha256": digest.hex}, "annotations": {"mediaType": media_type}}
            for media_type, digest in sorted(manifests.items())
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "name": name,
                    "packages": [package.name for package in resolved],
                    "system": system,
                },
                "internalParameters": {"packageSet": {"source": source, "revision": revision}},
                "resolvedDependencies": [
                    {
                        "name": package.attr,
                        "uri": f"file://{package.drv_path}",
                        "annotations": {"outputs": list(package.outputs)},
                    }
                    for package in resolved
                ],
            },
            "runDetails": {"builder": {"id": BUILDER_ID, "version": {"nixery-py": __version__}}},
        },
    })
