"""NIXERY_LAYER_COMPRESSION: the setting, the cache keys it enters, and the manifests it gives."""

from __future__ import annotations

import json

import pytest

from nixery.config import ConfigError, load
from nixery.images import ImageRecord, ManifestRef, image_key
from nixery.layers.entrypoints import entry_layer_key
from nixery.layers.store import layer_key
from nixery.layers.tarball import Entry
from nixery.registry.descriptors import image_manifest
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor, layer_compression
from nixery.registry.mediatypes import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Compression, ManifestFormat
from nixery.registry.names import parse_image_name
from nixery.registry.negotiation import pull_digests
from nixery.resolver import Revision

PATHS = ["/nix/store/bbb-two", "/nix/store/aaa-one"]
ENTRIES = [
    Entry("bin", "dir", 0o755),
    Entry("bin/sh", "symlink", target="/nix/store/x-busybox/bin/sh"),
    Entry("etc/passwd", "file", 0o644, content=b"root:x:0:0::/root:/bin/sh\n"),
]
REVISION = Revision("path /x", "rev-1", None)
LAYER = LayerDescriptor(Digest.of(b"blob"), Digest.of(b"tar"), 4, "a layer")


def test_the_setting_defaults_to_gzip() -> None:
    assert load({"NIXERY_BUNDLED_SET": "busybox"}).layer_compression is Compression.GZIP
    env = {"NIXERY_BUNDLED_SET": "busybox", "NIXERY_LAYER_COMPRESSION": "zstd"}
    assert load(env).layer_compression is Compression.ZSTD


def test_a_bad_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^NIXERY_LAYER_COMPRESSION='xz' must be one of gzip, zstd$"):
        load({"NIXERY_BUNDLED_SET": "busybox", "NIXERY_LAYER_COMPRESSION": "xz"})


def test_gzip_cache_keys_are_those_from_before_the_setting() -> None:
    """Values computed before NIXERY_LAYER_COMPRESSION existed: stored caches stay valid."""
    assert layer_key(PATHS) == "92481db88b2157e905068bac6184c24de0db241034220d65fe5c32939767e87a"
    assert image_key(REVISION, parse_image_name("shell/hello"), 100) == (
        "cf8f139c8797a74212f3dd9257793f93fc6b4ee4f1412e7045a4dd573f143074"
    )
    assert entry_layer_key(ENTRIES) == "entry-0c1fbf2cc620d604c3d8ecf021a504c31374ffa06772dc1127d5d54bf395e4be"
    assert layer_key(PATHS, Compression.GZIP) == layer_key(PATHS)


def test_zstd_has_cache_keys_of_its_own() -> None:
    request = parse_image_name("shell/hello")
    assert layer_key(PATHS, Compression.ZSTD) != layer_key(PATHS)
    assert entry_layer_key(ENTRIES, Compression.ZSTD) != entry_layer_key(ENTRIES)
    assert image_key(REVISION, request, 100, Compression.ZSTD) != image_key(REVISION, request, 100)


def test_manifests_name_the_layer_compression() -> None:
    config = b"{}"
    zstd = image_manifest(ManifestFormat.OCI, config, [LAYER], Compression.ZSTD)
    gzip = image_manifest(ManifestFormat.OCI, config, [LAYER])
    assert [layer["mediaType"] for layer in json.loads(zstd)["layers"]] == [OCI_LAYER_ZSTD]
    assert [layer["mediaType"] for layer in json.loads(gzip)["layers"]] == [OCI_LAYER_GZIP]
    assert layer_compression(zstd) is Compression.ZSTD
    assert layer_compression(gzip) is Compression.GZIP
    assert layer_compression(image_manifest(ManifestFormat.DOCKER, config, [LAYER])) is Compression.GZIP


def _record(manifests: dict[ManifestFormat, ManifestRef]) -> ImageRecord:
    return ImageRecord(
        key="k", name="shell", source="path /x", revision="rev-1", packages=("shell",), architecture="amd64",
        config=Digest.of(b"config"), manifests=manifests, layers=(LAYER,), built_at=1.0,
    )


def test_an_image_without_a_docker_manifest_defaults_to_oci() -> None:
    docker, oci = ManifestRef(Digest.of(b"docker"), 6), ManifestRef(Digest.of(b"oci"), 3)
    assert pull_digests(_record({ManifestFormat.DOCKER: docker, ManifestFormat.OCI: oci}).descriptors).default == (
        docker.digest
    )
    zstd_image = _record({ManifestFormat.OCI: oci})
    assert pull_digests(zstd_image.descriptors).default == oci.digest
    again = ImageRecord.from_json(zstd_image.to_json())
    assert again.manifests == {ManifestFormat.OCI: oci}
    assert again.blobs() == {Digest.of(b"config"), oci.digest, LAYER.digest}
