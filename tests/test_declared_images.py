"""Declared images beyond their contents: several platforms (`data.arch: [amd64, arm64]`,
an image index) and the image config a name cannot carry (`user`, `workingDir`, `env`,
`entrypoint`, `cmd`, `exposedPorts`, `labels`).

The parsing rules, the image key and the config are checked in this process; the
index and the config against real registry processes on the busybox set (its aarch64
packages are Debian's arm64 busybox) and real clients: skopeo copies the arm64 image
of a declared index, podman runs a declared image as its user.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from nixery.declarations import InvalidDeclaration, parse_declaration
from nixery.images import image_key
from nixery.layers.entrypoints import entry_points
from nixery.registry.image import image_config
from nixery.registry.mediatypes import DOCKER_MANIFEST_LIST, OCI_INDEX
from nixery.registry.names import Arch, parse_image_name
from nixery.registry.runconfig import RunConfig
from nixery.resolver import Revision
from tests.registry import OCI_MANIFEST, PODMAN_RUN_FLAGS, RegistryProcess, have, run, slow_package_set, unpack_oci
from tests.test_declarations import nix_image, write_images
from tests.test_k8s_watch import ThreadedKubeApi, wait_until
from tests.test_platforms import elf_machine, skopeo_copy_for

REVISION = Revision(source="bundled", id="r1", path=None)


# ---- data.arch ----------------------------------------------------------------


def test_arch_may_list_several_platforms() -> None:
    both = parse_declaration(nix_image("multi", arch=["arm64", "amd64", "arm64"]), origin="t").request
    assert both.platforms == (Arch.AMD64, Arch.ARM64) and both.arch is Arch.AMD64  # the host's, for old clients
    assert both.display_name == "hello"
    for one in ("arm64", ["arm64"], ["arm64", "arm64"]):
        request = parse_declaration(nix_image("one", arch=one), origin="t").request
        assert request.arch is Arch.ARM64 and request.platforms == ()  # one platform: one manifest, no index
    assert parse_declaration(nix_image("plain"), origin="t").request == parse_image_name("hello")


@pytest.mark.parametrize(
    ("arch", "problem"),
    [
        (["amd64", "x86_64"], "data.arch[1] 'x86_64' is not one of amd64, arm64"),
        ([], "data.arch is empty"),
        ("s390x", "data.arch 's390x' is not one of amd64, arm64"),
        ([["amd64"]], "data.arch[0] ['amd64'] is not one of"),
        (64, "data.arch 64 is not one of"),
    ],
)
def test_an_unknown_arch_names_the_field(arch: Any, problem: str) -> None:
    with pytest.raises(InvalidDeclaration) as caught:
        parse_declaration(nix_image("a", arch=arch), origin="t")
    assert problem in str(caught.value)


# ---- the image config -----------------------------------------------------------

CONFIG = {
    "user": "app", "workingDir": "/home/app", "env": ["GREETING=hello there", "PATH=/bin", "GREETING=hi"],
    "entrypoint": ["/bin/sh", "-c"], "cmd": ["echo $GREETING"], "exposedPorts": [8080, "53/udp", "8080/tcp"],
    "labels": {"org.opencontainers.image.source": "https://example.com/app"},
}


def test_config_fields_are_read_into_the_request() -> None:
    config = parse_declaration(nix_image("app", **CONFIG), origin="t").request.config
    assert config == RunConfig(
        user="app", working_dir="/home/app", env=("GREETING=hi", "PATH=/bin"), entrypoint=("/bin/sh", "-c"),
        cmd=("echo $GREETING",), exposed_ports=("53/udp", "8080/tcp"),
        labels=(("org.opencontainers.image.source", "https://example.com/app"),),
    )
    assert parse_declaration(nix_image("plain"), origin="t").request.config is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"user": "root"}, "data.user 'root' is the default"),
        ({"user": "App"}, "data.user 'App' is not a user name"),
        ({"user": "1app"}, "data.user '1app' is not a user name"),
        ({"user": "a" * 33}, "is not a user name"),
        ({"user": 1000}, 'data.user must be a string, not int (quote it: "1000")'),
        ({"workingDir": "srv"}, "data.workingDir 'srv' must be an absolute path"),
        ({"workingDir": ["/srv"]}, "data.workingDir must be a string"),
        ({"env": "A=1"}, "data.env must be a list"),
        ({"env": ["A=1", "B"]}, "data.env[1] 'B' is not KEY=VALUE"),
        ({"env": ["1A=x"]}, "data.env[0] '1A=x' is not KEY=VALUE"),
        ({"env": [{"name": "A", "value": "1"}]}, "data.env[0] must be a string, not dict"),
        ({"entrypoint": "/bin/sh -c"}, "data.entrypoint must be a list of strings"),
        ({"entrypoint": []}, "data.entrypoint is empty"),
        ({"cmd": ["echo", 1]}, "data.cmd[1] must be a string, not int"),
        ({"exposedPorts": [0]}, "data.exposedPorts[0] 0 is not a port"),
        ({"exposedPorts": ["80", "70000"]}, "data.exposedPorts[1] '70000' is not a port"),
        ({"exposedPorts": ["80/http"]}, "data.exposedPorts[0] '80/http' is not a port"),
        ({"exposedPorts": [True]}, "data.exposedPorts[0] must be a port number"),
        ({"exposedPorts": 80}, "data.exposedPorts must be a list"),
        ({"labels": ["a=b"]}, "data.labels must be a mapping"),
        ({"labels": {"a": 1}}, "data.labels['a'] must be a string, not int"),
        ({"labels": {"org.nixos.nixery.packages": "x"}}, "is the registry's own"),
        ({"env": [f"K{n}=v" for n in range(101)]}, "data.env has 101 entries; at most 100"),
        ({"workingDir": "/a\0b"}, "holds a NUL character"),
    ],
)
def test_invalid_config_fields_name_the_field(data: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidDeclaration) as caught:
        parse_declaration(nix_image("a", **data), origin="t")
    assert problem in str(caught.value) and len(str(caught.value)) < 200


def test_the_config_is_part_of_the_image_key_and_only_when_set() -> None:
    plain = parse_image_name("shell/hello")
    declared = parse_declaration(nix_image("x", contents=["hello", "shell"]), origin="t").request
    assert image_key(REVISION, declared, 10) == image_key(REVISION, plain, 10)
    keys = {
        image_key(REVISION, parse_declaration(nix_image("x", contents=["hello", "shell"], **data), origin="t").request,
                  10)
        for data in ({}, {"user": "app"}, {"user": "web"}, {"env": ["A=1"]}, {"cmd": ["hello"]}, CONFIG)
    }
    assert len(keys) == 6
    again = parse_declaration(nix_image("y", contents=["shell", "hello"], **CONFIG), origin="t").request
    assert image_key(REVISION, again, 10) in keys  # the same config under another name: the same image


def test_the_config_goes_over_the_registrys_own() -> None:
    run_config = parse_declaration(nix_image("app", **CONFIG), origin="t").request.config
    base = dict(architecture="amd64", env=["PATH=/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
                cmd=["/bin/sh"], labels={"org.nixos.nixery.packages": "shell"})
    assert image_config([], **base, run=None) == image_config([], **base)
    config = json.loads(image_config([], **base, run=run_config))["config"]
    assert config == {
        "User": "1000:1000", "WorkingDir": "/home/app",
        "Env": ["SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt", "GREETING=hi", "PATH=/bin"],
        "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo $GREETING"],
        "ExposedPorts": {"53/udp": {}, "8080/tcp": {}},
        "Labels": {"org.nixos.nixery.packages": "shell", "org.opencontainers.image.source": "https://example.com/app"},
    }
    # An entry point of its own drops the registry's command, as Docker does.
    only_entrypoint = json.loads(image_config([], **base, run=RunConfig(entrypoint=("/bin/hello",))))["config"]
    assert only_entrypoint["Entrypoint"] == ["/bin/hello"] and "Cmd" not in only_entrypoint


def test_the_user_has_an_account_in_the_entry_point_layer() -> None:
    def files(config: RunConfig | None) -> dict[str, Any]:
        return {entry.name: entry for entry in entry_points([], [], config).entries}

    plain, app, nobody = files(None), files(RunConfig(user="app")), files(RunConfig(user="nobody"))
    assert app["etc/passwd"].content == plain["etc/passwd"].content + b"app:x:1000:1000:app:/home/app:/bin/sh\n"
    assert app["etc/group"].content == plain["etc/group"].content + b"app:x:1000:\n"
    assert app["home/app"].kind == "dir" and "home" not in plain
    assert nobody == plain  # a built-in account: nothing to add
    assert json.loads(image_config([], architecture="amd64", env=[], cmd=None, labels={},
                                   run=RunConfig(user="nobody")))["config"]["User"] == "65534:65534"


# ---- real registries and clients ----------------------------------------------


def _config_of(registry: RegistryProcess, name: str, tag: str, manifest: dict[str, Any]) -> dict[str, Any]:
    status, _, body = registry.request(f"/v2/{name}/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200
    return json.loads(body)


@pytest.fixture
def declared_registry(start_registry: Callable[..., RegistryProcess], tmp_path: Path) -> RegistryProcess:
    """A one-platform registry (NIXERY_PLATFORMS unset) on the busybox set, with declared images."""
    images = tmp_path / "images"
    images.mkdir()
    write_images(
        images / "team.yaml",
        nix_image("multi", contents=["shell"], arch=["amd64", "arm64"]),
        nix_image("app", contents=["shell", "hello"], user="app", workingDir="/home/app",
                  env=["GREETING=hi"], entrypoint=["/bin/sh", "-c"], cmd=["hello"], exposedPorts=[8080],
                  labels={"team": "web"}),
    )
    return start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images))


@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
def test_a_declaration_of_two_platforms_is_an_index(declared_registry: RegistryProcess, tmp_path: Path) -> None:
    registry = declared_registry
    for accept, index_type in (([OCI_INDEX, OCI_MANIFEST], OCI_INDEX), ([DOCKER_MANIFEST_LIST], DOCKER_MANIFEST_LIST)):
        status, headers, body = registry.request("/v2/multi/manifests/v1", accept=accept)
        assert status == 200 and headers["Content-Type"] == index_type, (status, body[:500])
        index = json.loads(body)
        assert [entry["platform"]["architecture"] for entry in index["manifests"]] == ["amd64", "arm64"]
    # Each platform's image is the one its name gives, as on a registry of both NIXERY_PLATFORMS.
    arm64_digest, arm64 = registry.manifest("arm64/shell", "v1", accept=OCI_MANIFEST)
    status, _, body = registry.request("/v2/multi/manifests/v1", accept=[OCI_INDEX])
    assert json.loads(body)["manifests"][1]["digest"] == arm64_digest
    assert _config_of(registry, "arm64/shell", "v1", arm64)["architecture"] == "arm64"
    # A plain name on this one-platform registry is still one manifest.
    status, headers, _ = registry.request("/v2/shell/manifests/v1", accept=[OCI_INDEX, OCI_MANIFEST])
    assert status == 200 and headers["Content-Type"] == OCI_MANIFEST

    skopeo_copy_for(f"{registry.host}/multi:v1", "arm64", tmp_path / "layout")
    root = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    machines = {elf_machine(path) for path in root.rglob("*") if path.is_file() and not path.is_symlink()}
    assert machines - {None} == {"aarch64"}, machines


@pytest.mark.skipif(not (have("skopeo") and have("podman")), reason="needs skopeo and podman")
def test_a_declared_config_is_in_the_image_and_podman_runs_as_its_user(declared_registry: RegistryProcess) -> None:
    image = f"{declared_registry.host}/app:v1"
    inspected = json.loads(run(["skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{image}"]).stdout)
    config = inspected["config"]
    assert config["User"] == "1000:1000" and config["WorkingDir"] == "/home/app"
    assert "GREETING=hi" in config["Env"] and config["Entrypoint"] == ["/bin/sh", "-c"] and config["Cmd"] == ["hello"]
    assert config["ExposedPorts"] == {"8080/tcp": {}} and config["Labels"]["team"] == "web"
    try:
        default = run(["podman", "run", "--rm", "--pull", "always", "--tls-verify=false", *PODMAN_RUN_FLAGS,
                       image]).stdout
        assert default.splitlines()[-1] == "Hello, world!"  # the entry point runs the declared command
        shown = run(["podman", "run", "--rm", "--tls-verify=false", *PODMAN_RUN_FLAGS, image,
                     'id -un; id -u; pwd; echo "$GREETING"; touch "$HOME/written" && echo home-writable']).stdout
        assert shown.splitlines()[-5:] == ["app", "1000", "/home/app", "hi", "home-writable"]
    finally:
        run(["podman", "rmi", "-f", image], check=False)
    # The same contents as a name: root, as ever.
    _, plain = declared_registry.manifest("shell/hello", "v1")
    plain_config = _config_of(declared_registry, "shell/hello", "v1", plain)["config"]
    assert "User" not in plain_config and "Entrypoint" not in plain_config


def test_a_niximage_resource_of_two_platforms_with_a_user(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    """A NixImage object (the watch, against the stand-in API server of test_k8s_watch: no
    Kubernetes runs here) of two platforms and a user: prebuilt, its status names the index."""
    api = ThreadedKubeApi()
    try:
        registry = start_registry(
            NIXERY_BUNDLED_SET="busybox", NIXERY_K8S_WATCH="true", NIXERY_PREBUILD="true",
            KUBECONFIG=str(api.kubeconfig(tmp_path / "kc")),
        )
        api.create("web", {"tag": "v1", "contents": ["shell"], "arch": ["arm64", "amd64"], "user": "app"})
        api.create("broken", {"tag": "v1", "contents": ["shell"], "arch": ["amd64", "riscv64"]})
        status = wait_until(lambda: api.status("web").get("phase") == "Ready" and api.status("web"), what="Ready")
        index_digest, index = registry.manifest("web", "v1", accept=OCI_INDEX)
        assert status["indexDigest"] == index_digest
        assert [entry["platform"]["architecture"] for entry in index["manifests"]] == ["amd64", "arm64"]
        assert status["digest"] == registry.manifest("web", "v1")[0]  # a client that takes no index: amd64
        for entry in index["manifests"]:
            _, manifest = registry.manifest("web", entry["digest"], accept=OCI_MANIFEST)
            assert _config_of(registry, "web", "v1", manifest)["config"]["User"] == "1000:1000"
        broken = wait_until(lambda: api.status("broken").get("phase") == "Invalid" and api.status("broken"),
                            what="Invalid")
        assert "data.arch[1] 'riscv64' is not one of amd64, arm64" in broken["error"]
    finally:
        api.close()


def test_a_prebuild_under_way_is_stopped_at_once_when_the_registry_stops(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    """A declared image being prebuilt (NIXERY_PREBUILD) when SIGTERM comes while a pull waits
    for another build: no client waits for the prebuild, so it is stopped at once, and no longer
    takes a build slot and Nix's time from the pull's build until the grace ends. It is logged as
    stopped, not as a failed declaration (whose status a Kubernetes resource would show)."""
    images = tmp_path / "images"
    images.mkdir()
    write_images(images / "team.yaml", nix_image("slow", contents=["shell", "slowpoke"]))
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs", seconds=60)),
                              NIXERY_IMAGES_PATH=str(images), NIXERY_PREBUILD="true", NIXERY_SHUTDOWN_GRACE="8")
    answers: list[int] = []
    pull = threading.Thread(target=lambda: answers.append(registry.request("/v2/slowpoke/manifests/latest")[0]))
    pull.start()
    wait_until(lambda: len(registry.log_events("build.realising")) == 2, 120)
    stopping = time.monotonic()
    registry.process.send_signal(signal.SIGTERM)
    assert registry.process.wait(30) == 0
    pull.join(30)
    assert answers == [503]  # the pull's build, stopped shortly before the grace ended
    stopped = {entry["image"]: entry["timestamp"] for entry in registry.log_events("build.stopped")}
    [signalled] = registry.log_events("registry.stopping")
    assert sorted(stopped) == ["shell/slowpoke", "slowpoke"], stopped
    assert _seconds_between(signalled["timestamp"], stopped["shell/slowpoke"]) < 4  # the prebuild: at once
    assert 4 < _seconds_between(signalled["timestamp"], stopped["slowpoke"]) < 8  # the pull's: at 8 - 2 s
    assert registry.log_events("declarations.build_failed") == []
    assert time.monotonic() - stopping < 15


def _seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def test_the_landing_page_of_several_platforms_lists_declared_images_of_one(
    start_registry: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    """On a registry of several platforms, a declared image of one platform (amd64, the default)
    was left out of the recently built images: its record is named by its packages, and that
    name names an image of each platform. It is listed under the declared name, linked to its page."""
    images = tmp_path / "images"
    images.mkdir()
    write_images(images / "team.yaml", nix_image("app", contents=["shell", "hello"]),
                 nix_image("armtool", tag="latest", contents=["shell", "figlet"], arch="arm64"))
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images),
                              NIXERY_PLATFORMS="linux/amd64,linux/arm64")
    for name, tag in (("app", "v1"), ("armtool", "latest")):
        status, _, body = registry.request(f"/v2/{name}/manifests/{tag}")
        assert status == 200, body
    status, _, page = registry.request("/", accept="text/html")
    assert status == 200
    section = page.decode().split("Recently built images", 1)[1].split("</section>", 1)[0]
    links = re.findall(r'<a href="([^"]+)"><code>([^<]+)</code>', section)
    assert ("/images/app?tag=v1", "app:v1") in links, section
    assert ("/images/arm64/figlet/shell", "arm64/figlet/shell") in links, section  # a name that pulls it
    for link, _ in links:
        status, _, body = registry.request(link, accept="text/html")
        assert status == 200, (link, body[-500:])
