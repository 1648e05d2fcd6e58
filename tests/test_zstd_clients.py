"""A registry started with NIXERY_LAYER_COMPRESSION=zstd, pulled by real clients:
skopeo, podman and containerd unpack zstd layers; Docker Engine 20.10 cannot
and is told so by the registry instead of failing on the layers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from nixery.registry.mediatypes import OCI_LAYER_ZSTD
from tests import daemons
from tests.registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    RegistryProcess,
    ctr_pull_and_run,
    have,
    podman_run,
    run,
    skopeo_to_oci,
)

pytestmark = [pytest.mark.nix, pytest.mark.clients]

IMAGE = "shell/hello"
DOCKER_REFUSAL = (
    "Docker Engine 20.10 cannot unpack zstd layers; this registry was started with NIXERY_LAYER_COMPRESSION=zstd"
)


@pytest.fixture(scope="module")
def zstd_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    base = tmp_path_factory.mktemp("zstd-registry")
    registry = RegistryProcess(
        storage=base / "storage",
        env={"NIXERY_BUNDLED_SET": "busybox", "NIXERY_LAYER_COMPRESSION": "zstd"},
        log_path=base / "registry.log",
    )
    registry.start()
    yield registry
    registry.stop()


def _blob(registry: RegistryProcess, digest: str) -> bytes:
    status, _, body = registry.request(f"/v2/{IMAGE}/blobs/{digest}", accept=None)
    assert status == 200, (status, body[:500])
    return body


def _error(registry: RegistryProcess, **request) -> dict:
    status, _, body = registry.request(f"/v2/{IMAGE}/manifests/latest", **request)
    assert status == 404, (status, body[:500])
    (error,) = json.loads(body)["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    return error


def test_layers_are_zstd_in_an_oci_manifest(zstd_registry: RegistryProcess) -> None:
    digest, manifest = zstd_registry.manifest(IMAGE, accept=OCI_MANIFEST)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert {layer["mediaType"] for layer in manifest["layers"]} == {OCI_LAYER_ZSTD}
    config = json.loads(_blob(zstd_registry, manifest["config"]["digest"]))
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        compressed = _blob(zstd_registry, layer["digest"])
        assert f"sha256:{hashlib.sha256(compressed).hexdigest()}" == layer["digest"]
        tar = zstandard.ZstdDecompressor().decompressobj().decompress(compressed)
        assert f"sha256:{hashlib.sha256(tar).hexdigest()}" == diff_id
    # A client that takes any format gets the only one the image has.
    assert zstd_registry.manifest(IMAGE, accept="*/*")[0] == digest


def test_a_docker_schema_2_only_client_is_told_why(zstd_registry: RegistryProcess) -> None:
    error = _error(zstd_registry, accept=DOCKER_MANIFEST)
    assert "zstd layers" in error["message"] and "need OCI manifests" in error["message"]


def test_docker_engine_20_is_refused_by_tag_and_by_digest(zstd_registry: RegistryProcess) -> None:
    digest, _ = zstd_registry.manifest(IMAGE, accept=OCI_MANIFEST)
    old = {"User-Agent": "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 os/linux arch/amd64"}
    assert _error(zstd_registry, accept=[DOCKER_MANIFEST, OCI_MANIFEST], headers=old)["message"].startswith(
        DOCKER_REFUSAL
    )
    status, _, body = zstd_registry.request(f"/v2/{IMAGE}/manifests/{digest}", accept=OCI_MANIFEST, headers=old)
    assert status == 404 and DOCKER_REFUSAL in body.decode(), (status, body[:500])
    newer = {"User-Agent": "docker/24.0.7 go/go1.20.10 git-commit/311b9ff os/linux arch/amd64"}
    status, headers, _ = zstd_registry.request(f"/v2/{IMAGE}/manifests/{digest}", accept=OCI_MANIFEST, headers=newer)
    assert status == 200 and headers["Docker-Content-Digest"] == digest


def test_switching_the_setting_never_mixes_the_layers(zstd_registry: RegistryProcess, start_registry) -> None:
    """A gzip registry on the same storage builds its own layers and manifests."""
    _, zstd_manifest = zstd_registry.manifest(IMAGE, accept=OCI_MANIFEST)
    gzip_registry = start_registry(zstd_registry.storage, NIXERY_BUNDLED_SET="busybox")
    _, docker_manifest = gzip_registry.manifest(IMAGE)
    _, oci_manifest = gzip_registry.manifest(IMAGE, accept=OCI_MANIFEST)
    assert {layer["mediaType"] for layer in oci_manifest["layers"]} == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    zstd_layers = {layer["digest"] for layer in zstd_manifest["layers"]}
    assert zstd_layers.isdisjoint(layer["digest"] for layer in docker_manifest["layers"])
    assert zstd_registry.manifest(IMAGE, accept=OCI_MANIFEST)[1] == zstd_manifest


@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_skopeo_copies_the_zstd_layers(zstd_registry: RegistryProcess, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    skopeo_to_oci(f"{zstd_registry.host}/{IMAGE}", layout)
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    copied = json.loads((layout / "blobs" / "sha256" / entry["digest"].removeprefix("sha256:")).read_text())
    assert {layer["mediaType"] for layer in copied["layers"]} == {OCI_LAYER_ZSTD}


@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_podman_runs_a_zstd_image(zstd_registry: RegistryProcess) -> None:
    result = podman_run(f"{zstd_registry.host}/{IMAGE}", "sh", "-c", "hello && echo ok")
    assert result.stdout.splitlines()[-2:] == ["Hello, world!", "ok"]


@pytest.mark.skipif(not (have("containerd") and have("ctr")), reason="needs containerd and ctr")
def test_containerd_pulls_and_runs_a_zstd_image(zstd_registry: RegistryProcess, tmp_path: Path) -> None:
    image = f"{zstd_registry.host}/{IMAGE}:latest"
    result = ctr_pull_and_run(image, tmp_path / "containerd", "sh", "-c", "echo ok")
    assert result.stdout.splitlines()[-1] == "ok"


@pytest.mark.skipif(not have("dockerd"), reason="needs docker.io (dockerd)")
def test_docker_engine_20_is_refused_with_a_reason(zstd_registry: RegistryProcess) -> None:
    version = run(["dockerd", "--version"]).stdout  # "Docker version 20.10.24+dfsg1, build ..."
    if not version.startswith("Docker version 20.10"):
        pytest.skip(f"the refusal is for Docker Engine 20.10; this dockerd is {version.strip()}")
    # dockerd's containerd needs short socket paths (at most 104 bytes).
    base = Path(tempfile.mkdtemp(prefix="nixery-zstd-docker-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        socket = cleanup.enter_context(daemons.dockerd(base))
        seen_before = len(zstd_registry.log_events("http.request"))
        pulled = run(["docker", "-H", f"unix://{socket}", "pull", f"{zstd_registry.host}/{IMAGE}"], check=False)
    assert pulled.returncode != 0
    assert DOCKER_REFUSAL in pulled.stderr, pulled.stderr
    # Refused at the manifest: no layer was downloaded to fail on.
    during = zstd_registry.log_events("http.request")[seen_before:]
    answers = {(entry["path"], entry["status"]) for entry in during if entry["path"].startswith(f"/v2/{IMAGE}/")}
    assert answers == {(f"/v2/{IMAGE}/manifests/latest", 404)}, during
