"""The registry's answers side by side with the reference registry's (CNCF distribution 2.8,
Debian's `docker-registry`, which CI installs): the same requests, for the same blob, on both.

Where they differ on purpose, the test says so and why."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.registry import OCI_MANIFEST, DistributionRegistry, RegistryProcess, error_of, have, multipart_parts

pytestmark = pytest.mark.skipif(not have("docker-registry"), reason="needs docker-registry (CNCF distribution)")

API_VERSION = "Docker-Distribution-API-Version"


@pytest.fixture(scope="module")
def layer(shared_registry: RegistryProcess) -> tuple[str, bytes]:
    """The first layer of `hello` in the registry: its digest and bytes."""
    _, manifest = shared_registry.manifest("hello")
    digest = manifest["layers"][0]["digest"]
    status, _, blob = shared_registry.request(f"/v2/hello/blobs/{digest}")
    assert status == 200
    return digest, blob


@pytest.fixture(scope="module")
def distribution(tmp_path_factory: pytest.TempPathFactory, layer: tuple[str, bytes]) -> Iterator[DistributionRegistry]:
    """docker-registry holding the same layer, in repository `hello`."""
    registry = DistributionRegistry(storage=tmp_path_factory.mktemp("distribution"))
    registry.start()
    try:
        assert registry.push_blob("hello", layer[1]) == layer[0]
        yield registry
    finally:
        registry.stop()


def _headers(answer_headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in answer_headers.items()}


def test_every_v2_error_names_the_api_version_as_distributions_do(
    shared_registry: RegistryProcess, distribution: DistributionRegistry, layer: tuple[str, bytes]
) -> None:
    """distribution sends `Docker-Distribution-API-Version: registry/2.0` on every answer under
    /v2/, errors included (a client may check it to know it talks to a registry); ours had it
    on successful answers only, not on a 404, a 400 or a 416."""
    digest, blob = layer
    absent = "sha256:" + "0" * 64
    both = [  # (path, request headers): errors from both registries
        (f"/v2/hello/blobs/{absent}", {}),
        (f"/v2/hello/manifests/{absent}", {}),
        ("/v2/hello/blobs/sha256:abc", {}),
        ("/v2/no/such/endpoint", {}),
    ]
    for path, headers in both:
        for registry in (distribution, shared_registry):
            status, answer_headers, body = registry.request(path, headers=headers)
            assert status >= 400, (registry, path, status)
            assert _headers(answer_headers).get(API_VERSION.lower()) == "registry/2.0", (registry, path, status, body)
    # Errors only this registry gives (a pull-only registry refuses a push; its server answers an
    # unmet Expect before the application runs; a condition with another ETag), a HEAD's, and a 416
    # (distribution's has the header too, but claims the blob's length for a body it does not send).
    ours = [
        ("POST", "/v2/hello/blobs/uploads/", {}, 405),
        ("GET", "/v2/hello/manifests/latest", {"Expect": "a-miracle"}, 417),
        ("GET", f"/v2/hello/blobs/{digest}", {"If-Match": '"another"'}, 412),
        ("GET", f"/v2/hello/blobs/{digest}", {"Range": f"bytes={len(blob)}-"}, 416),
        ("HEAD", f"/v2/hello/blobs/{absent}", {}, 404),
        ("GET", "/v2/hello/manifests/bad..tag", {}, 400),
        ("GET", "/v2", {}, 200),
    ]
    for method, path, headers, expected in ours:
        status, answer_headers, body = shared_registry.request(path, method=method, headers=headers)
        assert status == expected, (method, path, status, body[:300])
        assert _headers(answer_headers).get(API_VERSION.lower()) == "registry/2.0", (method, path, status)
    # Not the pages': they are no registry API.
    status, answer_headers, _ = shared_registry.request("/no-such-page")
    assert status == 404 and API_VERSION.lower() not in _headers(answer_headers)
    assert error_of(shared_registry.request(f"/v2/hello/blobs/{absent}")[2])["code"] == "BLOB_UNKNOWN"


def test_a_well_formed_digest_of_another_algorithm_is_absent_not_invalid(
    shared_registry: RegistryProcess, distribution: DistributionRegistry
) -> None:
    """A well-formed sha512 digest (the OCI image spec registers sha512 beside sha256; distribution
    also takes sha384) names a blob or manifest this registry does not have: 404 BLOB_UNKNOWN or
    MANIFEST_UNKNOWN, as distribution answers, where this registry said 400 DIGEST_INVALID.
    A malformed digest, or one of an algorithm neither knows, stays 400 DIGEST_INVALID."""
    absent = ["sha512:" + "ab" * 64, "sha384:" + "cd" * 48]
    for digest in absent:
        for kind, code in (("blobs", "BLOB_UNKNOWN"), ("manifests", "MANIFEST_UNKNOWN")):
            path = f"/v2/hello/{kind}/{digest}"
            for registry in (distribution, shared_registry):
                status, _, body = registry.request(path, accept=OCI_MANIFEST)
                assert (status, error_of(body)["code"]) == (404, code), (registry, path, body[:300])
                assert registry.request(path, method="HEAD", accept=OCI_MANIFEST)[0] == 404, (registry, path)
    malformed = [
        "sha512:" + "ab" * 32,  # a sha256's length
        "sha512:" + "AB" * 64,  # upper case
        "sha256:" + "ab" * 64,  # a sha512's length
        "sha256:abc",
        "blake3:" + "ab" * 32,  # an algorithm neither registry knows
    ]
    for digest in malformed:
        for registry in (distribution, shared_registry):
            status, _, body = registry.request(f"/v2/hello/blobs/{digest}")
            assert (status, error_of(body)["code"]) == (400, "DIGEST_INVALID"), (registry, digest, body[:300])
        # As a manifest reference distribution takes it for a tag and fails with 500 UNKNOWN (a tag
        # has no colon); this registry says what it is.
        status, _, body = shared_registry.request(f"/v2/hello/manifests/{digest}")
        assert (status, error_of(body)["code"]) == (400, "DIGEST_INVALID"), (digest, body[:300])
    # The referrers API (which distribution 2.8 lacks) lists none for such a digest, as for any
    # digest no image has; the spec wants 200 and an empty index there, never 404.
    status, _, body = shared_registry.request(f"/v2/hello/referrers/{absent[0]}")
    assert status == 200 and json.loads(body)["manifests"] == [], body[:300]
    status, _, body = shared_registry.request(f"/v2/hello/referrers/{malformed[0]}")
    assert (status, error_of(body)["code"]) == (400, "DIGEST_INVALID"), body[:300]


def test_several_ranges_of_a_blob_are_answered_as_distribution_does(
    shared_registry: RegistryProcess, distribution: DistributionRegistry, layer: tuple[str, bytes]
) -> None:
    """A `Range` of several byte ranges (what a lazy puller sends for the chunks of a layer it
    needs) is one 206 `multipart/byteranges` answer from distribution (Go's http.ServeContent),
    the parts in the order asked; this registry sent the whole blob (200), so such a client
    downloaded all of the layer for a few chunks. Now both send the same parts; ranges past the
    end are dropped (one left: a plain 206), and ranges adding up to more than the blob get it whole."""
    digest, blob = layer
    size = len(blob)
    path = f"/v2/hello/blobs/{digest}"
    requested = [
        "bytes=0-1,5-9", "bytes=0-1, 5-9", "bytes= 0-1,\t5-9", "bytes=100-199,0-9", "bytes=-10,0-9", "bytes=0-1,0-1",
        f"bytes=0-1,5-{size * 2}", f"bytes={size}-,0-1", f"bytes={size - 5}-,0-", "bytes=0-,0-",
    ]  # fmt: skip
    for value in requested:
        answers = []
        for registry in (distribution, shared_registry):
            status, answer_headers, body = registry.request(path, headers={"Range": value})
            headers = _headers(answer_headers)
            assert int(headers["content-length"]) == len(body), (registry, value)
            assert headers["etag"] == f'"{digest}"' and headers["docker-content-digest"] == digest, (registry, value)
            if headers["content-type"].startswith("multipart/"):
                answers.append((status, multipart_parts(headers["content-type"], body)))
            else:
                answers.append((status, [(headers.get("content-range"), body)]))
        assert answers[0] == answers[1], (value, [(status, [r for r, _ in parts]) for status, parts in answers])
    # Where they differ on purpose: another unit or a malformed range is ignored here (RFC 9110:
    # a server MUST ignore a unit it does not know, MAY ignore an invalid range) and the whole blob
    # sent; distribution refuses both with a plain-text 416. Whitespace inside a range (`0 - 1`) is
    # not RFC 9110's grammar (OWS only around commas and after `=`), so ignored too; Go trims it.
    for value in ("items=0-1", "bytes=5-1", "bytes=0-1,x", "bytes=0 - 1"):
        status, _, body = shared_registry.request(path, headers={"Range": value})
        assert (status, body) == (200, blob), value
    assert distribution.request(path, headers={"Range": "bytes=0 - 1"})[0] == 206
