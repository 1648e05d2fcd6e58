"""nginx in front of the registry, as deploy/nginx/nixery.conf ships it: the
registry answers every request (and checks it), nginx sends the layer bytes;
with NIXERY_VERIFIED_BLOB_LINKS, nginx sends blobs the registry has already
hashed without asking it again.

Real nginx, real clients: skopeo and podman pull through the front and run
the image while the registry itself sends no blob byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixery.auth import hash_password
from nixery.config import ConfigError, load
from nixery.storage.base import CorruptBlob
from nixery.storage.filesystem import FilesystemStorage
from tests import daemons
from tests.registry import RegistryProcess, free_port, have, podman_run, run, skopeo_to_oci, unpack_oci

needs_nginx = pytest.mark.skipif(not have("nginx"), reason="needs nginx (nginx-light)")

PREFIX = "/_nixery_blobs/"


@dataclass
class Front:
    registry: RegistryProcess
    host: str  # nginx's HOST:PORT

    def get(
        self, path: str, accept: str | None = None, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        return daemons.http_request(self.host, path, method=method, accept=accept, headers=headers)


def _front(start_registry, tmp_path: Path, **env: str) -> Iterator[Front]:
    storage = tmp_path / "storage"
    registry = start_registry(storage, NIXERY_BUNDLED_SET="busybox", NIXERY_BLOB_ACCEL_REDIRECT=PREFIX, **env)
    port = free_port()
    site = daemons.nginx_front_site(listen=port, upstream=registry.host, storage=storage)
    config = daemons.nginx_config(tmp_path / "nginx", site, workers="1")
    with daemons.nginx(tmp_path / "nginx", config, port):
        yield Front(registry, f"127.0.0.1:{port}")


@pytest.fixture
def front(start_registry, tmp_path: Path) -> Iterator[Front]:
    """Every blob request goes to the registry (NIXERY_BLOB_ACCEL_REDIRECT alone)."""
    yield from _front(start_registry, tmp_path)


@pytest.fixture
def trusting_front(start_registry, tmp_path: Path) -> Iterator[Front]:
    """The registry believes nginx's X-Forwarded-For (NIXERY_TRUSTED_PROXIES)."""
    yield from _front(start_registry, tmp_path, NIXERY_TRUSTED_PROXIES="127.0.0.1")


@pytest.fixture
def public_front(start_registry, tmp_path: Path) -> Iterator[Front]:
    """nginx also sends blobs the registry has found intact without asking it."""
    yield from _front(start_registry, tmp_path, NIXERY_VERIFIED_BLOB_LINKS="true")


def blob_requests_seen_by_registry(registry: RegistryProcess) -> list[str]:
    return [e["path"] for e in registry.log_events("http.request") if "/blobs/" in e["path"]]


def blob_bytes_sent_by_registry(registry: RegistryProcess) -> float:
    status, _, body = registry.request("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("nixery_blob_served_bytes_total "):
            return float(line.split()[1])
    raise AssertionError("no nixery_blob_served_bytes_total in /metrics")


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
    assert headers["Cache-Control"] == "max-age=31536000"  # nginx passes the registry's on
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


def _clients_logged(registry: RegistryProcess, path: str) -> list[str]:
    return [e["client"] for e in registry.log_events("http.request") if e["path"] == path]


@needs_nginx
def test_behind_a_trusted_proxy_the_log_names_the_client_it_forwarded(trusting_front: Front) -> None:
    # nginx appends the address it was reached from (127.0.0.1, trusted) to what it was sent: a
    # client behind another proxy sends one. The first untrusted address from the right is the client.
    trusting_front.get("/v2/named-client", headers={"X-Forwarded-For": "203.0.113.7"})
    trusting_front.get("/v2/nginx-itself")
    assert _clients_logged(trusting_front.registry, "/v2/named-client") == ["203.0.113.7"]
    assert _clients_logged(trusting_front.registry, "/v2/nginx-itself") == ["127.0.0.1"]


@needs_nginx
def test_behind_a_trusted_proxy_links_name_the_host_the_client_used_not_one_it_chose(trusting_front: Front) -> None:
    """nginx sets X-Forwarded-Host itself: one a client sends does not reach the registry, which
    would believe it from nginx (the pages' pull commands, the token realm, signatures)."""
    status, _, page = trusting_front.get("/", accept="text/html", headers={"X-Forwarded-Host": "evil.example"})
    assert status == 200 and f"serving <code>{trusting_front.host}</code>".encode() in page, page[-600:]
    assert b"evil.example" not in page


@needs_nginx
def test_without_trusted_proxies_a_forwarded_address_is_not_believed(front: Front) -> None:
    front.get("/v2/named-client", headers={"X-Forwarded-For": "203.0.113.7"})
    assert _clients_logged(front.registry, "/v2/named-client") == ["127.0.0.1"]


@pytest.mark.parametrize("prefix", ["_blobs/", "/_blobs", "/a b/", "/x?y/", "/%2e/"])
def test_the_prefix_must_be_a_plain_absolute_path(prefix: str) -> None:
    with pytest.raises(ConfigError, match=r"^NIXERY_BLOB_ACCEL_REDIRECT="):
        load({"NIXERY_BLOB_ACCEL_REDIRECT": prefix})
    assert load({"NIXERY_BLOB_ACCEL_REDIRECT": PREFIX}).blob_accel_redirect == PREFIX
    assert load({}).blob_accel_redirect is None


@pytest.mark.parametrize(("backend", "bucket"), [("s3", "S3_BUCKET"), ("gcs", "GCS_BUCKET")])
def test_the_prefix_needs_the_filesystem_store(backend: str, bucket: str) -> None:
    """With a bucket backend the setting was accepted and ignored without a word (blobs went on
    being redirected to the bucket): it is refused, as NIXERY_VERIFIED_BLOB_LINKS is."""
    env = {"NIXERY_BLOB_ACCEL_REDIRECT": PREFIX, "NIXERY_STORAGE_BACKEND": backend, bucket: "nixery"}
    refused = rf"^NIXERY_BLOB_ACCEL_REDIRECT needs NIXERY_STORAGE_BACKEND=filesystem \(not {backend}\)"
    with pytest.raises(ConfigError, match=refused):
        load(env)
    assert load({**env, "NIXERY_STORAGE_BACKEND": "filesystem"}).blob_accel_redirect == PREFIX


# ---- NIXERY_VERIFIED_BLOB_LINKS: nginx sends blobs the registry has checked ----------


@needs_nginx
def test_a_verified_blob_is_sent_by_nginx_without_asking_the_registry(public_front: Front) -> None:
    _, manifest = public_front.registry.manifest("shell/hello")
    layer = manifest["layers"][0]
    path = f"/v2/shell/hello/blobs/{layer['digest']}"
    first = public_front.get(path)
    assert blob_requests_seen_by_registry(public_front.registry) == [path]  # hashed by the registry first
    # From now on nginx alone: other names, GET and HEAD, same bytes and headers.
    for method, name in (("GET", "shell/hello"), ("GET", "hello"), ("HEAD", "shell/hello")):
        status, headers, body = public_front.get(f"/v2/{name}/blobs/{layer['digest']}", method=method)
        assert status == 200
        assert body == (first[2] if method == "GET" else b"")
        assert int(headers["Content-Length"]) == layer["size"]
        assert headers["Content-Type"] == "application/octet-stream"
        assert headers["Docker-Content-Digest"] == layer["digest"]
        assert headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert headers["ETag"] == f'"{layer["digest"]}"'
        assert headers["Cache-Control"] == "max-age=31536000"  # as the registry says it
    assert "sha256:" + hashlib.sha256(first[2]).hexdigest() == layer["digest"]
    assert blob_requests_seen_by_registry(public_front.registry) == [path]


@needs_nginx
def test_what_nginx_cannot_answer_gets_the_registrys_own_errors(public_front: Front) -> None:
    _, manifest = public_front.registry.manifest("shell/hello")
    layer = manifest["layers"][0]["digest"]
    assert public_front.get(f"/v2/shell/hello/blobs/{layer}")[0] == 200  # now linked
    status, _, body = public_front.get(f"/v2/shell/hello/blobs/{layer}", method="DELETE")
    assert status == 405 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    status, _, body = public_front.get(f"/v2/shell/hello/blobs/sha256:{'1' * 64}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    status, _, body = public_front.get(f"/v2/shell/hello/blobs/sha256:{layer[7:20]}")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"


@needs_nginx
def test_a_blob_corrupted_after_its_check_is_withdrawn_by_nixery_check(public_front: Front, tmp_path: Path) -> None:
    _, manifest = public_front.registry.manifest("shell/cowsay")
    layer = manifest["layers"][0]["digest"]
    path = f"/v2/shell/cowsay/blobs/{layer}"
    assert public_front.get(path)[0] == 200
    storage = tmp_path / "storage"
    with open(storage / "blobs" / "sha256" / layer[7:9] / layer[7:], "r+b") as blob:  # the same inode as the link
        blob.write(b"rot")
    result = run([sys.executable, "-m", "nixery", "check"], env_extra={"STORAGE_PATH": str(storage)}, check=False)
    assert result.returncode == 1 and layer in result.stdout
    status, _, body = public_front.get(path)  # nginx no longer sends it; the registry hashes it again
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"


@needs_nginx
@pytest.mark.clients
@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
def test_a_second_skopeo_pull_gets_every_blob_from_nginx_alone(public_front: Front, tmp_path: Path) -> None:
    skopeo_to_oci(f"{public_front.host}/shell/hello", tmp_path / "first")
    seen = blob_requests_seen_by_registry(public_front.registry)
    assert seen, "the first pull's blobs are checked by the registry"
    skopeo_to_oci(f"{public_front.host}/shell/hello", tmp_path / "second")
    assert blob_requests_seen_by_registry(public_front.registry) == seen
    rootfs = unpack_oci(tmp_path / "second", tmp_path / "bundle")
    assert run(["chroot", str(rootfs), "/bin/sh", "-c", "hello"]).stdout == "Hello, world!\n"
    assert blob_bytes_sent_by_registry(public_front.registry) == 0


def test_links_follow_their_blobs(tmp_path: Path) -> None:
    """Linked only once hashed; unlinked when deleted, quarantined or found corrupt; gone on restart."""

    async def scenario() -> None:
        store = FilesystemStorage(tmp_path, verified_links=True)
        intact, damaged = await store.put_blob_bytes(b"layer one"), await store.put_blob_bytes(b"layer two")
        assert not store.verified_link(intact).exists()
        await store.blob_source(intact, allow_redirect=False)
        assert os.path.samefile(store.verified_link(intact), store.blob_path(intact))
        await store.delete_blob(intact)
        assert not store.verified_link(intact).exists() and not store.blob_path(intact).exists()

        await store.blob_source(damaged, allow_redirect=False)
        store.blob_path(damaged).write_bytes(b"rot")  # in place: the link shows the same bytes
        assert await store.verify_blob(damaged) is False
        assert not store.verified_link(damaged).exists()
        with pytest.raises(CorruptBlob):
            await store.blob_source(damaged, allow_redirect=False)

        again = await store.put_blob_bytes(b"layer three")
        await store.blob_source(again, allow_redirect=False)
        assert store.verified_link(again).exists()
        FilesystemStorage(tmp_path)  # a restart (with or without links): every blob is hashed again first
        assert not store.verified_link(again).exists() and store.blob_path(again).exists()

    asyncio.run(scenario())


def test_without_the_setting_nothing_is_linked(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = FilesystemStorage(tmp_path)
        digest = await store.put_blob_bytes(b"layer")
        await store.blob_source(digest, allow_redirect=False)
        assert not (tmp_path / "verified").exists()

    asyncio.run(scenario())


def test_links_need_the_filesystem_and_anonymous_pulls(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('a-secret', log_n=10)}:pull\n")
    assert load({"NIXERY_VERIFIED_BLOB_LINKS": "true"}).verified_blob_links
    assert not load({}).verified_blob_links
    with pytest.raises(ConfigError, match="NIXERY_STORAGE_BACKEND=filesystem"):
        load({"NIXERY_VERIFIED_BLOB_LINKS": "true", "NIXERY_STORAGE_BACKEND": "s3", "S3_BUCKET": "nixery"})
    private = {"NIXERY_VERIFIED_BLOB_LINKS": "true", "NIXERY_AUTH": "basic", "NIXERY_AUTH_USERS": str(users)}
    with pytest.raises(ConfigError, match="NIXERY_AUTH_ANONYMOUS_PULL=true"):
        load(private)
    assert load({**private, "NIXERY_AUTH_ANONYMOUS_PULL": "true"}).verified_blob_links
