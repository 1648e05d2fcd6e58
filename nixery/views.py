"""What the web pages and the `nixery` command line both show: an image as JSON,
its reference, the stages of a build, their labels and what Nix did in one.

No HTTP and no Nix here: the web package (`nixery.http.web`) and the command
line (`nixery.client`, `nixery.terminal`) import these, so that a page and a
terminal describe an image and a build in the same words (sizes, rates and
counts in words are `nixery.amounts`'). `image_json` is the document
`GET /images/{name}.json` answers and `nixery build --local` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nixery.amounts import plural
from nixery.images import ImageRecord
from nixery.platforms import image_summary, platform_records
from nixery.progress import Stage
from nixery.registry.negotiation import pull_digests

#: A build's stages in the order they come; a failed build ends in FAILED instead of DONE.
STAGE_ORDER = (
    Stage.QUEUED, Stage.EVALUATING, Stage.BUILDING, Stage.LAYERING, Stage.COMPRESSING, Stage.UPLOADING, Stage.DONE,
)
STAGE_LABELS = {
    Stage.QUEUED: "Queued",
    Stage.EVALUATING: "Evaluating",
    Stage.BUILDING: "Building with Nix",
    Stage.LAYERING: "Grouping into layers",
    Stage.COMPRESSING: "Compressing layers",
    Stage.UPLOADING: "Uploading",
    Stage.DONE: "Done",
    Stage.FAILED: "Failed",
}


#: What a `building` event counts of Nix's work (docs/web.md#events).
NIX_COUNTS = ("built", "to_build", "fetched", "to_fetch")


def nix_work_text(counts: Mapping[str, int], *, over: bool, ended: bool = False) -> str:
    """What Nix did of `counts` (a `building` event's NIX_COUNTS): while the stage is under way
    `building 2 of 3 derivations, fetching 1 of 4 paths` (Nix names each derivation as it starts
    it: the last one counted is still building), or `ended building ...` for the stage a build
    failed or stopped in; once it is `over`, `3 derivations built, 4 paths fetched`. The progress
    page (`nixery.http.web.builds`) and `nixery build` (`nixery.terminal`) both say it so; the
    live page's build.js has a twin."""
    built, fetched = counts.get("built", 0), counts.get("fetched", 0)
    to_build, to_fetch = max(built, counts.get("to_build", 0)), max(fetched, counts.get("to_fetch", 0))
    if over:
        parts = [f"{plural(to_build, 'derivation')} built"]
        parts += [f"{plural(to_fetch, 'path')} fetched"] if to_fetch else []
    else:
        parts = [f"{'ended ' if ended else ''}building {built} of {plural(to_build, 'derivation')}"]
        parts += [f"fetching {fetched} of {plural(to_fetch, 'path')}"] if to_fetch else []
    return ", ".join(parts)


def image_reference(name: str, tag: str) -> str:
    """`name:tag` as a client writes it: `:latest` is left out."""
    return name + ("" if tag == "latest" else f":{tag}")


def other_order(name: str) -> str | None:
    """The same image named with its packages in the reverse order (None for one package):
    the order of the names does not change the image."""
    arch, packages = ("arm64/", name.removeprefix("arm64/")) if name.startswith("arm64/") else ("", name)
    components = packages.split("/")
    return arch + "/".join(reversed(components)) if len(components) >= 2 else None


def image_json(record: ImageRecord, tag: str) -> dict[str, Any]:
    """The image; of several platforms, `digest` is its index's, `platforms` lists each one
    (`nixery.platforms.platform_summaries`, with its layers), and the rest is the default
    platform's (the one a client that takes no index gets)."""
    summary = image_summary(record)
    document = {
        "name": record.name,
        "tag": tag,
        "digest": summary["digest"],
        "oci_digest": summary["oci_digest"],
        "config": str(record.config),
        "size": record.compressed_size,
        "source": record.source,
        "revision": record.revision,
        "packages": list(record.packages),
        "architecture": record.architecture,
        "built_at": record.built_at,
        "paths_recorded": bool(record.layer_paths),
        "layers": _layers_json(record),
        # The SBOM and provenance of the manifest `attached_to` (nixery.attachments): that is the
        # manifest `digest` names, but for several platforms: `digest` is then the index's, which
        # has none (its referrers are an empty list), and these are the default platform's.
        **_attached_json(record),
    }
    if "platforms" in summary:
        document["platforms"] = [
            # Each platform's documents too: `nixery inspect --sbom --platform` takes them from here.
            {**platform, "config": str(one.config), "layers": _layers_json(one), **_attached_json(one)}
            for platform, one in zip(summary["platforms"], platform_records(record), strict=True)
        ]
    return document


def _attached_json(record: ImageRecord) -> dict[str, Any]:
    """`attached_to`, the manifest (of one platform) the record's documents are attached to, and
    `attached`: each artifact manifest, and the document it carries (its last blob), fetched as a blob."""
    default = pull_digests(record.descriptors).default
    return {
        "attached_to": str(default),
        "attached": [
            {"artifactType": one.manifest.artifact_type, "manifest": str(one.manifest.digest),
             "document": str(one.blobs[-1])}
            for one in record.attached if one.subject == default and one.tag is None and one.blobs
        ],
    }


def _layers_json(record: ImageRecord) -> list[dict[str, Any]]:
    paths = record.layer_paths or tuple(() for _ in record.layers)
    return [
        {**layer.to_json(), "paths": list(layer_paths)} for layer, layer_paths in zip(record.layers, paths, strict=True)
    ]
