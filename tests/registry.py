"""Run real registry processes and real container clients in tests."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import daemons

REPOSITORY = Path(__file__).resolve().parent.parent
PODMAN_RUN_FLAGS = [
    "--runtime", "runc", "--network", "none",
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
]
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCTET_STREAM = "application/octet-stream"


#: What NIXERY_BASELINE's default (cacert, iana-etc) costs a registry process in Nix
#: evaluations, once per package-set revision however many images it builds, on the busybox
#: set and the sets built on it: they have `cacert` but no `iana-etc`, so one evaluation learns
#: that and one more evaluates `cacert` alone (nixery.baseline).
BASELINE_EVALUATIONS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RegistryProcess(daemons.LoopbackServer):
    """A `nixery serve` subprocess on a free port, with its own storage."""

    storage: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    #: The process's limit on open files (soft and hard), if not this one's.
    open_files: int | None = None

    def start(self, timeout: float = 20.0) -> RegistryProcess:
        env = {
            **os.environ, "PORT": str(self.port), "STORAGE_PATH": str(self.storage), "LOG_FORMAT": "json", **self.env,
        }
        self.log_path = self.log_path or self.storage.parent / f"registry-{self.port}.log"
        limit = self.open_files
        limited = {} if limit is None else {
            "preexec_fn": lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        }
        # Any answer will do (e.g. 401 when access control is on).
        self.process = daemons.start_http_server(
            [sys.executable, "-m", "nixery", "serve"], self.log_path, f"{self.url}/v2/", "registry",
            timeout=timeout, env=env, cwd=REPOSITORY, **limited,
        )
        return self

    def stop(self) -> None:
        daemons.stop(self.process, grace=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_events(self, event: str) -> list[dict]:
        """The registry's JSON log lines for one event (e.g. "http.request")."""
        found = []
        for line in self.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                found.append(entry)
        return found

    def plain_text_lines(self) -> list[str]:
        """The log's lines that are not JSON (a traceback printed by Python's logging, say)."""
        lines = []
        for line in self.log().splitlines():
            try:
                json.loads(line)
            except ValueError:
                lines.append(line)
        return lines

    def rss_bytes(self) -> int:
        """The registry process's resident memory."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024

    def request(
        self, path: str, *, method: str = "GET", accept: str | list[str] | None = DOCKER_MANIFEST,
        headers: dict[str, str] | None = None, timeout: float = 300,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request, each Accept value on its own header line; returns (status, headers, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            for value in [accept] if isinstance(accept, str) else accept or []:
                connection.putheader("Accept", value)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            body = response.read()
            return response.status, dict(response.getheaders()), body
        finally:
            connection.close()

    def manifest(self, name: str, reference: str = "latest", accept: str = DOCKER_MANIFEST) -> tuple[str, dict]:
        status, headers, body = self.request(f"/v2/{name}/manifests/{reference}", accept=accept)
        assert status == 200, (status, body[:2000])
        return headers["Docker-Content-Digest"], json.loads(body)


@dataclass
class DistributionRegistry(RegistryProcess):
    """The reference registry (CNCF distribution 2.8, Debian's `docker-registry`) on a free
    port, its storage under `storage`: a peer whose answers the registry's are compared with."""

    def start(self, timeout: float = 20.0) -> DistributionRegistry:
        self.storage.mkdir(parents=True, exist_ok=True)
        config = self.storage / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage / 'data'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self.log_path = self.log_path or self.storage / "registry.log"
        self.process = daemons.start_http_server(
            ["docker-registry", "serve", str(config)], self.log_path, f"{self.url}/v2/", "docker-registry",
            timeout=timeout,
        )
        return self

    def push_blob(self, name: str, blob: bytes) -> str:
        """Uploads `blob` in one request (POST, then PUT with its digest); returns its digest."""
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("POST", f"/v2/{name}/blobs/uploads/")
            response = connection.getresponse()
            response.read()
            assert response.status == 202, response.status
            location = response.getheader("Location", "")
            location = location.removeprefix(self.url)
            separator = "&" if "?" in location else "?"
            connection.request("PUT", f"{location}{separator}digest={digest}", body=blob,
                               headers={"Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            response.read()
            assert response.status == 201, response.status
        finally:
            connection.close()
        return digest


def error_of(body: bytes) -> dict:
    document = json.loads(body)
    assert set(document) == {"errors"} and len(document["errors"]) == 1, document
    error = document["errors"][0]
    assert set(error) == {"code", "message", "detail"}, error
    return error


def ping_wait_while(registry: RegistryProcess, senders: list[threading.Thread]) -> float:
    """Seconds /v2/ took to answer while `senders` (started here, joined before returning) ran
    their requests: how long one client's requests held up another's."""
    for sender in senders:
        sender.start()
    time.sleep(0.2)  # their requests under way
    started = time.monotonic()
    assert registry.request("/v2/")[0] == 200
    waited = time.monotonic() - started
    for sender in senders:
        sender.join()
    return waited


def check_blob_ranges(registry: RegistryProcess, name: str) -> None:
    """A blob's ETag is its digest on every answer; conditions made with it hold; one byte
    range is 206, several a multipart/byteranges 206, ranges all past the end 416 with the
    JSON error; ranges the registry does not serve (another unit, malformed, overlapping or too
    many) get the whole blob, as RFC 9110 allows.
    Checked on the first layer of image `name`, which `registry` sends itself (no redirect)."""
    _, manifest = registry.manifest(name)
    digest, size = manifest["layers"][0]["digest"], manifest["layers"][0]["size"]
    path, etag = f"/v2/{name}/blobs/{digest}", f'"{digest}"'

    def get(headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        status, answer_headers, body = registry.request(path, headers=headers)
        return status, {name.lower(): value for name, value in answer_headers.items()}, body

    status, headers, whole = get({})
    assert (status, headers["etag"], len(whole), headers["accept-ranges"]) == (200, etag, size, "bytes")
    partial = {
        "bytes=0-9": (0, 10), "bytes=-10": (size - 10, size), f"bytes=10-{size * 2}": (10, size),
        f"bytes={size - 1}-": (size - 1, size),
        "Bytes=0-9": (0, 10), "BYTES=-10": (size - 10, size),  # a range unit's name is case-insensitive (RFC 9110 14.1)
    }  # fmt: skip
    for requested, (start, end) in partial.items():
        for extra in ({}, {"If-Range": etag}):
            status, headers, body = get({"Range": requested, **extra})
            assert (status, headers["etag"], body) == (206, etag, whole[start:end]), (requested, extra)
            assert headers["content-range"] == f"bytes {start}-{end - 1}/{size}", requested
    # Several ranges: one multipart/byteranges 206, the parts in the order asked (distribution's answer).
    for requested, expected in {
        "bytes=0-1,4-5": [(0, 2), (4, 6)], f"bytes=-3, 10-19,{size * 2}-": [(size - 3, size), (10, 20)],
        "bytes=0-1,0-1": [(0, 2), (0, 2)],
    }.items():
        status, headers, body = get({"Range": requested})
        assert (status, headers["etag"]) == (206, etag), (requested, status)
        assert int(headers["content-length"]) == len(body) and "content-range" not in headers, requested
        assert multipart_parts(headers["content-type"], body) == [
            (f"bytes {start}-{end - 1}/{size}", whole[start:end]) for start, end in expected
        ], requested
    status, headers, body = get({"Range": f"bytes={size}-,5-9"})  # the one left: a plain 206
    assert (status, headers["content-range"], body) == (206, f"bytes 5-9/{size}", whole[5:10])
    ignored = [
        {"Range": "bytes=0-,1-"},  # adding up to more than the blob (Go's rule): the blob once
        {"Range": "bytes=" + ",".join(["0-0"] * 65)},  # more ranges than are sent in parts
        {"Range": "items=0-1"}, {"Range": "bytes=5-1"}, {"Range": "bytes=x"},
        {"Range": "bytes=0-1", "If-Range": '"an-older-etag"'}, {"If-None-Match": '"another"'}, {"If-Match": etag},
        {"If-Match": "*"}, {"If-Modified-Since": "not a date"},
        {"If-Unmodified-Since": "Mon, 01 Jan 1990 00:00:00 GMT"},
    ]  # fmt: skip
    for extra in ignored:
        status, headers, body = get(extra)
        assert (status, headers["etag"], body) == (200, etag, whole), extra
    for if_none_match in (etag, f"W/{etag}", f'"another", {etag}', "*"):
        status, headers, body = get({"If-None-Match": if_none_match})
        assert (status, headers["etag"], body) == (304, etag, b""), if_none_match
    unsatisfiable = {
        f"bytes={size}-": f"the requested range starts past the end of this {size}-byte blob",
        "bytes=-0": "the requested range asks for the last 0 bytes (-0): a suffix range must ask for at least one",
        f"bytes={size}-,-0,{size + 9}-{size + 10}": "none of the requested ranges can be sent: each starts past "
                                                    f"the end of this {size}-byte blob or asks for its last 0 bytes",
    }
    for past_the_end, message in unsatisfiable.items():
        status, headers, body = get({"Range": past_the_end})
        assert (status, headers["content-range"]) == (416, f"bytes */{size}"), past_the_end
        error = error_of(body)
        assert error["detail"] == {"size": size, "kind": "RANGE_NOT_SATISFIABLE"}
        assert error["message"].startswith(message), (past_the_end, error["message"])
    status, _, body = get({"If-Match": '"another"'})
    assert status == 412 and error_of(body)["detail"]["kind"] == "PRECONDITION_FAILED"


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The (Content-Range, bytes) of each part of a multipart/byteranges body, checking its
    framing (RFC 9110 14.6, RFC 2046 5.1.1) and that each part says it is a blob."""
    kind, _, boundary = content_type.partition("; boundary=")
    assert kind == "multipart/byteranges" and boundary, content_type
    delimiter, closing = f"--{boundary}\r\n".encode(), f"\r\n--{boundary}--\r\n".encode()
    assert body.startswith(delimiter) and body.endswith(closing), (body[:100], body[-100:])
    parts = []
    for part in body[len(delimiter) : -len(closing)].split(b"\r\n" + delimiter):
        head, _, data = part.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert fields.keys() == {"Content-Type", "Content-Range"} and fields["Content-Type"] == OCTET_STREAM, fields
        parts.append((fields["Content-Range"], data))
    return parts


def run(
    argv: list[str], *, timeout: float = 300, check: bool = True, env_extra: dict[str, str] | None = None, **kwargs
) -> subprocess.CompletedProcess[str]:
    if env_extra:
        kwargs["env"] = {**os.environ, **env_extra}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPOSITORY, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def podman_run(image: str, *command: str, timeout: float = 300, tty: bool = False) -> subprocess.CompletedProcess[str]:
    """`tty`: with a terminal, as `podman run -t` gives (TERM=xterm; stderr comes on stdout, lines end in CRLF)."""
    terminal = ["-t"] if tty else []
    return run(
        ["podman", "run", "--rm", "--tls-verify=false", *PODMAN_RUN_FLAGS, *terminal, image, *command], timeout=timeout
    )


def ctr_pull_and_run(image: str, base: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """Pull `image` (HOST/NAME:TAG, plain HTTP) into a private containerd and run `command` in it."""
    with daemons.containerd(base) as socket:
        ctr = ["ctr", "--address", str(socket)]
        run([*ctr, "image", "pull", "--plain-http", image])
        return run([*ctr, "run", "--rm", image, "nixery-test", *command])


def skopeo_to_oci(image: str, layout: Path, tag: str = "img") -> None:
    run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{image}", f"oci:{layout}:{tag}"])


def unpack_oci(layout: Path, bundle: Path, tag: str = "img") -> Path:
    """Unpack with umoci; returns the root file system."""
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    return bundle / "rootfs"


# The registry's long-running `nix repl` (nixery/nix/evaluator.py) gets one line per
# image evaluation: each is logged like a `nix-instantiate --eval` call, so that
# counts of evaluations hold whichever way the registry evaluates.
_REPL_TEE = """if [ "$1" = repl ]; then
  while IFS= read -r line; do
    case "$line" in '__nixeryRequest "'*) echo "nix-instantiate --eval (sent to nix repl)" >> {calls};; esac
    printf '%s\\n' "$line"
  done | {real} "$@"
  exit
fi
"""


def nix_counting_path(directory: Path) -> tuple[str, Path]:
    """Wrap Nix's commands so that every call is logged; returns (PATH, log file)."""
    calls = directory / "nix-calls.log"
    calls.touch()
    for tool in ("nix", "nix-instantiate", "nix-store", "nix-build"):
        real = shutil.which(tool)
        assert real, f"{tool} is not installed"
        wrapper = directory / tool
        repl_tee = _REPL_TEE.format(calls=calls, real=real) if tool == "nix" else ""
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n{repl_tee}exec {real} "$@"\n')
        wrapper.chmod(0o755)
    return f"{directory}:{os.environ['PATH']}", calls


def nix_call_count(calls: Path) -> int:
    return len(calls.read_text().splitlines())


def nix_calls_of(calls: Path, prefix: str) -> list[str]:
    return [line for line in calls.read_text().splitlines() if line.startswith(prefix)]


def busybox_set_with(directory: Path, attr: str, name: str, script: str) -> Path:
    """The busybox set plus the package `attr`: a derivation called `name` that runs
    `script` with busybox's sh (`$bb` is busybox's bin directory, `$out` the output)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "default.nix").write_text(
        f"""{{ system ? builtins.currentSystem, ... }}@args:
let base = import {REPOSITORY / "pkgs" / "busybox"} args; bb = "${{base.busybox}}/bin";
in base // {{
  {attr} = derivation {{
    name = "{name}"; inherit system; builder = "${{bb}}/sh";
    args = [ "-c" "{script.replace("$bb", "${bb}")}" ];
  }};
}}
"""
    )
    return directory


def slow_package_set(directory: Path, seconds: int = 3) -> Path:
    """The busybox set plus `slowpoke`, a package that takes `seconds` to build and
    is new on every call (so the build really runs and its progress can be watched)."""
    nonce = random.getrandbits(64)
    script = f"$bb/sleep {seconds}; $bb/mkdir -p $out/bin; echo 'echo slow {nonce}' > $out/bin/slowpoke"
    return busybox_set_with(directory, "slowpoke", "slowpoke-1.0", script)


def many_steps_set(directory: Path, steps: int) -> Path:
    """The busybox set plus `manysteps`, a package built from `steps` derivations, all new on
    every call: Nix builds each one, a `building` event each (a build with a long event list)."""
    nonce = random.getrandbits(64)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "default.nix").write_text(
        f"""{{ system ? builtins.currentSystem, ... }}@args:
let base = import {REPOSITORY / "pkgs" / "busybox"} args; bb = "${{base.busybox}}/bin";
  step = n: derivation {{
    name = "step-${{toString n}}"; inherit system; builder = "${{bb}}/sh";
    args = [ "-c" "echo {nonce} ${{toString n}} > $out" ];
  }};
in base // {{
  manysteps = derivation {{
    name = "manysteps-1.0"; inherit system; builder = "${{bb}}/sh";
    args = [ "-c" "${{bb}}/mkdir -p $out; ${{bb}}/cat ${{toString (builtins.genList step {steps})}} > $out/steps" ];
  }};
}}
"""
    )
    return directory
