"""Media types of the Docker schema 2 and OCI image formats, and content negotiation."""

from __future__ import annotations

import functools
import re
from collections.abc import Collection
from enum import Enum

from nixery.errors import RequestInvalid

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCTET_STREAM = "application/octet-stream"
#: The config of an artifact manifest that has none (`{}`), and the blob it names.
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"


class Compression(Enum):
    """How layer blobs are compressed (NIXERY_LAYER_COMPRESSION)."""

    GZIP = "gzip"
    ZSTD = "zstd"

    @property
    def manifest_formats(self) -> tuple[ManifestFormat, ...]:
        """The manifest formats that can describe such layers, preferred first."""
        return tuple(fmt for fmt in ManifestFormat if (fmt, self) in _LAYER_TYPES)


class ManifestFormat(Enum):
    DOCKER = DOCKER_MANIFEST
    OCI = OCI_MANIFEST

    @property
    def config_type(self) -> str:
        return DOCKER_CONFIG if self is ManifestFormat.DOCKER else OCI_CONFIG

    def layer_type(self, compression: Compression) -> str:
        try:
            return _LAYER_TYPES[self, compression]
        except KeyError:
            raise ValueError(f"{self.name} manifests have no media type for {compression.value} layers") from None


#: Docker schema 2 has no zstd layer type: zstd images have OCI manifests only.
_LAYER_TYPES = {
    (ManifestFormat.DOCKER, Compression.GZIP): DOCKER_LAYER_GZIP,
    (ManifestFormat.OCI, Compression.GZIP): OCI_LAYER_GZIP,
    (ManifestFormat.OCI, Compression.ZSTD): OCI_LAYER_ZSTD,
}
#: The media type of every layer, for reading a stored manifest back.
LAYER_COMPRESSION = {media_type: compression for (_, compression), media_type in _LAYER_TYPES.items()}


def accepted_media_types(accept_headers: list[str]) -> frozenset[str] | None:
    """The media types named in a request's Accept headers, parameters dropped, a wildcard
    (`*/*`, `application/*`) standing for the manifest types it gives that are not refused;
    None when there is no Accept header (or only empty ones): the client takes any type. Empty
    when every type named is refused (`;q=0`). Headers longer than MAX_ACCEPT_LENGTH together are
    refused unread (RequestInvalid)."""
    headers = tuple(accept_headers)
    length = sum(len(header) for header in headers)
    if length > MAX_ACCEPT_LENGTH:
        raise RequestInvalid(
            f"the Accept headers are {length} characters long; at most {MAX_ACCEPT_LENGTH} are read",
            detail={"limit": MAX_ACCEPT_LENGTH},
        )
    if length > _CACHED_ACCEPT_LENGTH:  # no client's: not kept
        return _media_types.__wrapped__(headers)
    return _media_types(headers)


#: Clients send a few sets of Accept headers over and over (skopeo's six are ~300 bytes).
_CACHED_ACCEPT_LENGTH = 2048
#: Sixteen times any client's: reading the 2 MB of Accept headers a request can carry held the
#: event loop for 44 ms per request.
MAX_ACCEPT_LENGTH = 8192


@functools.lru_cache(maxsize=256)
def _media_types(accept_headers: tuple[str, ...]) -> frozenset[str] | None:
    parts = [part for header in accept_headers for part in header.split(",") if part.strip()]
    if not parts:
        return None
    taken: set[str] = set()
    refused: set[str] = set()
    for part in parts:
        (refused if _refused(part) else taken).add(part.split(";", 1)[0].strip().lower())
    accepted = {media_type for media_type in taken if media_type not in _WILDCARDS}
    for wildcard, covered in _WILDCARDS.items():
        if wildcard in taken:
            accepted.update(media_type for media_type in covered if _takes(media_type, taken, refused))
    return frozenset(accepted)


#: The manifest types a wildcard gives a client (`application/*`: OCI, as the format it names).
#: Indexes are not among them: a client gets one only when it names its type.
_WILDCARDS = {"*/*": (DOCKER_MANIFEST, OCI_MANIFEST), "application/*": (OCI_MANIFEST,)}


def _takes(media_type: str, taken: set[str], refused: set[str]) -> bool:
    """Whether a client takes `media_type`: as the most specific of the type, its `type/*` and
    `*/*` that it names says (RFC 9110 12.5.1). `Accept: <Docker schema 2>;q=0, */*` refuses
    Docker schema 2 and takes anything else: the wildcard gave the Docker manifest."""
    for named in (media_type, media_type.split("/", 1)[0] + "/*", "*/*"):
        if named in taken:
            return True
        if named in refused:
            return False
    return False


_ZERO_QUALITY = re.compile(r";\s*q\s*=\s*0(?:\.0{0,3})?\s*(?:;|$)", re.IGNORECASE)


def _refused(part: str) -> bool:
    """`type;q=0`: RFC 9110's "not acceptable" (a curl user's way of refusing an index), not a
    type the client takes, also through a wildcard it names (`_takes`); other weights only
    order what is accepted, which is not read here."""
    return _ZERO_QUALITY.search(part) is not None


def accepted_formats(accept_headers: list[str]) -> list[ManifestFormat]:
    """The manifest formats a client accepts, preferred first.

    Clients send one Accept header per type (skopeo, docker) or one comma-joined
    list (containerd, with `*/*`). Docker schema 2 is preferred when accepted
    because every client we know reads it. No Accept header at all, or a
    wildcard, means the client takes what it gets; a header that refuses every
    type it names (`;q=0`), that it takes none.
    """
    return preferred_formats(accepted_media_types(accept_headers))


def preferred_formats(accepted: Collection[str] | None) -> list[ManifestFormat]:
    """`accepted_formats` of the media types `accepted_media_types` read."""
    if accepted is None or "*/*" in accepted:
        return [ManifestFormat.DOCKER, ManifestFormat.OCI]
    formats = []
    if DOCKER_MANIFEST in accepted:
        formats.append(ManifestFormat.DOCKER)
    if OCI_MANIFEST in accepted or "application/*" in accepted:
        formats.append(ManifestFormat.OCI)
    return formats


def choose_format(
    accept_headers: list[str], available: Collection[ManifestFormat] = tuple(ManifestFormat)
) -> ManifestFormat | None:
    """The client's most preferred format among those the image has (`available`);
    None when it accepts none of them."""
    return next((fmt for fmt in accepted_formats(accept_headers) if fmt in available), None)
