"""NIXERY_NIX_ANNOTATIONS: each layer's descriptor lists the store paths the layer holds,
in the form nix-snapshotter reads (`nixery.registry.nix_snapshotter`), and clients that
know nothing of it still pull the image.

Against a real registry process on the busybox set; the annotations are compared with
what each layer's tarball holds; skopeo and podman pull the image (run under
`flock /tmp/clients.lock`). With the setting off (the default) nothing changes:
tests/test_manifests_unchanged.py.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery import config
from nixery.registry.nix_snapshotter import NIX_LAYER, NIX_STORE_PATH_PREFIX, nix_layer_annotations
from tests.registry import DOCKER_MANIFEST, OCI_MANIFEST, PODMAN_RUN_FLAGS, RegistryProcess, have, run, unpack_oci

pytestmark = pytest.mark.nix


def test_the_setting_is_off_by_default_and_read_as_a_boolean() -> None:
    assert config.load({}).nix_annotations is False
    assert config.load({"NIXERY_NIX_ANNOTATIONS": "true"}).nix_annotations is True
    with pytest.raises(config.ConfigError, match="NIXERY_NIX_ANNOTATIONS"):
        config.load({"NIXERY_NIX_ANNOTATIONS": "maybe"})


def test_the_annotations_are_nix_snapshotters() -> None:
    assert nix_layer_annotations(["/nix/store/a-glibc", "/nix/store/b-hello"]) == {
        "containerd.io/snapshot/nix-layer": "true",
        "containerd.io/snapshot/nix-store-path.0": "/nix/store/a-glibc",
        "containerd.io/snapshot/nix-store-path.1": "/nix/store/b-hello",
    }
    assert nix_layer_annotations([]) == {}


def _store_paths_in(registry: RegistryProcess, name: str, digest: str) -> set[str]:
    """The store paths a layer's tarball holds: `/nix/store/<name>` of each entry under nix/store."""
    status, _, blob = registry.request(f"/v2/{name}/blobs/{digest}", accept=None)
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        parts = (member.name.lstrip("./").split("/") for member in tar.getmembers())
        return {"/" + "/".join(part[:3]) for part in parts if part[:2] == ["nix", "store"] and len(part) >= 3}


def _annotated_paths(layer: dict) -> list[str] | None:
    annotations = layer.get("annotations")
    if annotations is None:
        return None
    assert annotations[NIX_LAYER] == "true"
    paths = {
        int(key.removeprefix(NIX_STORE_PATH_PREFIX)): value for key, value in annotations.items() if key != NIX_LAYER
    }
    assert sorted(paths) == list(range(len(paths)))  # numbered from 0, none missing
    return [paths[number] for number in range(len(paths))]


def test_each_layer_lists_exactly_the_store_paths_it_holds(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    storage = tmp_path / "shared-storage"
    plain = start_registry(storage, NIXERY_BUNDLED_SET="busybox")
    plain_digest, plain_manifest = plain.manifest("shell/greet")
    assert all("annotations" not in layer for layer in plain_manifest["layers"])
    plain.stop()
    # The same storage: the setting gives other manifests, not the records built without it.
    registry = start_registry(storage, NIXERY_BUNDLED_SET="busybox", NIXERY_NIX_ANNOTATIONS="true")
    for accept in (DOCKER_MANIFEST, OCI_MANIFEST):
        digest, manifest = registry.manifest("shell/greet", accept=accept)
        assert digest != plain_digest
        assert [one["digest"] for one in manifest["layers"]] == [one["digest"] for one in plain_manifest["layers"]]
        *held, entry_points = manifest["layers"]
        assert _annotated_paths(entry_points) is None
        assert not _store_paths_in(registry, "shell/greet", entry_points["digest"])
        for layer in held:
            annotated = _annotated_paths(layer)
            assert annotated and annotated == sorted(annotated)
            assert set(annotated) == _store_paths_in(registry, "shell/greet", layer["digest"]), layer["digest"]
        every = [path for layer in held for path in _annotated_paths(layer) or []]
        assert any(path.endswith("-greet-0.3") for path in every) and len(every) == len(set(every))


@pytest.mark.skipif(not (have("skopeo") and have("umoci") and have("podman")), reason="needs skopeo, umoci, podman")
def test_clients_pull_an_annotated_image(start_registry: Callable[..., RegistryProcess], tmp_path: Path) -> None:
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_NIX_ANNOTATIONS="true")
    image = f"{registry.host}/shell/hello"
    for fmt, layout in ((None, "oci"), ("v2s2", "docker")):
        flags = [] if fmt is None else ["--format", fmt]
        run(["skopeo", "copy", "--src-tls-verify=false", *flags, f"docker://{image}", f"oci:{tmp_path / layout}:img"])
    root = unpack_oci(tmp_path / "oci", tmp_path / "bundle")
    assert (root / "bin" / "hello").exists()
    try:
        pulled = ["podman", "run", "--rm", "--pull", "always", "--tls-verify=false", *PODMAN_RUN_FLAGS, image]
        assert "Hello, world!" in run([*pulled, "hello"]).stdout
    finally:
        run(["podman", "rmi", "-f", image], check=False)
    _, manifest = registry.manifest("shell/hello")
    assert _annotated_paths(manifest["layers"][0])  # the image pulled was the annotated one
