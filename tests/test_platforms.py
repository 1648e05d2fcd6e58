"""NIXERY_PLATFORMS: one name, an image for every platform, joined by an image index.

The setting and the record and index documents are checked in this process;
the rest against real registry processes (the busybox set: its aarch64
packages are Debian's arm64 busybox, built by this x86_64 machine's Nix), and
real clients (skopeo, podman), which run the arm64 image under qemu-user-static
(binfmt_misc, set up by scripts/install-system-deps.sh: without it the
emulated runs fail, they are not skipped). The Debian set's clients are in
tests/test_platforms_debian.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from nixery import config
from nixery.errors import ManifestUnknown
from nixery.images import ImageRecord, ManifestRef
from nixery.platforms import every_platform, index_image, parse_platforms
from nixery.registry.descriptors import is_index
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor
from nixery.registry.mediatypes import DOCKER_MANIFEST_LIST, OCI_INDEX, Compression, ManifestFormat
from nixery.registry.names import Arch, parse_image_name
from nixery.registry.negotiation import check_acceptable, choose
from tests import daemons
from tests.registry import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    PODMAN_RUN_FLAGS,
    RegistryProcess,
    free_port,
    have,
    run,
    unpack_oci,
)
from tests.test_sources import BUNDLED_BUSYBOX, error_of

BOTH = "linux/amd64,linux/arm64"
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


# ---- the setting ------------------------------------------------------------


def test_platforms_default_to_the_hosts_and_are_read_sorted() -> None:
    assert config.load({}).platforms == (Arch.AMD64,)  # this machine is x86_64
    assert config.load({"NIXERY_PLATFORMS": " linux/arm64, LINUX/AMD64,linux/arm64"}).platforms == (
        Arch.AMD64, Arch.ARM64,
    )


@pytest.mark.parametrize("raw", ["linux/s390x", "arm64", "linux/amd64,,linux/arm64", "windows/amd64", "linux/arm64/v7"])
def test_an_unknown_platform_is_a_one_line_config_error(raw: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load({"NIXERY_PLATFORMS": raw})
    message = str(caught.value)
    assert "\n" not in message and "NIXERY_PLATFORMS" in message and "linux/amd64, linux/arm64" in message


def test_arm64_written_with_its_default_variant_is_arm64() -> None:
    """`linux/arm64/v8`, as Docker users write it (the OCI index's default variant of arm64), was
    refused as an unknown platform."""
    assert config.load({"NIXERY_PLATFORMS": "linux/amd64, linux/arm64/v8"}).platforms == parse_platforms(BOTH)


def test_only_names_without_a_platform_ask_for_every_platform() -> None:
    both = parse_platforms(BOTH)
    plain = every_platform(parse_image_name("shell/curl"), both)
    assert plain.platforms == both and plain.arch is Arch.AMD64 and plain.display_name == "shell/curl"
    assert every_platform(parse_image_name("arm64/shell"), both).platforms == ()
    assert every_platform(parse_image_name("shell"), (Arch.AMD64,)).platforms == ()


# ---- the record and the index documents -------------------------------------


def _record(arch: str, seed: str) -> ImageRecord:
    def digest(what: str) -> Digest:
        return Digest.of(f"{seed}-{what}".encode())

    return ImageRecord(
        key=f"key-{arch}", name="shell", source="bundled", revision="r1", packages=("shell",), architecture=arch,
        config=digest("config"),
        manifests={fmt: ManifestRef(digest(fmt.name), 500) for fmt in ManifestFormat},
        layers=(LayerDescriptor(digest("layer"), digest("diff"), 1000, "a"),),
        built_at=1.0, layer_paths=(("/nix/store/a",),),
    )


def test_the_index_is_the_same_whatever_order_the_platforms_were_built_in() -> None:
    amd64, arm64 = _record("amd64", "a"), _record("arm64", "b")
    first, documents = index_image("k", [amd64, arm64], Arch.AMD64)
    second, again = index_image("k", [arm64, amd64], Arch.AMD64)
    assert documents == again and first == second
    oci, docker = (json.loads(document) for document in documents)
    assert oci["mediaType"] == OCI_INDEX and docker["mediaType"] == DOCKER_MANIFEST_LIST
    assert [m["platform"] for m in oci["manifests"]] == [
        {"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"},
    ]
    assert [m["digest"] for m in oci["manifests"]] == [
        str(amd64.manifests[ManifestFormat.OCI].digest), str(arm64.manifests[ManifestFormat.OCI].digest),
    ]
    assert {m["mediaType"] for m in docker["manifests"]} == {DOCKER_MANIFEST}


def test_an_index_record_names_every_platforms_blobs_and_reads_back() -> None:
    amd64, arm64 = _record("amd64", "a"), _record("arm64", "b")
    record, documents = index_image("k", [amd64, arm64], Arch.AMD64)
    assert record.blobs() == amd64.blobs() | arm64.blobs() | {Digest.of(document) for document in documents}
    assert ImageRecord.from_json(record.to_json()) == record
    assert ImageRecord.from_json(record.to_json()).descriptors == record.descriptors
    # One platform's record is written as before indexes existed.
    assert b"indexes" not in amd64.to_json() and b"platforms" not in amd64.to_json()


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ([OCI_INDEX, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, OCI_MANIFEST], OCI_INDEX),
        ([DOCKER_MANIFEST_LIST, DOCKER_MANIFEST], DOCKER_MANIFEST_LIST),
        ([DOCKER_MANIFEST, OCI_MANIFEST], DOCKER_MANIFEST),
        ([OCI_MANIFEST], OCI_MANIFEST),
        ([], DOCKER_MANIFEST),
        ([OCI_INDEX], OCI_INDEX),
    ],
)
def test_negotiation_over_an_index_record(accept: list[str], expected: str) -> None:
    amd64, arm64 = _record("amd64", "a"), _record("arm64", "b")
    record, _ = index_image("k", [arm64, amd64], Arch.AMD64)
    chosen = choose(record.descriptors, accept, "skopeo/1.9.3", Compression.GZIP)
    assert chosen.media_type == expected
    if not is_index(expected):  # a client that takes no index gets the host platform's manifest
        assert chosen.platform is not None and chosen.platform.architecture == "amd64"
        assert chosen.digest in {ref.digest for ref in amd64.manifests.values()}


def test_a_client_that_takes_only_an_index_is_refused_only_where_there_is_none() -> None:
    check_acceptable([OCI_INDEX], "containerd/1.6", Compression.GZIP, indexed=True)
    with pytest.raises(ManifestUnknown):
        check_acceptable([OCI_INDEX], "containerd/1.6", Compression.GZIP)


# ---- real registries ----------------------------------------------------------


def _manifest(
    registry: RegistryProcess, name: str, accept: list[str], reference: str = "latest"
) -> tuple[str, str, dict]:
    status, headers, body = registry.request(f"/v2/{name}/manifests/{reference}", accept=accept)
    assert status == 200, (name, accept, status, body[:2000])
    assert headers["Docker-Content-Digest"] == str(Digest.of(body))
    return headers["Docker-Content-Digest"], headers["Content-Type"], json.loads(body)


def _config(registry: RegistryProcess, name: str, manifest: dict) -> dict:
    status, _, body = registry.request(f"/v2/{name}/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200
    return json.loads(body)


def test_two_registries_give_the_same_index_and_each_platform_is_served(
    start_registry: Callable[..., RegistryProcess],
) -> None:
    first = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS=BOTH)
    second = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS=BOTH)
    every = [OCI_INDEX, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, OCI_MANIFEST]
    docker_only = [DOCKER_MANIFEST_LIST, DOCKER_MANIFEST]
    cases = ((every, OCI_INDEX, OCI_MANIFEST), (docker_only, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))
    for accept, index_type, manifest_type in cases:
        digest, media_type, index = _manifest(first, "shell", accept)
        assert (digest, media_type, index) == _manifest(second, "shell", accept), "another index on a fresh registry"
        assert media_type == index_type and index["mediaType"] == index_type
        assert [entry["platform"] for entry in index["manifests"]] == [
            {"architecture": "amd64", "os": "linux"}, {"architecture": "arm64", "os": "linux"},
        ]
        for entry in index["manifests"]:  # fetched by digest, as clients do
            entry_digest, entry_type, manifest = _manifest(first, "shell", [manifest_type], entry["digest"])
            assert entry_digest == entry["digest"] and entry_type == entry["mediaType"] == manifest_type
            assert _config(first, "shell", manifest)["architecture"] == entry["platform"]["architecture"]
    # A client that takes no index gets the host's (amd64) manifest, as on a one-platform registry.
    _, amd64_type, amd64 = _manifest(first, "shell", [DOCKER_MANIFEST, OCI_MANIFEST])
    assert amd64_type == DOCKER_MANIFEST and _config(first, "shell", amd64)["architecture"] == "amd64"
    # `arm64/NAME` is still the one arm64 manifest: the one the index names.
    arm64_digest, arm64_type, _ = _manifest(first, "arm64/shell", [OCI_INDEX, OCI_MANIFEST])
    _, _, index = _manifest(first, "shell", every)
    assert arm64_type == OCI_MANIFEST and arm64_digest == index["manifests"][1]["digest"]
    # Each platform has its own layering history; the host's keeps the keys it always had.
    meta = first.storage / "meta" / "layering"
    assert any((meta / "history").iterdir()) and any((meta / "aarch64-linux" / "history").iterdir())


def test_the_amd64_image_in_an_index_is_the_one_a_single_platform_registry_serves(
    start_registry: Callable[..., RegistryProcess],
) -> None:
    single = start_registry(NIXERY_BUNDLED_SET="busybox")
    both = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS=BOTH)
    digest, media_type, _ = _manifest(single, "shell/hello", [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST])
    assert media_type == OCI_MANIFEST  # one platform: no index, whatever the client accepts
    index_digest, _, index = _manifest(both, "shell/hello", [OCI_INDEX, OCI_MANIFEST])
    assert index["manifests"][0]["digest"] == digest
    # Spelt otherwise, the same index (stored under its resolved names' key, under that key's lock).
    assert _manifest(both, "Hello/Shell", [OCI_INDEX, OCI_MANIFEST])[0] == index_digest


def _set_with_an_amd64_only_name(tmp_path: Path) -> Path:
    """The busybox set plus `amd64only`, a name it has on x86_64 alone (as the Debian set's libcpuid16)."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f"let base = import {BUNDLED_BUSYBOX} {{ inherit system; }}; in\n"
        'base // (if system == "x86_64-linux" then { amd64only = base.hello; } else { })\n'
    )
    return pkgs


@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_a_name_one_platform_lacks_is_an_index_of_the_platforms_that_have_it(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    """A package set may lack a name on one platform (the Debian set's libcpuid16 is amd64-only):
    the name's index lists the platforms that have it, so amd64 clients pull it and an arm64
    client is told by its own client that there is no arm64 image; `arm64/NAME` says which
    platform lacks it."""
    pkgs = _set_with_an_amd64_only_name(tmp_path)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_PLATFORMS=BOTH)
    digest, media_type, index = _manifest(registry, "amd64only", [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST])
    assert media_type == OCI_INDEX
    assert [entry["platform"] for entry in index["manifests"]] == [{"architecture": "amd64", "os": "linux"}]
    assert _manifest(registry, "amd64only", [OCI_INDEX])[0] == digest  # the same index once built
    _, _, amd64 = _manifest(registry, "amd64only", [DOCKER_MANIFEST])  # a client that takes no index
    assert _config(registry, "amd64only", amd64)["architecture"] == "amd64"
    status, error = error_of(registry, "arm64/amd64only")
    assert (status, error["code"], error["detail"]["missing"]) == (404, "MANIFEST_UNKNOWN", ["amd64only"])
    assert "for linux/arm64" in error["message"] and error["detail"]["platform"] == "linux/arm64", error
    image = f"docker://{registry.host}/amd64only"
    arm64 = run(["skopeo", "inspect", "--override-arch", "arm64", "--tls-verify=false", image], check=False)
    assert arm64.returncode != 0 and "no image found in image index for architecture arm64" in arm64.stderr
    inspected = json.loads(run(["skopeo", "inspect", "--override-arch", "amd64", "--tls-verify=false", image]).stdout)
    assert inspected["Architecture"] == "amd64" and inspected["Digest"] == digest


def _set_whose_arm64_build_fails(tmp_path: Path) -> Path:
    """The busybox set plus `armfail`: `hello` on x86_64, and on aarch64 a package whose build
    fails (a package that does not build for one platform; its builder is this machine's)."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f"let base = import {BUNDLED_BUSYBOX} {{ inherit system; }};\n"
        f"    native = import {BUNDLED_BUSYBOX} {{ }}; in\n"
        'base // { armfail = if system == "x86_64-linux" then base.hello else derivation {\n'
        '  name = "armfail-1"; inherit system; builder = "${native.shell}/bin/sh";\n'
        '  args = [ "-c" "echo this package does not build for aarch64 >&2; exit 3" ]; }; }\n'
    )
    return pkgs


@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_a_platform_whose_build_fails_is_named_in_the_error(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    """A name whose aarch64 package does not build fails as a whole on a registry of both
    platforms (an index that lacked arm64 by accident would be cached as the image), but the
    error was Nix's alone: a user of either platform read of a failed derivation and could not
    tell that it was the arm64 image's. It now names the platform: in the message (which skopeo
    prints from the 500's status line), `detail.platform`, and the build's last event."""
    registry = start_registry(NIXERY_PKGS_PATH=str(_set_whose_arm64_build_fails(tmp_path)), NIXERY_PLATFORMS=BOTH)
    status, error = error_of(registry, "shell/armfail")
    assert (status, error["code"], error["detail"]["kind"]) == (500, "UNKNOWN", "BUILD_FAILED"), error
    assert error["message"].startswith("building the linux/arm64 image failed: "), error
    assert error["detail"]["platform"] == "linux/arm64", error
    assert "does not build for aarch64" in error["detail"]["log"], error
    inspected = run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/shell/armfail"],
                    check=False)
    assert inspected.returncode != 0 and "building the linux/arm64 image failed" in inspected.stderr, inspected.stderr

    def arm64_builds_failed() -> int:
        return sum(event["image"].startswith("arm64/") for event in registry.log_events("build.failed"))

    # skopeo's pull was answered from the failure remembered (NIXERY_FAILED_BUILD_TTL), saying so:
    # Nix did not build the arm64 package again, nor did the index's build start.
    assert "this build failed at " in inspected.stderr and arm64_builds_failed() == 1, registry.log()[-3000:]
    assert [e["image"] for e in registry.log_events("build.failure_remembered")] == ["shell/armfail"]
    # The build's last event says it too, and keeps Nix's error as its kind; a build asked for
    # explicitly runs the arm64 build again.
    post = urllib.request.Request(f"{registry.url}/builds", data=json.dumps({"image": "shell/armfail"}).encode(),
                                  headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(post, timeout=60) as answer:
        started = json.load(answer)
    with urllib.request.urlopen(registry.url + started["events"], timeout=300) as stream:  # ends with the build
        data = [line[len("data: "):] for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    last = json.loads(data[-1])
    assert last["stage"] == "failed" and last["error"] == "NixError", last
    assert last["message"].startswith("building the linux/arm64 image failed: "), last
    assert "this build failed at " not in last["message"] and arm64_builds_failed() == 2, last


@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_an_arm64_name_only_the_hosts_set_has_is_not_taken_for_a_typo(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    """`arm64/NAME` of a name the package set has for x86_64 only was answered as a misspelling,
    with the nearest arm64 names: the Debian set's `arm64/libcpuid16` got "did you mean
    libuuid1?". It now says that the set has it for linux/amd64 only (`detail.elsewhere`), and
    suggests nothing for it; a real typo in the same name still gets its nearest names."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "default.nix").write_text(  # `hellox`, x86_64 only, is one letter from `hello`
        "{ system ? builtins.currentSystem, ... }:\n"
        f"let base = import {BUNDLED_BUSYBOX} {{ inherit system; }}; in\n"
        'base // (if system == "x86_64-linux" then { hellox = base.hello; } else { })\n'
    )
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs))
    status, error = error_of(registry, "arm64/shell/hellox/figlett")
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN"), error
    assert "hellox (which it has for linux/amd64 only)" in error["message"], error
    assert "figlett (did you mean figlet?)" in error["message"], error
    assert error["detail"]["elsewhere"] == {"hellox": "linux/amd64"}, error
    assert error["detail"]["suggestions"] == {"figlett": ["figlet"]}, error
    assert error["detail"]["platform"] == "linux/arm64", error
    inspected = run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/arm64/hellox"], check=False)
    assert inspected.returncode != 0 and "hellox (which it has for linux/amd64 only)" in inspected.stderr, inspected


def test_an_index_type_refused_with_q_0_is_not_served(start_registry: Callable[..., RegistryProcess]) -> None:
    """`Accept: <index>;q=0, <OCI manifest>` (RFC 9110: q=0 is "not acceptable", a curl user's way
    to say "the manifest, not the index") was answered with the index: weights were dropped unread.
    Now a type refused so is not taken; other weights still only list what is accepted."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS=BOTH)
    _, media_type, _ = _manifest(registry, "hello", [f"{OCI_INDEX};q=0, {OCI_MANIFEST}"])
    assert media_type == OCI_MANIFEST
    refused_both = [f"{DOCKER_MANIFEST_LIST}; q=0.0", DOCKER_MANIFEST, OCI_INDEX + ";q=0"]
    _, media_type, _ = _manifest(registry, "hello", refused_both)
    assert media_type == DOCKER_MANIFEST
    _, media_type, _ = _manifest(registry, "hello", [f"{OCI_INDEX};q=0.1, {OCI_MANIFEST}"])
    assert media_type == OCI_INDEX  # a low weight is still accepted, and an index is what it names


def test_an_arm64_name_the_arm64_set_lacks_is_not_offered_to_build(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    """The image page and `nixery inspect` checked an unbuilt image's names against the host's
    package list only: `arm64/amd64only` (a name the set has on x86_64 alone, as the Debian set's
    libcpuid16) was "not built yet: pull it, or build it with `nixery build arm64/amd64only`", a
    build that can only fail. Now they check arm64's list, and say it lacks the name there."""
    pkgs = _set_with_an_amd64_only_name(tmp_path)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs))
    status, _, body = registry.request("/images/arm64/amd64only", accept="application/json")
    error = json.loads(body)["errors"][0]
    assert (status, error["code"], error["detail"]["missing"]) == (404, "MANIFEST_UNKNOWN", ["amd64only"]), error
    assert "for linux/arm64" in error["message"] and error["detail"]["platform"] == "linux/arm64", error
    assert "not been built" not in error["message"]
    inspected = run([sys.executable, "-m", "nixery", "inspect", "--registry", registry.url, "arm64/amd64only"],
                    check=False)
    assert inspected.returncode == 1 and "packages not found" in inspected.stderr, inspected.stderr
    assert "nixery build" not in inspected.stderr
    # the host's image of the name is still only not built yet
    status, _, body = registry.request("/images/amd64only", accept="application/json")
    assert status == 404 and "not been built yet" in json.loads(body)["errors"][0]["message"]


def test_a_registry_of_one_other_platform_serves_it_for_names_without_a_platform(
    start_registry: Callable[..., RegistryProcess],
) -> None:
    """NIXERY_PLATFORMS=linux/arm64 (as the default on an arm64 machine): a plain name is the
    arm64 image, the one `arm64/NAME` gives, not an amd64 one."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS="linux/arm64")
    every = [OCI_INDEX, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, OCI_MANIFEST]
    digest, media_type, manifest = _manifest(registry, "shell", every)
    assert media_type == DOCKER_MANIFEST  # one platform: one manifest, no index
    assert _config(registry, "shell", manifest)["architecture"] == "arm64"
    assert _manifest(registry, "arm64/shell", every)[0] == digest


# ---- real clients -------------------------------------------------------------


def elf_machine(path: Path) -> str | None:
    """The machine of an ELF file (e_machine), None for any other file."""
    with open(path, "rb") as handle:
        header = handle.read(20)
    if header[:4] != b"\x7fELF":
        return None
    return ELF_MACHINES.get(int.from_bytes(header[18:20], "little"), f"machine {header[18:20].hex()}")


def skopeo_copy_for(image: str, arch: str, layout: Path) -> None:
    run(["skopeo", "copy", "--override-arch", arch, "--src-tls-verify=false", f"docker://{image}", f"oci:{layout}:img"])


@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
def test_skopeo_copies_the_arm64_image_of_a_plain_name(registry_both: RegistryProcess, tmp_path: Path) -> None:
    skopeo_copy_for(f"{registry_both.host}/shell", "arm64", tmp_path / "layout")
    root = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    assert elf_machine(_resolve_in(root, root / "bin" / "sh")) == "aarch64"
    machines = {elf_machine(path) for path in root.rglob("*") if path.is_file() and not path.is_symlink()}
    assert machines - {None} == {"aarch64"}, machines


def _resolve_in(root: Path, path: Path) -> Path:
    """A path inside an unpacked image, its absolute symlinks read relative to the image's root."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = Path(path.readlink())
        path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
    raise AssertionError(f"{path}: too many symlinks")


@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_a_pull_of_an_index_by_digest_rebuilds_a_platform_that_lost_a_layer(
    registry_both: RegistryProcess, tmp_path: Path
) -> None:
    """A pinned multi-platform pull (`shell@sha256:<index>`) after a layer of the arm64 image was
    lost: its manifest by digest was 404 until someone pulled `shell` by tag. Now the image is
    built again (the same digests) and the pull succeeds, in either format's documents."""
    registry = registry_both
    every = [OCI_INDEX, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, OCI_MANIFEST]
    oci_index, _, index = _manifest(registry, "shell", every)
    _, _, docker_list = _manifest(registry, "shell", [DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])
    oci_arm64, docker_arm64 = (next(entry["digest"] for entry in document["manifests"]
                                    if entry["platform"]["architecture"] == "arm64")
                               for document in (index, docker_list))
    _, _, arm64 = _manifest(registry, "shell", [OCI_MANIFEST], oci_arm64)
    layer = max(arm64["layers"], key=lambda layer: layer["size"])["digest"]
    blob_file = registry.storage / "blobs" / "sha256" / layer[7:9] / layer[7:]

    def lose_the_layer() -> None:  # with a restart: nothing held in memory vouches for it
        registry.stop()
        blob_file.unlink()
        registry.start()

    lose_the_layer()
    run(["flock", "/tmp/clients.lock", "skopeo", "copy", "--override-arch", "arm64", "--src-tls-verify=false",
         f"docker://{registry.host}/shell@{oci_index}", f"oci:{tmp_path / 'layout'}:img"])
    assert Digest.of(blob_file.read_bytes()) == Digest.parse(layer)
    lose_the_layer()
    assert _manifest(registry, "shell", [DOCKER_MANIFEST], docker_arm64)[0] == docker_arm64
    assert Digest.of(blob_file.read_bytes()) == Digest.parse(layer)
    assert _manifest(registry, "shell", every)[0] == oci_index, "the rebuilt image is byte-for-byte the same"


@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_podman_runs_the_platform_it_asks_for(registry_both: RegistryProcess) -> None:
    image = f"{registry_both.host}/shell"

    def uname(*arch: str) -> str:
        try:  # a fresh pull each time: podman would otherwise run the image it holds under this name
            return run(["podman", "run", "--rm", "--pull", "always", "--tls-verify=false", *arch, *PODMAN_RUN_FLAGS,
                        image, "uname", "-m"]).stdout.strip().splitlines()[-1]
        finally:
            run(["podman", "rmi", "-f", image], check=False)

    assert uname("--arch", "arm64") == "aarch64"
    assert uname() == "x86_64"


@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_podman_runs_arm64_from_a_registry_of_linux_arm64(start_registry: Callable[..., RegistryProcess]) -> None:
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS="linux/arm64")
    image = f"{registry.host}/shell"
    try:
        out = run(["podman", "run", "--rm", "--pull", "always", "--tls-verify=false", "--arch", "arm64",
                   *PODMAN_RUN_FLAGS, image, "uname", "-m"]).stdout
    finally:
        run(["podman", "rmi", "-f", image], check=False)
    assert out.strip().splitlines()[-1] == "aarch64"


@pytest.mark.skipif(not (have("nginx") and have("skopeo")), reason="needs nginx and skopeo")
def test_a_caching_proxy_in_front_gives_each_client_the_document_it_asks_for(
    registry_both: RegistryProcess, tmp_path: Path,
) -> None:
    """A shared HTTP cache in front of the registry (nginx's proxy_cache, as a CDN) keeps a tag's
    answers apart by Accept header (`Vary: Accept`): a client that takes no index, pulling
    first, does not leave the amd64 manifest for every later client, arm64 ones included."""
    root, port = tmp_path / "nginx", free_port()
    site = (
        f"proxy_cache_path {root}/cache keys_zone=registry:1m;\n"
        f"server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass {registry_both.url}; "
        "proxy_cache registry; proxy_cache_valid 200 10m; } }"
    )
    with daemons.nginx(root, daemons.nginx_config(root, site), port):
        front = f"127.0.0.1:{port}"
        for accept, media_type in ((DOCKER_MANIFEST, DOCKER_MANIFEST), (f"{OCI_INDEX}, {OCI_MANIFEST}", OCI_INDEX)):
            status, headers, _ = daemons.http_request(front, "/v2/shell/manifests/latest", accept=accept)
            assert (status, headers["Content-Type"]) == (200, media_type)
        image = f"docker://{front}/shell"
        inspected = run(["skopeo", "inspect", "--override-arch", "arm64", "--tls-verify=false", image])
    assert json.loads(inspected.stdout)["Architecture"] == "arm64"


@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_on_an_arm64_host_the_index_keeps_the_name_it_is_pulled_by(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path,
) -> None:
    """A registry on an aarch64 machine with both platforms (simulated here: Python is told the
    machine is aarch64, Nix may build aarch64-linux as its own): the index's default platform
    is arm64, but the image is still `shell/hello`, as its pages and builds show it and tell
    users to pull it, not `arm64/shell/hello`, the arm64 image alone."""
    fake = tmp_path / "aarch64-host"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text('import platform\nplatform.machine = lambda: "aarch64"\n')
    registry = start_registry(
        NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS=BOTH, NIX_CONFIG="extra-platforms = aarch64-linux",
        PYTHONPATH=os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])),
    )
    digest, media_type, index = _manifest(registry, "shell/hello", [OCI_INDEX, OCI_MANIFEST])
    assert media_type == OCI_INDEX and len(index["manifests"]) == 2
    _, _, manifest = _manifest(registry, "shell/hello", [DOCKER_MANIFEST])  # a client that takes no index
    assert _config(registry, "shell/hello", manifest)["architecture"] == "arm64"  # the host's
    status, _, body = registry.request("/images/shell/hello.json", accept=None)
    assert status == 200 and (json.loads(body)["name"], json.loads(body)["digest"]) == ("shell/hello", digest)
    status, _, body = registry.request("/images/shell/hello", accept=None)
    shown = re.search(rf"docker pull {re.escape(registry.host)}/(\S+?)<", body.decode())
    assert status == 200 and shown is not None and shown[1] == "shell/hello", shown
    inspected = run(["skopeo", "inspect", "--override-arch", "amd64", "--tls-verify=false",
                     f"docker://{registry.host}/{shown[1]}"])
    assert json.loads(inspected.stdout)["Architecture"] == "amd64"


@pytest.fixture
def registry_both(start_registry: Callable[..., RegistryProcess]) -> RegistryProcess:
    """A registry on the busybox set, with both platforms."""
    return start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS=BOTH)
