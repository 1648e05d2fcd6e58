"""With NIXERY_WORKERS above 1, any worker answers for any build: its JSON, its progress
page and its event stream, each request on a fresh connection (which the kernel hands to
either worker, as a proxy's pool or a browser's reconnect does)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.registry import REPOSITORY, RegistryProcess, busybox_set_with

pytestmark = pytest.mark.nix

HTML = "text/html"


def post_build(registry: RegistryProcess, image: str, tag: str = "latest") -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=60)
    try:
        body = json.dumps({"image": image, "tag": tag})
        connection.request("POST", "/builds", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
        assert response.status == 202, answer
        return json.loads(answer)
    finally:
        connection.close()


def events_until(
    registry: RegistryProcess, build_id: str, enough: Callable[[list[dict]], bool], *, until_quiet: bool = False
) -> list[dict]:
    """The build's events from its stream (a fresh connection), read until `enough` of them came
    or the stream ended (the build did); `until_quiet`: or its first keepalive came instead."""
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
    events: list[dict] = []
    try:
        connection.request("GET", f"/builds/{build_id}/events", headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        while not enough(events):
            line = response.readline()
            if not line or (until_quiet and line.startswith(b": keepalive")):
                break
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: "):]))
        return events
    finally:
        connection.close()


def answered_everywhere(registry: RegistryProcess, build_id: str, page: str = "", times: int = 10) -> dict:
    """The build's JSON and its page (at `page`, the address the registry gave out), `times`
    each on fresh connections: every one answered. The last JSON, and the pages as `pages`."""
    statuses, documents, pages = [], [], []
    for _ in range(times):
        status, _, body = registry.request(f"/builds/{build_id}.json", accept="application/json")
        statuses.append(status)
        if status == 200:
            documents.append(json.loads(body))
        status, _, body = registry.request(page or f"/builds/{build_id}", accept=HTML)
        statuses.append(status)
        pages.append(body.decode())
    assert statuses == [200] * len(statuses), statuses
    return {**documents[-1], "pages": pages}


def building_gated(events: list[dict]) -> bool:
    return any(event["stage"] == "building" and "gated" in event["message"] for event in events)


def test_every_worker_answers_for_every_build(start_registry, tmp_path: Path) -> None:
    """Each worker used to keep its own builds: requests for a build's JSON or page that the
    kernel gave the other worker were 404 (seen: 404 404 404 404 404 200 200 200 404 200), its
    event stream too; and a build started on the other worker for the same image waited for
    the first one's lock showing "queued" and no event until it ended "done". Now every request
    is answered, on either worker, with the events as they come; the second build shows the
    progress of the one it waits for, and both end with the same image."""
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do $bb/sleep 0.1; done; $bb/mkdir -p $out; echo gated > $out/gated"
    pkgs = busybox_set_with(tmp_path / "pkgs", "gated", "gated-1.0", script)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_WORKERS="2")

    started = post_build(registry, "gated", "v1")
    first = started["id"]
    assert building_gated(events_until(registry, first, building_gated))  # held at the gate from here
    running = answered_everywhere(registry, first)
    assert running["stage"] == "building" and not running["finished"]

    # The same image asked of each worker in turn: the worker running it answers with its build,
    # the other starts its own, which waits for the first one's lock.
    others = {post_build(registry, "gated", "v1")["id"] for _ in range(20)} - {first}
    assert len(others) == 1, others
    (second,) = others

    def following_first(events: list[dict]) -> bool:
        return any(event.get("waiting_for") == first for event in events) and building_gated(events)

    # It shows the first one's progress (no longer nothing until the end).
    assert following_first(events_until(registry, second, following_first, until_quiet=True))
    assert not answered_everywhere(registry, second)["finished"]

    gate.touch()
    outcomes = {}
    for build_id in (first, second):
        events = events_until(registry, build_id, lambda events: False)  # to the end
        assert events[-1]["stage"] == "done", events[-1]
        outcomes[build_id] = events[-1]["digest"]
        finished = answered_everywhere(registry, build_id, started["progress"].replace(first, build_id))
        assert finished["stage"] == "done" and finished["events"][-1]["digest"] == outcomes[build_id]
        for page in finished["pages"]:  # the pull command names the tag on either worker
            assert "Image ready." in page and outcomes[build_id] in page and f"{registry.host}/gated:v1" in page
    assert outcomes[first] == outcomes[second]
    assert len(registry.log_events("build.queued")) == 1  # one build ran: the second waited for it


def test_a_build_whose_worker_ended_is_failed_on_the_others(start_registry, tmp_path: Path, temporary: Path) -> None:
    """The worker process running a build was killed: the other worker, now answering every
    connection, still knows the build and says it failed, rather than "building" for ever
    (or, before, that the build is not known)."""
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do $bb/sleep 0.1; done; $bb/mkdir -p $out; echo gated > $out/gated"
    pkgs = busybox_set_with(tmp_path / "pkgs", "gated", "gated-1.0", script)
    registry = start_registry(NIXERY_PKGS_PATH=str(pkgs), NIXERY_WORKERS="2", TMPDIR=str(temporary))
    build_id = post_build(registry, "gated")["id"]
    assert building_gated(events_until(registry, build_id, building_gated))
    (journal,) = temporary.glob(f"nixery-run-*/nixery-builds-*/{build_id}.jsonl")
    owner = json.loads(journal.read_text().splitlines()[0])["pid"]
    process = os.pidfd_open(owner)  # readable once the process has ended
    try:
        os.kill(owner, signal.SIGKILL)
        assert select.select([process], [], [], 60)[0]  # its socket is closed: connections go to the other
    finally:
        os.close(process)
    try:
        events = events_until(registry, build_id, lambda events: False)
        assert events[-1]["stage"] == "failed" and "worker process" in events[-1]["message"], events[-1]
        assert building_gated(events)
        assert answered_everywhere(registry, build_id)["stage"] == "failed"
    finally:
        gate.touch()  # the killed worker's Nix build ends too
    registry.stop()
    assert list(temporary.iterdir()) == []  # the shared directory goes with the registry


def test_the_start_page_lists_every_workers_builds(start_registry, tmp_path: Path, temporary: Path) -> None:
    """The start page's recent builds were those of the worker that answered: which builds a
    visitor saw depended on the connection. Now every page, whichever worker answers, lists
    the builds of both, newest first, each with its stage."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2", TMPDIR=str(temporary))
    images = ["hello", "fortune", "cowsay", "cacert", "hello/fortune", "hello/cowsay", "cacert/hello",
              "cowsay/fortune", "cacert/fortune", "cacert/cowsay", "cowsay/hello/fortune"]
    started, workers = [], set()
    for image in images:  # each on a fresh connection, which the kernel gives either worker
        build_id = post_build(registry, image)["id"]
        (journal,) = temporary.glob(f"nixery-run-*/nixery-builds-*/{build_id}.jsonl")
        workers.add(json.loads(journal.read_text().splitlines()[0])["pid"])
        started.append(build_id)
        if len(workers) == 2 and len(started) >= 3:
            break
    assert len(workers) == 2, "every build went to one worker"
    for build_id in started:
        assert events_until(registry, build_id, lambda events: False)[-1]["stage"] == "done"

    newest_first = started[::-1][:8]  # the page lists 8
    for _ in range(10):
        status, _, body = registry.request("/", accept=HTML)
        assert status == 200
        recent = body.decode().split("<h2>Recent builds</h2>")[1].split("</section>")[0]
        assert re.findall(r'href="/builds/([0-9a-f]+)\?', recent) == newest_first
        assert recent.count('<span class="badge stage-done">done</span>') == len(newest_first)


def test_an_ended_workers_builds_go_once_they_are_no_longer_recent(tmp_path: Path) -> None:
    """The kept list and build files of a worker that ended stayed in the shared directory until
    the registry stopped, one more for every worker replaced (and every start page read them all).
    Now they are listed while recent, and go once a live worker keeps as many newer builds as it
    keeps at all."""
    from nixery.progress import Stage
    from nixery.shared_builds import SharedBuildLog

    ended = subprocess.run(
        [sys.executable, "-c", "import pathlib, sys; from nixery.progress import Stage; "
         "from nixery.shared_builds import SharedBuildLog; "
         "build = SharedBuildLog(pathlib.Path(sys.argv[1]), keep=3).new('shell/ended'); "
         "build.emit(Stage.DONE, 'image ready'); print(build.id)", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=REPOSITORY,
    )
    ended_id = ended.stdout.strip()
    (ended_list,) = (tmp_path / "kept").iterdir()
    live = SharedBuildLog(tmp_path, keep=3)
    for number in range(3):
        assert ended_id in [build.id for build in live.recent()], "a recent build of the ended worker is listed"
        assert (tmp_path / f"{ended_id}.jsonl").exists()
        live.new(f"shell/live{number}").emit(Stage.DONE, "image ready")
    assert [build.image for build in live.recent()] == ["shell/live2", "shell/live1", "shell/live0"]
    assert [path.name for path in (tmp_path / "kept").iterdir()] == [f"{os.getpid()}.json"]
    assert not ended_list.exists() and not (tmp_path / f"{ended_id}.jsonl").exists()


def test_every_worker_marks_each_platforms_build_with_the_image_it_is_part_of(start_registry) -> None:
    """With several NIXERY_PLATFORMS, each platform's build is part of the image's build: the
    start page marks it with its platform, and its page links to the image's build. Either
    worker answers so, whichever ran the builds. (The link was found by reading every event of
    every build each worker keeps, other workers' files too, on each page view; now each
    platform's build records it, in its file as well.)"""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2",
                              NIXERY_PLATFORMS="linux/amd64,linux/arm64")
    started = post_build(registry, "hello")
    events = events_until(registry, started["id"], lambda events: False)
    assert events[-1]["stage"] == "done", events[-1]
    parts = {event["platform"]: event["platform_build"] for event in events if event.get("platform_build")}
    assert sorted(parts) == ["linux/amd64", "linux/arm64"], parts
    for _ in range(10):  # fresh connections: both workers answer
        status, _, body = registry.request("/", accept=HTML)
        assert status == 200
        recent = body.decode().split("<h2>Recent builds</h2>")[1].split("</section>")[0]
        for platform, build_id in parts.items():
            row = recent.split(f'href="/builds/{build_id}?')[1].split("</li>")[0]
            assert f">{platform}</span>" in row, row
        for platform, build_id in parts.items():
            status, _, page = registry.request(f"/builds/{build_id}", accept=HTML)
            assert status == 200
            note = page.decode().split('id="part-of"')[1].split("</p>")[0]
            assert f"<code>{platform}</code>" in note and f"/builds/{started['id']}" in note, note


def test_another_workers_copy_of_a_platforms_build_knows_the_image_it_is_part_of(tmp_path: Path) -> None:
    """What a worker reads of another's build file: its events and, for one platform's build of
    an image of several, the image's build and the platform, written once the relay begins."""
    from nixery.progress import Build, PartOf, PlatformRelay, Stage
    from nixery.shared_builds import CopiedBuild, SharedBuildLog

    async def relayed() -> tuple[Build, Build]:
        log = SharedBuildLog(tmp_path)
        image, platform = log.new("hello", "v2"), log.new("arm64/hello", "v2")
        platform.emit(Stage.BUILDING, "building")
        relay = PlatformRelay(image)
        relay.follow("linux/arm64", platform)
        platform.emit(Stage.DONE, "image ready")
        await relay.finish()
        return image, platform

    image, platform = asyncio.run(relayed())
    copy = CopiedBuild.read(tmp_path / f"{platform.id}.jsonl")
    assert copy is not None and copy.part_of == PartOf(image.id, "linux/arm64") == platform.part_of
    assert copy.tag == "v2"  # its pages name the image by it
    assert [event.message for event in copy.events] == ["building", "image ready"] and copy.finished
    assert CopiedBuild.read(tmp_path / f"{image.id}.jsonl").part_of is None
