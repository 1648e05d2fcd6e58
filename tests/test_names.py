"""Image names through a running registry: what each path component selects.

Components name top-level attributes of the package set, dotted components
reach into nested sets, a unique case-insensitive match stands in for a
missing exact name, `shell` is the shell meta-package, order and repeats do
not matter, and a leading `arm64` asks for aarch64.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry import RegistryProcess, busybox_set_with
from tests.test_sources import BUNDLED_BUSYBOX, error_of, needs_clients, rootfs_of, run_in, started, write_package_set

pytestmark = pytest.mark.nix


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One registry on the bundled busybox set for every test here."""
    registry = started(tmp_path_factory.mktemp("names") / "storage", NIXERY_BUNDLED_SET="busybox")
    yield registry
    registry.stop()


def layers(manifest: dict) -> list[str]:
    return [layer["digest"] for layer in manifest["layers"]]


def labels(registry: RegistryProcess, manifest: dict) -> dict[str, str]:
    status, _, body = registry.request(f"/v2/hello/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200
    return json.loads(body)["config"]["Labels"]


def test_case_insensitive_name_resolves_to_the_package(bundled: RegistryProcess) -> None:
    _, upper = bundled.manifest("Hello")
    _, lower = bundled.manifest("hello")
    assert layers(upper) == layers(lower)
    assert labels(bundled, upper)["org.nixos.nixery.packages"] == "hello"


def test_order_and_repeats_do_not_change_the_image(bundled: RegistryProcess) -> None:
    digests = {bundled.manifest(name)[0] for name in ("hello/shell", "shell/hello", "shell/hello/hello")}
    assert len(digests) == 1
    assert layers(bundled.manifest("hello/shell")[1]) == layers(bundled.manifest("shell/hello")[1])


@needs_clients
def test_dotted_attribute_path_reaches_a_nested_set(bundled: RegistryProcess, tmp_path: Path) -> None:
    rootfs = rootfs_of(bundled, "shell/tools.jqlite", tmp_path / "jq")  # jqlite runs sed from the shell
    assert run_in(rootfs, "/bin/jqlite", stdin='{"name": "nixery"}\n') == "name=nixery\n"


@needs_clients
def test_shell_gives_a_shell(bundled: RegistryProcess, tmp_path: Path) -> None:
    rootfs = rootfs_of(bundled, "shell/hello", tmp_path / "sh")
    assert run_in(rootfs, "/bin/sh", "-c", "hello; echo $0") == "Hello, world!\n/bin/sh\n"


def test_unknown_names_are_manifest_unknown_listing_every_one(bundled: RegistryProcess) -> None:
    status, error = error_of(bundled, "hello/nosuchpackage/tools.nosuchtool/alsomissing")
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN")
    assert error["detail"]["missing"] == ["alsomissing", "nosuchpackage", "tools.nosuchtool"]
    for name in error["detail"]["missing"]:
        assert name in error["message"]


@pytest.mark.parametrize("word", ["amd64", "aarch64", "riscv64", "arm"])
def test_a_platform_this_registry_lacks_gets_a_hint(bundled: RegistryProcess, word: str) -> None:
    """`riscv64/hello` said only "packages not found ...: riscv64": the first component is read as a
    package, as always, but the answer now names the one platform prefix there is."""
    status, error = error_of(bundled, f"{word}/hello")
    assert (status, error["code"], error["detail"]["missing"]) == (404, "MANIFEST_UNKNOWN", [word])
    assert error["message"].startswith("packages not found") and f"{word} is not a platform prefix" in error["message"]
    assert "arm64/" in error["message"] and error["detail"]["hint"] in error["message"]
    # a misspelt package gets no such hint
    assert "hint" not in error_of(bundled, "hello/nosuchpackage")[1]["detail"]


@pytest.mark.parametrize("name", ["hello/arm64", "arm64/arm64/hello", "ARM64/hello", "Arm64/hello"])
def test_the_arm64_prefix_out_of_place_gets_a_hint(bundled: RegistryProcess, name: str) -> None:
    """`shell/arm64`, `arm64/arm64/shell` and `ARM64/shell` said only "packages not found ...: arm64"
    (no word of the prefix): `arm64` is the prefix only first, once, in lower case, and the
    answer now says so."""
    status, error = error_of(bundled, name)
    misplaced = name.split("/")[1] if name.startswith("arm64/") else next(w for w in name.split("/") if w != "hello")
    assert (status, error["code"], error["detail"]["missing"]) == (404, "MANIFEST_UNKNOWN", [misplaced])
    assert "first component, once and in lower case (arm64/shell)" in error["detail"]["hint"]
    assert error["detail"]["hint"] in error["message"]


def test_a_package_named_like_a_platform_is_still_a_package(start_registry, tmp_path: Path) -> None:
    pkgs = busybox_set_with(tmp_path / "pkgs", "riscv64", "riscv64-1",
                            "$bb/mkdir -p $out/bin; echo 'echo emulated' > $out/bin/riscv64")
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs))
    _, manifest = registry.manifest("riscv64/hello")
    status, _, body = registry.request(f"/v2/hello/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200 and json.loads(body)["config"]["Labels"]["org.nixos.nixery.packages"] == "hello riscv64"


def test_a_set_that_is_not_a_derivation_is_not_a_package(bundled: RegistryProcess) -> None:
    status, error = error_of(bundled, "tools")
    assert (status, error["detail"]["missing"]) == (404, ["tools"])


@pytest.mark.parametrize(
    "name", ["hello;ls", "hello$(id)", "he%20llo", "hello/..", "a..b", ".hidden", "-rf", "hello/-x", "hello//shell"]
)
def test_malformed_names_are_name_invalid(bundled: RegistryProcess, name: str) -> None:
    status, error = error_of(bundled, name)
    assert (status, error["code"]) == (400, "NAME_INVALID"), error


def test_an_empty_package_name_is_called_so(bundled: RegistryProcess) -> None:
    """`shell//curl` was refused as "invalid package name ''", which names nothing the user typed."""
    status, error = error_of(bundled, "shell//hello")
    assert (status, error["code"]) == (400, "NAME_INVALID"), error
    assert error["message"].startswith("the image name has an empty package name: '/' twice in a row"), error


def test_a_missing_name_is_not_offered_a_name_the_image_has_already(bundled: RegistryProcess) -> None:
    """`shell/hello` on the Debian set (which has no hello) was told "did you mean shell?"."""
    status, error = error_of(bundled, "shell/shel")
    assert (status, error["detail"]["missing"]) == (404, ["shel"]), error
    assert "did you mean shell" not in error["message"], error
    status, error = error_of(bundled, "hello/shel")  # the nearest name, when the image lacks it
    assert "shel (did you mean shell?)" in error["message"], error


def test_arm64_prefix_builds_an_aarch64_image(bundled: RegistryProcess) -> None:
    """The busybox set's aarch64 packages, built on this machine whatever it runs on."""
    _, manifest = bundled.manifest("arm64/hello")
    status, _, body = bundled.request(f"/v2/arm64/hello/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200
    config = json.loads(body)
    assert (config["architecture"], config["os"]) == ("arm64", "linux")
    assert config["config"]["Labels"]["org.nixos.nixery.packages"] == "hello"
    assert layers(manifest) != layers(bundled.manifest("hello")[1])


#: An ELF header for RISC-V (e_machine 243), which this machine neither runs nor emulates.
RISCV_ELF_HEADER = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
    "<HHIQQQIHHHHHH", 2, 243, 1, 0x10000, 64, 0, 0, 64, 56, 0, 64, 0, 0
)


@pytest.mark.parametrize(
    ("aarch64_derivation", "nix_said"),
    [
        # no machine has the feature: "a 'aarch64-linux' with features {...} is required to build"
        ('builder = "${base.busybox}/bin/sh"; args = [ "-c" "echo built > $out" ]; '
         'requiredSystemFeatures = [ "nixery-no-such-feature" ];', "nixery-no-such-feature"),
        # a builder this machine cannot execute, as an aarch64 one without emulation
        ("builder = ./riscv-builder;", "Exec format error"),
    ],
    ids=["feature", "exec"],
)
def test_arm64_that_nix_cannot_build_says_what_nix_said_and_what_would_help(
    tmp_path: Path, aarch64_derivation: str, nix_said: str
) -> None:
    """The registry no longer refuses arm64 up front: Nix tries, and here cannot."""
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "riscv-builder").write_bytes(RISCV_ELF_HEADER)
    (pkgs / "riscv-builder").chmod(0o755)
    (pkgs / "default.nix").write_text(
        "{ system ? builtins.currentSystem, ... }:\n"
        f"let base = import {BUNDLED_BUSYBOX} {{ inherit system; }}; in {{\n"
        '  tool = derivation ({ name = "tool"; inherit system; } // (if system == "aarch64-linux" then {\n'
        f"    {aarch64_derivation}\n"
        '  } else { builder = "${base.busybox}/bin/sh"; args = [ "-c" "echo built > $out" ]; }));\n'
        "}\n"
    )
    registry = started(tmp_path / "storage", NIXERY_PKGS_PATH=str(pkgs))
    try:
        registry.manifest("tool")  # the set itself builds
        status, error = error_of(registry, "arm64/tool")
        assert (status, error["code"], error["detail"]["kind"]) == (404, "MANIFEST_UNKNOWN", "MANIFEST_UNKNOWN")
        message = error["message"]
        assert "Nix could not build for aarch64-linux" in message and nix_said in message, message
        assert "\x00" not in message
        assert "builders" in message and "extra-platforms" in message and "qemu-user-static" in message
        assert nix_said in error["detail"]["log"]
    finally:
        registry.stop()


def test_exact_names_win_and_ambiguous_case_insensitive_names_are_missing(tmp_path: Path) -> None:
    pkgs = write_package_set(
        tmp_path / "pkgs",
        {"Tool": "echo capital", "tool": "echo small", "Unique": "echo unique", "py.Requests": "echo requests"},
    )
    registry = started(tmp_path / "storage", NIXERY_PKGS_PATH=str(pkgs))
    try:
        packages = {}
        for name in ("Tool", "tool", "unique", "UNIQUE", "py.requests", "PY.REQUESTS"):
            _, manifest = registry.manifest(name)
            packages[name] = labels(registry, manifest)["org.nixos.nixery.packages"]
        assert packages == {
            "Tool": "Tool", "tool": "tool", "unique": "Unique", "UNIQUE": "Unique",
            "py.requests": "py.Requests", "PY.REQUESTS": "py.Requests",
        }
        status, error = error_of(registry, "TOOL")  # matches Tool and tool: not unique
        assert (status, error["detail"]["missing"]) == (404, ["TOOL"])
    finally:
        registry.stop()


def image_name(registry: RegistryProcess, asked: str) -> str:
    """The name the registry gives the image that `asked` names (it must be built)."""
    status, _, body = registry.request(f"/images/{asked}.json", accept="application/json")
    assert status == 200, body
    return json.loads(body)["name"]


def test_one_image_under_the_names_first_asked_for(tmp_path: Path) -> None:
    """Other orders, spellings and repeats of an image's names are the image as first asked
    for: one record, one entry on the landing page, one build; shown as `shell/figlet`."""
    registry = started(tmp_path / "storage", NIXERY_BUNDLED_SET="busybox")
    try:
        digest, _ = registry.manifest("shell/figlet")
        for asked in ("figlet/shell", "Figlet/Shell", "SHELL/figlet/shell"):
            assert registry.manifest(asked)[0] == digest, asked
        for asked in ("shell/figlet", "figlet/shell", "Figlet/Shell", "SHELL/figlet/shell"):
            assert image_name(registry, asked) == "shell/figlet", asked
        assert len(registry.log_events("build.done")) == 1
        _, _, landing = registry.request("/", accept="text/html")
        # The list of images (recent builds link their image too, a line per name asked).
        images = landing.split(b"<h2>Recently built images</h2>", 1)[1].split(b"</table>", 1)[0]
        assert images.count(b'<a href="/images/') == 1 and b'href="/images/shell/figlet"' in images
        _, _, page = registry.request("/images/Figlet/Shell", accept="text/html")
        assert b"<code>Figlet/Shell</code> is this image" in page
        _, _, page = registry.request("/images/shell/figlet", accept="text/html")
        assert b"Other orders of the names (<code>figlet/shell</code>) are the same image" in page
    finally:
        registry.stop()


def test_an_image_first_asked_for_in_capitals_is_found_in_lower_case(tmp_path: Path) -> None:
    """Registry clients refuse upper-case names: an image built as `Hello` is `hello`, and
    pulling `hello` afterwards finds it without building or evaluating anything."""
    registry = started(tmp_path / "storage", NIXERY_BUNDLED_SET="busybox")
    try:
        digest, _ = registry.manifest("Hello")
        assert image_name(registry, "Hello") == "hello"
        assert registry.manifest("hello")[0] == digest
        assert len(registry.log_events("build.queued")) == 1
    finally:
        registry.stop()


def test_names_are_the_pullable_names_of_their_attributes(tmp_path: Path) -> None:
    """An image is named by the attributes its names found, in lower case whenever that finds
    the same attribute; a set's top-level names that hold dots (Debian's `python3.11`) are
    found whole, while dotted paths into nested sets work as before."""
    programs = {"Unique": "echo unique", "Tool": "echo capital", "tool": "echo small", "py.Requests": "echo r"}
    base = write_package_set(tmp_path / "base", programs)
    pkgs = tmp_path / "pkgs"
    pkgs.mkdir()
    (pkgs / "default.nix").write_text(f'args: let s = import {base} args; in s // {{ "tool.v2" = s.tool; }}\n')
    registry = started(tmp_path / "storage", NIXERY_PKGS_PATH=str(pkgs))
    try:
        expected = {
            "UNIQUE/Tool": "unique/Tool",  # `tool` is another attribute: Tool keeps its capital
            "PY.REQUESTS": "py.requests",
            "tool.v2": "tool.v2",
            "TOOL.V2/unique": "tool.v2/unique",
        }
        for asked, name in expected.items():
            registry.manifest(asked)
            assert image_name(registry, asked) == name, asked
        assert labels(registry, registry.manifest("tool.v2")[1])["org.nixos.nixery.packages"] == "tool.v2"
    finally:
        registry.stop()


def test_a_misspelt_name_gets_the_nearest_names(bundled: RegistryProcess) -> None:
    status, error = error_of(bundled, "shell/figlett/COWSY")
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN")
    assert error["detail"]["missing"] == ["COWSY", "figlett"]
    assert error["detail"]["suggestions"] == {"COWSY": ["cowsay"], "figlett": ["figlet"]}
    assert "COWSY (did you mean cowsay?), figlett (did you mean figlet?)" in error["message"]
    status, error = error_of(bundled, "shell/xqzvwk")  # nothing like it: no suggestion
    assert error["detail"]["suggestions"] == {} and error["message"].endswith(": xqzvwk")
    # A set of packages is no package, and a misspelt member of one is not compared with the
    # set's top-level names (`debian.curll` was asked "did you mean debianutils?").
    status, error = error_of(bundled, "shell/tools")
    assert (status, error["detail"]["suggestions"]) == (404, {}), error
    assert error["message"].endswith(": tools (a set of packages, not a package: name one of them, as tools.NAME)")
    status, error = error_of(bundled, "shell/tools.jqlitee")
    assert (status, error["detail"]["suggestions"]) == (404, {}), error
    assert error["message"].endswith(": tools.jqlitee (the set tools has no jqlitee)"), error
    assert bundled.manifest("tools.jqlite")[0].startswith("sha256:")


def test_a_misspelt_name_is_answered_without_nix_once_the_package_list_is_read(start_registry) -> None:
    """Misspelt pulls went to Nix each time and held a build slot meanwhile (seconds each on a large
    package set, while other clients' builds waited). Once the list of the set's names is read (the
    first missing name's answer reads it, for its suggestions), a name it surely lacks is answered
    from it: no Nix evaluation, no slot."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox")
    status, error = error_of(registry, "shell/figlett")
    assert (status, error["detail"]["suggestions"]) == (404, {"figlett": ["figlet"]})
    assert len(registry.log_events("build.evaluating")) == 1
    status, error = error_of(registry, "shell/cowsy")
    assert (status, error["code"], error["detail"]["suggestions"]) == (404, "MANIFEST_UNKNOWN", {"cowsy": ["cowsay"]})
    assert len(registry.log_events("build.evaluating")) == 1, "the second misspelt name went to Nix"
    assert registry.manifest("shell/cowsay")[0].startswith("sha256:")  # a real name still builds


@pytest.mark.parametrize("platforms", ["linux/amd64", "linux/amd64,linux/arm64"])
def test_a_misspelt_name_takes_no_storage_lock(tmp_path: Path, start_registry, platforms: str) -> None:
    """The image's build lock is an object written and deleted on S3 and GCS: each misspelt pull
    took and freed one, although its answer needs no build (with several NIXERY_PLATFORMS, the
    index's). Here, once the package lists are read, the filesystem storage's lock directory is
    made unusable, so a pull that takes a lock fails."""
    storage = tmp_path / "storage"
    registry = start_registry(storage, NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS=platforms)
    builds = len(platforms.split(","))
    assert error_of(registry, "shell/figlett")[1]["detail"]["suggestions"] == {"figlett": ["figlet"]}
    locks = storage / "locks"
    assert locks.is_dir() and not list(locks.iterdir())
    locks.rmdir()
    locks.write_text("not a directory: no lock can be taken\n")
    status, error = error_of(registry, "shell/cowsy")
    assert (status, error["code"], error["detail"]["suggestions"]) == (404, "MANIFEST_UNKNOWN", {"cowsy": ["cowsay"]})
    _, _, metrics = registry.request("/metrics", accept="text/plain")
    assert f'nixery_builds_total{{result="not_found"}} {2.0 * builds}'.encode() in metrics
