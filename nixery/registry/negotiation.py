"""Which manifest a client gets for a tag: the formats it accepts, the formats
the image has (zstd layers: OCI only), and whether it can unpack the layers.

No client says in its Accept header whether it unpacks zstd layers, so the
one client known to take OCI manifests but fail on zstd, Docker Engine before
23.0, is recognised by its User-Agent and told why, instead of failing later
with "archive/tar: invalid tar header".
"""

from __future__ import annotations

import re

from nixery.errors import ManifestUnknown
from nixery.registry.mediatypes import Compression, ManifestFormat, accepted_formats, choose_format

#: The first Docker Engine release that unpacks zstd layers.
DOCKER_ZSTD_MAJOR = 23

# dockerd's puller: "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/... UpstreamClient(Docker-Client/...)".
_DOCKER_ENGINE = re.compile(r"docker/(\d+)\.(\d+)")


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


def manifest_format(accept_headers: list[str], user_agent: str, compression: Compression) -> ManifestFormat:
    """The format to answer a manifest request with, for an image of `compression` layers."""
    check_client_unpacks(user_agent, compression)
    fmt = choose_format(accept_headers, compression.manifest_formats)
    if fmt is not None:
        return fmt
    if accepted_formats(accept_headers):  # Docker schema 2 only, and the layers are zstd
        raise ManifestUnknown(
            "this registry serves zstd layers (NIXERY_LAYER_COMPRESSION=zstd), which need OCI manifests; "
            "the client accepts only Docker schema 2 manifests",
            detail={"compression": compression.value, "formats": [f.value for f in compression.manifest_formats]},
        )
    raise ManifestUnknown("the client accepts neither Docker schema 2 nor OCI manifests")
