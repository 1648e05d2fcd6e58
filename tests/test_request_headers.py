"""Headers a client chooses (`Host`, `Sec-Fetch-Site`, `Origin`): a value that is not what it
should be gets a clear 400 or 403, never a 500, and changes nothing else the registry does.
Against a real registry process; raw sockets send what http.client cannot (bytes that are not
UTF-8, an empty `Host`)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable

from tests.registry import OCI_MANIFEST, REPOSITORY, RegistryProcess, error_of, slow_package_set

HTML = "text/html,application/xhtml+xml,*/*;q=0.8"
MALFORMED_HOSTS = [b"x:abc", b"x:99999", b"x:-1", b"x:", b"\xff", b"a b", b'<script>alert("x")</script>']


Answer = tuple[int, dict[str, str], bytes]


def raw_request(
    port: int, method: str, path: str, headers: list[tuple[str, bytes]], body: bytes = b"", version: str = "1.1"
) -> Answer:
    """One request exactly as given (each header's value as bytes); (status, headers, body)."""
    head = f"{method} {path} HTTP/{version}\r\n".encode()
    head += b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_and_headers, _, content = answer.partition(b"\r\n\r\n")
    lines = status_and_headers.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {name.lower(): value for name, value in fields.items()}, content


def post_build(port: int, headers: list[tuple[str, bytes]], image: str = "hello", tag: str = "latest") -> Answer:
    body = json.dumps({"image": image, "tag": tag}).encode()
    kind = [("Content-Type", b"application/json"), ("Accept", b"application/json")]
    return raw_request(port, "POST", "/builds", [*kind, *headers], body)


def test_a_malformed_host_is_refused_and_the_image_still_builds(shared_registry: RegistryProcess) -> None:
    """A pull with `Host: x:abc` of an image not built yet was a 500 (yarl refused to make the
    progress link of the log line out of it), and its build never started: every later pull of
    the image joined that build, and none built it. Now such a Host is 400 REQUEST_INVALID, and a
    pull with a good one builds the image."""
    path = "/v2/shell/hello/figlet/manifests/latest"  # built by no other test
    for host in MALFORMED_HOSTS:
        accept = ("Accept", OCI_MANIFEST.encode())
        status, headers, body = raw_request(shared_registry.port, "GET", path, [("Host", host), accept])
        error = error_of(body)
        assert (status, error["code"], error["detail"]["kind"]) == (400, "UNSUPPORTED", "REQUEST_INVALID"), host
        assert "Host header" in error["message"] and host not in body, error
        assert headers["docker-distribution-api-version"] == "registry/2.0"
    status, _, body = shared_registry.request(path, accept=OCI_MANIFEST, timeout=120)
    assert status == 200, body[:500]


def test_a_build_form_with_a_malformed_host_starts_nothing(shared_registry: RegistryProcess) -> None:
    """`POST /builds` with such a Host started the build, then answered 500."""
    for host in MALFORMED_HOSTS:
        status, _, body = post_build(shared_registry.port, [("Host", host)], image="shell/cowsay/figlet")
        assert status == 400 and error_of(body)["detail"]["kind"] == "REQUEST_INVALID", (host, body)
    assert not [e for e in shared_registry.log_events("http.build_started") if e["image"] == "shell/cowsay/figlet"]
    assert not shared_registry.log_events("http.internal_error")


def test_an_empty_host_is_taken_as_none(shared_registry: RegistryProcess) -> None:
    """RFC 9112 lets a client send an empty Host: the build starts, and its progress is linked
    at `localhost`, as the pages name a registry that was not given one."""
    status, _, body = post_build(shared_registry.port, [("Host", b"")])
    assert status == 202, body
    started = json.loads(body)["id"]
    logged = [e for e in shared_registry.log_events("http.build_started") if e["build"] == started]
    assert logged and logged[0]["progress"].startswith("http://localhost/builds/"), logged
    status, _, page = raw_request(shared_registry.port, "GET", "/", [("Host", b""), ("Accept", HTML.encode())])
    assert status == 200 and b"serving <code>localhost</code>" in page


def test_pages_asked_with_a_host_that_is_not_utf8_are_refused_not_failed(shared_registry: RegistryProcess) -> None:
    """Every page writes the Host into its footer: with bytes that are not UTF-8 in it, the page
    could not be encoded (500), the error page too."""
    for path in ["/", "/packages", "/docs", "/images/jq", "/images/no{such}name", "/builds/0123456789abcdef"]:
        headers_sent = [("Host", b"\xff"), ("Accept", HTML.encode())]
        status, headers, body = raw_request(shared_registry.port, "GET", path, headers_sent)
        assert status == 400 and headers["content-type"].startswith("text/html"), (path, status, body[:300])
        assert b"REQUEST_INVALID" in body and b"\xff" not in body, path
        assert b"serving <code>localhost</code>" in body
    assert not shared_registry.log_events("http.internal_error")


def test_pages_name_the_host_they_were_asked_by(shared_registry: RegistryProcess) -> None:
    for host in [b"registry.example", b"registry.example:5000", b"10.0.0.1:80", b"[::1]:8080"]:
        status, _, body = raw_request(shared_registry.port, "GET", "/", [("Host", host), ("Accept", HTML.encode())])
        assert status == 200 and b"serving <code>" + host + b"</code>" in body, host


def test_a_link_local_host_with_its_zone_is_kept_in_links_and_left_out_of_pull_commands(
    shared_registry: RegistryProcess,
) -> None:
    """`Host: [fe80::1%eth0]:8080`, an IPv6 address with the interface it is reached through (sent so
    by Python's http.client; `%25eth0` as URLs write it, RFC 6874), was refused as no host: 400, and
    an error page `serving localhost`. Links now keep the zone as URLs write it; pull commands, whose
    references have no room for one, name the address alone."""
    port = shared_registry.port
    accept = ("Accept", HTML.encode())
    for host in [b"[fe80::1%eth0]:8080", b"[fe80::1%25eth0]:8080", b"[FE80::1%25eth0]:8080"]:
        status, _, page = raw_request(port, "GET", "/", [("Host", host), accept])
        assert status == 200, (host, page[-600:])
        assert b"serving <code>[" + host[1:8] + b"]:8080</code>" in page, (host, page[-600:])
        assert b"docker run -ti [" + host[1:8] + b"]:8080/shell/" in page, host
        status, _, body = post_build(port, [("Host", host)], image="shell/hello/figlet")
        assert status == 202, (host, body)
        started = json.loads(body)["id"]
        logged = [e for e in shared_registry.log_events("http.build_started") if e["build"] == started]
        link = f"http://[{host[1:8].decode()}%25eth0]:8080/builds/"
        assert logged and logged[-1]["progress"].startswith(link), logged
    target = f"http://[fe80::1%25eth0]:{port}/"  # absolute-form: the host in the target
    status, _, page = raw_request(port, "GET", target, [("Host", b"elsewhere.example"), accept])
    assert status == 200 and f"serving <code>[fe80::1]:{port}</code>".encode() in page, page[-600:]
    for host in [b"[fe80::1%]:8080", b"[fe80::1%<b>]:8080", b"[fe80::1%eth0%]:8080"]:  # still no host
        status, _, body = raw_request(port, "GET", "/v2/", [("Host", host)])
        assert status == 400 and error_of(body)["detail"]["kind"] == "REQUEST_INVALID", host


def test_pages_name_the_host_and_port_of_a_request_without_a_host_header(shared_registry: RegistryProcess) -> None:
    """An absolute-form request names the registry in its target, which RFC 9112 puts before
    `Host`; an HTTP/1.0 request may name none. Both lost the port (aiohttp's request.host), so
    the pull commands, progress links and token realm named port 80."""
    port = shared_registry.port
    accept = ("Accept", HTML.encode())
    status, _, body = raw_request(port, "GET", f"http://127.0.0.1:{port}/", [("Host", b"elsewhere.example"), accept])
    assert status == 200 and f"serving <code>127.0.0.1:{port}</code>".encode() in body, body[-600:]
    status, _, body = raw_request(port, "GET", "/", [accept], version="1.0")
    assert status == 200 and f"serving <code>127.0.0.1:{port}</code>".encode() in body, body[-600:]
    build = json.dumps({"image": "shell/hello/cowsay"}).encode()  # no Host: the build's progress link
    kind = [("Content-Type", b"application/json"), ("Accept", b"application/json")]
    status, _, body = raw_request(port, "POST", "/builds", kind, build, version="1.0")
    assert status == 202, body
    started = json.loads(body)["id"]
    logged = [e for e in shared_registry.log_events("http.build_started") if e["build"] == started]
    assert logged and logged[0]["progress"].startswith(f"http://127.0.0.1:{port}/builds/"), logged


def test_cross_site_headers_that_are_not_utf8_are_refused_not_failed(shared_registry: RegistryProcess) -> None:
    """`Sec-Fetch-Site: \\xff` or `Origin: http://\\xff` on a build form's post: refused as from
    another site (403), where writing the refusal to the log raised (500)."""
    host = ("Host", f"127.0.0.1:{shared_registry.port}".encode())
    for header in [("Sec-Fetch-Site", b"\xff"), ("Origin", b"http://\xff")]:
        status, _, body = post_build(shared_registry.port, [host, header], image="shell/cowsay")
        error = error_of(body)
        assert (status, error["code"]) == (403, "DENIED"), (header, body)
        assert "\\udcff" in error["detail"]["reason"] and "forms only take posts" in error["message"], error
    refusals = [e for e in shared_registry.log_events("http.cross_site_refused") if "udcff" in e["reason"]]
    assert len(refusals) >= 2, refusals
    assert not [e for e in shared_registry.log_events("http.build_started") if e["image"] == "shell/cowsay"]


def test_a_log_line_holding_bytes_that_are_not_utf8_is_written_escaped() -> None:
    """The registry's JSON log (orjson) raised on text that is not UTF-8, failing whatever
    request logged it; the line is now written with the bytes escaped."""
    script = (
        "import structlog; from nixery import logs; logs.configure('info', 'json'); "
        "structlog.get_logger().info('test.line', value='a\\udcffb', items=['\\ud800'])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=REPOSITORY, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    line = json.loads(result.stderr)
    assert (line["event"], line["value"], line["items"]) == ("test.line", "a\\xffb", ["\\ud800"])


def test_builds_are_forgotten_past_the_limit_while_an_older_one_runs(
    start_registry: Callable[..., RegistryProcess], tmp_path
) -> None:
    """The log of recent builds keeps 200 of them: once the oldest kept was one still running (or
    one that never finished), no build was dropped any more, for as long as the process ran."""
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs", seconds=120)))
    status, _, body = post_build(registry.port, [("Host", b"registry")], image="shell/slowpoke")
    assert status == 202, body
    running = json.loads(body)["id"]
    finished = []
    for number in range(201):  # each fails at once: the set has no such package
        status, _, body = post_build(registry.port, [("Host", b"registry")], image=f"nosuch{number}")
        assert status == 202, body
        finished.append(json.loads(body)["id"])
    status, _, body = registry.request(f"/builds/{running}.json", accept="application/json")
    assert status == 200 and not json.loads(body)["finished"], body[:300]
    assert registry.request(f"/builds/{finished[0]}.json", accept="application/json")[0] == 404  # dropped
    assert registry.request(f"/builds/{finished[-1]}.json", accept="application/json")[0] == 200


def test_a_log_value_of_any_type_with_bytes_that_are_not_utf8_is_written() -> None:
    """The fallback escaped strings, dicts and lists only: any other value whose text holds such
    bytes (a URL of the request, an exception) made the second encoding raise too."""
    from nixery.logs import _dumps

    class Shown:
        def __str__(self) -> str:
            return "Host: \udcff"

    assert json.loads(_dumps({"event": "x", "value": Shown()})) == {"event": "x", "value": "Host: \\xff"}
