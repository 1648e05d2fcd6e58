"""Which document a client gets for a tag (`choose`): the media types it accepts,
the documents the image has (its descriptors: an index, if any, and manifests;
zstd layers: OCI manifests only), and whether it can unpack the layers.

No client says in its Accept header whether it unpacks zstd layers, so the
one client known to take OCI manifests but fail on zstd, Docker Engine before
23.0, is recognised by its User-Agent and told why, instead of failing later
with "archive/tar: invalid tar header".
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import NamedTuple

from nixery.errors import ManifestUnknown
from nixery.registry.descriptors import Descriptor, is_image, is_index
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import (
    OCI_MANIFEST,
    Compression,
    accepted_media_types,
    preferred_formats,
)

#: The manifest media types images of each compression have, preferred first.
_MEDIA_TYPES = {compression: tuple(fmt.value for fmt in compression.manifest_formats) for compression in Compression}

#: The first Docker Engine release that unpacks zstd layers.
DOCKER_ZSTD_MAJOR = 23

# dockerd's puller: "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/... UpstreamClient(Docker-Client/...)".
# ASCII digits, a few: int() refused a version of over 4300 digits (a 500), and \d takes any script's.
_DOCKER_ENGINE = re.compile(r"docker/([0-9]{1,9})\.([0-9]{1,9})(?![0-9])")


def docker_engine_version(user_agent: str) -> tuple[int, int] | None:
    """(major, minor) of the Docker Engine that sent this User-Agent; None for any other client."""
    match = _DOCKER_ENGINE.match(user_agent.strip())
    return (int(match[1]), int(match[2])) if match else None


def unpacks_zstd(user_agent: str) -> bool:
    """False only for the clients known to fail on zstd layers: Docker Engine before 23.0."""
    version = docker_engine_version(user_agent)
    return version is None or version[0] >= DOCKER_ZSTD_MAJOR


def check_client_unpacks(user_agent: str, compression: Compression) -> None:
    """Raise ManifestUnknown, saying why, when this client cannot unpack such layers."""
    if compression is not Compression.ZSTD or unpacks_zstd(user_agent):
        return
    major, minor = docker_engine_version(user_agent) or (0, 0)
    raise ManifestUnknown(
        f"Docker Engine {major}.{minor} cannot unpack zstd layers; this registry was started with "
        f"NIXERY_LAYER_COMPRESSION=zstd: pull with Docker Engine {DOCKER_ZSTD_MAJOR}.0 or later, "
        "podman, skopeo or containerd, or from a registry that serves gzip layers",
        detail={"compression": compression.value, "docker_engine": f"{major}.{minor}"},
    )


def choose(
    descriptors: Sequence[Descriptor], accept_headers: list[str], user_agent: str, compression: Compression
) -> Descriptor:
    """The document a client gets, among those an image has (`descriptors`), for an image of
    `compression` layers: the index, when the image has one and the client names its media
    type; else the image manifest of the format it prefers (`accepted_formats`). Raises
    ManifestUnknown, saying why, when it can take none of them."""
    check_client_unpacks(user_agent, compression)
    accepted = accepted_media_types(accept_headers)
    # Named, not matched by a wildcard: a client that says nothing of indexes may not read one.
    index = next((d for d in descriptors if is_index(d.media_type) and d.media_type in (accepted or ())), None)
    if index is not None:
        return index
    images: dict[str, Descriptor] = {}
    for descriptor in descriptors:  # the first of each format: a multi-platform image lists its own first
        if is_image(descriptor.media_type):
            images.setdefault(descriptor.media_type, descriptor)
    return images[_preferred(accepted, compression, images)]


def check_acceptable(
    accept_headers: list[str], user_agent: str, compression: Compression, *, indexed: bool = False
) -> None:
    """Raise what `choose` would for every image of `compression` layers (`indexed`: images
    with an index, which a client that names an index type takes): before a build, a client
    that could not use the image is told so at once."""
    check_client_unpacks(user_agent, compression)
    accepted = accepted_media_types(accept_headers)
    if indexed and any(is_index(media_type) for media_type in accepted or ()):
        return
    _preferred(accepted, compression, _MEDIA_TYPES[compression])


def _preferred(accepted: frozenset[str] | None, compression: Compression, available: Collection[str]) -> str:
    """The media type of the client's preferred format among those `available`; raises
    ManifestUnknown, saying why, when it takes none of them."""
    preferred = preferred_formats(accepted)
    media_type = next((fmt.value for fmt in preferred if fmt.value in available), None)
    if media_type is not None:
        return media_type
    if preferred:  # Docker schema 2 only, and the layers are zstd
        raise ManifestUnknown(
            "this registry serves zstd layers (NIXERY_LAYER_COMPRESSION=zstd), which need OCI manifests; "
            "the client accepts only Docker schema 2 manifests",
            detail={"compression": compression.value, "formats": list(available)},
        )
    if any(is_index(media_type) for media_type in accepted or ()):  # else `choose` gave the index
        raise ManifestUnknown(
            "the client accepts only image indexes (or manifest lists), and this image has none: it is "
            "the image of one platform (see NIXERY_PLATFORMS); accept Docker schema 2 or OCI manifests",
            detail={"formats": list(available)},
        )
    if accepted == frozenset():
        raise ManifestUnknown(
            "the client's Accept header refuses (;q=0) every type of manifest it names: it takes none"
        )
    raise ManifestUnknown("the client accepts neither Docker schema 2 nor OCI manifests")


class PullDigests(NamedTuple):
    """The digests an image is shown and pinned by (build events, image pages, NixImage status)."""

    default: Digest  # what a client that states no preference gets: Docker schema 2, else OCI (zstd)
    oci: Digest | None  # the OCI manifest's, for clients that take only OCI


def pull_digests(descriptors: Sequence[Descriptor]) -> PullDigests:
    # The default is what a client that sends neither Accept nor User-Agent gets (no User-Agent:
    # nothing to check against the layers' compression).
    default = choose(descriptors, accept_headers=[], user_agent="", compression=Compression.GZIP)
    oci = next((d.digest for d in descriptors if d.media_type == OCI_MANIFEST), None)
    return PullDigests(default.digest, oci)
