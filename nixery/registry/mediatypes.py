"""Media types of the Docker schema 2 and OCI image formats, and content negotiation."""

from __future__ import annotations

from enum import Enum

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCTET_STREAM = "application/octet-stream"


class ManifestFormat(Enum):
    DOCKER = DOCKER_MANIFEST
    OCI = OCI_MANIFEST

    @property
    def config_type(self) -> str:
        return DOCKER_CONFIG if self is ManifestFormat.DOCKER else OCI_CONFIG

    @property
    def layer_type(self) -> str:
        return DOCKER_LAYER_GZIP if self is ManifestFormat.DOCKER else OCI_LAYER_GZIP


def choose_format(accept_headers: list[str]) -> ManifestFormat | None:
    """Pick the manifest format a client accepts.

    Clients send one Accept header per type (skopeo, docker) or one comma-joined
    list (containerd, with `*/*`). Docker schema 2 is preferred when accepted
    because every client we know reads it; a client that names only OCI gets OCI.
    No Accept header at all, or a wildcard, means the client takes what it gets.
    Returns None when the client accepts neither format.
    """
    accepted = {
        part.split(";", 1)[0].strip().lower()
        for header in accept_headers
        for part in header.split(",")
        if part.strip()
    }
    if not accepted or DOCKER_MANIFEST in accepted or "*/*" in accepted:
        return ManifestFormat.DOCKER
    if OCI_MANIFEST in accepted or "application/*" in accepted:
        return ManifestFormat.OCI
    return None
