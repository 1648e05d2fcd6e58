"""Pure protocol pieces: closure parsing, content negotiation, names, digests."""

from __future__ import annotations

import json

import pytest

from nixery.errors import DigestInvalid, NameInvalid, TagInvalid
from nixery.layers.graph import ClosureGraph, GraphError
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import ManifestFormat, choose_format
from nixery.registry.names import Arch, check_tag, parse_image_name

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
        (["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"], ManifestFormat.DOCKER),
        (["application/vnd.docker.distribution.manifest.v1+json"], None),
    ],
)
def test_choose_format(headers, expected) -> None:
    assert choose_format(headers) is expected


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
    for good in ["latest", "v1", "release-v2", "feature/x", "0123456789abcdef0123456789abcdef01234567"]:
        assert check_tag(good) == good
    for bad in ["", "-x", "a..b", "a//b", "x/", "x.lock", "a b", "a:b", "x" * 129, "~1"]:
        with pytest.raises(TagInvalid):
            check_tag(bad)


def test_digests() -> None:
    digest = Digest.of(b"abc")
    assert Digest.parse(str(digest)) == digest
    for bad in ["sha256:ABC", "sha512:" + "0" * 128, "sha256:" + "0" * 63, "0" * 64]:
        with pytest.raises(DigestInvalid):
            Digest.parse(bad)
