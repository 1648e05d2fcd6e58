"""An image of several platforms (NIXERY_PLATFORMS) as its build, the web pages and the
command line show it: the build's last event names the index digest and each platform's
manifests; each platform's progress is relayed into the image's build, tagged with its
platform; the image page, `nixery inspect` and `nixery build` list the platforms; each
platform keeps its own layering history.

Against real registry processes on the busybox set (its aarch64 packages are Debian's
arm64 busybox, built by this x86_64 machine's Nix), and the build page in headless
Chromium as in tests/test_web.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nixery.registry.mediatypes import DOCKER_MANIFEST_LIST, OCI_INDEX
from tests.registry import DOCKER_MANIFEST, OCI_MANIFEST, RegistryProcess, busybox_set_with, slow_package_set
from tests.test_cli import ANSI, nixery, nixery_in_pty
from tests.test_web import ARTIFACTS, _sse, _start, browser, new_page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.nix

BOTH = "linux/amd64,linux/arm64"
PLATFORMS = ["linux/amd64", "linux/arm64"]
EVERY_TYPE = [OCI_INDEX, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, OCI_MANIFEST]


@pytest.fixture
def registry_both(start_registry: Callable[..., RegistryProcess]) -> RegistryProcess:
    return start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS=BOTH)


def _index(registry: RegistryProcess, name: str) -> tuple[str, dict]:
    """What a client that takes indexes (Docker, podman, containerd) gets for the name."""
    status, headers, body = registry.request(f"/v2/{name}/manifests/latest", accept=EVERY_TYPE)
    assert status == 200 and headers["Content-Type"] == OCI_INDEX, (status, body[:500])
    return headers["Docker-Content-Digest"], json.loads(body)


def _build(registry: RegistryProcess, image: str) -> tuple[dict, list[dict]]:
    """Start a build through the API; its start answer and every event of its stream."""

    async def run() -> tuple[dict, list[dict]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            started = await _start(session, registry.url, image)
            messages = await _sse(session, registry.url + started["events"])
            return started, [data for _, _, data in messages]

    return asyncio.run(run())



def build_from_the_form(page: Any, registry: RegistryProcess, image: str) -> Any:
    """`page` at the landing page's build form, `image` built: on the build's page."""
    page.goto(registry.url + "/")
    page.fill("#build-image", image)
    page.click("form.build-form button[type=submit]")
    page.wait_for_url("**/builds/**")
    return page

def test_the_build_of_several_platforms_ends_with_the_index_and_relays_each_platform(
    registry_both: RegistryProcess,
) -> None:
    started, events = _build(registry_both, "shell")
    last = events[-1]
    assert last["stage"] == "done", last
    digest, index = _index(registry_both, "shell")
    assert last["digest"] == digest  # the index, not the host platform's manifest
    assert [one["platform"] for one in last["platforms"]] == PLATFORMS
    assert [one["oci_digest"] for one in last["platforms"]] == [entry["digest"] for entry in index["manifests"]]
    arm64_digest, _ = registry_both.manifest("arm64/shell")  # what a client of no preference gets for arm64
    assert last["platforms"][1]["digest"] == arm64_digest

    # The image's own stages stay its own: only its last event is final.
    own = [event for event in events if "platform" not in event]
    assert [event["stage"] for event in own][-2:] == ["uploading", "done"]
    assert all(event["stage"] == "building" for event in events if "platform" in event)
    builds = {}
    for platform in PLATFORMS:
        relayed = [event for event in events if event.get("platform") == platform]
        stages = [event["platform_stage"] for event in relayed]
        assert {"evaluating", "building", "layering", "compressing", "uploading"} <= set(stages), (platform, stages)
        assert stages[-1] == "done" and relayed[-1]["size"] > 0
        assert events.index(relayed[-1]) < len(events) - 1  # relayed before the image's own end
        assert len({event["platform_build"] for event in relayed}) == 1
        builds[platform] = relayed[0]["platform_build"]
    # Each platform's build is a build of its own, followed on its own page.
    status, _, body = registry_both.request(f"/builds/{builds['linux/arm64']}.json", accept="application/json")
    assert status == 200 and json.loads(body)["image"] == "arm64/shell"

    # The build's page: a row per platform, done, linking its own build; the index digest.
    status, _, page = registry_both.request(f"/builds/{started['id']}", accept="text/html")
    html = page.decode()
    assert status == 200
    for platform in PLATFORMS:
        assert f'data-platform="{platform}" data-stage="done"' in html
        assert f'href="/builds/{builds[platform]}"' in html
    assert f'<code id="digest">{digest}</code>' in html
    assert all(entry["digest"] in html for entry in index["manifests"])

    # Built already: the build ends at once, and its page shows each platform done.
    again, events = _build(registry_both, "shell")
    assert [event["stage"] for event in events] == ["done"] and events[0]["digest"] == digest
    _, _, page = registry_both.request(f"/builds/{again['id']}", accept="text/html")
    assert all(f'data-platform="{platform}" data-stage="done"' in page.decode() for platform in PLATFORMS)

    # `nixery inspect`: the platforms and their digests.
    inspected = nixery("inspect", "shell", "--registry", registry_both.url, "--no-paths")
    assert inspected.returncode == 0, inspected.stderr
    assert f"Digest   {digest}" in inspected.stdout
    for platform, entry in zip(PLATFORMS, index["manifests"], strict=True):
        assert re.search(rf"^{platform}\s+{entry['digest']}\s", inspected.stdout, re.MULTILINE), inspected.stdout


def test_the_landing_page_lists_an_image_of_several_platforms_once(registry_both: RegistryProcess) -> None:
    """The landing page's recently built images listed a name pulled from a registry of two
    platforms twice, one row under the other with the same name, size and link: the image's
    record and its default platform's, which holds the same manifests. docs/web.md: "each
    image once"."""
    _index(registry_both, "shell/hello")
    status, _, page = registry_both.request("/", accept="text/html")
    assert status == 200
    images = page.decode().split("Recently built images", 1)[1]
    assert images.count('href="/images/shell/hello"') == 1, images


def test_after_an_arm64_build_failed_the_landing_page_links_only_to_what_is_there(
    start_registry: Callable[..., RegistryProcess], new_page, tmp_path: Path,  # noqa: F811
) -> None:
    """A package that builds for amd64 but not for arm64: the image's build fails, its amd64
    build is done. The landing page listed that amd64 build's image under the image's name
    among the built images, a link that answers 404 (the name is the index's, which failed),
    and listed the amd64 build among the recent builds under the same name as the image's
    own, failed, build, as if the image had been built after all."""
    script = ("if [ $system = aarch64-linux ]; then echo no arm64 here; exit 1; fi; "
              "$bb/mkdir -p $out/bin; echo ok > $out/bin/armfail")
    pkgs = busybox_set_with(tmp_path / "pkgs", "armfail", "armfail-1.0", script)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_PLATFORMS=BOTH)
    _index(registry, "shell")  # an image that is built, for both platforms
    page = build_from_the_form(new_page(), registry, "armfail")
    page.wait_for_selector("#state.stage-failed", timeout=120_000)
    assert "linux/arm64" in page.locator("#build").text_content()
    # The platform that failed was drawn green, as done: now red, as the image's failed stage.
    page.emulate_media(color_scheme="light")
    page.wait_for_selector("#platforms li.failed[data-platform='linux/arm64']")
    live = _platform_looks(page)
    assert live["linux/arm64"] == ("failed", BAD), live
    # amd64's own build may still run when arm64's failure ends the image's (a fresh machine builds
    # slower): the page is drawn again until it is done.
    deadline = time.monotonic() + 120
    while True:
        page.reload()
        drawn = _platform_looks(page)
        if drawn["linux/amd64"][0] != "current" or time.monotonic() > deadline:
            break
        page.wait_for_timeout(500)
    assert drawn == {"linux/amd64": ("past", OK), "linux/arm64": ("failed", BAD)}, drawn
    page.goto(registry.url + "/")
    images = page.locator("section.card:has(h2:text-is('Recently built images')) a")
    links = [images.nth(i).get_attribute("href") for i in range(images.count())]
    assert "/images/shell" in links and "/images/armfail" not in links, links
    for link in links:  # each leads to its image
        assert page.request.get(registry.url + link, headers={"Accept": "text/html"}).status == 200, link
    builds = page.locator("section.card:has(h2:text-is('Recent builds')) li")
    rows = {}
    for i in range(builds.count()):
        row = builds.nth(i)
        platform = row.locator(".badge.platform")
        rows[row.locator("a").first.get_attribute("href")] = (
            row.locator("code").text_content(), platform.text_content() if platform.count() else "",
            row.locator("[class*=stage-]").text_content(),
        )
    armfail = sorted(shown for shown in rows.values() if shown[0].endswith("armfail"))
    # The image's build, failed; its platforms' builds, each marked with its platform.
    assert armfail == [("arm64/armfail", "linux/arm64", "failed"), ("armfail", "", "failed"),
                       ("armfail", "linux/amd64", "done")], rows
    page.screenshot(path=str(ARTIFACTS / "web-landing-failed-platform.png"), full_page=True)


#: The colours of a stage's mark: done, and failed (style.css's --ok and --bad, light scheme).
OK, BAD = "rgb(47, 125, 79)", "rgb(178, 58, 58)"


def _platform_looks(page: Any) -> dict[str, tuple[str, str]]:
    """Each platform's row of a build page: its class and the colour of its mark."""
    rows = page.locator("#platforms li").evaluate_all(
        "items => items.map(i => [i.dataset.platform, i.className, getComputedStyle(i, '::before').backgroundColor])"
    )
    return {platform: (state, colour) for platform, state, colour in rows}


def test_the_page_of_a_platforms_build_leads_to_its_image_of_several_platforms(
    start_registry: Callable[..., RegistryProcess], new_page, tmp_path: Path,  # noqa: F811
) -> None:
    """The image's build failed for arm64; its amd64 build, done, had a page that said `docker
    pull HOST/armfail` (which fails: the name is the index's) and linked to /images/armfail,
    a 404, without a word of the image it was part of."""
    script = "if [ $system = aarch64-linux ]; then exit 1; fi; $bb/mkdir -p $out/bin; echo ok > $out/bin/armfail"
    pkgs = busybox_set_with(tmp_path / "pkgs", "armfail", "armfail-1.0", script)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_PLATFORMS=BOTH)
    page = build_from_the_form(new_page(), registry, "armfail")
    page.wait_for_selector("#state.stage-failed", timeout=120_000)
    image_build = page.url
    page.click("#platforms li[data-platform='linux/amd64'] a")  # its build
    page.wait_for_selector("#state.stage-done")
    outcome = page.locator("#outcome").text_content()
    assert "Image ready" in outcome and "docker pull" not in outcome, outcome
    note = page.locator("#part-of")
    assert "linux/amd64" in note.text_content() and "failed" in note.text_content()
    assert registry.url + note.locator("a").get_attribute("href") == image_build
    links = page.locator("main a").evaluate_all("links => links.map(a => a.href)")
    for link in links:  # none leads to a 404
        assert page.request.get(link, headers={"Accept": "text/html"}).status == 200, link
    page.screenshot(path=str(ARTIFACTS / "web-build-of-a-platform.png"), full_page=True)


def test_a_platform_still_building_when_another_failed_is_shown_as_it_ends(
    start_registry: Callable[..., RegistryProcess], new_page, tmp_path: Path,  # noqa: F811
) -> None:
    """arm64 fails at once, amd64 takes 10 seconds more: the image's build fails and stops
    relaying, and its page showed linux/amd64 "Building with Nix" for good, though that
    platform's own build went on and was done."""
    script = ("if [ $system = aarch64-linux ]; then exit 1; fi; $bb/sleep 10; "  # new to the Nix store:
              f"$bb/mkdir -p $out/bin; echo {random.getrandbits(64)} > $out/bin/armfast")
    pkgs = busybox_set_with(tmp_path / "pkgs", "armfast", "armfast-1.0", script)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_PLATFORMS=BOTH)
    page = build_from_the_form(new_page(), registry, "armfast")
    page.wait_for_selector("#state.stage-failed", timeout=120_000)
    amd64 = "#platforms li[data-platform='linux/amd64']"
    assert page.locator(amd64).get_attribute("data-stage") not in ("done", "failed")  # still building
    own = registry.url + page.locator(f"{amd64} a").get_attribute("href") + ".json"
    deadline = time.monotonic() + 60
    while page.request.get(own).json()["stage"] != "done":
        assert time.monotonic() < deadline, "the amd64 build did not end"
        time.sleep(0.2)
    page.reload()
    assert page.locator(amd64).get_attribute("data-stage") == "done"
    assert page.locator(f"{amd64} .badge").text_content() == "Done"


def test_the_build_page_of_several_platforms_counts_what_nix_built_for_them(
    start_registry: Callable[..., RegistryProcess], new_page, tmp_path: Path,  # noqa: F811
) -> None:
    """The image's "Building with Nix" stage said "nothing to build: all in the Nix store" once
    the build had ended, live and when drawn again, although Nix had just built the package
    for each platform: the counts are in the platforms' events, not in the image's own."""
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs", 2)), NIXERY_PLATFORMS=BOTH)
    page = build_from_the_form(new_page(), registry, "slowpoke")  # new to the Nix store, for each platform
    page.wait_for_selector("#state.stage-done", timeout=120_000)
    building = "#stages li[data-stage=building] .detail"
    live = page.locator(building).text_content()
    page.reload()
    drawn = page.locator(building).text_content()
    assert live == drawn, (live, drawn)
    match = re.fullmatch(r"(\d+) derivations built", drawn)
    assert match and int(match[1]) >= 2, drawn  # slowpoke, once for each platform


def test_the_image_page_lists_each_platform_and_its_layers(registry_both: RegistryProcess) -> None:
    digest, index = _index(registry_both, "shell/hello")
    status, _, body = registry_both.request("/images/shell/hello.json", accept="application/json")
    assert status == 200
    image = json.loads(body)
    assert image["digest"] == digest and [one["platform"] for one in image["platforms"]] == PLATFORMS
    for one, entry in zip(image["platforms"], index["manifests"], strict=True):
        assert one["oci_digest"] == entry["digest"]
        _, manifest = registry_both.manifest("shell/hello", entry["digest"], accept=OCI_MANIFEST)
        assert [layer["digest"] for layer in one["layers"]] == [layer["digest"] for layer in manifest["layers"]]
    status, _, page = registry_both.request("/images/shell/hello", accept="text/html")
    html = page.decode()
    assert status == 200 and 'id="platforms"' in html
    for platform, entry in zip(PLATFORMS, index["manifests"], strict=True):
        assert f"data-platform='{platform}'" in html and entry["digest"] in html
    assert "Layers of linux/arm64" in html  # the other platform's layers, with their store paths

    # Layer history is per platform: each platform's history holds its own image's layers only.
    meta = registry_both.storage / "meta" / "layering"
    histories = {"linux/amd64": meta / "history", "linux/arm64": meta / "aarch64-linux" / "history"}
    recorded = {
        platform: {path for entry in directory.iterdir() for layer in json.loads(entry.read_bytes())["layers"]
                   for path in layer}
        for platform, directory in histories.items()
    }
    for one in image["platforms"]:
        planned = {path for layer in one["layers"] for path in layer["paths"]}
        assert planned and planned == recorded[one["platform"]], one["platform"]
    assert not recorded["linux/amd64"] & recorded["linux/arm64"]


def test_nixery_build_shows_each_platforms_progress(registry_both: RegistryProcess) -> None:
    plain = nixery("build", "shell/greet", "--registry", registry_both.url)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    for platform in PLATFORMS:
        assert any(re.search(rf"\] building\s+{platform} compressing: ", line) for line in lines), platform
        assert any(re.search(rf"\] building\s+{platform} done: image ready", line) for line in lines), platform
    digest, index = _index(registry_both, "shell/greet")
    assert f"Digest   {digest}" in lines
    assert any(line.startswith("linux/arm64") and index["manifests"][1]["digest"] in line for line in lines)
    # On a terminal: a line of its own for each platform, ending with its size.
    status, raw = nixery_in_pty("build", "shell/cowsay", "--registry", registry_both.url)
    shown = ANSI.sub("", raw)
    assert status == 0, shown[-3000:]
    for platform in PLATFORMS:
        assert re.search(rf"{platform}\s.*\d+ layers", shown), shown[-3000:]


def test_the_build_page_follows_each_platform(registry_both: RegistryProcess, new_page) -> None:  # noqa: F811
    page = build_from_the_form(new_page(), registry_both, "shell/figlet")
    page.wait_for_selector("#digest", timeout=120_000)
    for platform in PLATFORMS:
        row = page.locator(f"#platforms li[data-platform='{platform}']")
        assert row.get_attribute("data-stage") == "done"
        assert "layers" in row.locator(".detail").text_content()
        assert row.locator("a").get_attribute("href").startswith("/builds/")
    digest, index = _index(registry_both, "shell/figlet")
    assert page.locator("#digest").text_content() == digest
    shown = page.locator("#platform-digests").text_content()
    assert all(entry["digest"] in shown for entry in index["manifests"])
    page.screenshot(path=str(ARTIFACTS / "web-build-platforms.png"), full_page=True)
