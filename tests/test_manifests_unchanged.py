"""Issue 21 reshapes the code without changing what it serves: the same image
names, asked in the same order, give byte-identical manifests and configs.

The package as it was at a known-good commit (`BASELINE`) is taken from git into
a temporary directory, and a registry running it is compared with one running
this checkout: same package set (the busybox set), each with its own empty
storage, the same sequence of names. Images share packages, so each build's
layering depends on the layers earlier builds made (docs/layering.md): the
sequence checks that history too. Both manifest formats, with gzip layers and,
in a second pair of registries, zstd ones (a registry-wide setting).

Until 2026-12-03 the baseline was the commit before the refactor, and this
checkout's registry ran with issue 23's per-layer cost and issue 24's baseline
packages switched off to match it. Then the order of layers changed on purpose
(stored layers first, oldest first: docs/layering.md, "The order of layers",
checked in tests/test_grouping.py and tests/test_debian_set.py), and the
baseline moved to that commit. Both registries now run with the same, default
settings.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.registry import DOCKER_MANIFEST, OCI_MANIFEST, REPOSITORY, RegistryProcess

# The commit whose layering reuses a stored layer whole although another one the image reuses holds
# some of its paths, with joins below 0.3-0.45 of a layer's price (2026-12-05, night: `shell` is one store
# layer). Before it, the commit whose layering reuses a stored layer whole although it holds paths outside
# the closure, with joins below a fifth of a layer's price (2026-12-05: `cowsay/fortune/greet` has fewer
# layers), c33d0db258e8846733715be0ee0101d6028e957f; before that, the merge that gave every image
# /var/tmp (2026-12-04, every top layer changed), 4f0ebbbca63153a90e655d2a9cb08d7a93f91213; before that, the
# commit that linked the CA bundle at OpenSSL's default files, f7008c7186efcef3df8e78f6233cd3538073db15
# (the top layer of every image with a CA bundle changed); the one that gave every image /etc/hosts,
# dacb07a8a278b7526df080d86a793d2028e9bfe1 (every top layer changed); the one that gave images
# without a shell package the closure's /bin/sh and /usr/bin/env,
# 14ff2137bf2ae4b8d61bd748add409b103b122d6 (`hello`'s top layer changed); the commit that put
# stored layers first, oldest first (2026-12-03), 043850ae9d658f3c304ca1c3c27342cb0c766c3a;
# before that, the last commit before the issue-21 refactor, 08ddb890f0a28e36784266bfb30223c8afc0d095.
# Move it forward only to a commit whose manifests are known to be right, e.g. once a
# change that is meant to alter manifests (a new layout or config field) has landed.
BASELINE = "0013354acb3a5a1d7e70b1d9fffdd0abf1c49566"

BUSYBOX_SET = REPOSITORY / "pkgs" / "busybox"

# Asked in this order of both registries. `hello` and `shell/hello` share a layer
# with what came before, `figlet`, `greet` and `cowsay` share `libwords`, and
# `hello/shell` is `shell/hello` asked again under another order.
IMAGES = ["shell", "hello", "shell/hello", "figlet/greet", "cowsay/fortune/greet", "shell/figlet/hello", "hello/shell"]


@pytest.fixture(scope="module")
def baseline_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the `nixery` package as it was at `BASELINE`."""
    found = subprocess.run(
        ["git", "-C", str(REPOSITORY), "cat-file", "-e", f"{BASELINE}^{{commit}}"], capture_output=True, text=True
    )
    if found.returncode != 0:
        pytest.fail(
            f"the baseline commit {BASELINE} is not in this clone's history ({found.stderr.strip()}); "
            "this test needs a clone with full history (git fetch --unshallow)"
        )
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", "--format=tar", BASELINE, "nixery"], capture_output=True, check=True
    )
    tree = tmp_path_factory.mktemp("baseline")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    return tree


def baseline_env(tree: Path) -> dict[str, str]:
    """The environment that makes `python -m nixery` import the package in `tree`: on
    PYTHONPATH, and without the working directory (this checkout) put before it."""
    return {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}


def test_the_baseline_registry_runs_the_baseline_code(baseline_tree: Path) -> None:
    """Else the comparison below would compare this checkout with itself."""
    imported = subprocess.run(
        [sys.executable, "-c", "import nixery; print(nixery.__file__)"],
        capture_output=True, text=True, check=True, cwd=REPOSITORY, env={**os.environ, **baseline_env(baseline_tree)},
    ).stdout.strip()
    assert Path(imported) == baseline_tree / "nixery" / "__init__.py"


def _pull(registry: RegistryProcess, name: str, accept: str) -> tuple[str, bytes, bytes]:
    """(the digest header, the manifest's bytes, the config blob's bytes)."""
    status, headers, manifest = registry.request(f"/v2/{name}/manifests/latest", accept=accept)
    assert status == 200, (registry.url, name, accept, status, manifest[:2000])
    config_digest = json.loads(manifest)["config"]["digest"]
    status, _, config = registry.request(f"/v2/{name}/blobs/{config_digest}", accept=None)
    assert status == 200, (registry.url, name, config_digest, status)
    return headers["Docker-Content-Digest"], manifest, config


@pytest.mark.parametrize(
    ("compression", "formats"),
    [("gzip", [DOCKER_MANIFEST, OCI_MANIFEST]), ("zstd", [OCI_MANIFEST])],  # zstd layers need OCI manifests
)
def test_manifests_are_those_the_baseline_serves(
    start_registry: Callable[..., RegistryProcess], baseline_tree: Path, compression: str, formats: list[str]
) -> None:
    settings = {"NIXERY_PKGS_PATH": str(BUSYBOX_SET), "NIXERY_LAYER_COMPRESSION": compression}
    before = start_registry(**settings, **baseline_env(baseline_tree))
    after = start_registry(**settings)
    for name in IMAGES:
        for accept in formats:
            old_digest, old_manifest, old_config = _pull(before, name, accept)
            new_digest, new_manifest, new_config = _pull(after, name, accept)
            where = f"{name} ({accept}, {compression})"
            old_layers = [layer["digest"] for layer in json.loads(old_manifest)["layers"]]
            new_layers = [layer["digest"] for layer in json.loads(new_manifest)["layers"]]
            assert new_layers == old_layers, f"{where}: other layers"
            assert new_manifest == old_manifest, f"{where}: another manifest"
            assert new_config == old_config, f"{where}: another config"
            assert new_digest == old_digest, f"{where}: another digest header"
