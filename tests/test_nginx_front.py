"""nginx in front of the registry, as deploy/nginx/nixery.conf ships it: the
registry answers every request (and checks it), nginx sends the layer bytes.

Real nginx, real clients: skopeo and podman pull through the front and run
the image while the registry itself sends no blob byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixery.config import ConfigError, load
from tests import daemons
from tests.registry import RegistryProcess, free_port, have, podman_run, run, skopeo_to_oci, unpack_oci

needs_nginx = pytest.mark.skipif(not have("nginx"), reason="needs nginx (nginx-light)")

PREFIX = "/_nixery_blobs/"


@dataclass
class Front:
    registry: RegistryProcess
    host: str  # nginx's HOST:PORT

    def get(self, path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
        import http.client

        hostname, port = self.host.split(":")
        connection = http.client.HTTPConnection(hostname, int(port), timeout=300)
        try:
            connection.request("GET", path, headers={"Accept": accept} if accept else {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


@pytest.fixture
def front(start_registry, tmp_path: Path) -> Iterator[Front]:
    storage = tmp_path / "storage"
    registry = start_registry(storage, NIXERY_BUNDLED_SET="busybox", NIXERY_BLOB_ACCEL_REDIRECT=PREFIX)
    port = free_port()
    site = daemons.nginx_front_site(listen=port, upstream=registry.host, storage=storage)
    config = daemons.nginx_config(tmp_path / "nginx", site, workers="1")
    with daemons.nginx(tmp_path / "nginx", config, port):
        yield Front(registry, f"127.0.0.1:{port}")


def blob_bytes_sent_by_registry(registry: RegistryProcess) -> float:
    status, _, body = registry.request("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("nixery_blob_bytes_served_total "):
            return float(line.split()[1])
    raise AssertionError("no nixery_blob_bytes_served_total in /metrics")


@needs_nginx
@pytest.mark.clients
@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
def test_skopeo_pulls_through_the_front_and_the_registry_sends_no_layer_bytes(front: Front, tmp_path: Path) -> None:
    skopeo_to_oci(f"{front.host}/shell/hello", tmp_path / "layout")
    rootfs = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    assert run(["chroot", str(rootfs), "/bin/sh", "-c", "hello && echo ok"]).stdout == "Hello, world!\nok\n"
    blob_requests = [e for e in front.registry.log_events("http.request") if "/blobs/" in e["path"]]
    assert blob_requests, "the registry saw no blob request: nginx served them without asking"
    assert blob_bytes_sent_by_registry(front.registry) == 0


@needs_nginx
@pytest.mark.clients
@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_podman_runs_an_image_pulled_through_the_front(front: Front) -> None:
    result = podman_run(f"{front.host}/shell/fortune", "sh", "-c", "fortune >/dev/null && echo ok")
    assert result.stdout.splitlines()[-1] == "ok"
    assert blob_bytes_sent_by_registry(front.registry) == 0


@needs_nginx
def test_blob_answers_through_the_front(front: Front) -> None:
    digest, manifest = front.registry.manifest("shell/hello")
    layer = manifest["layers"][0]["digest"]
    status, headers, body = front.get(f"/v2/shell/hello/blobs/{layer}")
    assert status == 200
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer
    assert int(headers["Content-Length"]) == manifest["layers"][0]["size"]
    assert headers["Docker-Content-Digest"] == layer
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
    # The internal location is not reachable by its own URL.
    status, _, _ = front.get(f"{PREFIX}sha256/{layer[7:9]}/{layer[7:]}")
    assert status == 404
    # Errors are the registry's own.
    status, _, body = front.get(f"/v2/shell/hello/blobs/sha256:{'0' * 64}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    # Manifests pass through unchanged.
    status, headers, _ = front.get("/v2/shell/hello/manifests/latest", accept=manifest["mediaType"])
    assert status == 200 and headers["Docker-Content-Digest"] == digest


@needs_nginx
def test_a_corrupt_blob_is_refused_before_nginx_would_send_it(front: Front, tmp_path: Path) -> None:
    _, manifest = front.registry.manifest("shell/cowsay")
    layer = manifest["layers"][0]["digest"]
    blob = tmp_path / "storage" / "blobs" / "sha256" / layer[7:9] / layer[7:]
    blob.write_bytes(b"not the layer")  # disk corruption, before anyone fetched it
    status, _, body = front.get(f"/v2/shell/cowsay/blobs/{layer}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert not blob.exists()  # quarantined; the next pull of the image rebuilds it


@pytest.mark.parametrize("prefix", ["_blobs/", "/_blobs", "/a b/", "/x?y/", "/%2e/"])
def test_the_prefix_must_be_a_plain_absolute_path(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"^NIXERY_BLOB_ACCEL_REDIRECT="):
        load({"NIXERY_BLOB_ACCEL_REDIRECT": prefix})
    assert load({"NIXERY_BLOB_ACCEL_REDIRECT": PREFIX}).blob_accel_redirect == PREFIX
    assert load({}).blob_accel_redirect is None
