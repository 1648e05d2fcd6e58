"""The web side against a real registry process: pages in headless Chromium,
the build API and its event stream with an aiohttp client, and the catalogue.

Browser tests need Debian's `chromium` (/usr/bin/chromium) and the `playwright`
Python package (its driver only: no browser download); they are skipped when
either is missing. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import html.parser
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode, urljoin

import aiohttp
import pytest

from nixery.config import debian_set
from tests.registry import (
    REPOSITORY,
    RegistryProcess,
    busybox_set_with,
    many_steps_set,
    ping_wait_while,
    slow_package_set,
)
from tests.sets import require_debian_set

pytestmark = pytest.mark.nix

ARTIFACTS = REPOSITORY / "test-artifacts"
CHROMIUM = os.environ.get("NIXERY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def run_async(coroutine) -> None:
    """asyncio.run in a thread of its own: playwright's sync API keeps an event loop
    running in the test thread while the module's browser is open."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()




# ---- browser -------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser) -> Iterator[Callable[..., object]]:
    contexts = []

    def make(width: int = 1100, height: int = 900):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        return page

    yield make
    for context in contexts:
        context.close()


def no_horizontal_scroll(page, width: int) -> None:
    scroll_width = page.evaluate("document.documentElement.scrollWidth")
    assert scroll_width <= width, f"{page.url} scrolls sideways: {scroll_width} px wide at {width} px"


def test_landing_page_renders(registry: RegistryProcess, new_page) -> None:
    page = new_page()
    response = page.goto(registry.url + "/")
    assert response.status == 200
    assert "Nixery" in page.title()
    pull = page.locator("pre.command code").first.text_content()
    assert pull == f"docker run -ti {registry.host}/shell/hello bash"  # the busybox set has no curl
    facts = page.locator("dl.facts").text_content()
    assert "bundled busybox" in facts and "tree-" in facts
    assert page.locator("form.build-form input[name=image]").count() == 1
    assert page.locator("form.search-form input[name=q]").count() == 1
    page.screenshot(path=str(ARTIFACTS / "web-landing.png"), full_page=True)
    # The browser fetches the page's icon by itself: it asked for /favicon.ico, a 404 for every visitor.
    deadline = time.monotonic() + 30
    while not (icons := [e for e in registry.log_events("http.request") if "favicon" in e["path"]]):
        assert time.monotonic() < deadline, "the browser asked for no icon"
        time.sleep(0.1)
    assert [(e["path"], e["status"]) for e in icons] == [("/static/favicon.svg", 200)]


def _contrast(foreground: str, background: str) -> float:
    """WCAG 2 contrast ratio of two computed CSS colours (`rgb(r, g, b)`)."""

    def luminance(colour: str) -> float:
        channels = [int(x) / 255 for x in colour[colour.index("(") + 1 : colour.index(")")].split(",")[:3]]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    light, dark = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_links_read_well_and_the_package_page_has_a_heading_and_named_columns(
    registry: RegistryProcess, new_page,
) -> None:
    """WCAG AA asks 4.5:1 of text: a link on the code background (the recent builds' image
    names, links in code) had 4.45:1. The package search's page had no first-level heading,
    and its Build buttons' column header was empty, for a screen reader a column without a name."""
    registry.request("/v2/shell/hello/manifests/latest")  # a recent build: its name, a link in code
    page = new_page()
    page.emulate_media(color_scheme="light")
    page.goto(registry.url + "/")
    link = page.locator("a[href^='/builds/'] > code").first
    colours = link.evaluate("e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]")
    assert _contrast(*colours) >= 4.5, colours
    page.goto(f"{registry.url}/packages?q=hello")
    assert page.locator("h1").count() == 1
    headers = page.locator("table.results th")  # what a screen reader names each column
    assert all(headers.nth(i).text_content().strip() for i in range(headers.count()))
    page.goto(registry.url + "/")
    page.fill("#search-q", "hello")  # the same table, drawn by the script as you type
    page.wait_for_selector("#live-results table.results")
    headers = page.locator("#live-results th")
    assert all(headers.nth(i).text_content().strip() for i in range(headers.count()))


def _search_target() -> tuple[dict[str, str], str]:
    """curl in the Debian-derived set when it is generated, else hello in the busybox set."""
    if (debian_set().path / "default.nix").is_file():
        return {"NIXERY_BUNDLED_SET": "debian"}, "curl"
    return {"NIXERY_BUNDLED_SET": "busybox"}, "hello"


def test_search_finds_a_package(start_registry, new_page) -> None:
    env, name = _search_target()
    registry = start_registry(**env)
    page = new_page()
    # Without JavaScript: the form is a GET to /packages.
    page.goto(f"{registry.url}/packages?q={name}")
    first = page.locator("table.results tbody tr").first
    assert first.locator("code").first.text_content() == name
    assert first.locator("td").nth(1).text_content().strip()[0].isdigit()  # a version
    # With JavaScript: results appear while typing on the landing page.
    page.goto(registry.url + "/")
    page.fill("#search-q", name)
    page.wait_for_selector(f"#live-results table.results code:text-is('{name}')")
    page.screenshot(path=str(ARTIFACTS / "web-search.png"), full_page=True)


def test_build_from_the_page_shows_progress(start_registry, new_page, tmp_path: Path) -> None:
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs")))
    page = new_page()
    page.goto(registry.url + "/")
    page.fill("#build-image", "shell/slowpoke")
    page.click("form.build-form button[type=submit]")
    page.wait_for_url("**/builds/**")
    build = page.locator("#build")
    rendered = int(build.get_attribute("data-events"))
    assert build.get_attribute("data-stage") not in ("done", "failed"), "the build should still be running"
    # Events arrive while the page is open: Nix builds the slow package.
    page.wait_for_selector("#stages li.current[data-stage=building], #stages li.past[data-stage=building]")
    page.screenshot(path=str(ARTIFACTS / "web-build-running.png"), full_page=True)
    page.wait_for_selector("#digest", timeout=120_000)
    assert page.locator("#events li").count() > rendered
    stages = page.locator("#stages li.past").evaluate_all("items => items.map(i => i.dataset.stage)")
    assert stages == ["queued", "evaluating", "building", "layering", "compressing", "uploading", "done"]
    assert page.locator("#state").text_content() == "done"
    assert page.title() == "Built shell/slowpoke · Nixery"  # the tab says so too (it said Building)
    digest = page.locator("#digest").text_content()
    manifest_digest, _ = registry.manifest("shell/slowpoke")
    assert digest == manifest_digest
    # Events came in on top, newest first, as the server draws them; the pull command has its Copy
    # button (it had none, here and as drawn again); the stages say what they did as drawn again.
    assert _shows_the_newest_event(page) and "image ready" in page.locator("#events li").first.text_content()
    page.wait_for_selector("#outcome pre.command button.copy")
    live = page.locator("#stages").inner_text()
    page.screenshot(path=str(ARTIFACTS / "web-build-done.png"), full_page=True)
    page.reload()
    page.wait_for_selector("#outcome pre.command button.copy")
    assert page.locator("#stages").inner_text() == live
    # The image page lists the layers and their store paths.
    page.click("text=Layers and store paths")
    assert page.locator("details summary").first.text_content().endswith(("store path", "store paths"))


def test_the_stage_a_build_failed_in_is_not_shown_as_done(start_registry, new_page, tmp_path: Path) -> None:
    """A build whose Nix builder failed showed "Building with Nix" as a finished green step,
    "1 derivations built", above the failure: live and drawn again, it is now the stage it
    ended in, saying what it was doing."""
    pkgs = busybox_set_with(tmp_path / "pkgs", "brokenslow", f"brokenslow-{time.time_ns()}",
                            "$bb/sleep 3; echo the-build-says-why >&2; exit 3")
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_FAILED_BUILD_TTL="0")
    page = new_page()
    page.goto(registry.url + "/")
    page.fill("#build-image", "shell/brokenslow")
    page.click("form.build-form button[type=submit]")
    page.wait_for_url("**/builds/**")
    assert page.locator("#build").get_attribute("data-stage") not in ("done", "failed"), "should still be running"
    page.wait_for_selector("#state.stage-failed", timeout=120_000)
    building = "#stages li[data-stage=building]"
    live = (page.locator(building).get_attribute("class"), page.locator(f"{building} .detail").text_content())
    page.reload()
    drawn = (page.locator(building).get_attribute("class"), page.locator(f"{building} .detail").text_content())
    assert live == drawn == ("ended", "ended building 1 of 1 derivation"), (live, drawn)
    assert page.locator("#stages li.past").evaluate_all("items => items.map(i => i.dataset.stage)") == [
        "queued", "evaluating"]
    assert page.locator("#stages li.failed").count() == 1


def test_a_build_of_a_tag_followed_live_names_the_tag(start_registry, new_page, tmp_path: Path) -> None:
    """The outcome a running build's page draws when the build ends is the one the server
    renders: its pull command and image link name the tag the build was for."""
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs")))
    page = new_page()
    page.goto(registry.url + "/")
    page.fill("#build-image", "shell/slowpoke")
    page.fill("#build-tag", "v2")
    page.click("form.build-form button[type=submit]")
    page.wait_for_url("**/builds/**")
    assert page.locator("#build").get_attribute("data-stage") not in ("done", "failed"), "should still be running"
    page.wait_for_selector("#digest", timeout=120_000)
    live = " ".join(page.locator("#outcome").inner_text().split())
    assert f"docker pull {registry.host}/shell/slowpoke:v2" in live
    page.reload()
    assert " ".join(page.locator("#outcome").inner_text().split()) == live
    page.click("text=Layers and store paths")
    assert page.url.endswith("/images/shell/slowpoke?tag=v2")
    assert f"docker pull {registry.host}/shell/slowpoke:v2" in page.locator("pre.command").first.inner_text()


def test_each_tags_page_of_a_built_image_names_its_own_tag(registry: RegistryProcess) -> None:
    """One finished build answers every post of a built image, whatever the tag: each tag's page
    showed the tag posted last (`shell/hello:v5`'s page said `docker pull .../shell/hello`)."""
    registry.manifest("shell/hello")
    pages = {}
    for tag in ("v5", "latest", "v6"):
        status, _, see = _post_build(registry, {}, image=f"shell/hello:{tag}", browser=True)
        assert status == 303 and see.startswith(b"See /builds/"), (status, see)
        pages[tag] = see.decode().removeprefix("See ")
    for tag, location in pages.items():
        status, _, body = registry.request(location, accept="text/html")
        text = body.decode()
        pull = f"docker pull {registry.host}/shell/hello" + ("" if tag == "latest" else f":{tag}")
        assert status == 200 and f'data-tag="{tag}"' in text and f"{pull}<" in text, (tag, location)


def test_screen_readers_hear_the_outcome_and_which_package_a_build_button_builds(registry: RegistryProcess) -> None:
    """The progress page's end is announced ("Built", "Could not build": the heading's verb, in a
    live region shown from the start), and each search result's "Build" button says what it
    builds: both were silent or the same words."""
    registry.manifest("shell/hello")  # built: its page has ended
    status, _, see = _post_build(registry, {}, image="shell/hello", browser=True)
    status, _, body = registry.request(see.decode().removeprefix("See "), accept="text/html")
    assert status == 200 and b'<span id="verb" aria-live="polite">Built</span>' in body
    status, _, body = registry.request("/packages?q=hello", accept="text/html")
    assert status == 200 and b'aria-label="Build shell/hello"' in body, body[:2000]


def test_usable_at_phone_width(registry: RegistryProcess, new_page) -> None:
    registry.manifest("shell/hello")  # something built, for the image page and the recent list
    page = new_page(width=390, height=844)
    for path, shot in [
        ("/", "web-mobile-landing.png"),
        ("/packages?q=hello", "web-mobile-search.png"),
        ("/images/shell/hello", "web-mobile-image.png"),
    ]:
        assert page.goto(registry.url + path).status == 200
        no_horizontal_scroll(page, 390)
        page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
    # The documentation too: its wide tables made whole pages scroll sideways.
    page.goto(registry.url + "/docs")
    docs = page.locator("ul.docs > li > a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    for path in ["/docs", *docs, "/docs/benchmarks/cold_build"]:
        assert page.goto(registry.url + path).status == 200
        no_horizontal_scroll(page, 390)
    page.goto(registry.url + "/")
    page.fill("#build-image", "shell/fortune")
    page.click("form.build-form button[type=submit]")
    page.wait_for_selector("#digest", timeout=120_000)
    no_horizontal_scroll(page, 390)
    page.screenshot(path=str(ARTIFACTS / "web-mobile-build.png"), full_page=True)


def test_an_images_layer_table_fits_a_phone(start_registry, new_page, tmp_path: Path) -> None:
    """What a layer holds is package names with versions that have no break (Debian's
    `12.2.0-14+deb12u1`): at 390 px the table grew wider than its card, whose edge hid the
    "Holds" column half-way, store paths included. It fits now, nothing hidden."""
    version = "12.2.0-14+deb12u1.2.36-9+deb12u13.20240117"
    script = "$bb/mkdir -p $out/bin; echo 'echo wide' > $out/bin/widename"
    registry = start_registry(NIXERY_PKGS_PATH=str(busybox_set_with(tmp_path / "pkgs", "widename",
                                                                     f"widename-{version}", script)))
    registry.manifest("shell/widename")
    page = new_page(width=390, height=844)
    assert page.goto(registry.url + "/images/shell/widename").status == 200
    page.evaluate("document.querySelectorAll('.table-wrap details').forEach(d => d.open = true)")
    assert version in page.locator(".table-wrap").text_content()
    no_horizontal_scroll(page, 390)
    hidden = page.locator(".table-wrap").evaluate_all("boxes => boxes.map(b => b.scrollWidth - b.clientWidth)")
    assert hidden and max(hidden) <= 1, f"the layer table is {hidden} px wider than its box"
    page.screenshot(path=str(ARTIFACTS / "web-mobile-wide-layers.png"), full_page=True)


def test_the_recent_builds_name_their_tag_and_lead_to_its_pages(registry: RegistryProcess) -> None:
    """A build of a tag was listed on the start page as its image alone (`shell/hello`) and
    linked to `/builds/ID`, whose page then named the image as `latest` (`docker pull
    HOST/shell/hello`) unless this worker's form had started it: a pull's build, another
    worker's. Each names its tag now, links to its progress page by an address that names
    image and tag, and once built to that tag's image page."""
    registry.manifest("shell/hello", "v2")  # a pull builds it
    status, _, body = registry.request("/", accept="text/html")
    assert status == 200
    (row,) = re.findall(r"<li>.*?</li>", body.decode().split("<h2>Recent builds</h2>")[1].split("</section>")[0])
    progress, image = (html.unescape(link) for link in re.findall(r'href="([^"]+)"', row))
    assert "<code>shell/hello:v2</code>" in row, row
    assert re.fullmatch(r"/builds/[0-9a-f]+\?image=shell/hello&tag=v2", progress), progress
    assert image == "/images/shell/hello?tag=v2"
    pull = f"docker pull {registry.host}/shell/hello:v2<"
    for path in (progress, progress.split("?")[0], image):  # as linked, the build's bare address, the image
        status, _, page = registry.request(path, accept="text/html")
        assert status == 200 and pull in page.decode(), path


def test_without_javascript_a_builds_page_shows_its_latest_events_first(
    start_registry, browser, tmp_path: Path
) -> None:
    """Without JavaScript, a build's event list opened at its oldest event ("queued"), the
    build's latest state out of sight below (the script used to scroll it down). The list is
    newest first: its box opens on the latest event, with or without a script."""
    registry = start_registry(NIXERY_PKGS_PATH=str(many_steps_set(tmp_path / "pkgs", 24)))

    async def build() -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            started = await _start(session, registry.url, "shell/manysteps")
            assert (await _sse(session, registry.url + started["events"]))[-1][1] == "done"
            return started["id"]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the browser's event loop runs in this thread
        build_id = pool.submit(asyncio.run, build()).result()
    context = browser.new_context(java_script_enabled=False, viewport={"width": 1100, "height": 900})
    try:
        page = context.new_page()
        assert page.goto(f"{registry.url}/builds/{build_id}").status == 200
        events = page.locator("#events")
        assert events.evaluate("e => e.scrollHeight > e.clientHeight"), "too few events to scroll"
        assert _shows_the_newest_event(page)
        newest = page.locator("#events li").first
        assert "image ready" in newest.text_content()
        assert newest.evaluate("item => { const box = item.parentElement.getBoundingClientRect(), "
                               "own = item.getBoundingClientRect(); return own.top >= box.top && "
                               "own.bottom <= box.bottom; }"), "the newest event is out of the list's view"
        page.screenshot(path=str(ARTIFACTS / "web-build-no-script.png"), full_page=True)
    finally:
        context.close()


def test_friendly_error_page_for_a_bad_name(registry: RegistryProcess, new_page) -> None:
    page = new_page()
    page.goto(registry.url + "/")
    page.fill("#build-image", "shell/no such thing")
    with page.expect_navigation() as navigation:
        page.click("form.build-form button[type=submit]")
    assert navigation.value.status == 400
    assert "invalid package name" in page.locator(".card.error .message").text_content()
    assert page.locator("#build-image").input_value() == "shell/no such thing"  # to correct it
    page.screenshot(path=str(ARTIFACTS / "web-error.png"), full_page=True)


def _debian_set() -> dict[str, str]:
    """The environment of a registry on the Debian-derived set (CI generates it: missing, it fails there)."""
    require_debian_set()
    return {"NIXERY_BUNDLED_SET": "debian"}


def _shows_the_newest_event(page) -> bool:
    """The event list's box shows its newest event: first in the list, and not scrolled away."""
    return page.locator("#events").evaluate(
        "e => e.scrollTop === 0 && +e.firstElementChild.dataset.index === "
        "Math.max(...[...e.children].map(item => +item.dataset.index))"
    )


def test_search_build_button_builds_a_dotted_debian_name(start_registry, new_page) -> None:
    """The search shows the set's own names; its Build button builds what it shows, also a
    Debian name with a dot (`python3.11`, which a dotted path would look for in `python3`)."""
    registry = start_registry(**_debian_set())
    page = new_page()
    page.goto(f"{registry.url}/packages?q=python3.11")
    row = page.locator("table.results tbody tr").filter(has=page.locator("code", has_text="python3.11")).first
    assert row.locator("code").first.text_content() == "python3.11"
    row.locator("button").click()
    page.wait_for_url("**/builds/**")
    page.wait_for_selector("#digest, #error", timeout=300_000)
    assert page.locator("#state").text_content() == "done", page.locator("#outcome").text_content()
    assert f"docker pull {registry.host}/shell/python3.11" in page.locator("#outcome").text_content()
    assert page.locator("#digest").text_content() == registry.manifest("shell/python3.11")[0]
    # The finished page shows its newest events, not the first ones.
    page.reload()
    events = page.locator("#events")
    assert events.evaluate("e => e.scrollHeight > e.clientHeight"), "too few events to scroll"
    assert _shows_the_newest_event(page)
    page.screenshot(path=str(ARTIFACTS / "web-build-dotted-name.png"), full_page=True)


def test_a_forgotten_build_id_shows_a_page_that_helps(start_registry, new_page, tmp_path: Path) -> None:
    """Builds live in memory: a bookmarked progress page after a restart says the build is not
    known, links to its image when that is built, and offers to build it when not."""
    registry = start_registry(tmp_path / "kept", NIXERY_BUNDLED_SET="busybox")
    page = new_page()
    response = page.goto(registry.url + "/builds/0123456789abcdef")
    assert response.status == 404 and response.headers["content-type"].startswith("text/html")
    assert "is not known here" in page.locator("#unknown-build h1").text_content()
    page.goto(registry.url + "/")
    page.fill("#build-image", "figlet/shell")
    page.click("form.build-form button[type=submit]")
    page.wait_for_selector("#digest", timeout=120_000)
    bookmark = page.url
    registry.stop()
    registry.start()  # same storage and port; the build is forgotten
    response = page.goto(bookmark)
    assert response.status == 404
    assert "Its image is built" in page.locator("#unknown-build").text_content()
    page.screenshot(path=str(ARTIFACTS / "web-unknown-build.png"), full_page=True)
    page.click("#unknown-build a[href^='/images/']")
    assert page.locator("h1 code").text_content() == "figlet/shell"
    # A forgotten build of an image not built: a button builds it.
    page.goto(registry.url + "/builds/00ff?image=shell/cowsay")
    page.click("#unknown-build button")
    page.wait_for_selector("#digest", timeout=120_000)
    assert "shell/cowsay" in page.locator("#outcome").text_content()


def test_a_progress_page_open_across_a_restart_says_the_build_was_stopped_and_builds_it_again(
    start_registry, new_page, tmp_path: Path
) -> None:
    """A registry restarted while a page follows a build: the page's event stream does not hold
    the shutdown. The page stayed on "Building" for ever; then, once the registry was back, said
    the build was gone. Now it says at once that the registry stopped the build as it shut down,
    and its button builds the image again once the registry is back."""
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs", seconds=40)))
    page = new_page()
    page.goto(registry.url + "/")
    page.fill("#build-image", "shell/slowpoke")
    page.click("form.build-form button[type=submit]")
    page.wait_for_selector("#stages li.current[data-stage=building]")
    stopping = time.monotonic()
    registry.stop()
    assert time.monotonic() - stopping < 15, "the build, which no pull waited for, was not stopped at once"
    stopped = registry.log_events("registry.stopped")
    assert stopped and stopped[-1]["cut_off"] == 0, "the open progress page held the shutdown"
    page.wait_for_selector("#build-again button", timeout=30_000)
    assert "stopped this build as it shut down" in page.locator("#outcome").text_content()
    assert page.locator("#error").text_content() == "stopped: the registry is shutting down"
    assert page.locator("#build-again button").text_content() == "Build shell/slowpoke again"
    first = page.url
    registry.start()
    page.click("#build-again button")
    page.wait_for_selector("#stages li.current[data-stage=building]", timeout=60_000)
    assert page.url != first and "/builds/" in page.url


def test_not_built_and_misspelt_images_offer_a_build(start_registry, new_page, tmp_path: Path) -> None:
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs")), NIXERY_MAX_BUILDS="1")
    page = new_page()
    response = page.goto(registry.url + "/images/shell/fortune")
    assert response.status == 404
    assert "is not built yet" in page.locator("#not-built h1").text_content()
    page.wait_for_selector("#not-built pre.command button.copy")  # as every pull command has
    page.click("#not-built button")
    page.wait_for_selector("#digest", timeout=120_000)
    # A misspelt name: the page names the nearest names and builds them with one click. It
    # waits for the one build slot (slowpoke's), so the failure arrives while the page follows it.
    run_async(_start_in_session(registry.url, "slowpoke"))
    page.goto(registry.url + "/")
    page.fill("#build-image", "shell/figlett")
    page.click("form.build-form button[type=submit]")
    page.wait_for_selector("#error", timeout=120_000)
    assert page.title() == "Could not build shell/figlett · Nixery"
    assert "figlett (did you mean figlet?)" in page.locator("#error").text_content()
    page.screenshot(path=str(ARTIFACTS / "web-misspelt.png"), full_page=True)
    page.click("text=Build shell/figlet instead")
    page.wait_for_selector("#digest", timeout=120_000)
    assert f"docker pull {registry.host}/shell/figlet" in page.locator("#outcome").text_content()
    # With a name that has no nearest one, no button: `shell/figlet/xqzvwk` would fail too.
    page.goto(registry.url + "/")
    page.fill("#build-image", "shell/figlett/xqzvwk")
    page.click("form.build-form button[type=submit]")
    page.wait_for_selector("#error", timeout=120_000)
    assert "figlett (did you mean figlet?)" in page.locator("#error").text_content()
    assert page.locator("#outcome .suggestion").count() == 0
    page.reload()
    assert page.locator("#error").count() == 1 and page.locator("#outcome .suggestion").count() == 0


# ---- HTTP: the build API and the event stream --------------------------------------


async def _start(session: aiohttp.ClientSession, url: str, image: str) -> dict:
    async with session.post(f"{url}/builds", json={"image": image}) as response:
        assert response.status == 202, await response.text()
        assert response.headers["Location"].startswith("/builds/")
        return await response.json()


async def _start_in_session(url: str, image: str) -> None:
    async with aiohttp.ClientSession() as session:
        await _start(session, url, image)


async def _sse(session: aiohttp.ClientSession, url: str, **headers: str) -> list[tuple[str, str, dict]]:
    """(id, event name, data) of every message until the stream ends."""
    messages, fields = [], {}
    async with session.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    messages.append((fields.get("id"), fields.get("event"), json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value
    return messages


def test_event_stream_in_order_ending_with_the_digest(start_registry, tmp_path: Path) -> None:
    registry = start_registry(NIXERY_PKGS_PATH=str(slow_package_set(tmp_path / "pkgs", seconds=2)))

    async def run() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            started = await _start(session, registry.url, "shell/slowpoke")
            # Two followers: one from the start, one joining late (replay, then live).
            first = asyncio.ensure_future(_sse(session, registry.url + started["events"]))
            await asyncio.sleep(0.5)
            late = await _sse(session, registry.url + started["events"])
            messages = await first
            assert [m[2] for m in late] == [m[2] for m in messages]
            indexes = [m[2]["index"] for m in messages]
            assert indexes == list(range(len(messages)))
            assert [int(m[0]) for m in messages] == indexes
            assert all(name == data["stage"] for _, name, data in messages)
            stages = [data["stage"] for _, _, data in messages]
            order = ["queued", "evaluating", "building", "layering", "compressing", "uploading", "done"]
            assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == order
            times = [data["time"] for _, _, data in messages]
            assert times == sorted(times)
            last = messages[-1][2]
            assert last["digest"].startswith("sha256:") and last["layers"] >= 2 and last["size"] > 0
            compressing = [data for _, _, data in messages if data["stage"] == "compressing"]
            assert compressing[-1]["layers_done"] == compressing[-1]["layers_total"] == last["layers"]
            # Resuming after the last event: nothing more (204 stops EventSource reconnecting).
            async with session.get(
                registry.url + started["events"], headers={"Last-Event-ID": str(indexes[-1])}
            ) as response:
                assert response.status == 204
            async with session.get(registry.url + started["events"], params={"after": "3"}) as response:
                assert response.status == 200
            async with session.get(registry.url + started["json"]) as response:
                doc = await response.json()
                assert doc["finished"] and doc["stage"] == "done" and len(doc["events"]) == len(messages)
            digest, _ = registry.manifest("shell/slowpoke")
            assert last["digest"] == digest

    run_async(run())


def test_build_api_errors(registry: RegistryProcess) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{registry.url}/builds", json={"image": "shell/bad name"}) as response:
                assert response.status == 400
                assert (await response.json())["errors"][0]["code"] == "NAME_INVALID"
            async with session.post(f"{registry.url}/builds", json={"image": "shell/hello", "tag": "a..b"}) as response:
                assert response.status == 400
                error = (await response.json())["errors"][0]
                assert (error["code"], error["detail"]["kind"]) == ("NAME_INVALID", "TAG_INVALID")
            async with session.post(f"{registry.url}/builds", data={"image": "shell/bad name"}) as response:
                assert response.status == 400 and response.content_type == "text/html"
            # A tag in the name and another in the tag field: one was dropped without a word.
            both = {"image": "shell/hello:v1", "tag": "v2"}
            async with session.post(f"{registry.url}/builds", json=both) as response:
                error = (await response.json())["errors"][0]
                assert response.status == 400 and error["detail"]["kind"] == "TAG_INVALID", error
                assert "the tag field another" in error["message"], error
            # A body of another type was read as an empty form: "the image name lists no packages".
            async with session.post(f"{registry.url}/builds", data=b"shell",
                                    headers={"Content-Type": "text/plain", "Accept": "application/json"}) as response:
                error = (await response.json())["errors"][0]
                assert response.status == 400 and error["detail"]["kind"] == "REQUEST_INVALID", error
                assert "takes a JSON object (application/json) or a form" in error["message"], error
            for body in ({"json": {}}, {"json": {"tag": "v1"}}, {}):  # {}: no body at all
                async with session.post(f"{registry.url}/builds", headers={"Accept": "application/json"},
                                        **body) as response:
                    error = (await response.json())["errors"][0]
                    assert response.status == 400 and error["code"] == "NAME_INVALID", (body, error)
                    assert error["message"].startswith("the request names no image"), (body, error)
            for path in ("/builds/0123456789abcdef", "/builds/0123456789abcdef.json", "/builds/00ff/events"):
                async with session.get(registry.url + path, headers={"Accept": "application/json"}) as response:
                    assert response.status == 404, path
                    assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"
            page_url = f"{registry.url}/builds/0123456789abcdef"
            async with session.get(page_url, headers={"Accept": "text/html"}) as response:
                assert response.status == 404 and response.content_type == "text/html"
            # A path no route serves is a page to a browser too; the registry API's stay JSON.
            browser = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
            for path in ("/nosuchpage", "/images/", "/builds/"):
                async with session.get(registry.url + path, headers=browser) as response:
                    assert response.status == 404 and response.content_type == "text/html", path
            for path in ("/v2/nosuch/endpoint", "/v2"):
                async with session.get(registry.url + path, headers=browser) as response:
                    assert response.content_type == "application/json", path
            # Only browsers get error pages: a client that names no HTML gets the registry's JSON error.
            for accept in ("*/*", ""):
                async with session.get(page_url, headers={"Accept": accept}) as response:
                    assert response.status == 404 and response.content_type == "application/json", accept
                    assert (await response.json())["errors"][0]["code"] == "NAME_UNKNOWN"
            # A build that fails reports the registry's error as its last event.
            started = await _start(session, registry.url, "shell/nosuchpackage")
            messages = await _sse(session, registry.url + started["events"])
            assert messages[-1][2]["stage"] == "failed"
            assert "nosuchpackage" in messages[-1][2]["message"]
            # A form post redirects to the progress page.
            async with session.post(
                f"{registry.url}/builds", data={"image": f"{registry.host}/shell/hello:latest"}, allow_redirects=False
            ) as response:
                assert response.status == 303 and response.headers["Location"].startswith("/builds/")

    run_async(run())


def test_build_api_fields_that_are_not_strings_are_refused_as_such(registry: RegistryProcess) -> None:
    """JSON `image` and `tag` values that are not strings were read as Python's text for them:
    `{"image": {"a": 1}}` was refused as "invalid tag ' 1}'", `["hello"]` as a package named
    "['hello']", and `{"tag": 1e999}` started a build tagged `inf`. Now each is refused as a
    value of the wrong type; null is still as if absent."""
    refused = {
        '{"image": {"a": 1}}': ("NAME_INVALID", "`image` must be a string", "an object"),
        '{"image": ["hello"]}': ("NAME_INVALID", "`image` must be a string", "an array"),
        '{"image": 5}': ("NAME_INVALID", "`image` must be a string", "a number"),
        '{"image": "hello", "tag": 1e999}': ("TAG_INVALID", "`tag` must be a string", "a number"),
        '{"image": "hello", "tag": true}': ("TAG_INVALID", "`tag` must be a string", "a boolean"),
    }
    for body, (kind, said, what) in refused.items():
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
        connection.request("POST", "/builds", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        connection.close()
        assert response.status == 400, (body, answer)
        error = json.loads(answer)["errors"][0]
        assert error["detail"]["kind"] == kind, (body, error)
        assert said in error["message"] and what in error["message"], (body, error)
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
    connection.request("POST", "/builds", body='{"image": "hello", "tag": null}',
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 202 and json.loads(response.read())["tag"] == "latest"
    connection.close()


def test_an_event_stream_resumed_from_an_index_that_is_no_number_starts_at_the_beginning(
    registry: RegistryProcess,
) -> None:
    """`Last-Event-ID` or `?after=` that str.isdigit takes but int() refuses (`²`, a number of
    over 4300 digits) was a 500 INTERNAL_ERROR with a traceback in the log; now such an index is
    ignored, as any other that is not a number is, and a number past every event is one."""
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
    connection.request("POST", "/builds", body=json.dumps({"image": "hello"}),
                       headers={"Content-Type": "application/json"})
    started = json.loads(connection.getresponse().read())
    connection.close()
    events = started["events"]
    deadline = time.monotonic() + 120
    while not json.loads(registry.request(started["json"], accept="application/json")[2])["finished"]:
        assert time.monotonic() < deadline, "the build did not finish"
        time.sleep(0.2)
    superscript_two = "²".encode().decode("latin-1")  # http.client sends a header's str as latin-1: these are its UTF-8
    for path, headers in ((f"{events}?after=%C2%B2", {}), (events, {"Last-Event-ID": superscript_two})):
        status, answer_headers, body = registry.request(path, accept="text/event-stream", headers=headers)
        assert status == 200, (path, headers, body[:300])
        assert answer_headers["Content-Type"].startswith("text/event-stream")
        assert b"id: 0\n" in body, body[:300]  # from the first event
    for path, headers in ((f"{events}?after={'9' * 5000}", {}), (events, {"Last-Event-ID": "9" * 5000})):
        status, _, body = registry.request(path, accept="text/event-stream", headers=headers)
        assert status == 204, (path[:80], body[:300])  # past the last event of a finished build
    assert not registry.log_events("http.internal_error")


#: (Content-Type, more headers, body) of POST /builds bodies that cannot be read.
UNREADABLE_BODIES = [
    ("application/json", {}, b"[" * 30_000 + b"]" * 30_000),  # deeper than Python's JSON parser goes
    ("application/json", {}, b'{"image": '),
    ("application/json; charset=no-such-charset", {}, b'{"image": "shell"}'),
    ("application/json", {"Content-Encoding": "gzip"}, b'{"image": "shell"}'),  # not gzip
    ("multipart/form-data", {}, b"--x\r\n\r\nshell\r\n--x--\r\n"),  # no boundary
    ("multipart/form-data; boundary=x", {}, b"--x\r\nnot a header\r\n\r\nshell\r\n--x--\r\n"),
    ("multipart/form-data; boundary=x", {}, b"no boundary here"),
    ("multipart/form-data; boundary=x", {}, b"--x\r\nContent-Disposition: form-data\r\n\r\nshell\r\n--x--\r\n"),
    # A Content-Transfer-Encoding aiohttp does not know: its RuntimeError was a 500 INTERNAL_ERROR.
    ("multipart/form-data; boundary=x", {},
     b'--x\r\nContent-Disposition: form-data; name="image"\r\nContent-Transfer-Encoding: x\r\n\r\nshell\r\n--x--\r\n'),
    ("multipart/form-data; boundary=x", {},  # a part that is itself multipart: no form field
     b"--x\r\nContent-Type: multipart/mixed; boundary=y\r\n\r\n--y\r\n\r\nshell\r\n--y--\r\n--x--\r\n"),
    ("application/x-www-form-urlencoded; charset=no-such-charset", {}, b"image=shell"),
]


def test_a_failed_build_with_huge_log_lines_has_a_page_of_normal_size(start_registry, tmp_path: Path) -> None:
    """A builder that prints lines of ~1 MB before failing: its page shows the start and end of
    each of Nix's last lines, not 10 MB of them (the page, the build's JSON, and each of the 200
    builds kept in memory were that large; its last event was one line too long for aiohttp's
    reader, so `nixery build` failed with a traceback, as this test's reader did)."""
    lines = "for i in 1 2 3 4 5 6 7 8 9 10; do head -c 900000 /dev/zero | $bb/tr '\\\\0' x; echo; done"
    pkgs = busybox_set_with(tmp_path / "pkgs", "loud", "loud-1.0", f"{lines}; exit 1")
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs))

    async def run() -> dict:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            started = await _start(session, registry.url, "shell/loud")
            await _sse(session, registry.url + started["events"])
            return started

    started: dict = {}
    run_async(_keep(run(), started))
    status, _, page = registry.request(started["progress"], accept="text/html")
    assert status == 200 and b"The build failed" in page
    assert len(page) < 200_000, f"a page of {len(page)} bytes"
    assert b"characters left out] xxxx" in page and b"loud-1.0.drv&#x27; failed with exit code 1" in page
    status, _, body = registry.request(started["json"], accept="application/json")
    assert status == 200 and len(body) < 200_000


async def _keep(coroutine, into: dict) -> None:
    into.update(await coroutine)


def test_build_bodies_that_cannot_be_read_are_the_clients_error(registry: RegistryProcess) -> None:
    """POST /builds with a body aiohttp or the JSON parser cannot read: 400 REQUEST_INVALID,
    not a 500 with a traceback in the log; the registry serves on. JSON over 64 KiB: 413."""
    for content_type, headers, body in UNREADABLE_BODIES:
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
        try:
            connection.request(
                "POST", "/builds", body=body,
                headers={"Content-Type": content_type, "Accept": "application/json", **headers},
            )
            response = connection.getresponse()
            status, answer = response.status, response.read()
        finally:
            connection.close()
        assert status == 400, (content_type, body[:40], answer)
        error = json.loads(answer)["errors"][0]
        assert (error["code"], error["detail"]["kind"]) == ("UNSUPPORTED", "REQUEST_INVALID"), (content_type, error)
    assert not registry.log_events("http.internal_error")
    # aiohttp went on to read a body that does not match its Content-Encoding, and logged that as a
    # plain-text "Unhandled exception" traceback of ~40 lines.
    assert not registry.plain_text_lines(), registry.plain_text_lines()[:5]
    assert registry.request("/v2/")[0] == 200
    # JSON is parsed on the event loop: a body longer than a build request can be is not parsed.
    padded = json.dumps({"image": "shell", "padding": [0] * 40_000}).encode()
    for headers in ({}, {"Transfer-Encoding": "chunked"}):
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
        try:
            connection.request(
                "POST", "/builds", body=padded, encode_chunked=bool(headers),
                headers={"Content-Type": "application/json", "Accept": "application/json", **headers},
            )
            response = connection.getresponse()
            status, answer = response.status, response.read()
        finally:
            connection.close()
        assert status == 413, (headers, answer[:300])
        assert json.loads(answer)["errors"][0]["detail"] == {"limit": 65536, "kind": "REQUEST_TOO_LARGE"}


def _post_build(
    registry: RegistryProcess, headers: dict[str, str], *, image: str, browser: bool
) -> tuple[int, str, bytes]:
    """POST /builds as a browser's form (HTML errors) or as an API client (JSON); (status, type, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
    try:
        if browser:
            body = urlencode({"image": image}).encode()
            kind = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"}
        else:
            body = json.dumps({"image": image}).encode()
            kind = {"Content-Type": "application/json", "Accept": "application/json"}
        connection.request("POST", "/builds", body=body, headers={**kind, **headers})
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def test_posts_from_other_sites_pages_are_refused(registry: RegistryProcess) -> None:
    """A page elsewhere cannot make a visitor's browser (logged in: it sends the basic
    credentials by itself) start builds; the registry's own pages, `nixery build`
    and scripts still can."""
    own = f"127.0.0.1:{registry.port}"
    credentials = {"Authorization": "Basic " + base64.b64encode(b"alice:secret").decode()}
    cross_site = [
        {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": f"http://127.0.0.1:{registry.port + 1}", "Sec-Fetch-Site": "same-site"},  # another port
        {"Origin": "http://evil.example"},  # a browser that sends no Sec-Fetch-Site
        {"Origin": f"http://{own}.evil.example"},
        {"Origin": "null"},  # a sandboxed page
        # Anyone can send this header; it counts only from NIXERY_TRUSTED_PROXIES.
        {"Origin": "http://evil.example", "X-Forwarded-Host": "evil.example"},
        # An empty Host names no host: the pages' stand-in for it, localhost, is not the registry's.
        {"Origin": "http://localhost", "Host": ""},
    ]
    for headers in cross_site:
        status, kind, body = _post_build(registry, {**credentials, **headers}, image="shell/figlet", browser=False)
        assert status == 403 and kind.startswith("application/json"), (headers, status, body)
        error = json.loads(body)["errors"][0]
        assert error["code"] == "DENIED" and "forms only take posts from its own pages" in error["message"]
        status, kind, body = _post_build(registry, {**credentials, **headers}, image="shell/figlet", browser=True)
        assert status == 403 and kind.startswith("text/html") and b"Not allowed" in body, (headers, status)
    assert not [e for e in registry.log_events("http.build_started") if "figlet" in e["image"]]
    same_site = [
        {},  # not from a page: nixery build, curl
        {"Origin": f"http://{own}", "Sec-Fetch-Site": "same-origin"},
        {"Origin": f"http://{own}"},
        {"Origin": f"https://{own}"},  # behind a proxy that ends TLS and keeps the Host
        {"Sec-Fetch-Site": "none"},  # the user's own action
    ]
    for headers in same_site:
        status, _, body = _post_build(registry, {**credentials, **headers}, image="shell/hello", browser=False)
        assert status == 202, (headers, status, body)


def test_behind_a_trusted_proxy_its_forwarded_host_is_the_registrys(
    start_registry: Callable[..., RegistryProcess],
) -> None:
    """A proxy that sends its upstream's name as `Host` says the host the browser used in
    `X-Forwarded-Host`: from a trusted proxy the pages name it and the forms take posts from it.
    NIXERY_PUBLIC_HOST counts as the registry's own too."""
    registry = start_registry(
        NIXERY_BUNDLED_SET="busybox", NIXERY_TRUSTED_PROXIES="127.0.0.1", NIXERY_PUBLIC_HOST="public.example:5000"
    )
    proxied = {"Host": "backend:8080", "X-Forwarded-Host": "registry.example", "X-Forwarded-Proto": "https"}
    for headers in [{**proxied, "Origin": "https://registry.example"}, {"Origin": "http://public.example:5000"}]:
        status, _, body = _post_build(registry, headers, image="shell/hello", browser=False)
        assert status == 202, (headers, status, body)
    status, _, body = _post_build(registry, {**proxied, "Origin": "https://backend:8080"}, image="shell", browser=False)
    assert status == 202, body  # the Host the proxy sent names the registry as well
    status, _, body = _post_build(registry, {**proxied, "Origin": "https://evil.example"}, image="shell", browser=False)
    assert status == 403, body
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
    try:
        connection.request("GET", "/", headers={**proxied, "Accept": "text/html"})
        response = connection.getresponse()
        status, page = response.status, response.read()
    finally:
        connection.close()
    assert status == 200 and b"serving <code>registry.example</code>" in page, page[-2000:]
    assert b"https://registry.example/builds/" in page or b"docker run -ti registry.example/" in page
    # A link-local address with its zone: links keep it (RFC 6874's %25), as for a Host (test_request_headers).
    zoned = {**proxied, "X-Forwarded-Host": "[fe80::1%eth0]:8080"}
    status, _, body = _post_build(registry, zoned, image="shell/hello", browser=False)
    started = json.loads(body)["id"]
    logged = [e for e in registry.log_events("http.build_started") if e["build"] == started]
    assert logged[-1]["progress"].startswith("https://[fe80::1%25eth0]:8080/builds/"), logged


def test_a_form_on_another_site_cannot_start_builds(registry: RegistryProcess, new_page) -> None:
    """The same in a real browser: a form on another site, posted to the registry."""
    page = new_page()
    form = f"""<form method="post" action="{registry.url}/builds">
      <input name="image" value="shell/cowsay"><button type="submit">Build</button></form>"""
    page.route("http://evil.example/", lambda route: route.fulfill(status=200, content_type="text/html", body=form))
    page.goto("http://evil.example/")
    with page.expect_navigation() as navigation:
        page.click("button")
    assert navigation.value.status == 403
    assert "Not allowed" in page.content()
    assert not [e for e in registry.log_events("http.build_started") if "cowsay" in e["image"]]


@contextlib.contextmanager
def _page_served_elsewhere(html: str) -> Iterator[str]:
    """The URL of a page on another origin of this machine (a real server: Chromium lets
    only local pages frame or reach local addresses)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()


def test_other_sites_cannot_frame_the_pages_which_run_under_their_policy(
    registry: RegistryProcess, new_page
) -> None:
    """Another site cannot show a page in a disguised frame (and have its Build button clicked);
    the pages' own style sheet, scripts, live search and event stream pass their policy."""
    page = new_page()
    with _page_served_elsewhere(f'<iframe src="{registry.url}/"></iframe>') as elsewhere:
        page.goto(elsewhere)
        framed = page.frames[1]
        framed.wait_for_load_state("load")
        assert framed.locator("form.build-form").count() == 0, "the start page was shown in another site's frame"
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.goto(registry.url + "/")
    page.fill("#search-q", "hello")
    page.wait_for_selector("#live-results table.results code:text-is('hello')")
    page.locator("#live-results button").first.click()
    page.wait_for_selector("#digest", timeout=120_000)
    page.goto(registry.url + "/images/shell/hello")
    page.wait_for_selector("pre.command button.copy")  # nixery.js ran
    assert page.evaluate("getComputedStyle(document.querySelector('main')).maxWidth") != "none"  # style.css applied
    assert not [line for line in console if "Content Security Policy" in line]


def test_pages_escape_what_the_request_says(registry: RegistryProcess) -> None:
    evil = '<script>alert("x")</script>'
    with socket.create_connection(("127.0.0.1", registry.port), timeout=30) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {evil}\r\nAccept: text/html\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    # A Host that is no host name is refused (nixery.http.hosts), and not shown, escaped or not.
    assert response.startswith(b"HTTP/1.1 400") and b"REQUEST_INVALID" in response
    assert b"alert" not in response
    status, _, body = registry.request("/packages?q=" + "%3Cb%3Ebold%3C/b%3E", accept="text/html")
    assert status == 200 and b"<b>bold</b>" not in body and b"&lt;b&gt;bold&lt;/b&gt;" in body


def test_the_image_pages_sbom_links_save_json_files_named_after_the_image(
    registry: RegistryProcess, new_page, tmp_path: Path,
) -> None:
    """The SBOM and provenance links of an image's page are blobs (application/octet-stream,
    an address ending in the digest): a click saved a file called `sha256:...`, no extension."""
    registry.request("/v2/shell/hello/manifests/latest")
    page = new_page()
    page.goto(registry.url + "/images/shell/hello")
    names = {}
    for label in ("SBOM (SPDX 2.3 JSON)", "SBOM (CycloneDX 1.5 JSON)", "provenance (in-toto, SLSA v1)"):
        with page.expect_download() as saved:
            page.get_by_role("link", name=label).click()
        names[label] = saved.value.suggested_filename
        saved.value.save_as(tmp_path / names[label])
        json.loads((tmp_path / names[label]).read_text())  # the document itself
    assert names == {
        "SBOM (SPDX 2.3 JSON)": "shell_hello.spdx.json", "SBOM (CycloneDX 1.5 JSON)": "shell_hello.cdx.json",
        "provenance (in-toto, SLSA v1)": "shell_hello.provenance.json",
    }


def test_image_json_lists_store_paths_per_layer(registry: RegistryProcess) -> None:
    digest, manifest = registry.manifest("shell/hello")
    status, _, body = registry.request("/images/shell/hello.json", accept="application/json")
    assert status == 200, body
    image = json.loads(body)
    assert image["digest"] == digest and image["name"] == "shell/hello"  # as first asked for
    assert [layer["digest"] for layer in image["layers"]] == [layer["digest"] for layer in manifest["layers"]]
    paths = [path for layer in image["layers"] for path in layer["paths"]]
    assert any(path.endswith("-hello-2.12.1") for path in paths)
    assert all(path.startswith("/nix/store/") for path in paths)
    assert image["layers"][-1]["paths"] == []  # the entry-point layer
    status, _, body = registry.request("/images/shell/cowsay.json", accept="application/json")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # A client that asks for JSON gets it without the suffix too (it got the HTML page; its 404 was JSON).
    status, headers, body = registry.request("/images/shell/hello", accept="application/json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == image
    started = json.loads(_post_build(registry, {}, image="shell/hello", browser=False)[2])
    status, headers, body = registry.request(f"/builds/{started['id']}", accept="application/json")
    assert status == 200 and json.loads(body)["id"] == started["id"]


def test_packages_json(registry: RegistryProcess) -> None:
    status, _, body = registry.request("/packages?q=hello&format=json", accept="application/json")
    assert status == 200
    doc = json.loads(body)
    assert doc["results"][0] == {"name": "hello", "kind": "package", "version": "2.12.1", "description": None}
    assert doc["complete"] and doc["total"] > 10


def test_docs_are_served_with_anchors(registry: RegistryProcess) -> None:
    status, _, body = registry.request("/docs/readme", accept="text/html")
    assert status == 200
    assert b'<h2 id="' in body
    status, _, _ = registry.request("/docs/..%2Fpyproject", accept="text/html")
    assert status == 404
    # The lists of sections (on / and /docs) show a heading's code as code, not as Markdown's backticks.
    for path in ("/", "/docs"):
        status, _, body = registry.request(path, accept="text/html")
        sections = body.decode().partition("<h2>Documentation</h2>")[2]
        assert status == 200 and "`" not in sections, path
        assert "What is in <code>deploy/</code></a>" in sections, path


def test_a_sections_link_shows_the_headings_code_but_not_its_links(tmp_path: Path) -> None:
    """A heading's inline Markdown in a list of sections: code as code; its own links and images
    left out (a link in a link, an image fetched from elsewhere); raw HTML escaped."""
    from markdown_it import MarkdownIt

    from nixery.http.web.docs import _heading_html

    md = MarkdownIt("commonmark", {"html": False})
    text = "What is in `deploy/`, [see](other.md) ![logo](http://elsewhere.example/x.png) <b>bold</b>"
    children = md.parseInline(text)[0].children or []
    assert _heading_html(md, children) == "What is in <code>deploy/</code>, see  &lt;b&gt;bold&lt;/b&gt;"


class _Links(html.parser.HTMLParser):
    """The addresses a page links to or loads (a, link, script)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"a": "href", "link": "href", "script": "src"}.get(tag)
        self.found += [value for name, value in attrs if name == wanted and value]


def test_every_link_of_the_pages_and_docs_resolves(registry: RegistryProcess) -> None:
    """Every link of the pages, and of every documentation page reachable from them, answers:
    links between the docs (the benchmarks' pages too) and to the repository's other files
    led to 404s (a JSON error in the browser)."""
    registry.manifest("shell/hello")
    started = json.loads(_post_build(registry, {}, image="shell/hello", browser=False)[2])
    queue = ["/", "/docs", "/packages?q=hello", "/images/shell/hello", started["progress"], "/builds/00ff?image=x"]
    seen, broken = set(queue), []
    while queue:
        path = queue.pop()
        status, _, body = registry.request(path, accept="text/html")
        if status >= 400 and not path.startswith("/builds/00ff"):  # an unknown build: 404 by design
            broken.append((path, status))
            continue
        if path.startswith(("/v2/", "/metrics", "/static/")):
            continue
        links = _Links()
        links.feed(body.decode(errors="replace"))
        for link in links.found:
            target = urljoin(f"http://{registry.host}{path}", link)
            if not target.startswith(f"http://{registry.host}/"):
                continue
            local = target.removeprefix(f"http://{registry.host}").partition("#")[0]
            if local not in seen:
                seen.add(local)
                queue.append(local)
    assert any(path.startswith("/docs/benchmarks/") for path in seen)
    assert broken == []


def test_browsers_keep_the_static_files_until_they_change_and_never_keep_pages(registry: RegistryProcess) -> None:
    """A page's style sheet and scripts are named by their content, so browsers keep them for good
    and still get a changed file at once (with the version number in the address, new code of the
    same version left browsers running the old scripts); pages are checked every time."""
    started = json.loads(_post_build(registry, {}, image="shell/hello", browser=False)[2])
    assets = set()
    for path in ("/", "/packages?q=hello", started["progress"], "/docs"):
        status, headers, body = registry.request(path, accept="text/html")
        assert status == 200 and headers["Cache-Control"] == "no-cache", (path, headers)
        links = _Links()
        links.feed(body.decode())
        assets |= {link for link in links.found if link.startswith("/static/")}
    assert len(assets) == 4, assets  # style.css, favicon.svg, nixery.js, build.js
    for asset in assets:
        status, headers, body = registry.request(asset, accept="*/*")
        assert status == 200 and "immutable" in headers["Cache-Control"], (asset, headers)
        assert asset.endswith("?v=" + hashlib.sha256(body).hexdigest()[:16]), asset
        # Another release's address (a rolling update): served, and not kept.
        status, headers, _ = registry.request(asset.split("?")[0] + "?v=0123456789abcdef", accept="*/*")
        assert (status, headers["Cache-Control"]) == (200, "no-cache"), (asset, headers)


# ---- the catalogue ------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="needs Nix")
def test_catalog_tolerates_attributes_that_throw(tmp_path: Path) -> None:
    from nixery.nix.catalog import PackageCatalog
    from nixery.nix.packages import host_system
    from nixery.resolver import Revision

    (tmp_path / "default.nix").write_text(
        """{ system ? builtins.currentSystem, ... }: {
  good = derivation { name = "good-1.2.3"; inherit system; builder = "/bin/sh"; };
  versioned = (derivation { name = "v"; inherit system; builder = "/bin/sh"; }) // { version = "9"; };
  removed = throw "removed: use good instead";
  broken = assert false; 1;
  nested = { inner = 1; };
  number = 3;
}"""
    )

    async def run() -> None:
        catalog = await PackageCatalog(system=host_system()).read(Revision("test", "t1", tmp_path))
        by_name = {e.name: e for e in catalog.entries}
        assert catalog.complete and catalog.total == 6
        assert (by_name["good"].kind, by_name["good"].version) == ("package", "1.2.3")
        assert by_name["versioned"].version == "9"
        assert by_name["removed"].kind == by_name["broken"].kind == "broken"
        assert by_name["nested"].kind == "set" and by_name["number"].kind == "other"
        assert [e.name for e in catalog.search("goo")] == ["good"]
        # A set whose evaluation aborts (not catchable) still lists its names.
        (tmp_path / "default.nix").write_text(
            '{ ... }: { fine = 1; fatal = abort "no"; }'
        )
        fallback = await PackageCatalog(system=host_system()).read(Revision("test", "t2", tmp_path))
        assert not fallback.complete and sorted(e.name for e in fallback.entries) == ["fatal", "fine"]

    run_async(run())


def test_paths_under_static_that_name_no_file_get_the_registrys_404(registry: RegistryProcess) -> None:
    """`/static/` itself (a directory: aiohttp refuses a listing with HTTPForbidden, which the
    error middleware did not know) was a 500 INTERNAL_ERROR with a traceback in the log, and a
    file that is not there an empty 404 of type application/octet-stream; now both are the
    registry's JSON 404. The files there are served as before."""
    for path in ("/static", "/static/", "/static/.", "/static/?x=1", "/static/nosuch.css", "/static/style.css/x"):
        for method in ("GET", "HEAD"):
            status, headers, body = registry.request(path, method=method, accept="*/*")
            assert status == 404 and headers["Content-Type"].startswith("application/json"), (method, path, body)
            if method == "GET":
                assert json.loads(body)["errors"][0]["detail"]["kind"] == "NAME_UNKNOWN", (path, body)
    status, headers, body = registry.request("/static/style.css", accept="*/*")
    assert status == 200 and headers["Content-Type"].startswith("text/css") and body.startswith(b"/*")
    assert not registry.log_events("http.internal_error")


def test_a_content_type_too_long_to_be_one_is_refused_unparsed(registry: RegistryProcess) -> None:
    """POST /builds with a Content-Type of 15,000 semicolons held the event loop ~2 s while
    Python's email parser (which aiohttp uses) read it, every other request waiting; one of
    thousands of nested comments made it raise RecursionError: a 500 INTERNAL_ERROR. A
    Content-Type of over 256 characters (a multipart boundary is at most 70) is now 400
    REQUEST_INVALID, unparsed, and the registry answers others meanwhile."""
    hostile = {
        "semicolons": "application/json" + ";" * 15_000,
        "nested comments": "application/json" + "(" * 7_000 + ")" * 7_000,
        "a form's, nested": "application/x-www-form-urlencoded" + "(" * 7_000 + ")" * 7_000,
    }
    answers: dict[str, tuple[int, bytes]] = {}

    def post(what: str, content_type: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
        connection.request("POST", "/builds", body='{"image": "hello"}', headers={"Content-Type": content_type})
        response = connection.getresponse()
        answers[what] = (response.status, response.read())
        connection.close()

    senders = [threading.Thread(target=post, args=(what, value)) for what, value in hostile.items()]
    senders += [threading.Thread(target=post, args=(f"semicolons {i}", f"{hostile['semicolons']}{'x' * i}"))
                for i in range(1, 4)]  # each a value of its own: aiohttp keeps the last 56 parsed
    waited = ping_wait_while(registry, senders)
    for what, (status, body) in answers.items():
        assert status == 400, (what, status, body[:300])
        error = json.loads(body)["errors"][0]
        assert error["detail"] == {"limit": 256, "kind": "REQUEST_INVALID"}, (what, error)
    assert waited < 1, f"the registry answered a ping after {waited:.1f} s"
    assert not registry.log_events("http.internal_error") and not registry.log_events("http.unhandled_error")
    post("plain", "application/json; charset=utf-8")
    assert answers["plain"][0] == 202


def test_a_build_form_whose_image_is_a_file_is_refused_as_such(registry: RegistryProcess) -> None:
    """A multipart form whose `image` (or `tag`) is a file was read as Python's text for aiohttp's
    FileField: refused as an "invalid tag" quoting the part's headers back. Now it is refused as
    a field that must be text."""
    for field, kind in (("image", "NAME_INVALID"), ("tag", "TAG_INVALID")):
        other = "tag" if field == "image" else "image"
        body = (
            f'--xyz\r\nContent-Disposition: form-data; name="{other}"\r\n\r\n{"latest" if other == "tag" else "hello"}'
            f'\r\n--xyz\r\nContent-Disposition: form-data; name="{field}"; filename="a.txt"\r\n'
            "Content-Type: text/plain\r\n\r\nhello\r\n--xyz--\r\n"
        )
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
        connection.request("POST", "/builds", body=body, headers={
            "Content-Type": "multipart/form-data; boundary=xyz", "Accept": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        connection.close()
        assert response.status == 400, (field, answer)
        error = json.loads(answer)["errors"][0]
        assert error["detail"]["kind"] == kind and f"`{field}` must be a string, not a file" in error["message"], error
        assert "Content-Disposition" not in error["message"], error


def test_conditions_and_ranges_on_static_files_get_the_registrys_answers(registry: RegistryProcess) -> None:
    """aiohttp's file responses answered an unmet If-Match (or If-Unmodified-Since) with an empty
    412, and a range past the end, or several ranges, with an empty 416 of type
    application/octet-stream. The static files now answer as blobs do: 412 PRECONDITION_FAILED in
    the registry's JSON, 304 for their ETag, and the whole file for a Range (RFC 9110 allows
    ignoring it: they are a few kilobytes)."""
    def get(name: str = "style.css", method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
        status, answer, body = registry.request(f"/static/{name}", method=method, accept="*/*",
                                                headers={k.replace("_", "-"): v for k, v in headers.items()})
        return status, {k.lower(): v for k, v in answer.items()}, body

    status, headers, whole = get()
    assert status == 200 and headers["content-type"].startswith("text/css")
    etag = headers["etag"]
    for extra in ({"Range": "bytes=999999-"}, {"Range": "bytes=0-0,5-6"}, {"If_Match": etag},
                  {"If_Unmodified_Since": "Mon, 01 Jan 1990 00:00:00 GMT"}, {"If_None_Match": '"another"'}):
        status, headers, body = get(**extra)
        assert (status, body) == (200, whole), (extra, status, body[:200])
    for method in ("GET", "HEAD"):
        status, headers, body = get(method=method, If_Match='"another"')
        assert status == 412 and headers["content-type"].startswith("application/json"), (method, status, headers)
        if method == "GET":
            assert json.loads(body)["errors"][0]["detail"]["kind"] == "PRECONDITION_FAILED"
        status, headers, body = get(method=method, If_None_Match=etag)
        assert (status, body, headers["etag"]) == (304, b"", etag), method
    for name, kind in (("nixery.js", "javascript"), ("favicon.svg", "image/svg+xml")):
        status, headers, _ = get(name)
        assert status == 200 and kind in headers["content-type"], (name, headers)
