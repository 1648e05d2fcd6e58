"""How to build an image again, stored with it under each of its manifests' digests.

A pull by digest (a pinned deployment) of an image that lost a blob (gone, or set aside as
damaged) finds no image by tag to rebuild: the registry stores, beside each image record, a
*recipe* (the request, the tag it was built under and the revision that tag selected) under
every manifest and index digest the image has (`nixery.images.manifest_keys`). The builder
reads it back (`ImageBuilder.rebuilt_naming`) and builds the image again; builds are
deterministic, so the rebuilt image has the same digests.
"""

from __future__ import annotations

import json
from typing import Any

from nixery.images import ImageRecord, manifest_digests
from nixery.registry.digest import Digest
from nixery.registry.image import canonical_json
from nixery.registry.names import Arch, ImageRequest
from nixery.registry.runconfig import RunConfig
from nixery.resolver import Revision


def build_recipe(request: ImageRequest, tag: str, revision: Revision) -> bytes:
    """How to build an image again (stored by each of its manifests' digests, `nixery.images`):
    the request, the tag it was built under and the revision that tag selected."""
    document: dict[str, Any] = {
        "tag": tag, "revision": revision.id, "packages": list(request.packages), "order": list(request.order),
        "arch": request.arch.oci_name, "platforms": [arch.oci_name for arch in request.platforms],
    }
    if request.config is not None:
        document["config"] = request.config.to_json()
    return canonical_json(document)


def read_recipe(data: bytes) -> tuple[ImageRequest, str, str] | None:
    """The request, tag and revision id of a `build_recipe`; None for another document."""
    try:
        doc = json.loads(data)
        arches = {arch.oci_name: arch for arch in Arch}
        config = doc.get("config")
        request = ImageRequest(
            tuple(str(name) for name in doc["packages"]), arches[doc["arch"]],
            tuple(str(name) for name in doc["order"]), tuple(arches[arch] for arch in doc["platforms"]),
            None if config is None else RunConfig.from_json(config),
        )
        return request, str(doc["tag"]), str(doc["revision"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def names_manifest(record: ImageRecord, manifest: Digest) -> bool:
    """Whether `manifest` is one of the record's manifests or indexes, or of its attached documents."""
    return manifest in manifest_digests(record)
