"""The platforms a registry builds images for (NIXERY_PLATFORMS), and the image
index that joins one image's builds for each of them.

A platform is written as OCI and Docker write it, `linux/amd64` or
`linux/arm64`; each is one `Arch` (its Nix system, its OCI architecture).
With one platform (the default: the host's) nothing here takes part: a plain
name gives one manifest of that platform (`arm64/NAME`'s on a registry of
linux/arm64), as it always did on amd64. With several, a plain name
(`shell/curl`) is built once per platform, each build an ordinary image with
its own record, key, layering history and layers, and `index_image` joins
them:

    record of the index    the host platform's record (its config, manifests and
                           layers: what a client that takes no index is given),
                           plus the index documents' descriptors and the other
                           platforms' records (so every blob the index names is
                           kept by `nixery gc` while the image is used)
    OCI image index        one entry per platform: its OCI manifest
    Docker manifest list   one entry per platform: its Docker schema 2 manifest
                           (not for zstd images: they have no Docker manifests)

Guarantees: an index lists the platforms sorted by OCI architecture, and is
canonical JSON (`nixery.registry.descriptors.image_index`), so the same
per-platform manifests (the same name, package set and layering history)
give the same index digest on any registry. `arm64/NAME` stays one manifest.

When one platform's build fails (Nix could not evaluate or build its packages: the other
platforms' may well build), the name fails as a whole, and the error says which platform's
build it was (`PlatformFailed`): otherwise an amd64 user was told of a failed derivation of
an aarch64 package set with nothing to say that it was not the image they run.

What a build's last event and the image pages say of an image
(`image_summary`): for one of several platforms, the digest is the OCI
index's (what a client that takes indexes, as Docker, podman and containerd
do, gets for the name), and each platform is listed with its own manifests'
digests (`platform_summaries`).
"""

from __future__ import annotations

import hashlib
import platform as host
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from nixery.images import ImageRecord
from nixery.registry.descriptors import Descriptor, image_index
from nixery.registry.digest import Digest
from nixery.registry.image import canonical_json
from nixery.registry.mediatypes import DOCKER_MANIFEST_LIST, OCI_INDEX, ManifestFormat
from nixery.registry.names import Arch, ImageRequest, without_platform
from nixery.registry.negotiation import pull_digests

#: The only operating system Nix builds images for here.
OS = "linux"
#: `uname -m` of the machines Nix runs on, and the platform each builds natively.
_MACHINES = {"x86_64": Arch.AMD64, "amd64": Arch.AMD64, "aarch64": Arch.ARM64, "arm64": Arch.ARM64}
#: The index documents an image with several platforms has, each over manifests of one format.
_INDEX_FORMATS = ((OCI_INDEX, ManifestFormat.OCI), (DOCKER_MANIFEST_LIST, ManifestFormat.DOCKER))


class PlatformFailed(Exception):
    """The build of one platform's image (`platform`, `linux/arm64`) of an image of several
    failed with `cause`; its message names the platform, `log_tail` is the cause's."""

    def __init__(self, platform: str, cause: Exception):
        self.platform = platform
        self.cause = cause
        self.log_tail: str = getattr(cause, "log_tail", "")
        self.message = f"building the {platform} image failed: {getattr(cause, 'message', None) or cause}"
        super().__init__(self.message)


def host_arch() -> Arch:
    """The platform this machine builds natively (amd64 on a machine this code does not know)."""
    return _MACHINES.get(host.machine(), Arch.AMD64)


def platform_name(arch: Arch) -> str:
    return f"{OS}/{arch.oci_name}"


#: Platforms written with the variant their architecture has by default (the OCI image index
#: spec's `v8` of arm64), as Docker users write them: the images the registry builds are those.
_DEFAULT_VARIANTS = {"linux/arm64/v8": "linux/arm64"}


def parse_platforms(raw: str) -> tuple[Arch, ...]:
    """`linux/amd64,linux/arm64` as platforms, sorted and each once; raises ValueError, naming
    the platforms there are, for one that is not (or a list that names none)."""
    known = {platform_name(arch): arch for arch in Arch}
    found: set[Arch] = set()
    for item in raw.split(","):
        name = item.strip().lower()
        name = _DEFAULT_VARIANTS.get(name, name)
        if name not in known:
            raise ValueError(f"unknown platform {item.strip()!r}: use a comma-separated list of {', '.join(known)}")
        found.add(known[name])
    return tuple(sorted(found, key=lambda arch: arch.oci_name))


def index_key(platform_keys: Sequence[str]) -> str:
    """The key of an image with several platforms: made of its per-platform images' keys only."""
    return hashlib.sha256(canonical_json({"platforms": sorted(platform_keys)})).hexdigest()


def index_image(key: str, records: Sequence[ImageRecord], default: Arch) -> tuple[ImageRecord, tuple[bytes, ...]]:
    """The record of one image's builds for several platforms (`records`, one each), and its
    index documents (blobs to store before the record appears). `default` is the platform a
    client that takes no index gets: its record gives the image's manifests, and its name
    without the platform (an arm64 default is still `shell`, not `arm64/shell`)."""
    ordered = sorted(records, key=lambda record: record.architecture)
    documents, indexes = [], []
    for media_type, fmt in _INDEX_FORMATS:
        entries = [d for record in ordered for d in record.descriptors if d.media_type == fmt.value]
        if len(entries) != len(ordered):  # zstd images have no Docker manifests
            continue
        document = image_index(entries, media_type)
        documents.append(document)
        indexes.append(Descriptor(media_type, Digest.of(document), len(document)))
    first = next((record for record in ordered if record.architecture == default.oci_name), ordered[0])
    record = replace(
        first, key=key, name=without_platform(first.name), built_at=max(record.built_at for record in ordered),
        indexes=tuple(indexes), platforms=tuple(record for record in ordered if record is not first),
    )
    return record, tuple(documents)


def every_platform(request: ImageRequest, platforms: Sequence[Arch]) -> ImageRequest:
    """A name without a platform (`shell`, not `arm64/shell`) asks for the registry's platforms:
    of one, its image (`arm64/shell` on a registry of linux/arm64, the default on an arm64
    machine); of several, an image of each, the host's (else the first) for clients that take
    no index."""
    if request.arch is not Arch.AMD64 or request.platforms or not platforms:
        return request
    if len(platforms) == 1:
        return replace(request, arch=platforms[0])
    return for_platforms(request, platforms)


def for_platforms(request: ImageRequest, platforms: Iterable[Arch]) -> ImageRequest:
    """The request for an image of each of `platforms` (two or more), joined by an index; the
    host's (else the first) is for clients that take no index."""
    ordered = tuple(sorted(set(platforms), key=lambda arch: arch.oci_name))
    default = host_arch() if host_arch() in ordered else ordered[0]
    return replace(request, arch=default, platforms=ordered)


def each_platform(request: ImageRequest) -> list[ImageRequest]:
    """The one-platform requests that a request of several platforms is made of."""
    return [replace(request, arch=arch, platforms=()) for arch in request.platforms]


def platform_records(record: ImageRecord) -> list[ImageRecord]:
    """Each platform's image in a record, sorted as its index lists them (a one-platform image:
    itself); the default platform's without the index's descriptors."""
    if not record.indexes:
        return [record]
    own = replace(record, indexes=(), platforms=())
    return sorted((own, *record.platforms), key=lambda one: one.architecture)


def each_image_once(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """`records` without the default platform's record of an image of several platforms that is
    among them: the image's record holds that one's name, manifests and layers (`index_image`),
    so lists of images (the landing page's) showed the image twice under one name."""
    records = list(records)
    held = {ref.digest for record in records if record.indexes for ref in record.manifests.values()}
    return [record for record in records
            if record.indexes or not {ref.digest for ref in record.manifests.values()} <= held]


def platform_summaries(record: ImageRecord) -> list[dict[str, Any]]:
    """Each platform's image: its platform, the manifest digests a client of that platform gets
    (`digest`: when it states no preference, as for `arm64/NAME`; `oci_digest`: the one the OCI
    index names), its layers and size."""
    summaries = []
    for one in platform_records(record):
        digests = pull_digests(one.descriptors)
        summaries.append({
            "platform": f"{OS}/{one.architecture}", "digest": str(digests.default), "oci_digest": str(digests.oci),
            "layers": len(one.layers), "size": one.compressed_size,
        })
    return summaries


def image_summary(record: ImageRecord) -> dict[str, Any]:
    """An image as a build's last event states it. Of several platforms: the digest is the OCI
    index's, `platforms` lists each one's (`platform_summaries`); the layers and size are the
    default platform's."""
    digests = pull_digests(record.descriptors)
    summary: dict[str, Any] = {
        "image": record.name, "digest": str(digests.default), "oci_digest": str(digests.oci),
        "layers": len(record.layers), "size": record.compressed_size,
    }
    oci_index = next((index.digest for index in record.indexes if index.media_type == OCI_INDEX), None)
    if oci_index is not None:
        summary.update(digest=str(oci_index), oci_digest=str(oci_index), platforms=platform_summaries(record))
    return summary
