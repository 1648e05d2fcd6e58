"""Hostile input: thousands of random requests, never a 5xx, never a traceback.

Requests are well-formed HTTP/1.1 with hostile content: random methods, paths
(percent-encoded bytes that are not UTF-8, encoded slashes, `..`, shell and
Nix syntax, very long components), tags, digests and headers. Every answer
must be a registry JSON error (or a success), no Nix evaluation may see a name
that fails validation, and nothing outside storage may be read.
"""

from __future__ import annotations

import json
import socket
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.registry import RegistryProcess, nix_call_count

METHODS = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "TRACE"]
NASTY = ["..", ".", "%2e%2e", "%2F", "%00", "%ff%fe", "$(id)", "`id`", "a;b", "${x}", "<script>", "builtins.readFile",
         "/etc/passwd", "~root", "a" * 300, "%C0%AF", "\\", "'", '"', "shell", "hello", "HELLO", "tools.jqlite"]
FIELD_CHARS = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t"  # legal in a header value
SEGMENT_CHARS = string.ascii_letters + string.digits + "._-+~%:@!$&'()*,;=\\"

segments = st.one_of(st.sampled_from(NASTY), st.text(SEGMENT_CHARS, min_size=0, max_size=40))
digests = st.one_of(
    st.just("sha256:" + "0" * 64),
    st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h),
    st.text(SEGMENT_CHARS, max_size=80),
)
references = st.one_of(st.sampled_from(["latest", "v1", "a..b", "-x", "x" * 200]), digests, segments)


@st.composite
def requests(draw) -> tuple[str, str, list[tuple[str, str]]]:
    name = "/".join(draw(st.lists(segments, min_size=0, max_size=5)))
    kind = draw(st.sampled_from(["manifests", "blobs", "tags", "uploads", "other"]))
    if kind == "manifests":
        path = f"/v2/{name}/manifests/{draw(references)}"
    elif kind == "blobs":
        path = f"/v2/{name}/blobs/{draw(digests)}"
    elif kind == "tags":
        path = f"/v2/{name}/tags/list"
    elif kind == "uploads":
        path = f"/v2/{name}/blobs/uploads/{draw(segments)}"
    else:
        path = "/" + "/".join(draw(st.lists(segments, max_size=4)))
    headers = draw(st.dictionaries(
        st.sampled_from(["Accept", "Authorization", "Range", "If-None-Match", "X-Junk", "Content-Type", "Expect"]),
        st.text(FIELD_CHARS, max_size=200),
        max_size=4,
    ))
    return draw(st.sampled_from(METHODS)), path, list(headers.items())


def raw_request(port: int, method: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v.strip()}" for k, v in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def assert_registry_answer(method: str, status: int, body: bytes) -> None:
    assert status < 500, (status, body[:500])
    assert b"Traceback" not in body
    if status >= 400 and method != "HEAD":
        error = json.loads(body)["errors"][0]
        assert set(error) == {"code", "message", "detail"}


@settings(max_examples=5000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_random_requests_get_registry_errors(shared_registry: RegistryProcess, request) -> None:
    method, path, headers = request
    status, body = raw_request(shared_registry.port, method, path, headers)
    assert_registry_answer(method, status, body)


def test_unknown_http_methods_are_refused_by_the_parser(shared_registry: RegistryProcess) -> None:
    # Not HTTP: aiohttp's parser answers 400 before any routing (the only non-JSON answer).
    status, body = raw_request(shared_registry.port, "FOO", "/v2/", [])
    assert status == 400 and b"Traceback" not in body


def test_limits_are_clear_errors(shared_registry: RegistryProcess, nix_calls) -> None:
    _, calls = nix_calls
    before = nix_call_count(calls)
    too_many = "/".join(f"p{i}" for i in range(101))
    status, body = raw_request(shared_registry.port, "GET", f"/v2/{too_many}/manifests/latest", [])
    assert status == 400 and "at most 100 packages" in json.loads(body)["errors"][0]["message"]
    status, body = raw_request(shared_registry.port, "GET", "/v2/" + "x" * 129 + "/manifests/latest", [])
    assert status == 400 and "longer than 128" in json.loads(body)["errors"][0]["message"]
    status, body = raw_request(shared_registry.port, "GET", "/v2/", [("X-Big", "a" * 20000)])
    assert status in (400, 431)
    assert nix_call_count(calls) == before


def test_storage_paths_cannot_escape(shared_registry: RegistryProcess) -> None:
    for path in ["/v2/hello/blobs/sha256:../../../../etc/passwd", "/v2/hello/blobs/..%2F..%2Fetc%2Fpasswd",
                 "/v2/hello/manifests/sha256:..%2F..%2Fmeta", "/v2/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"]:
        status, body = raw_request(shared_registry.port, "GET", path, [])
        assert status in (400, 404), (path, status)
        assert b"root:" not in body
