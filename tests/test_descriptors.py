"""Descriptors (nixery/registry/descriptors.py): the OCI descriptor fields, manifests and
indexes made of them, negotiation over them, image records handing them out, and a
stored index served by digest by a real registry process."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from nixery.errors import ManifestUnknown
from nixery.images import ImageRecord
from nixery.registry.descriptors import (
    Descriptor,
    Platform,
    image_index,
    image_manifest,
    is_image,
    is_index,
    parse_manifest,
)
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor, image_config
from nixery.registry.mediatypes import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Compression,
    ManifestFormat,
)
from nixery.registry.negotiation import choose, pull_digests
from nixery.storage.filesystem import FilesystemStorage
from tests.registry import RegistryProcess

LAYERS = [
    LayerDescriptor(Digest.of(b"blob"), Digest.of(b"tar"), 4, "a layer"),
    LayerDescriptor(Digest.of(b"blob2"), Digest.of(b"tar2"), 5, "another"),
]
CONFIG = image_config(LAYERS, architecture="amd64", env=["PATH=/bin"], cmd=["/bin/sh"], labels={"a": "b"})

#: Written by the code before descriptors existed (ImageRecord.to_json at 08ddb89).
RECORD_BEFORE_DESCRIPTORS = (
    b'{"architecture":"amd64","built_at":1764720000.5,'
    b'"config":"sha256:b79606fb3afea5bd1609ed40b622142f1c98125abcfe89a76a661b0e8e343910",'
    b'"key":"kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk",'
    b'"layers":[{"description":"hello",'
    b'"diff_id":"sha256:90aebae315675cbf04612de4f7d5874850f48e0b8dd82becbeaa47ca93f5ebfb",'
    b'"digest":"sha256:fa2c8cc4f28176bbeed4b736df569a34c79cd3723e9ec42f9674b4d46ac6b8b8",'
    b'"paths":["/nix/store/aaaa-hello"],"size":4}],'
    b'"manifests":{"docker":{"digest":"sha256:d6b0f3843784011f4fa3ee7a01a3ebb5ea69661bfb8674fa58b049b06a840d6c",'
    b'"size":500},"oci":{"digest":"sha256:294b90ef01b01b93cd5bc67942ffff6214406902f840d540b201705ce5dd0954",'
    b'"size":480}},"name":"shell/hello","packages":["busybox","hello"],"revision":"rev-1","source":"path /pkgs"}'
)


@pytest.mark.parametrize(
    ("fmt", "compression", "digest"),
    [
        (ManifestFormat.DOCKER, Compression.GZIP, "53f5379d067a77f285c4d1d3cc258916071daf216e606e404139f4a139912c71"),
        (ManifestFormat.OCI, Compression.GZIP, "fb2f6021992778ed6e44edf33193d2183576648f55bc924e04f4537e9a952c10"),
        (ManifestFormat.OCI, Compression.ZSTD, "60197e3434a3ea3bab1b06aaf6096ff91f4d80da3101dffe1aa2c16ffe6bdbc7"),
    ],
)
def test_manifests_without_a_subject_are_the_bytes_written_before(fmt, compression, digest) -> None:
    """Digests of nixery.registry.image.image_manifest at 08ddb89, for the same inputs."""
    assert Digest.of(image_manifest(fmt, CONFIG, LAYERS, compression)).hex == digest


def test_a_subject_is_added_to_an_oci_manifest_only() -> None:
    plain = json.loads(image_manifest(ManifestFormat.OCI, CONFIG, LAYERS))
    subject = Descriptor(OCI_MANIFEST, Digest.of(b"the image"), 9)
    referring = json.loads(image_manifest(ManifestFormat.OCI, CONFIG, LAYERS, subject=subject))
    assert referring == {**plain, "subject": {"mediaType": OCI_MANIFEST, "digest": str(subject.digest), "size": 9}}
    with pytest.raises(ValueError, match="only OCI manifests have a subject"):
        image_manifest(ManifestFormat.DOCKER, CONFIG, LAYERS, subject=subject)


def test_descriptor_fields_are_the_oci_names() -> None:
    full = Descriptor(
        OCI_MANIFEST, Digest.of(b"x"), 1, Platform("linux", "arm64", "v8"),
        artifact_type="application/spdx+json", annotations={"org.opencontainers.image.created": "1970"},
    )  # fmt: skip
    document = full.to_json()
    assert document == {
        "mediaType": OCI_MANIFEST, "digest": str(Digest.of(b"x")), "size": 1,
        "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
        "artifactType": "application/spdx+json", "annotations": {"org.opencontainers.image.created": "1970"},
    }  # fmt: skip
    assert Descriptor.from_json(document) == full
    bare = Descriptor(DOCKER_MANIFEST, Digest.of(b"y"), 2)
    assert bare.to_json() == {"mediaType": DOCKER_MANIFEST, "digest": str(Digest.of(b"y")), "size": 2}
    assert Descriptor.from_json(bare.to_json()) == bare
    assert len({full, bare, Descriptor.from_json(document)}) == 2  # hashable, annotations and all
    with pytest.raises(ValueError):
        Descriptor.from_json({**document, "size": -1})


def test_media_type_predicates() -> None:
    assert [is_index(t) for t in (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)] == [
        True, True, False, False,
    ]  # fmt: skip
    assert [is_image(t) for t in (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)] == [
        False, False, True, True,
    ]  # fmt: skip
    assert not is_image("application/vnd.docker.distribution.manifest.v1+json")


def test_an_index_is_canonical_and_parsed_back() -> None:
    amd64 = Descriptor(OCI_MANIFEST, Digest.of(b"amd64"), 10, Platform("linux", "amd64"))
    arm64 = Descriptor(OCI_MANIFEST, Digest.of(b"arm64"), 11, Platform("linux", "arm64"))
    index = image_index([amd64, arm64])
    assert index == json.dumps(json.loads(index), sort_keys=True, separators=(",", ":")).encode()
    assert json.loads(index) == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        amd64.to_json(), arm64.to_json()]}  # fmt: skip
    assert parse_manifest(index) == (OCI_INDEX, (amd64.digest, arm64.digest))
    manifest = image_manifest(ManifestFormat.DOCKER, CONFIG, LAYERS)
    assert parse_manifest(manifest) == (DOCKER_MANIFEST, (Digest.of(CONFIG), *(layer.digest for layer in LAYERS)))
    assert parse_manifest(json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode()) is None


def _image(*extra: Descriptor, compression: Compression = Compression.GZIP) -> list[Descriptor]:
    return [
        *extra,
        *(Descriptor(fmt.value, Digest.of(fmt.value.encode()), 100) for fmt in compression.manifest_formats),
    ]


INDEX = Descriptor(OCI_INDEX, Digest.of(b"index"), 300)
SKOPEO_ACCEPT = [OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX]


def test_a_client_naming_the_index_type_gets_the_index() -> None:
    for accept in ([OCI_INDEX], SKOPEO_ACCEPT, [f"{DOCKER_MANIFEST}, {OCI_INDEX}; q=0.5, */*"]):
        assert choose(_image(INDEX), accept, "skopeo/1.9.3", Compression.GZIP) == INDEX, accept


@pytest.mark.parametrize(
    ("accept", "expected"),
    [([], DOCKER_MANIFEST), (["*/*"], DOCKER_MANIFEST), (["application/*"], OCI_MANIFEST),
     ([OCI_MANIFEST], OCI_MANIFEST), ([DOCKER_MANIFEST], DOCKER_MANIFEST)],
)  # fmt: skip
def test_a_client_not_naming_the_index_type_gets_a_platform_manifest(accept, expected) -> None:
    assert choose(_image(INDEX), accept, "", Compression.GZIP).media_type == expected
    assert choose(_image(), accept, "", Compression.GZIP).media_type == expected  # as without an index


def test_a_docker_manifest_list_is_chosen_by_its_own_type_only() -> None:
    manifest_list = Descriptor(DOCKER_MANIFEST_LIST, Digest.of(b"list"), 300)
    assert choose(_image(manifest_list), [DOCKER_MANIFEST_LIST], "", Compression.GZIP) == manifest_list
    assert choose(_image(manifest_list), [OCI_INDEX, DOCKER_MANIFEST], "", Compression.GZIP).media_type == (
        DOCKER_MANIFEST
    )


def test_the_first_platform_manifest_of_a_format_is_served_without_the_index() -> None:
    own = Descriptor(OCI_MANIFEST, Digest.of(b"amd64"), 1, Platform("linux", "amd64"))
    other = Descriptor(OCI_MANIFEST, Digest.of(b"arm64"), 1, Platform("linux", "arm64"))
    assert choose([INDEX, own, other], [OCI_MANIFEST], "", Compression.GZIP) == own


def test_a_client_that_takes_none_is_refused() -> None:
    with pytest.raises(ManifestUnknown, match="neither Docker schema 2 nor OCI"):
        choose(_image(INDEX), ["application/vnd.docker.distribution.manifest.v1+json"], "", Compression.GZIP)
    with pytest.raises(ManifestUnknown, match="which need OCI manifests") as refused:
        choose(_image(compression=Compression.ZSTD), [DOCKER_MANIFEST], "", Compression.ZSTD)
    assert refused.value.detail == {"compression": "zstd", "formats": [OCI_MANIFEST]}


def test_a_record_written_before_descriptors_loads_and_hands_them_out() -> None:
    record = ImageRecord.from_json(RECORD_BEFORE_DESCRIPTORS)
    assert record.to_json() == RECORD_BEFORE_DESCRIPTORS  # and is written back the same
    docker, oci = record.descriptors
    assert (docker.media_type, docker.size, oci.media_type, oci.size) == (DOCKER_MANIFEST, 500, OCI_MANIFEST, 480)
    assert docker.platform == oci.platform == Platform("linux", "amd64")
    assert choose(record.descriptors, [OCI_MANIFEST], "containerd/1.6.20", Compression.GZIP) == oci
    assert choose(record.descriptors, [], "", Compression.GZIP) == docker
    assert pull_digests(record.descriptors) == (docker.digest, oci.digest)


def test_the_pull_digest_of_a_zstd_image_is_its_oci_manifest() -> None:
    only_oci = _image(compression=Compression.ZSTD)
    assert pull_digests(only_oci) == (only_oci[0].digest, only_oci[0].digest)


def test_a_stored_record_and_a_stored_index_are_served(shared_registry: RegistryProcess) -> None:
    """The record the registry wrote loads and names what it serves; an index stored beside
    its manifests is served by digest, with its media type and digest."""
    docker_digest, _ = shared_registry.manifest("shell/hello", accept=DOCKER_MANIFEST)
    oci_digest, _ = shared_registry.manifest("shell/hello", accept=OCI_MANIFEST)
    stored = (shared_registry.storage / "meta" / "images").iterdir()
    records = [ImageRecord.from_json(path.read_bytes()) for path in stored]
    record = next(r for r in records if r.name == "shell/hello")
    assert [str(d.digest) for d in record.descriptors] == [docker_digest, oci_digest]

    index = image_index(record.descriptors)
    digest = asyncio.run(_store(shared_registry, index))
    for method in ("GET", "HEAD"):
        status, headers, body = shared_registry.request(
            f"/v2/shell/hello/manifests/{digest}", method=method, accept=[OCI_INDEX, OCI_MANIFEST]
        )
        assert status == 200, body
        assert headers["Content-Type"] == OCI_INDEX
        assert headers["Docker-Content-Digest"] == str(digest) == "sha256:" + hashlib.sha256(index).hexdigest()
        assert body == (index if method == "GET" else b"")


async def _store(registry: RegistryProcess, document: bytes) -> Digest:
    storage = FilesystemStorage(registry.storage)
    try:
        return await storage.put_blob_bytes(document)
    finally:
        await storage.close()
