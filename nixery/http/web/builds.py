"""Builds: POST /builds starts one; its progress page, its JSON and its event stream.

    POST /builds                 form or JSON `image`, `tag`: 303 to the progress page for forms,
                                 202 + JSON for JSON; posts from other sites' pages are refused
                                 (nixery/http/csrf.py)
    GET  /builds/{id}            the progress page (server-rendered; build.js follows the events);
                                 for an unknown id, a page saying so (nixery/http/guidance.py)
    GET  /builds/{id}.json       the build and its events
    GET  /builds/{id}/events     server-sent events, one JSON event per message, resumable with
                                 Last-Event-ID or ?after=; a comment every KEEPALIVE_SECONDS;
                                 ends when the registry stops (the page reloads once the
                                 restarted registry says the build is unknown)

Builds live in the builder's memory (`builder.builds`): an id outlives neither
a restart nor the last 200 builds. With several worker processes, any of them
answers for any of theirs (`nixery.shared_builds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from aiohttp import web

from nixery import errors
from nixery.amounts import rate_text, size_text
from nixery.auth import BUILD, PULL
from nixery.http import auth as http_auth
from nixery.http import csrf, guidance, hosts
from nixery.http.markup import h
from nixery.http.pages import wants_html_error, wants_json
from nixery.http.routes import BUILDER, requested_image
from nixery.http.web import platform_parts
from nixery.http.web.build_requests import build_request
from nixery.http.web.layout import ago, page, registry_host, script
from nixery.lru import LRU
from nixery.progress import FINAL, PLATFORM_FIELDS, Build, Event, Stage
from nixery.registry.names import check_build_tag, check_tag
from nixery.shared_builds import POLL_SECONDS
from nixery.views import NIX_COUNTS, STAGE_LABELS, STAGE_ORDER, nix_work_text

log = structlog.get_logger(__name__)

#: The tag each recent build was last asked for here: a build under way is shared by the tags
#: whose image it builds, and its own (`Build.tag`) is the first one's.
BUILD_TAGS = web.AppKey("build_tags", LRU[str, str])
BUILD_TAGS_KEPT = 1000

KEEPALIVE_SECONDS = 15.0
#: Set when the registry begins to stop: event streams end then, so that an open progress page
#: does not hold the shutdown for its whole grace period (a browser reconnects with
#: Last-Event-ID, and learns from the restarted registry that the build is gone).
STREAMS_STOPPING = web.AppKey("event_streams_stopping", asyncio.Event)
SHOWN_EVENTS = 200  # the progress page lists the latest events only
BUILD_ID = r"[0-9a-f]{1,64}"

_VERBS = {Stage.DONE: "Built", Stage.FAILED: "Could not build"}


async def start_build(request: web.Request) -> web.StreamResponse:
    csrf.refuse_cross_site(request, csrf.FORM_POST_REFUSED)
    json_api = wants_json(request)
    name, tag = await build_request(request)
    tag = check_build_tag(tag)  # not an attachment's (sha256-...): an image built under one could not be pulled
    image = await requested_image(request, tag, name)
    # With access control on: viewing a built image needs pull, building a new one build
    # (pull is checked first, so that a client who may not pull is not told which images are built).
    await http_auth.require(request, name, PULL)
    if await request.app[BUILDER].built(image, tag) is None:
        await http_auth.require(request, name, BUILD)
    build = await request.app[BUILDER].start(image, tag)
    request.app[BUILD_TAGS].put(build.id, tag)
    location = f"/builds/{build.id}"
    progress = guidance.progress_path(build.id, name, tag)  # the name as given: a declared one stays one
    log.info(
        "http.build_started", image=image.display_name, tag=tag, build=build.id,
        progress=f"{hosts.origin(request)}{progress}",
    )
    if json_api:
        return web.json_response(
            {
                "id": build.id,
                "image": build.image,
                "tag": tag,
                "stage": build.stage.value,
                "progress": progress,
                "events": f"{location}/events",
                "json": f"{location}.json",
            },
            status=202,
            headers={"Location": location},
        )
    return web.Response(status=303, headers={"Location": progress}, text=f"See {progress}")


async def _get_build(request: web.Request) -> Build:
    """The build the path names, for a client that may pull its image (access control on)."""
    build = request.app[BUILDER].builds.get(request.match_info["id"])
    if build is None:
        raise errors.NameUnknown("no build with this id (it may be too old to be kept, or the registry "
                                 "restarted since)")
    await http_auth.require(request, build.image, PULL)
    return build


def event_json(index: int, event: Event) -> dict[str, Any]:
    return {"index": index, **event.to_json()}


class Progress:
    """What a build's events add up to (the progress page's numbers)."""

    def __init__(self, started: float, events: list[Event]):
        self.reached: set[Stage] = set()
        self.current = Stage.QUEUED
        self.messages: dict[Stage, str] = {}
        self.data: dict[str, Any] = {}
        self.compress_started: float | None = None
        self.last_time = started
        #: An image of several platforms: each platform's own progress, from its relayed events
        #: (`nixery.progress.PlatformRelay`), and its own build's id.
        self.platforms: dict[str, Progress] = {}
        self.platform_builds: dict[str, str] = {}
        for event in events:
            self.add(event)

    def add(self, event: Event) -> None:
        platform = event.data.get("platform")
        if platform is not None:  # one platform's: its own progress, not the image's
            own = {key: value for key, value in event.data.items() if key not in PLATFORM_FIELDS}
            stage = Stage(event.data.get("platform_stage", event.stage))
            own_progress = self.platforms.setdefault(platform, Progress(event.time, []))
            own_progress.add(Event(stage, event.message, event.time, own))
            if event.data.get("platform_build"):
                self.platform_builds[platform] = event.data["platform_build"]
            return
        self.reached.add(event.stage)
        self.current = event.stage
        self.messages[event.stage] = event.message
        self.data.update(event.data)
        self.last_time = event.time
        if event.stage is Stage.COMPRESSING and self.compress_started is None:
            self.compress_started = event.time
        if event.stage is Stage.DONE:  # an image found built: its platforms have no events of their own
            for one in event.data.get("platforms") or ():
                if isinstance(one, dict) and one.get("platform") not in self.platforms:
                    summary = {key: value for key, value in one.items() if key not in PLATFORM_FIELDS}
                    found = Event(Stage.DONE, event.message, event.time, summary)
                    self.platforms[one["platform"]] = Progress(event.time, [found])

    @property
    def rate(self) -> str | None:
        """The compressed bytes per second over the compressing stage so far, in words."""
        if self.compress_started is None:
            return None
        return rate_text(self.data.get("compressed_bytes", 0), self.last_time - self.compress_started)

    def detail(self, stage: Stage, *, ended: bool = False) -> str:
        """What the stage did; `ended`: the stage the build failed or was stopped in."""
        d = self.data
        if stage is Stage.BUILDING and self.platforms:  # Nix builds each platform's: their sums
            d = {key: sum(one.data.get(key, 0) for one in self.platforms.values()) for key in NIX_COUNTS}
        if stage is Stage.BUILDING and stage in self.reached:
            under_way = self.current is Stage.BUILDING or ended
            if not any(d.get(key) for key in NIX_COUNTS):
                return self.messages[stage] if under_way else "nothing to build: all in the Nix store"
            # A stage that ended is said in the past, as the build went on after it.
            return nix_work_text(d, over=not under_way, ended=ended)
        if stage is Stage.LAYERING and "paths" in d:
            return f"{d['paths']} store paths"
        if stage is Stage.COMPRESSING and "layers_total" in d:
            text = f"{d.get('layers_done', 0)}/{d['layers_total']} layers"
            text += f" · {d.get('layers_created', 0)} new, {size_text(d.get('compressed_bytes', 0))} compressed"
            if self.rate:
                text += f" · {self.rate}"
            return text
        if stage is Stage.DONE and "digest" in d:
            return f"{size_text(d.get('size'))} in {d.get('layers')} layers"
        return self.messages.get(stage, "")


def _stage_list(build: Build, progress: Progress) -> str:
    failed = build.stage is Stage.FAILED
    furthest = max((STAGE_ORDER.index(s) for s in progress.reached if s in STAGE_ORDER), default=-1)
    # The stage a failed (or stopped) build ended in: not shown as done ("1 derivations built").
    ended_in = STAGE_ORDER[furthest] if failed and 0 <= furthest < STAGE_ORDER.index(Stage.DONE) else None
    items = []
    for position, stage in enumerate(STAGE_ORDER):
        if stage is progress.current and not build.finished:
            state = "current"
        elif stage is ended_in:
            state = "ended"
        elif stage in progress.reached:
            state = "past"
        elif position < furthest:
            state = "skipped"
        else:
            state = "pending"
        if failed and stage is Stage.DONE:
            stage_li = (
                f'<li class="failed" data-stage="failed"><span class="label">{STAGE_LABELS[Stage.FAILED]}</span>'
                f'<span class="detail">{h(progress.messages.get(Stage.FAILED, ""))}</span></li>'
            )
            items.append(stage_li)
            continue
        items.append(
            f'<li class="{state}" data-stage="{stage.value}"><span class="label">{STAGE_LABELS[stage]}</span>'
            f'<span class="detail">{h(progress.detail(stage, ended=state == "ended") if state in _SHOWN else "")}'
            "</span></li>"
        )
    return f'<ol class="stages" id="stages">{"".join(items)}</ol>'


_SHOWN = ("past", "current", "ended")  # the states whose stage says what it did


#: A platform's row once its build ended: styled as the image's stages are (a failed one red, not done).
_PLATFORM_STATES = {Stage.DONE: "past", Stage.FAILED: "failed"}


def _platform_list(build: Build, progress: Progress, find: Callable[[str], Build | None]) -> str:
    """An image of several platforms: each platform's stage and numbers, and a link to its own build.
    Once the image's build ended (failed on one platform), the others' are no longer relayed:
    a platform's own build (`find`) says how it went on, or it showed "building" for good."""
    names = progress.data.get("platforms") or []
    names = [one["platform"] if isinstance(one, dict) else one for one in names] or list(progress.platforms)
    if not names:
        return ""
    items = []
    for name in names:
        own = progress.platforms.get(name)
        build_id = progress.platform_builds.get(name)
        if build.finished and build_id and (own is None or own.current not in FINAL):
            own_build = find(build_id)
            own = Progress(own_build.started, own_build.events) if own_build is not None else own
        stage = own.current if own is not None else Stage.QUEUED
        detail = own.detail(stage) if own is not None else ""
        link = f' <a class="hint" href="/builds/{h(build_id)}">its build</a>' if build_id else ""
        state = _PLATFORM_STATES.get(stage) or ("current" if not build.finished else "pending")
        items.append(
            f'<li class="{state}" data-platform="{h(name)}" data-stage="{stage.value}"><span class="label">'
            f"<code>{h(name)}</code></span> <span class=\"badge stage-{stage.value}\">{h(STAGE_LABELS[stage])}</span>"
            f' <span class="detail">{h(detail)}</span>{link}</li>'
        )
    return f'<h2>Platforms</h2><ol class="stages platforms" id="platforms">{"".join(items)}</ol>'


def _tag(request: web.Request, build: Build) -> str:
    """The tag the page names the image by (its pull command and links): as this worker was asked
    for it, else the build's own (that of another worker's build, or of a pull's)."""
    return request.app[BUILD_TAGS].peek(build.id) or build.tag


def _outcome(request: web.Request, build: Build, progress: Progress, part: tuple[Build, str] | None = None) -> str:
    d = progress.data
    tag = _tag(request, build)
    if build.stage is Stage.DONE and "digest" in d and part is not None:
        return platform_parts.outcome(build, d)
    if build.stage is Stage.DONE and "digest" in d:
        name = d.get("image", build.image)  # the image's own name: as first asked for, resolved
        note = guidance.same_image_note(build.image, name) if name != build.image else ""
        ref = guidance.pull_reference(registry_host(request), name, tag)
        return f"""<div class="outcome done" id="outcome" data-image="{h(name)}">
<p><strong>Image ready.</strong> {h(size_text(d.get("size")))} in {h(d.get("layers"))} layers.</p>{note}
<p class="digest">Digest <code id="digest">{h(d["digest"])}</code></p>{_platform_digests(d)}
<pre class="command" data-copy><code>docker pull {h(ref)}</code></pre>
<p><a href="{h(guidance.image_path(name, tag))}">Layers and store paths</a></p>
</div>"""
    if build.stage is Stage.FAILED and d.get("error") == "stopped":  # the registry shut down: not the build's fault
        again = guidance.build_button(build.image, tag, f"Build {build.image} again")
        return f"""<div class="outcome failed" id="outcome">
<p><strong>The registry stopped this build as it shut down.</strong></p>
<p class="message" id="error">{h(progress.messages.get(Stage.FAILED, ""))}</p>
<div class="suggestion" id="build-again">{again}</div></div>"""
    if build.stage is Stage.FAILED:
        tail = d.get("log")
        log_html = f"<details open><summary>Nix's last lines</summary><pre>{h(tail)}</pre></details>" if tail else ""
        return f"""<div class="outcome failed" id="outcome">
<p><strong>The build failed.</strong></p><p class="message" id="error">{h(progress.messages.get(Stage.FAILED, ""))}</p>
{guidance.suggestion_button(build.image, tag, d.get("suggestions"), d.get("missing"))}{log_html}</div>"""
    return '<div class="outcome" id="outcome" hidden></div>'


def _platform_digests(data: dict[str, Any]) -> str:
    platforms = [one for one in data.get("platforms") or () if isinstance(one, dict)]
    if not platforms:
        return ""
    rows = "".join(
        f"<li><code>{h(one['platform'])}</code> <code class='digest'>{h(one['oci_digest'])}</code></li>"
        for one in platforms
    )
    hint = "<p class='hint'>The digest of the image index; each platform's manifest:</p>"
    return f'{hint}<ul id="platform-digests">{rows}</ul>'


def _platform_tag(event: Event) -> str:
    platform = event.data.get("platform")
    return "" if platform is None else f"<code>{h(platform)}</code> {h(event.data.get('platform_stage', ''))}: "


def _event_items(build: Build) -> str:
    """The latest events, newest first: the build's state is what a reader wants first, and the
    list's box opens at its top with or without JavaScript (a list oldest first opened at its
    oldest event without it, and a jump to its end would scroll the page past the stages too)."""
    start = max(0, len(build.events) - SHOWN_EVENTS)
    return "".join(
        f'<li data-index="{i}"><span class="t">+{e.time - build.started:.1f}s</span> '
        f'<span class="badge stage-{e.stage.value}">{e.stage.value}</span> {_platform_tag(e)}{h(e.message)}</li>'
        for i, e in reversed(list(enumerate(build.events[start:], start)))
    )


async def build_page(request: web.Request) -> web.Response:
    if wants_json(request):  # a client that asks for JSON gets the build's JSON, as its 404 is
        return await build_json(request)
    if request.app[BUILDER].builds.get(request.match_info["id"]) is None and wants_html_error(request):
        return await _unknown_build_page(request)
    build = await _get_build(request)
    progress = Progress(build.started, build.events)
    part = platform_parts.part_of(request.app[BUILDER].builds, build)
    head = "" if build.finished else '<noscript><meta http-equiv="refresh" content="3"></noscript>'
    state = build.stage.value
    body = f"""
<section class="card build" id="build" data-id="{h(build.id)}" data-events="{len(build.events)}"
  data-started="{build.started}" data-stage="{h(state)}" data-tag="{h(_tag(request, build))}"
  {'data-part-of="' + h(part[0].id) + '"' if part else ""}>
  <h1><span id="verb" aria-live="polite">{h(_VERBS.get(build.stage, "Building"))}</span>
    <code>{h(build.image)}</code></h1>
  <p class="muted">Build <code>{h(build.id)}</code> · started {h(ago(build.started))} ·
    <span id="state" class="badge stage-{h(state)}">{h(state)}</span></p>
  {platform_parts.note(part, _tag(request, build))}
  {_stage_list(build, progress)}
  {_platform_list(build, progress, request.app[BUILDER].builds.get)}
  {_outcome(request, build, progress, part)}
</section>
<section class="card">
  <h2>Events <small class="muted">newest first</small></h2>
  <ol class="events" id="events">{_event_items(build)}</ol>
  <p class="hint">Also as <a href="/builds/{h(build.id)}.json">JSON</a> and as a
  <a href="/builds/{h(build.id)}/events">stream of server-sent events</a>.</p>
</section>
{script("build.js")}
"""
    return page(request, f"{_VERBS.get(build.stage, 'Building')} {build.image}", body, head=head)


async def _unknown_build_page(request: web.Request) -> web.Response:
    """A forgotten build (a restart, a bookmark): what became of its image, when the address names it."""
    image_name, record = request.query.get("image"), None
    tag = check_tag(request.query.get("tag") or "latest")
    if image_name is not None:
        image = await requested_image(request, tag, image_name)
        await http_auth.require(request, image_name, PULL)
        record = await request.app[BUILDER].built(image, tag)
    body = guidance.unknown_build(request.match_info["id"], image_name, tag, record, registry_host(request))
    return page(request, "Unknown build", body, status=404)


async def build_json(request: web.Request) -> web.Response:
    build = await _get_build(request)
    return web.json_response(
        {
            **build.summary(),
            "finished": build.finished,
            "events": [event_json(i, e) for i, e in enumerate(build.events)],
        }
    )


def _first_index(request: web.Request) -> int:
    """Where the stream starts: after `Last-Event-ID` (a reconnect) or at `?after=`; an index
    that is not a number is ignored."""
    start = 0
    last = _event_index(request.headers.get("Last-Event-ID", ""))
    if last is not None:
        start = last + 1
    after = _event_index(request.query.get("after", ""))
    if after is not None:
        start = max(start, after)
    return start


_EVENT_INDEX = re.compile(r"[0-9]+")
#: Past every build's events (the builder keeps far fewer).
_PAST_EVERY_EVENT = 10**18


def _event_index(text: str) -> int | None:
    """An event index as sent, or None. ASCII digits only: str.isdigit also takes `²`, which int()
    refuses, as it refuses numbers of over 4300 digits (both were a 500)."""
    if not _EVENT_INDEX.fullmatch(text):
        return None
    return int(text) if len(text) < 18 else _PAST_EVERY_EVENT


async def build_events(request: web.Request) -> web.StreamResponse:
    build = await _get_build(request)
    start = _first_index(request)
    if build.finished and start >= len(build.events):
        return web.Response(status=204)  # tells EventSource not to reconnect
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        await response.write(b"retry: 2000\n\n")
        async for index, event in _follow(build, start, request.app[STREAMS_STOPPING]):
            if event is None:
                await response.write(b": keepalive\n\n")
                continue
            data = json.dumps(event_json(index, event), separators=(",", ":"))
            await response.write(f"id: {index}\nevent: {event.stage.value}\ndata: {data}\n\n".encode())
        await response.write_eof()
    return response


async def _follow(build: Build, start: int, stopping: asyncio.Event) -> AsyncIterator[tuple[int, Event | None]]:
    """The build's events from `start` on, with None every KEEPALIVE_SECONDS of silence,
    until the build ends or the registry stops."""
    queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump() -> None:
        index = 0
        async for event in build.follow():
            if index >= start:
                queue.put_nowait((index, event))
            index += 1
        queue.put_nowait(None)

    async def until_stopping() -> None:
        await stopping.wait()
        # A build of this process has said it stopped, and its stream has ended; another worker's
        # build says so in its file, which a copy reads every POLL_SECONDS: a moment to pass it on.
        await asyncio.sleep(2 * POLL_SECONDS)
        queue.put_nowait(None)

    tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(until_stopping())]
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield 0, None
                continue
            if item is None:
                return
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
