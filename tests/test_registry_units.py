"""Pure protocol pieces: closure parsing, content negotiation, names, digests."""

from __future__ import annotations

import json

import pytest

from nixery.closure import ClosureGraph, GraphError
from nixery.errors import DigestInvalid, ManifestUnknown, NameInvalid, TagInvalid
from nixery.registry.descriptors import Descriptor
from nixery.registry.digest import Digest, names_another_algorithm
from nixery.registry.mediatypes import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Compression,
    ManifestFormat,
    choose_format,
)
from nixery.registry.names import Arch, check_tag, parse_image_name
from nixery.registry.negotiation import check_acceptable, choose, docker_engine_version, unpacks_zstd

NIX_28 = [
    {"path": "/nix/store/a-app", "narSize": 100, "references": ["/nix/store/a-app", "/nix/store/b-lib"]},
    {"path": "/nix/store/b-lib", "narSize": 50, "references": []},
]
NIX_219 = {
    "/nix/store/a-app": {"narSize": 100, "references": ["/nix/store/a-app", "/nix/store/b-lib"]},
    "/nix/store/b-lib": {"narSize": 50, "references": []},
}


@pytest.mark.parametrize("document", [NIX_28, NIX_219], ids=["nix-2.8-list", "nix-2.19-object"])
def test_path_info_both_shapes(document) -> None:
    graph = ClosureGraph.from_path_info(json.dumps(document))
    assert graph.size("/nix/store/a-app") == 100
    assert graph.nodes["/nix/store/a-app"].references == ("/nix/store/b-lib",)  # self-reference dropped
    assert graph.closure(["/nix/store/a-app"]) == {"/nix/store/a-app", "/nix/store/b-lib"}


@pytest.mark.parametrize("text", ["not json", "42", json.dumps([{"narSize": 1}]), json.dumps({"/nix/store/x": {}})])
def test_path_info_malformed(text: str) -> None:
    with pytest.raises(GraphError):
        ClosureGraph.from_path_info(text)


def test_dangling_reference_is_an_error() -> None:
    with pytest.raises(GraphError):
        ClosureGraph.from_mapping({"a": {"size": 1, "refs": ["missing"]}})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], ManifestFormat.DOCKER),
        (["*/*"], ManifestFormat.DOCKER),
        (["application/vnd.oci.image.manifest.v1+json"], ManifestFormat.OCI),
        (["application/vnd.oci.image.manifest.v1+json; q=0.9"], ManifestFormat.OCI),
        (["application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"], ManifestFormat.OCI),
        ([OCI_MANIFEST, DOCKER_MANIFEST], ManifestFormat.DOCKER),
        (["application/*"], ManifestFormat.OCI),
        ([f"{DOCKER_MANIFEST};q=0, */*"], ManifestFormat.OCI),
        ([f"{OCI_MANIFEST};q=0", "*/*"], ManifestFormat.DOCKER),
        ([f"{DOCKER_MANIFEST};q=0, application/*"], ManifestFormat.OCI),
        (["application/*;q=0, */*"], None),
        (["application/vnd.docker.distribution.manifest.v1+json"], None),
    ],
)
def test_choose_format(headers, expected) -> None:
    assert choose_format(headers) is expected


DOCKER_20 = (
    "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0 os/linux arch/amd64 "
    "UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))"
)
DOCKER_24 = (
    "docker/24.0.7 go/go1.20.10 git-commit/311b9ff kernel/6.1.0 os/linux arch/amd64 "
    "UpstreamClient(Docker-Client/24.0.7 \\(linux\\))"
)
#: What dockerd 20.10 sends: OCI is accepted, so only the User-Agent says it cannot unpack zstd.
DOCKER_ACCEPT = [DOCKER_MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json", OCI_MANIFEST,
                 "application/vnd.oci.image.index.v1+json"]


@pytest.mark.parametrize(
    ("user_agent", "version"),
    [
        (DOCKER_20, (20, 10)),
        (DOCKER_24, (24, 0)),
        ("docker/1.13.1 go/go1.7.5", (1, 13)),
        ("containerd/1.6.20~ds1", None),
        ("skopeo/1.9.3", None),
        ("containers/5.23.1 (github.com/containers/image)", None),
        ("Docker-Client/20.10.24 (linux)", None),
        ("", None),
        ("docker/" + "1" * 5000 + ".1", None),  # int() refuses over 4300 digits: no version
        ("docker/\u0661\u0662.0", None),  # Arabic-Indic digits, which \d and int() take
    ],
)
def test_docker_engine_version(user_agent: str, version) -> None:
    assert docker_engine_version(user_agent) == version
    assert unpacks_zstd(user_agent) is (version is None or version[0] >= 23)


def manifest_format(accept_headers: list[str], user_agent: str, compression: Compression) -> ManifestFormat:
    """The format `choose` gives for an image of `compression` layers; `check_acceptable`,
    asked before the build, agrees."""
    check_acceptable(accept_headers, user_agent, compression)
    image = [Descriptor(fmt.value, Digest.of(fmt.value.encode()), 1) for fmt in compression.manifest_formats]
    return ManifestFormat(choose(image, accept_headers, user_agent, compression).media_type)


def test_gzip_images_keep_docker_preferred() -> None:
    assert Compression.GZIP.manifest_formats == (ManifestFormat.DOCKER, ManifestFormat.OCI)
    assert manifest_format(DOCKER_ACCEPT, DOCKER_20, Compression.GZIP) is ManifestFormat.DOCKER
    assert manifest_format([], "", Compression.GZIP) is ManifestFormat.DOCKER
    assert manifest_format([OCI_MANIFEST], "skopeo/1.9.3", Compression.GZIP) is ManifestFormat.OCI


def test_zstd_images_have_only_oci_manifests() -> None:
    assert Compression.ZSTD.manifest_formats == (ManifestFormat.OCI,)
    assert ManifestFormat.OCI.layer_type(Compression.ZSTD) == OCI_LAYER_ZSTD
    with pytest.raises(ValueError, match="no media type for zstd"):
        ManifestFormat.DOCKER.layer_type(Compression.ZSTD)
    for accept in ([], ["*/*"], [OCI_MANIFEST, DOCKER_MANIFEST], DOCKER_ACCEPT):
        assert manifest_format(accept, "containerd/1.6.20", Compression.ZSTD) is ManifestFormat.OCI
    assert choose_format([DOCKER_MANIFEST], Compression.ZSTD.manifest_formats) is None


def test_a_docker_schema_2_only_client_is_told_zstd_needs_oci() -> None:
    with pytest.raises(ManifestUnknown, match="serves zstd layers .* which need OCI manifests"):
        manifest_format([DOCKER_MANIFEST], "", Compression.ZSTD)
    with pytest.raises(ManifestUnknown, match="neither Docker schema 2 nor OCI"):
        manifest_format(["application/vnd.docker.distribution.manifest.v1+json"], "", Compression.ZSTD)


def test_docker_engine_before_23_is_refused_zstd_images_only() -> None:
    with pytest.raises(ManifestUnknown) as refused:
        manifest_format(DOCKER_ACCEPT, DOCKER_20, Compression.ZSTD)
    assert refused.value.message.startswith(
        "Docker Engine 20.10 cannot unpack zstd layers; this registry was started with NIXERY_LAYER_COMPRESSION=zstd"
    )
    assert refused.value.status == 404 and refused.value.code == "MANIFEST_UNKNOWN"
    assert manifest_format(DOCKER_ACCEPT, DOCKER_24, Compression.ZSTD) is ManifestFormat.OCI


def test_image_names() -> None:
    request = parse_image_name("shell/hello/shell")
    assert request.packages == ("hello", "shell") and request.arch is Arch.AMD64
    arm = parse_image_name("arm64/shell")
    assert arm.packages == ("shell",) and arm.arch is Arch.ARM64
    assert parse_image_name("python3Packages.requests").packages == ("python3Packages.requests",)
    for bad in ["", "a;b", "../x", "a//b", "$(id)", "x" * 129, "a..b", ".a", "a.", "arm64", "a b", "é"]:
        with pytest.raises(NameInvalid):
            parse_image_name(bad)
    with pytest.raises(NameInvalid):
        parse_image_name("/".join(f"p{i}" for i in range(101)))


def test_tags() -> None:
    for good in ["latest", "v1", "release-v2", "_x", "v1.2_3", "0123456789abcdef0123456789abcdef01234567", "x" * 128]:
        assert check_tag(good) == good
    # Not an OCI tag (`/`: no client could pull it), or not a git ref name.
    for bad in ["", "-x", ".x", "a..b", "feature/x", "a//b", "x/", "x.lock", "x.", "a b", "a:b", "x" * 129, "~1", "é"]:
        with pytest.raises(TagInvalid):
            check_tag(bad)


def test_digests() -> None:
    digest = Digest.of(b"abc")
    assert Digest.parse(str(digest)) == digest
    for bad in ["sha256:ABC", "sha512:" + "0" * 128, "sha256:" + "0" * 63, "0" * 64]:
        with pytest.raises(DigestInvalid):
            Digest.parse(bad)
    # A well-formed sha512 or sha384 digest is no Digest (all are sha256) but is told apart from a
    # malformed one, so that a request naming one is answered 404 (nothing stored under it), not 400.
    for other in ["sha512:" + "0" * 128, "sha384:" + "0" * 96]:
        assert names_another_algorithm(other), other
    for malformed in ["sha512:" + "0" * 64, "sha512:" + "A" * 128, "sha384:" + "0" * 128, "md5:" + "0" * 32,
                      "sha256:" + "0" * 64, "sha512:" + "0" * 128 + "\n"]:
        assert not names_another_algorithm(malformed), malformed


def test_parsed_accept_headers_are_kept_only_for_short_sets() -> None:
    """Clients send a few short sets over and over; a long one (no client's) is parsed and not kept."""
    from nixery.registry.mediatypes import _media_types, accepted_media_types

    long = ["application/x-" + "a" * 3000]
    kept = _media_types.cache_info().currsize
    assert accepted_media_types(long) == {long[0]}
    assert _media_types.cache_info().currsize == kept
    # a wildcard stands for the manifest types it gives, less those refused by name
    assert accepted_media_types([f"{OCI_MANIFEST}; q=0.5, */*"]) == {OCI_MANIFEST, DOCKER_MANIFEST}
    assert accepted_media_types([f"{DOCKER_MANIFEST};q=0, */*"]) == {OCI_MANIFEST}
    # q=0 refuses a type (RFC 9110), in any spelling of zero
    for refused in ("q=0", "q=0.0", " Q = 0.000 "):
        assert accepted_media_types([f"{OCI_INDEX};{refused}, {OCI_MANIFEST}"]) == {OCI_MANIFEST}, refused
    assert accepted_media_types([f"{OCI_INDEX};q=0.001"]) == {OCI_INDEX}
    # every type refused: none taken, unlike no header at all (anything)
    assert accepted_media_types([f"{OCI_MANIFEST};q=0"]) == frozenset()
    assert accepted_media_types([]) is None and accepted_media_types([" , "]) is None
