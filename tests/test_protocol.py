"""The registry API as a client sees it, against a real registry process."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import threading

import pytest

from tests.registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    RegistryProcess,
    check_blob_ranges,
    error_of,
    nix_call_count,
    ping_wait_while,
)

SKOPEO_ACCEPT = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.index.v1+json",
]
CONTAINERD_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*"
)


def test_api_version_endpoint(shared_registry: RegistryProcess) -> None:
    status, headers, body = shared_registry.request("/v2/")
    assert status == 200
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert json.loads(body) == {}


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        (DOCKER_MANIFEST, DOCKER_MANIFEST),
        (OCI_MANIFEST, OCI_MANIFEST),
        (SKOPEO_ACCEPT, DOCKER_MANIFEST),
        (CONTAINERD_ACCEPT, DOCKER_MANIFEST),
        (None, DOCKER_MANIFEST),
    ],
)
def test_manifest_format_follows_accept(shared_registry: RegistryProcess, accept, media_type) -> None:
    status, headers, body = shared_registry.request("/v2/shell/hello/manifests/latest", accept=accept)
    assert status == 200, body
    assert headers["Content-Type"] == media_type
    manifest = json.loads(body)
    assert manifest["mediaType"] == media_type and manifest["schemaVersion"] == 2
    assert headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    assert headers["ETag"] == f'"{headers["Docker-Content-Digest"]}"'


def test_accept_headers_longer_than_any_clients_are_refused_unread(shared_registry: RegistryProcess) -> None:
    """Over 8 KiB of Accept (clients send a few hundred bytes) is 400, on one line or many:
    reading the 2 MB a request may carry held the event loop."""
    one_line = ", ".join([DOCKER_MANIFEST, OCI_MANIFEST] * 90)
    for accept in (one_line, [f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"] * 100):
        status, _, body = shared_registry.request("/v2/hello/manifests/latest", accept=accept)
        assert status == 400, body[:300]
        assert error_of(body)["detail"] == {"limit": 8192, "kind": "REQUEST_INVALID"}
    assert shared_registry.request("/v2/hello/manifests/latest", accept=SKOPEO_ACCEPT)[0] == 200


def test_head_by_tag_then_get_by_digest(shared_registry: RegistryProcess) -> None:
    status, headers, body = shared_registry.request(
        "/v2/shell/hello/manifests/latest", method="HEAD", accept=CONTAINERD_ACCEPT
    )
    assert status == 200 and body == b""
    digest = headers["Docker-Content-Digest"]
    status, by_digest, document = shared_registry.request(
        f"/v2/shell/hello/manifests/{digest}", accept=CONTAINERD_ACCEPT
    )
    assert status == 200
    assert int(headers["Content-Length"]) == len(document)
    assert by_digest["Docker-Content-Digest"] == digest
    assert by_digest["Content-Type"] == headers["Content-Type"]


def test_every_blob_matches_its_digest_and_diff_ids(shared_registry: RegistryProcess) -> None:
    _, manifest = shared_registry.manifest("shell/fortune")
    status, _, config_bytes = shared_registry.request(f"/v2/shell/fortune/blobs/{manifest['config']['digest']}")
    assert status == 200
    assert "sha256:" + hashlib.sha256(config_bytes).hexdigest() == manifest["config"]["digest"]
    assert len(config_bytes) == manifest["config"]["size"]
    config = json.loads(config_bytes)
    diff_ids = []
    for layer in manifest["layers"]:
        status, headers, blob = shared_registry.request(f"/v2/shell/fortune/blobs/{layer['digest']}")
        assert status == 200
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"]
        assert int(headers["Content-Length"]) == layer["size"] == len(blob)
        assert headers["Docker-Content-Digest"] == layer["digest"]
        assert headers["Cache-Control"] == "max-age=31536000"  # it never changes: clients may keep it
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest())
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}


def test_image_config_is_complete(shared_registry: RegistryProcess) -> None:
    _, manifest = shared_registry.manifest("shell/cacert")
    _, _, config_bytes = shared_registry.request(f"/v2/shell/cacert/blobs/{manifest['config']['digest']}")
    config = json.loads(config_bytes)
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["created"] == "1970-01-01T00:00:01Z"
    assert len(config["history"]) == len(manifest["layers"])
    env = dict(item.split("=", 1) for item in config["config"]["Env"])
    assert "/bin" in env["PATH"].split(":")
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert config["config"]["Cmd"] == ["/bin/sh"]


def test_head_blob_answers_size_without_body(shared_registry: RegistryProcess) -> None:
    _, manifest = shared_registry.manifest("hello")
    layer = manifest["layers"][0]
    status, headers, body = shared_registry.request(f"/v2/hello/blobs/{layer['digest']}", method="HEAD")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) == layer["size"]
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Cache-Control"] == "max-age=31536000"
    # As the GET says: a client that HEADs first learns that it may resume with Range (it did not).
    assert headers["Accept-Ranges"] == "bytes"


def test_blob_ranges_and_conditions_keep_the_digest_as_etag(shared_registry: RegistryProcess) -> None:
    check_blob_ranges(shared_registry, "hello")


def test_head_and_get_agree_on_conditions_for_blobs_and_manifests(shared_registry: RegistryProcess) -> None:
    """`If-None-Match` naming the ETag (the digest) is 304 and an `If-Match` naming another is 412,
    for GET and HEAD alike (RFC 9110 13.2.1: an origin server evaluates them), as docker-registry
    answers. A blob's HEAD answered 200 to both (its GET 304 and 412), and a manifest ignored
    them on GET and HEAD; a client revalidating a cached manifest got it whole again."""
    digest, manifest = shared_registry.manifest("hello")
    config = manifest["config"]["digest"]
    referrers_tag = f"/v2/hello/manifests/sha256-{digest.removeprefix('sha256:')}"  # its SBOM and provenance
    status, headers, _ = shared_registry.request(referrers_tag, method="HEAD")
    assert status == 200
    paths = {
        f"/v2/hello/blobs/{config}": config, "/v2/hello/manifests/latest": digest,
        f"/v2/hello/manifests/{digest}": digest, referrers_tag: headers["Docker-Content-Digest"],
    }  # fmt: skip
    for path, etag_digest in paths.items():
        etag = f'"{etag_digest}"'
        for method in ("GET", "HEAD"):
            for if_none_match in (etag, f"W/{etag}", f'"other", {etag}', "*"):
                status, headers, body = shared_registry.request(path, method=method,
                                                                headers={"If-None-Match": if_none_match})
                assert (status, body) == (304, b""), (method, path, if_none_match, body[:300])
                assert (headers["ETag"], headers["Docker-Content-Digest"]) == (etag, etag_digest), (method, path)
            status, headers, body = shared_registry.request(path, method=method, headers={"If-Match": '"other"'})
            assert status == 412, (method, path, body[:300])
            assert headers["ETag"] == etag
            if method == "GET":
                assert error_of(body)["detail"]["kind"] == "PRECONDITION_FAILED"
            for unmet in ({"If-None-Match": '"other"'}, {"If-Match": etag}, {"If-Match": "*"}):
                status, headers, _ = shared_registry.request(path, method=method, headers=unmet)
                assert (status, headers["ETag"]) == (200, etag), (method, path, unmet)
    # A manifest's ETag is the document's the client gets: an OCI client's differs from a Docker client's.
    status, _, _ = shared_registry.request("/v2/hello/manifests/latest", accept=OCI_MANIFEST,
                                           headers={"If-None-Match": f'"{digest}"'})
    assert status == 200


def test_conditions_sent_on_several_header_lines_are_one_list(shared_registry: RegistryProcess) -> None:
    """RFC 9110 5.3: `If-Match` or `If-None-Match` sent on two lines is one comma-separated list.
    Only the first line was read: a blob GET whose second If-Match line named its ETag was
    refused 412, and one whose second If-None-Match line named it was sent whole again."""
    _, manifest = shared_registry.manifest("hello")
    digest = manifest["config"]["digest"]
    connection = http.client.HTTPConnection("127.0.0.1", shared_registry.port, timeout=60)
    try:
        for header, status in (("If-Match", 200), ("If-None-Match", 304)):
            for method in ("GET", "HEAD"):
                connection.putrequest(method, f"/v2/hello/blobs/{digest}")
                connection.putheader(header, '"another"')
                connection.putheader(header, f'"{digest}"')
                connection.endheaders()
                response = connection.getresponse()
                response.read()
                assert response.status == status, (header, method, response.status)
    finally:
        connection.close()


def test_long_conditional_headers_do_not_hold_the_registry(shared_registry: RegistryProcess) -> None:
    """An `If-None-Match` or `If-Match` of 16 KB of spaces between two letters took the ETag
    pattern seconds to scan (a regular expression tried at each position, each try to the end),
    on the event loop: four such requests held every other client for about 15 s. Now each such
    list is read in one pass, and the registry answers meanwhile at once."""
    digest, manifest = shared_registry.manifest("hello")
    blob = f"/v2/hello/blobs/{manifest['config']['digest']}"
    hostile = "a" + " " * 16_000 + "a"
    answers: list[int] = []

    def send(path: str, header: str) -> None:
        answers.append(shared_registry.request(path, headers={header: hostile}, timeout=120)[0])

    senders = [threading.Thread(target=send, args=args) for args in (
        (blob, "If-None-Match"), (blob, "If-Match"), (f"/v2/hello/manifests/{digest}", "If-None-Match"),
        ("/v2/hello/manifests/latest", "If-None-Match"),
    )]  # fmt: skip
    waited = ping_wait_while(shared_registry, senders)
    assert sorted(answers) == [200, 200, 200, 412]  # names no ETag: If-Match fails, If-None-Match holds
    assert waited < 2, f"the registry answered a ping after {waited:.1f} s"


def test_a_user_agent_with_an_absurd_docker_version_is_not_an_internal_error(shared_registry: RegistryProcess) -> None:
    """`User-Agent: docker/<5000 digits>.1` on a manifest by digest was a 500 INTERNAL_ERROR
    (int() refuses numbers of over 4300 digits); now it is no Docker Engine version the
    registry knows, and the manifest is served."""
    digest, _ = shared_registry.manifest("hello")
    for method in ("GET", "HEAD"):
        status, headers, body = shared_registry.request(
            f"/v2/hello/manifests/{digest}", method=method, headers={"User-Agent": "docker/" + "1" * 5000 + ".1"}
        )
        assert (status, headers["Docker-Content-Digest"]) == (200, digest), (method, body[:300])


def test_a_client_that_takes_only_indexes_is_told_the_image_has_none(shared_registry: RegistryProcess) -> None:
    """A client that accepts only image indexes (or manifest lists) was told it "accepts neither
    Docker schema 2 nor OCI manifests", as if it had named no type at all; on a registry of one
    platform the image has no index, and the answer now says so."""
    for accept in ("application/vnd.oci.image.index.v1+json",
                   "application/vnd.docker.distribution.manifest.list.v2+json"):
        for method in ("GET", "HEAD"):
            status, _, body = shared_registry.request("/v2/hello/manifests/latest", method=method, accept=accept)
            assert status == 404, (accept, method, body[:300])
            if method == "GET":
                error = error_of(body)
                assert error["code"] == "MANIFEST_UNKNOWN", error
                assert "only image indexes" in error["message"] and "one platform" in error["message"], error


def test_a_client_that_refuses_every_type_it_names_gets_none(shared_registry: RegistryProcess) -> None:
    """`Accept: <Docker schema 2>;q=0` got the Docker manifest: with every type it named refused,
    the header was read as if there were none (the client takes anything). Now the client gets
    no manifest, and the answer says why; with no Accept header it still gets Docker schema 2."""
    docker, oci = "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"
    refusing = (f"{docker};q=0", f"{docker};q=0, {oci};q=0")
    for accept in refusing:
        for method in ("GET", "HEAD"):
            status, headers, body = shared_registry.request("/v2/hello/manifests/latest", method=method, accept=accept)
            assert status == 404, (accept, method, headers.get("Content-Type"))
            if method == "GET":
                error = error_of(body)
                assert error["code"] == "MANIFEST_UNKNOWN" and "refuses (;q=0) every type" in error["message"], error
    status, headers, _ = shared_registry.request("/v2/hello/manifests/latest", accept=None)
    assert (status, headers["Content-Type"]) == (200, docker)


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        (f"{DOCKER_MANIFEST};q=0, */*", OCI_MANIFEST),
        (f"{DOCKER_MANIFEST}; q=0, application/*", OCI_MANIFEST),
        (f"{OCI_MANIFEST};q=0, */*", DOCKER_MANIFEST),
        (f"{OCI_MANIFEST};q=0, application/*, */*", DOCKER_MANIFEST),
        (f"{DOCKER_MANIFEST};q=0, {OCI_MANIFEST};q=0, */*", None),
        ("application/*;q=0, */*", None),
    ],
)
def test_a_type_refused_by_name_is_not_given_through_a_wildcard(
    shared_registry: RegistryProcess, accept: str, media_type: str | None
) -> None:
    """`Accept: <Docker schema 2>;q=0, */*` got the Docker manifest: the wildcard was read as taking
    every type, the one refused by name too. A weight of 0 is "not acceptable" (RFC 9110 12.4.2),
    and the more specific of a type and a range that covers it says (12.5.1)."""
    for method in ("GET", "HEAD"):
        status, headers, body = shared_registry.request("/v2/hello/manifests/latest", method=method, accept=accept)
        if media_type is None:
            assert status == 404, (accept, method, status, headers.get("Content-Type"))
            if method == "GET":
                error = error_of(body)
                assert error["code"] == "MANIFEST_UNKNOWN" and "refuses (;q=0) every type" in error["message"], error
        else:
            assert (status, headers.get("Content-Type")) == (200, media_type), (accept, method, body[:300])


def test_the_tag_list_of_a_name_the_package_set_lacks_is_not_known(shared_registry: RegistryProcess) -> None:
    """`/v2/shell/figlett/tags/list` listed `latest`, whose pull then answered 404. Now a name
    whose packages the set lacks has no tag to list: 404 NAME_UNKNOWN (distribution spec: no
    such repository), saying which names and the nearest ones; a name it has lists `latest`."""
    status, _, body = shared_registry.request("/v2/shell/figlett/tags/list")
    error = error_of(body)
    assert (status, error["code"]) == (404, "NAME_UNKNOWN"), body
    assert "figlett (did you mean figlet?)" in error["message"], error
    status, _, body = shared_registry.request("/v2/shell/figlet/tags/list")
    assert (status, json.loads(body)) == (200, {"name": "shell/figlet", "tags": ["latest"]})


def test_layer_budget_holds(start_registry) -> None:
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_MAX_LAYERS="3")
    _, manifest = registry.manifest("shell/fortune/cowsay/figlet/greet/bigdata")
    assert len(manifest["layers"]) <= 3


def test_unknown_packages_are_listed(shared_registry: RegistryProcess) -> None:
    status, _, body = shared_registry.request("/v2/shell/nosuchpkg/alsomissing/manifests/latest")
    assert status == 404
    error = error_of(body)
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "nosuchpkg" in error["message"] and "alsomissing" in error["message"]
    assert error["detail"]["missing"] == ["alsomissing", "nosuchpkg"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/../x/manifests/latest",
        "/v2/a;b/manifests/latest",
        "/v2/$(id)/manifests/latest",
        "/v2/%24%28id%29/manifests/latest",
        "/v2/" + "a" * 300 + "/manifests/latest",
        "/v2/shell//hello/manifests/latest",
        "/v2/shell/hello/../x/manifests/latest",
        "/v2/a%2Fb/manifests/latest",
        "/v2/x..y/manifests/latest",
        "/v2/hello/blobs/sha256:" + "0" * 64 + "/../x",
    ],
)
def test_invalid_names_never_reach_nix(shared_registry: RegistryProcess, nix_calls, path: str) -> None:
    _, calls = nix_calls
    before = nix_call_count(calls)
    status, _, body = shared_registry.request(path)
    assert 400 <= status < 500, (status, body)
    if status == 400:
        assert error_of(body)["code"] == "NAME_INVALID"
    assert nix_call_count(calls) == before


def test_percent_encoding_anywhere_in_the_path_is_refused_as_such(shared_registry: RegistryProcess) -> None:
    """An encoded character in a tag or digest was refused as one "in image names"."""
    for path in ("/v2/hello/manifests/lat%65st", "/v2/hello/blobs/sha256%3A" + "0" * 64, "/v2/a%2Fb/tags/list"):
        status, _, body = shared_registry.request(path)
        error = error_of(body)
        assert status == 400 and error["code"] == "NAME_INVALID", (path, body)
        assert "not allowed in registry paths" in error["message"], (path, error)


@pytest.mark.parametrize("name", ["builtins.readFile", "import", "__toString", "hello.drvPath"])
def test_names_that_look_like_nix_are_only_data(shared_registry: RegistryProcess, name: str) -> None:
    status, _, body = shared_registry.request(f"/v2/{name}/manifests/latest")
    assert status == 404, body
    error = error_of(body)
    assert error["code"] == "MANIFEST_UNKNOWN" and error["detail"]["missing"] == [name]


@pytest.mark.parametrize(
    ("path", "status", "code", "kind"),
    [
        ("/v2/hello/manifests/bad..tag", 400, "NAME_INVALID", "TAG_INVALID"),
        ("/v2/hello/manifests/sha256:xyz", 400, "DIGEST_INVALID", "DIGEST_INVALID"),
        ("/v2/hello/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN", "MANIFEST_UNKNOWN"),
        ("/v2/hello/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN", "BLOB_UNKNOWN"),
        ("/v2/hello/blobs/md5:abc", 400, "DIGEST_INVALID", "DIGEST_INVALID"),
        ("/v2/_catalog", 404, "NAME_UNKNOWN", "NAME_UNKNOWN"),
        ("/v2/hello/blobs/uploads/5c0a7e1b-4f9e-4a55", 404, "BLOB_UPLOAD_UNKNOWN", "BLOB_UPLOAD_UNKNOWN"),
        ("/v3/", 404, "NAME_UNKNOWN", "NAME_UNKNOWN"),
        # `{` and `}` (aiohttp's route syntax) are refused as any other character a name, tag or digest
        # cannot hold: they were left to the catch-all, 404 "no such endpoint or repository".
        ("/v2/a${b}/manifests/latest", 400, "NAME_INVALID", "NAME_INVALID"),
        ("/v2/{x}/blobs/sha256:" + "0" * 64, 400, "NAME_INVALID", "NAME_INVALID"),
        ("/v2/a}/tags/list", 400, "NAME_INVALID", "NAME_INVALID"),
        ("/v2/a{/referrers/sha256:" + "0" * 64, 400, "NAME_INVALID", "NAME_INVALID"),
        ("/v2/hello/manifests/v{1}", 400, "NAME_INVALID", "TAG_INVALID"),
        ("/v2/hello/blobs/sha256:{x}", 400, "DIGEST_INVALID", "DIGEST_INVALID"),
        ("/v2/hello/referrers/sha256:{x}", 400, "DIGEST_INVALID", "DIGEST_INVALID"),
    ],
)
def test_errors_use_registry_codes(
    shared_registry: RegistryProcess, path: str, status: int, code: str, kind: str
) -> None:
    got, _, body = shared_registry.request(path)
    assert got == status, body
    error = error_of(body)
    assert (error["code"], error["detail"]["kind"]) == (code, kind)
    # A HEAD gets the same answer without its body, and the length the body would have.
    got, headers, head_body = shared_registry.request(path, method="HEAD")
    assert (got, head_body, headers.get("Content-Length")) == (status, b"", str(len(body)))
    assert headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"])
def test_push_and_delete_are_unsupported(shared_registry: RegistryProcess, method: str) -> None:
    """Any method but GET and HEAD under /v2/ is 405 UNSUPPORTED, with the `Allow` header RFC 9110
    asks of a 405 (there was none; OPTIONS, TRACE and others were told the methods of the push routes)."""
    paths = ("/v2/", "/v2/hello/manifests/latest", "/v2/hello/blobs/uploads/", "/v2/hello/blobs/uploads/x/../y",
             "/v2/hello/blobs/sha256:" + "0" * 64, "/v2/hello/tags/list")
    for path in paths:
        status, headers, body = shared_registry.request(path, method=method)
        assert status == 405, (path, body)
        assert error_of(body)["code"] == "UNSUPPORTED" and "pull-only" in error_of(body)["message"]
        assert headers.get("Allow") == "GET, HEAD", (path, headers)


def test_a_page_asked_with_a_method_it_does_not_answer_says_which_it_does(shared_registry: RegistryProcess) -> None:
    """Outside the registry API, a 405 named the pull-only registry (`DELETE /builds`); it now says
    what the path answers, and so does its `Allow` header."""
    # GET /builds (the build form's address, opened in a browser) answered 404 "no such endpoint".
    for method, path, allowed in (("DELETE", "/builds", "POST"), ("GET", "/builds", "POST"),
                                  ("POST", "/packages", "GET, HEAD")):
        status, headers, body = shared_registry.request(path, method=method, accept="application/json")
        assert status == 405, (path, body)
        error = error_of(body)
        assert error["code"] == "UNSUPPORTED" and error["message"].endswith(f"this path answers {allowed}"), error
        assert headers.get("Allow") == allowed


def test_build_failure_reports_nix_log(shared_registry: RegistryProcess) -> None:
    status, _, body = shared_registry.request("/v2/broken/manifests/latest")
    assert status == 500
    error = error_of(body)
    assert (error["code"], error["detail"]["kind"]) == ("UNKNOWN", "BUILD_FAILED")
    assert "the answer is not a number" in error["message"]


def test_evaluation_failure_reports_nix_error(shared_registry: RegistryProcess) -> None:
    status, _, body = shared_registry.request("/v2/evalError/manifests/latest")
    assert status == 500
    assert "this package does not evaluate" in error_of(body)["message"]


def test_second_pull_starts_no_nix_process(shared_registry: RegistryProcess, nix_calls) -> None:
    _, calls = nix_calls
    first, _ = shared_registry.manifest("figlet/shell")
    before = nix_call_count(calls)
    again, manifest = shared_registry.manifest("shell/figlet")
    for layer in manifest["layers"]:
        assert shared_registry.request(f"/v2/shell/figlet/blobs/{layer['digest']}", method="HEAD")[0] == 200
    assert again == first
    assert nix_call_count(calls) == before


def test_order_and_repetition_do_not_change_the_image(shared_registry: RegistryProcess) -> None:
    a, _ = shared_registry.manifest("hello/shell")
    b, _ = shared_registry.manifest("shell/hello/hello")
    assert a == b


def test_images_sharing_a_dependency_share_its_layer(shared_registry: RegistryProcess) -> None:
    _, fortune = shared_registry.manifest("fortune")
    _, cowsay = shared_registry.manifest("cowsay")
    shared = {layer["digest"] for layer in fortune["layers"]} & {layer["digest"] for layer in cowsay["layers"]}
    assert shared, "fortune and cowsay both need libwords and busybox but share no layer"
    _, figlet = shared_registry.manifest("figlet")
    assert shared & {layer["digest"] for layer in figlet["layers"]}


def test_tags_list(shared_registry: RegistryProcess) -> None:
    status, _, body = shared_registry.request("/v2/shell/hello/tags/list")
    assert status == 200
    assert json.loads(body) == {"name": "shell/hello", "tags": ["latest"]}


def test_tags_list_pages_as_the_spec_says(shared_registry: RegistryProcess) -> None:
    """`n` and `last` (distribution-spec, content discovery): `n=0` lists none, `last` only the
    tags after it; an `n` that is not a number of tags is refused."""
    pages = {
        "n=0": [], "n=1": ["latest"], "n=1000": ["latest"], "last=latest": [], "last=a": ["latest"],
        "last=zzz&n=5": [], "last=a&n=0": [],
    }  # fmt: skip
    for query, tags in pages.items():
        status, _, body = shared_registry.request(f"/v2/shell/hello/tags/list?{query}")
        assert status == 200, (query, body)
        assert json.loads(body) == {"name": "shell/hello", "tags": tags}, query
    for size in ("-1", "abc", "1.5", "", "1e3", "9" * 30):
        status, _, body = shared_registry.request(f"/v2/shell/hello/tags/list?n={size}")
        assert status == 400, (size, body)
        error = error_of(body)
        assert (error["code"], error["detail"]["kind"]) == ("UNSUPPORTED", "REQUEST_INVALID"), size
