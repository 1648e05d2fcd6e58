"""The server under the application (nixery/http/server.py), against real registry
processes over raw sockets: requests aiohttp cannot parse, clients that never
finish their request heads, and a port that is already taken."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import daemons
from tests.registry import REPOSITORY, RegistryProcess, busybox_set_with, free_port, slow_package_set

MARKER = "nixery-echo-marker"


def exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_unparseable_requests_get_the_registrys_json_error_without_the_input(registry: RegistryProcess) -> None:
    marker = MARKER.encode()
    requests = {
        "request line over 8190 bytes": b"GET /v2/" + marker + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "NUL in the path": b"GET /v2/" + marker + b"\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        "non-ASCII path": f"GET /v2/é<script>{MARKER} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "header over the limit": b"GET /v2/ HTTP/1.1\r\nX-Long: " + marker + b"b" * 20000 + b"\r\n\r\n",
        "not a method": b"GE<T>" + marker + b" / HTTP/1.1\r\n\r\n",
        "bad Content-Length": b"POST /builds HTTP/1.1\r\nHost: x\r\nContent-Length: " + marker + b"\r\n\r\n",
        "too many header fields": b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + (b"X-A: " + marker + b"\r\n") * 200 + b"\r\n",
        "two lengths": b"PUT /v2/x/manifests/" + marker + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "bad chunk size": b"PATCH /v2/x/blobs/uploads/" + marker + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + marker + b"\r\n0\r\n\r\n",
        "a TLS handshake": _client_hello(),  # podman's and skopeo's first try with --tls-verify=false
        "a method HTTP lacks": b"FOO /v2/" + marker + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        # llhttp parses it: it was answered `HTTP/2.0 200 OK` in HTTP/1 framing.
        "HTTP/2.0": b"GET /v2/" + marker + b" HTTP/2.0\r\nHost: x\r\n\r\n",
        "HTTP/3.0": b"GET /v2/" + marker + b" HTTP/3.0\r\nHost: x\r\n\r\n",
    }
    #: What the answer says, where it says more than that the request is malformed.
    framing = "malformed body framing (Content-Length or Transfer-Encoding)"
    said = {"too many header fields": "too many header fields (at most 128)", "bad Content-Length": framing,
            "two lengths": framing, "bad chunk size": framing,
            "a TLS handshake": "not an HTTP request: a TLS handshake (HTTPS) on this plain-HTTP port",
            "a method HTTP lacks": "the request method is none that HTTP defines (this registry answers GET, HEAD "
                                   "and POST)",
            "HTTP/2.0": "this registry speaks HTTP/1.1 and HTTP/1.0 only (the request line names another version)"}
    for what, request in requests.items():
        answer = exchange(registry.port, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
        assert status_line.startswith("HTTP/1.") and status_line.split()[1] == "400", (what, answer[:300])
        assert headers["content-type"].startswith("application/json"), (what, headers)
        error = json.loads(body)["errors"][0]
        assert (error["code"], error["detail"]["kind"]) == ("UNSUPPORTED", "REQUEST_INVALID"), (what, error)
        assert error["message"] and error["message"] == said.get(what, error["message"]), (what, error)
        assert marker not in answer and b"<script>" not in answer, (what, answer[:500])
    assert MARKER not in registry.log(), "the input reached the log"
    logged = [event["problem"] for event in registry.log_events("http.malformed_request")]
    assert len(logged) == len(requests) and logged.count("TLSHandshake") == 1, logged  # named, not BadHttpMethod
    assert registry.request("/v2/")[0] == 200  # and the registry serves on


def _client_hello() -> bytes:
    """The first bytes a TLS client sends."""
    import ssl

    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    connection = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="registry.example.org")
    with contextlib.suppress(ssl.SSLWantReadError):
        connection.do_handshake()
    return outgoing.read()


def test_connections_that_never_finish_their_request_heads_are_closed(start_registry) -> None:
    timeout = 2.0
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_HEADER_TIMEOUT=str(timeout))
    kept_alive = socket.create_connection(("127.0.0.1", registry.port), timeout=30)
    ping = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"
    kept_alive.sendall(ping)
    assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    stalled = []
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", registry.port), timeout=30)
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: 1")  # and nothing more
        stalled.append(sock)
    assert registry.request("/v2/")[0] == 200  # others are served meanwhile
    for sock in stalled:
        sock.settimeout(max(0.1, started + timeout + 10 - time.monotonic()))
        assert sock.recv(100) == b"", "the server answered a request it had not received"
        sock.close()
    waited = time.monotonic() - started
    assert timeout * 0.5 <= waited < timeout + 10, waited
    # A kept-alive connection may idle longer than the header timeout ...
    time.sleep(max(0.0, started + timeout + 0.5 - time.monotonic()))
    kept_alive.sendall(ping)
    assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
    # ... but its next request's head must arrive in time too.
    kept_alive.sendall(b"GET /v2/ HTTP/1.1\r\nHo")
    began = time.monotonic()
    assert kept_alive.recv(100) == b""
    assert time.monotonic() - began < timeout + 10
    kept_alive.close()
    assert len(registry.log_events("http.header_timeout")) == len(stalled) + 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_and_a_failed_start(tmp_path, workers: str) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        env = {
            **os.environ, "PORT": str(port), "NIXERY_WORKERS": workers, "STORAGE_PATH": str(tmp_path / "storage"),
            "NIXERY_BUNDLED_SET": "busybox", "LOG_FORMAT": "json",
        }
        result = subprocess.run(
            [sys.executable, "-m", "nixery", "serve"], env=env, cwd=REPOSITORY, capture_output=True, text=True,
            timeout=60,
        )
    assert result.returncode == 1  # the machine's state, not a setting's fault (that is 2)
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"nixery: cannot listen on 127.0.0.1:{port}: the address is in use (another process listens on this port)"
    ]


def _link_local_address() -> tuple[str, str] | None:
    """An IPv6 link-local address of this machine and the interface it is on, if it has one."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        address, _index, _prefix, scope, _flags, interface = line.split()
        if int(scope, 16) == 0x20:  # IPV6_ADDR_LINKLOCAL
            return str(ipaddress.IPv6Address(bytes.fromhex(address))), interface
    return None


def test_a_registry_on_a_link_local_address_links_to_it_with_its_zone(tmp_path) -> None:
    """NIXERY_HOST=fe80::...%eth0: `registry.listening` gave `http://[fe80::...]:PORT`, without the
    interface, through which alone the address is reached. Links now name it (`%25eth0`, RFC 6874);
    pull commands cannot, and name the address alone."""
    found = _link_local_address()
    if found is None:
        pytest.skip("this machine has no IPv6 link-local address")
    address, interface = found
    log = tmp_path / "registry.log"
    env = {**os.environ, "NIXERY_HOST": f"{address}%{interface}", "PORT": "0", "LOG_FORMAT": "json",
           "STORAGE_PATH": str(tmp_path / "storage"), "NIXERY_BUNDLED_SET": "busybox"}
    process = subprocess.Popen([sys.executable, "-m", "nixery", "serve"], env=env, cwd=REPOSITORY,
                               stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        daemons.wait_until(lambda: "registry.listening" in log.read_text(), process, log, "registry")
        [listening] = [line for line in map(json.loads, log.read_text().splitlines())
                       if line["event"] == "registry.listening"]
        port = int(listening["url"].rpartition(":")[2])
        assert listening["url"] == f"http://[{address}%25{interface}]:{port}", listening

        def without_host(request: bytes) -> bytes:  # HTTP/1.0: the pages name the address it came in on
            target = socket.getaddrinfo(f"{address}%{interface}", port, type=socket.SOCK_STREAM)[0][4]
            with socket.socket(socket.AF_INET6) as sock:
                sock.settimeout(60)
                sock.connect(target)
                sock.sendall(request)
                return b"".join(iter(lambda: sock.recv(65536), b""))

        page = without_host(b"GET / HTTP/1.0\r\nAccept: text/html\r\n\r\n")
        assert f"docker run -ti [{address}]:{port}/shell/".encode() in page, page[-600:]
        body = b'{"image": "shell/hello"}'
        answer = without_host(b"POST /builds HTTP/1.0\r\nContent-Type: application/json\r\nAccept: application/json\r\n"
                              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        started = json.loads(answer.partition(b"\r\n\r\n")[2])["id"]
        [logged] = [line for line in map(json.loads, log.read_text().splitlines())
                    if line["event"] == "http.build_started" and line["build"] == started]
        assert logged["progress"].startswith(f"http://[{address}%25{interface}]:{port}/builds/"), logged
        # The URL it logged, and the reference a page shows, are the registry's own to `nixery build`.
        built = subprocess.run(
            [sys.executable, "-m", "nixery", "build", "--plain", "--registry", listening["url"],
             f"[{address}]:{port}/shell/hello"], capture_output=True, text=True, cwd=REPOSITORY, timeout=120,
        )
        assert built.returncode == 0, built.stderr
        assert f"\nPull     docker pull [{address}]:{port}/shell/hello\n" in built.stdout, built.stdout
    finally:
        daemons.stop(process)


@pytest.mark.parametrize("cause", ["port in use", "storage it cannot use"])
def test_a_failed_start_of_several_workers_leaves_no_temporary_directory(tmp_path, cause: str) -> None:
    """With NIXERY_WORKERS above 1, `nixery serve` makes temporary directories the workers
    share (builds, metrics). A worker that could not start (here: STORAGE_PATH is a file) used
    to leave them behind, one pair per failed start (the registry ended by os._exit); now
    every failed start removes them, as a stop does."""
    port, temporary, storage = free_port(), tmp_path / "tmp", tmp_path / "storage"
    temporary.mkdir()
    if cause == "storage it cannot use":
        storage.write_text("not a directory")
    with socket.socket() as holder:
        if cause == "port in use":
            holder.bind(("127.0.0.1", port))
            holder.listen()
        env = {
            **os.environ, "PORT": str(port), "NIXERY_WORKERS": "2", "STORAGE_PATH": str(storage),
            "NIXERY_BUNDLED_SET": "busybox", "LOG_FORMAT": "json", "TMPDIR": str(temporary),
        }
        result = subprocess.run(
            [sys.executable, "-m", "nixery", "serve"], env=env, cwd=REPOSITORY, capture_output=True, text=True,
            timeout=60,
        )
    assert result.returncode == (1 if cause == "port in use" else 2)
    [problem] = result.stderr.splitlines()
    assert ("address is in use" if cause == "port in use" else f"STORAGE_PATH='{storage}'") in problem
    assert list(temporary.iterdir()) == []


def _serve_briefly(tmp_path, workers: str, **extra: str) -> subprocess.CompletedProcess[str]:
    """`nixery serve` that is expected to fail at start-up, with TMPDIR at `tmp_path / "tmp"`."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {
        **os.environ, "PORT": str(free_port()), "NIXERY_WORKERS": workers, "STORAGE_PATH": str(tmp_path / "storage"),
        "NIXERY_BUNDLED_SET": "busybox", "LOG_FORMAT": "json", "TMPDIR": str(tmp_path / "tmp"), **extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "nixery", "serve"], env=env, cwd=REPOSITORY, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_kubeconfig_that_is_not_one_is_a_configuration_error(tmp_path, workers: str) -> None:
    """NIXERY_K8S_WATCH with a kubeconfig that is not one: one line and status 2, as for any
    other setting (it was a traceback and status 1; with several workers, status 0 and nothing)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("not a kubeconfig")
    result = _serve_briefly(tmp_path, workers, NIXERY_K8S_WATCH="true", KUBECONFIG=str(kubeconfig))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"nixery: configuration error: NIXERY_K8S_WATCH=true, but kubeconfig {kubeconfig} is not a mapping"
    ]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_worker_that_fails_unexpectedly_fails_the_start(tmp_path) -> None:
    """A worker of several that ended with an unexpected error used to end silently with status 0,
    the registry too, as if stopped; now it prints its traceback and the registry ends with status
    1, as one process does, leaving no temporary directory behind. The error is injected (a
    sitecustomize that makes the builder fail): no setting makes start-up fail unexpectedly."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import nixery.builder\n"
        "def broken(*args, **kwargs):\n"
        "    raise RuntimeError('injected start-up failure')\n"
        "nixery.builder.ImageBuilder.__init__ = broken\n"
    )
    result = _serve_briefly(tmp_path, "2", PYTHONPATH=f"{hooks}{os.pathsep}{REPOSITORY}")
    assert result.returncode == 1
    assert "RuntimeError: injected start-up failure" in result.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_the_log_says_where_to_pull_from_and_what_a_shutdown_drained(start_registry, tmp_path) -> None:
    """`registry.listening` names the URL once the port accepts; on SIGTERM `registry.stopping`
    counts the requests under way, and `registry.stopped` those drained and those cut off at the
    end of NIXERY_SHUTDOWN_GRACE.

    A pull waiting for a build longer than the grace was cut off: its connection closed with no
    answer, and the build's event stream broke off. Now the build is stopped shortly before the
    grace ends: the pull is answered 503 BUILD_STOPPED, saying to pull again, and the event stream
    ends with the build's last event, which says it was stopped."""
    pkgs = slow_package_set(tmp_path / "pkgs", seconds=30)
    registry: RegistryProcess = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_SHUTDOWN_GRACE="3")
    [listening] = registry.log_events("registry.listening")
    assert listening["url"] == registry.url and listening["addresses"] == [registry.host]

    answers: list[object] = []
    pull = threading.Thread(target=lambda: answers.append(_request_or_error(registry, "/v2/slowpoke/manifests/latest")))
    pull.start()
    deadline = time.monotonic() + 60
    while not registry.log_events("build.realising"):
        assert time.monotonic() < deadline, "the build did not start"
        time.sleep(0.1)
    [waiting] = registry.log_events("http.waiting_for_build")
    events: list[dict] = []
    stream = threading.Thread(target=lambda: events.extend(_events(registry, waiting["build"])))
    stream.start()
    time.sleep(0.5)  # the stream is open
    registry.process.send_signal(signal.SIGTERM)
    assert registry.process.wait(30) == 0
    pull.join(30)
    stream.join(30)
    [answer] = answers
    assert not isinstance(answer, OSError), answer
    status, _, body = answer  # type: ignore[misc]
    error = json.loads(body)["errors"][0]
    assert (status, error["code"], error["detail"]["kind"]) == (503, "UNAVAILABLE", "BUILD_STOPPED"), answer
    assert "stopped building slowpoke; pull again" in error["message"], error
    assert events and (events[-1]["stage"], events[-1]["error"]) == ("failed", "stopped"), events
    [stopping] = registry.log_events("registry.stopping")
    assert (stopping["signal"], stopping["in_flight"], stopping["grace"]) == ("SIGTERM", 2, 3.0)
    [stopped] = registry.log_events("registry.stopped")
    assert (stopped["drained"], stopped["cut_off"]) == (2, 0), stopped
    assert 1 <= stopped["seconds"] < 15
    assert len(registry.log_events("build.stopped")) == 1


def test_with_a_shutdown_delay_the_registry_serves_on_while_readiness_says_it_is_stopping(start_registry) -> None:
    """A Kubernetes Service's endpoints learn that a pod ends as the pod gets SIGTERM, and send it
    new connections for a few seconds more: a registry that closed its port at once refused them
    (a failed pull during every rollout). With NIXERY_SHUTDOWN_DELAY it accepts and serves for
    that long, while `/readyz` answers 503, then stops as before; a second SIGTERM ends the
    delay, and Ctrl-C (SIGINT) has none."""
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_SHUTDOWN_DELAY="4")
    assert registry.request("/readyz", accept=None)[0] == 200
    registry.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.5)
    status, _, body = registry.request("/readyz", accept=None, timeout=10)  # a new connection
    assert (status, json.loads(body)) == (503, {"ready": False, "reason": "shutting down"})
    status, _, body = registry.request("/v2/hello/manifests/latest", timeout=120)  # served, built even
    assert status == 200, body
    assert registry.process.wait(30) == 0
    assert time.monotonic() - signalled >= 4
    [draining] = registry.log_events("registry.draining")
    assert draining["seconds"] == 4.0

    for signals in ([signal.SIGTERM, signal.SIGTERM], [signal.SIGINT]):
        registry.start()
        started = time.monotonic()
        for signum in signals:
            registry.process.send_signal(signum)
            time.sleep(0.3)
        assert registry.process.wait(30) == 0
        assert time.monotonic() - started < 3, signals


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_shutdown_grace_is_a_bound_a_download_still_under_way_is_cut_off_when_it_ends(
    start_registry, workers: str
) -> None:
    """A client reading a blob slowly (or no more) when the registry was stopped held the stop for
    about twice NIXERY_SHUTDOWN_GRACE: aiohttp waited the grace, cancelled the request in a way
    that does not end a send with sendfile(2), and waited the grace again. systemd and Kubernetes,
    given the delay plus the grace and a little more, then SIGKILLed the registry. Now the download
    is given the grace and then cut off (its connection closed); each worker obeys the same bound."""
    grace = 4.0
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_SHUTDOWN_GRACE=str(grace),
                                               NIXERY_WORKERS=workers)
    _, manifest = registry.manifest("bigdata")
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    assert layer["size"] > 10_000_000, layer  # more than the kernel's buffers hold
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the registry cannot send it all at once
    sock.connect(("127.0.0.1", registry.port))
    sock.sendall(f"GET /v2/bigdata/blobs/{layer['digest']} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = len(sock.recv(4096))  # the download has begun; the client reads no more for now
    assert received > 0
    time.sleep(0.5)
    registry.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):
        registry.process.wait(4 * grace)
    took = time.monotonic() - signalled
    assert registry.process.poll() == 0, f"still running {took:.1f} s after SIGTERM"
    assert grace - 0.5 <= took <= grace + 2.5, f"stopped {took:.1f} s after SIGTERM, with a grace of {grace} s"
    sock.settimeout(10)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):  # what reached the client's buffers before the cut
            received += len(chunk)
    sock.close()
    assert received < layer["size"], "the download was not cut off"
    stopped = registry.log_events("registry.stopped")
    assert len(stopped) == int(workers), stopped
    assert sum(line["cut_off"] for line in stopped) == 1, stopped
    assert all(line["seconds"] <= grace + 2 for line in stopped), stopped
    [cutting_off] = registry.log_events("registry.cutting_off")
    assert (cutting_off["requests"], cutting_off["grace"]) == (1, grace), cutting_off
    assert not registry.log_events("http.unhandled_error")
    assert not registry.plain_text_lines()


def _events(registry: RegistryProcess, build: str) -> list[dict]:
    """A build's events, read from its event stream until the stream ends."""
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
    try:
        connection.request("GET", f"/builds/{build}/events", headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        lines = response.read().splitlines()
        return [json.loads(line.removeprefix(b"data: ")) for line in lines if line.startswith(b"data: ")]
    finally:
        connection.close()


def _request_or_error(registry: RegistryProcess, path: str) -> object:
    try:
        return registry.request(path, timeout=60)
    except OSError as exc:  # the connection closed: what a cut-off request gets
        return exc


def test_a_body_that_never_arrives_is_answered_408(start_registry) -> None:
    """A POST whose body does not come within NIXERY_HEADER_TIMEOUT of its head gets the
    registry's 408 (aiohttp would wait as long as the client keeps the connection open);
    others are served meanwhile."""
    timeout = 2.0
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_HEADER_TIMEOUT=str(timeout))
    heads = {
        "/builds": b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"image\": ",
        "/builds?form": b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nimage=",
    }
    slow = []
    started = time.monotonic()
    for path, rest in heads.items():
        sock = socket.create_connection(("127.0.0.1", registry.port), timeout=30)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n".encode() + rest)
        slow.append(sock)
    assert registry.request("/v2/")[0] == 200
    for sock in slow:
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        sock.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(body)["errors"][0]["detail"] == {"seconds": timeout, "kind": "REQUEST_TIMEOUT"}
    assert timeout * 0.5 <= time.monotonic() - started < timeout + 10
    assert not registry.log_events("http.internal_error")


def test_an_expectation_other_than_100_continue_gets_the_registrys_json_error(registry: RegistryProcess) -> None:
    """aiohttp refuses such an `Expect` before the application's middlewares, with plain text that
    quoted the header: now the registry's 417, quoting nothing. `100-continue` still works."""
    for path in ("/v2/", "/v2/shell/manifests/latest", "/no/such/page"):
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: {MARKER}\r\n\r\n"
        answer = exchange(registry.port, request.encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 417 "), (path, answer[:300])
        assert b"application/json" in head and MARKER.encode() not in answer, (path, answer[:300])
        error = json.loads(body)["errors"][0]
        assert (error["code"], error["detail"]["kind"]) == ("UNSUPPORTED", "EXPECTATION_FAILED"), (path, error)
    # A value that is not UTF-8: aiohttp's refusal failed as it quoted it, a 500 on every route.
    answer = exchange(registry.port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: \xff\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 417 ") and b"EXPECTATION_FAILED" in answer, answer[:300]
    # Answered before the middlewares, these 417s were missing from the access log.
    refused = [(e["method"], e["path"]) for e in registry.log_events("http.request") if e["status"] == 417]
    assert refused == [("GET", "/v2/"), ("GET", "/v2/shell/manifests/latest"), ("GET", "/no/such/page"),
                       ("GET", "/v2/")]
    continued = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\n\r\n"
    answer = exchange(registry.port, continued)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "), answer[:300]
    assert not registry.log_events("http.internal_error") and not registry.log_events("http.unhandled_error")


@pytest.mark.parametrize("image", ["shell", "noise"])
def test_clients_that_stop_reading_a_blob_are_cut_off_after_the_send_timeout(start_registry, tmp_path,
                                                                              image: str) -> None:
    """A client that requests a blob and then reads nothing held its connection (and, while the
    blob was being sent, its file) for as long as it liked: thousands of them left the registry
    out of descriptors. Once nothing it was sent has been taken for NIXERY_SEND_TIMEOUT seconds,
    its connection is closed; others are served meanwhile, and a client that reads gets the whole
    blob. `shell`'s largest layer (1 MB) fits in the kernel's buffers, so the answer is sent in
    full and the connection idles (the cut-off is logged); `noise`'s (16 MB) is still being sent
    with sendfile(2)."""
    pkgs = busybox_set_with(tmp_path / "pkgs", "noise", "noise-1.0",
                            "$bb/mkdir $out; $bb/head -c 16000000 /dev/urandom > $out/noise")
    limit = 2.0
    registry: RegistryProcess = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_SEND_TIMEOUT=str(limit))
    _, manifest = registry.manifest(image)
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    request = f"GET /v2/{image}/blobs/{layer['digest']} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    descriptors_before = len(os.listdir(f"/proc/{registry.process.pid}/fd"))
    stalled = []
    for _ in range(20):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the registry cannot send it all at once
        sock.connect(("127.0.0.1", registry.port))
        sock.sendall(request)
        stalled.append(sock)
    assert registry.request("/v2/", timeout=5)[0] == 200  # others are served meanwhile
    time.sleep(limit + 3)  # reading nothing
    assert len(os.listdir(f"/proc/{registry.process.pid}/fd")) <= descriptors_before + 2, "still held"
    for sock in stalled:
        sock.settimeout(10)
        received = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):  # what reached the client's buffers before the cut
                received += len(chunk)
        sock.close()
        assert received < layer["size"], "the stalled client got the whole blob: it was not cut off"
    if image == "shell":  # (during sendfile, asyncio keeps the kernel's error to itself)
        assert len(registry.log_events("http.send_timeout")) == len(stalled)
    assert not registry.log_events("http.unhandled_error")
    # A client that reads is not cut off.
    status, _, body = registry.request(f"/v2/{image}/blobs/{layer['digest']}", timeout=10)
    assert (status, len(body)) == (200, layer["size"])


def read_answer(sock: socket.socket) -> tuple[str, bytes]:
    """The status line and JSON body of one answer that ends with its connection."""
    answer = b""
    with contextlib.suppress(ConnectionResetError):  # the server closes with the client's bytes unread
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


def test_a_request_head_over_64_kib_is_refused_at_once_and_holds_no_memory(start_registry) -> None:
    """aiohttp limits each header field and their number, not their sum: a client sending 127
    fields of 16,000 bytes and never the blank line held ~3.2 MB per connection for the whole
    header timeout. Now a head over 64 KiB is answered 400 as soon as it passes the limit."""
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_HEADER_TIMEOUT="60")
    field = b"a" * 16000
    under = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        b"X-%d: %s\r\n" % (k, field) for k in range(3)) + b"\r\n"
    assert exchange(registry.port, under).startswith(b"HTTP/1.1 200"), "a head under the limit is served"
    with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (k, field) for k in range(5)))
        status, body = read_answer(sock)  # without the blank line: answered long before the header timeout
    assert status.split()[1] == "400", status
    error = json.loads(body)["errors"][0]
    assert error["detail"]["kind"] == "REQUEST_INVALID" and "head is too large" in error["message"], error
    before = registry.rss_bytes()
    flood = []
    for _ in range(200):  # the audit's: 200 of them took the registry from 167 MB to 954 MB
        sock = socket.create_connection(("127.0.0.1", registry.port), timeout=10)
        flood.append(sock)
        with contextlib.suppress(OSError):  # refused part-way: the rest is not read
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            for k in range(127):
                sock.sendall(b"X-%d: %s\r\n" % (k, field))
    time.sleep(1)
    grown = registry.rss_bytes() - before
    for sock in flood:
        sock.close()
    assert grown < 100 << 20, f"{grown >> 20} MB more for 200 unfinished heads"
    assert registry.request("/v2/")[0] == 200


def idle_connections(port: int, count: int, *, in_turn: bool = False) -> list[socket.socket]:
    """`count` kept-alive connections, each after one answered request. `in_turn`: each answered
    before the next is opened, so that every earlier one is idle when the next arrives (else, on a
    loaded machine, the registry may accept many whose requests are all still under way)."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        opened.append(sock)
        if in_turn:
            sock.recv(65536)
    if not in_turn:
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.recv(65536)
    return opened


def test_idle_connections_cannot_take_every_file_descriptor(start_registry) -> None:
    """One client opening more idle connections than the registry has file descriptors stopped it
    serving anyone else (and asyncio wrote a plain-text traceback for each failed accept). Now the
    registry raises its open-files limit, keeps its connections below what that allows, and closes
    the longest idle connection for a new one."""
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", open_files=256)
    flood = idle_connections(registry.port, 300, in_turn=True)
    try:
        status, _, _ = registry.request("/v2/", timeout=10)  # others are served meanwhile
        assert status == 200
        closed = 0
        for sock in flood[:100]:  # the oldest: closed for the new ones
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                closed += sock.recv(100) == b""
        assert closed == 100
    finally:
        for sock in flood:
            sock.close()
    assert not registry.plain_text_lines(), registry.plain_text_lines()[:5]
    assert registry.log_events("http.connections_full")
    listening = registry.log_events("registry.listening")[0]
    assert listening["open_files_limit"] == 256 and listening["max_connections"] < 256 // 2, listening


def test_when_every_connection_has_a_request_under_way_a_new_one_is_closed_at_once(start_registry) -> None:
    """At NIXERY_MAX_CONNECTIONS with no idle connection to close, a new connection is closed at
    once (the requests under way are someone's); once they end, new connections are served."""
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_MAX_CONNECTIONS="4",
                                               NIXERY_HEADER_TIMEOUT="3")
    busy = []
    for _ in range(4):  # bodies that never come: requests under way until the body timeout
        sock = socket.create_connection(("127.0.0.1", registry.port), timeout=30)
        sock.sendall(b"POST /builds HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        busy.append(sock)
    time.sleep(0.5)
    with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as refused:
        with contextlib.suppress(ConnectionResetError):
            assert refused.recv(100) == b""
    for sock in busy:
        status, _ = read_answer(sock)
        assert status.split()[1] == "408", status
        sock.close()
    assert registry.request("/v2/", timeout=10)[0] == 200
    assert registry.log_events("http.connections_full")[0]["refused"] >= 1


def test_out_of_file_descriptors_is_one_log_line_not_a_traceback_per_accept(start_registry) -> None:
    """With NIXERY_MAX_CONNECTIONS above what the open-files limit allows, accepts fail: asyncio
    (3.11) wrote a plain-text traceback for each (600,000 lines a minute). Now the waiting connection
    is closed and one structured line is logged per 10 s; the registry serves once descriptors are free."""
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_MAX_CONNECTIONS="1000",
                                               open_files=128)
    deadline = time.monotonic() + 60
    while not registry.log_events("layers.writers_ready"):  # its start-up's files opened
        assert time.monotonic() < deadline
        time.sleep(0.2)
    flood = idle_connections(registry.port, 200)
    time.sleep(2)
    for sock in flood:
        sock.close()
    deadline = time.monotonic() + 30
    while True:  # descriptors are freed as the registry sees the closes
        with contextlib.suppress(OSError):
            if registry.request("/v2/", timeout=5)[0] == 200:
                break
        assert time.monotonic() < deadline, "the registry did not serve again"
        time.sleep(0.5)
    assert not registry.plain_text_lines(), registry.plain_text_lines()[:5]
    failed = registry.log_events("http.accept_failed")
    assert 1 <= len(failed) <= 3 and failed[0]["reason"] == "Too many open files", failed


def test_a_client_hanging_up_mid_body_is_logged_as_gone_not_as_an_internal_error(registry: RegistryProcess) -> None:
    for content_type in ("application/json", "application/x-www-form-urlencoded"):
        with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as sock:
            sock.sendall(f"POST /builds HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                         "Content-Length: 100\r\n\r\nimage".encode())
            time.sleep(0.3)
    deadline = time.monotonic() + 10
    while len([e for e in registry.log_events("http.request") if e["path"] == "/builds"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert [e["status"] for e in registry.log_events("http.request") if e["path"] == "/builds"] == [499, 499]
    assert not registry.log_events("http.internal_error")
    _, _, metrics = registry.request("/metrics", accept="text/plain")
    assert b'route="/builds",status="500"' not in metrics and b'status="499"' in metrics


def test_a_body_declared_too_large_is_refused_at_once(registry: RegistryProcess) -> None:
    """`POST /builds` with a Content-Length of 10 GB and no body was answered only when the body
    timeout (60 s) ran out, 408; and a body that came was read before it was refused. Now the
    declared length is refused before anything is read: 413, at once."""
    for kind, limit in (("application/json", 65536), ("application/x-www-form-urlencoded", 1 << 20)):
        head = (f"POST /builds HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\nAccept: application/json\r\n"
                f"Content-Length: {10 ** 10}\r\nConnection: close\r\n\r\n").encode()
        started = time.monotonic()
        answer = exchange(registry.port, head, timeout=30)
        status_line, _, rest = answer.partition(b"\r\n")
        error = json.loads(rest.partition(b"\r\n\r\n")[2])["errors"][0]
        assert status_line.split()[1] == b"413", (kind, answer[:300])
        assert error["message"] == f"the request body is {10 ** 10} bytes long; at most {limit} are read", error
        assert time.monotonic() - started < 20, "answered only when the body timeout ran out"


def test_a_build_form_naming_only_a_scheme_names_no_image(registry: RegistryProcess) -> None:
    """`image=docker://` (a pasted reference cut short) was read as the package `docker`."""
    body = b"image=docker%3A%2F%2F"
    head = (b"POST /builds HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Accept: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    answer = exchange(registry.port, head + body)
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["errors"][0]
    assert (error["code"], error["message"]) == ("NAME_INVALID", "the image name lists no packages"), error


def test_a_pull_given_up_while_its_image_builds_is_logged_as_gone(tmp_path, start_registry) -> None:
    """A pull given up mid-build is logged and counted as 499 when the client leaves, with the time
    it waited: it was logged as a 200 it never got, then as a 499 only once the build ended, with
    the build's time. The build goes on for the next pull."""
    registry = start_registry(tmp_path / "storage", NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "set", 12)))
    path = "/v2/shell/slowpoke/manifests/latest"

    def logged(event: str, **fields: object) -> list[dict]:
        deadline = time.monotonic() + 120
        while not (found := [e for e in registry.log_events(event) if fields.items() <= e.items()]):
            assert time.monotonic() < deadline, f"no {event} {fields} in the log"
            time.sleep(0.1)
        return found

    with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        asked = time.monotonic()
        logged("build.realising")  # Nix builds slowpoke (12 s); the client gives up
    left = time.monotonic()
    (answered,) = logged("http.request", path=path)
    assert time.monotonic() - left < 5, "logged long after the client left"
    assert not registry.log_events("build.done"), "logged when the build ended"
    assert answered["status"] == 499 and answered["ms"] < 1000 * (left - asked + 5), answered
    logged("build.done")  # the build went on for the next pull
    _, _, metrics = registry.request("/metrics", accept="text/plain")
    counted = [line for line in metrics.decode().splitlines() if line.startswith("nixery_http_requests_total{")]
    assert any('manifests' in line and 'status="499"' in line for line in counted), counted
    assert not any('manifests' in line and 'status="200"' in line for line in counted), counted
    assert registry.manifest("shell/slowpoke")[0].startswith("sha256:")
    assert len(registry.log_events("build.done")) == 1, "the next pull found the image built"


def test_a_build_whose_only_client_left_does_not_hold_up_a_shutdown(tmp_path, start_registry) -> None:
    """A stop waits for the builds a client waits for (its grace), not for one whose only client
    hung up: that pull still counted as waiting until the build ended, so the stop took the
    build's time (or the whole grace)."""
    registry = start_registry(tmp_path / "storage", NIXERY_SHUTDOWN_GRACE="60",
                              NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "set", 50)))
    path = "/v2/shell/slowpoke/manifests/latest"
    with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        deadline = time.monotonic() + 120
        while not registry.log_events("build.realising"):
            assert time.monotonic() < deadline, "the build did not start"
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while not [e for e in registry.log_events("http.request") if e["path"] == path]:
        assert time.monotonic() < deadline, "the pull given up was not logged"
        time.sleep(0.1)
    stopping = time.monotonic()
    registry.process.send_signal(signal.SIGTERM)
    registry.process.wait(timeout=60)
    assert time.monotonic() - stopping < 20, "the stop waited for the build"
    assert registry.log_events("build.stopped") and not registry.log_events("build.done")


def _download(port: int, path: str, *, rate: float, stop_after: int | None = None) -> None:
    """GET `path` reading at most `rate` bytes a second, with a small receive buffer (the kernel's
    own would take a whole layer at once); hang up after `stop_after` bytes, if given."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(60)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received, started = 0, time.monotonic()
        while chunk := sock.recv(65536):
            received += len(chunk)
            if stop_after is not None and received >= stop_after:
                return
            time.sleep(max(0.0, received / rate - (time.monotonic() - started)))


def test_a_downloads_log_line_has_the_time_it_took_and_a_cut_off_one_says_so(registry: RegistryProcess) -> None:
    """Blobs were sent after their log line was written: every download was logged as a 200 of a
    tenth of a millisecond, a slow one and one the client gave up on alike."""
    _, manifest = registry.manifest("fortune/bigdata")
    layer = max(manifest["layers"], key=lambda layer: layer["size"])
    assert layer["size"] > 10_000_000, "a layer larger than the socket buffers is needed"
    path = f"/v2/fortune/bigdata/blobs/{layer['digest']}"

    _download(registry.port, path, rate=8_000_000)  # ~1.7 s, the last 4 MB or so in the sender's buffer
    _download(registry.port, path, rate=8_000_000, stop_after=1_000_000)
    deadline = time.monotonic() + 30
    while len(logged := [e for e in registry.log_events("http.request") if e["path"] == path]) < 2:
        assert time.monotonic() < deadline, logged
        time.sleep(0.2)
    slow, cut_off = logged
    assert slow["status"] == 200 and slow["ms"] > 500, slow
    assert cut_off["status"] == 499, cut_off
