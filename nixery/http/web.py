"""The web side of the registry: pages for people, JSON and events for tools.

    GET  /                       landing page: how to pull, the package source, search,
                                 a build form, recent builds and images, docs
    GET  /packages?q=            package search (HTML; JSON with ?format=json or Accept)
    POST /builds                 start a build (form or JSON `image`, `tag`):
                                 303 to the progress page for forms, 202 + JSON for JSON;
                                 posts from other sites' pages are refused (nixery/http/csrf.py)
    GET  /builds/{id}            progress page (server-rendered, follows the events with JS); for an
                                 unknown id, a page saying so (nixery/http/guidance.py)
    GET  /builds/{id}.json       the build and its events
    GET  /builds/{id}/events     server-sent events, one JSON event per message
    GET  /images/{name}[.json]   a built image: layers, sizes, the store paths of each layer
    GET  /docs, /docs/{page}     README.md and docs/*.md, rendered
    GET  /static/...             style sheet and scripts

Pages are plain server-rendered HTML that work without JavaScript; scripts
only add live updates. Everything taken from a request (the Host header, image
names, queries) is escaped before it is written into a page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import structlog
from aiohttp import web

from nixery import __version__, errors
from nixery.auth import BUILD, PULL
from nixery.builder import ImageBuilder
from nixery.config import REPOSITORY
from nixery.http import auth as http_auth
from nixery.http import csrf, guidance
from nixery.http.errors import registry_error
from nixery.http.markup import h
from nixery.http.routes import BUILDER, RESOLVER
from nixery.images import ImageRecord
from nixery.nix.catalog import Catalog, PackageCatalog
from nixery.nix.packages import host_system
from nixery.nix.sources import Revision
from nixery.progress import Build, Event, Stage
from nixery.registry.mediatypes import ManifestFormat
from nixery.registry.names import ImageRequest, check_tag, parse_image_name

log = structlog.get_logger(__name__)

BUILD_TAGS = web.AppKey("build_tags", "OrderedDict[str, str]")

STATIC_DIR = Path(__file__).with_name("static")
DOCS_DIR = REPOSITORY / "docs"
README = REPOSITORY / "README.md"

KEEPALIVE_SECONDS = 15.0
SHOWN_EVENTS = 200  # the progress page lists the latest events only
_BUILD_ID = r"[0-9a-f]{1,64}"
_STAGE_ORDER = [
    Stage.QUEUED, Stage.EVALUATING, Stage.BUILDING, Stage.LAYERING, Stage.COMPRESSING, Stage.UPLOADING, Stage.DONE,
]
_STAGE_LABELS = {
    Stage.QUEUED: "Queued",
    Stage.EVALUATING: "Evaluating",
    Stage.BUILDING: "Building with Nix",
    Stage.LAYERING: "Grouping into layers",
    Stage.COMPRESSING: "Compressing layers",
    Stage.UPLOADING: "Uploading",
    Stage.DONE: "Done",
    Stage.FAILED: "Failed",
}

_VERBS = {Stage.DONE: "Built", Stage.FAILED: "Could not build"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ---- small helpers -----------------------------------------------------------


def size_text(n: int | float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def ago(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, (now or time.time()) - timestamp)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def registry_host(request: web.Request) -> str:
    """The host clients use for this registry (from the Host header)."""
    return request.host or "localhost"


def wants_json(request: web.Request) -> bool:
    if request.path.endswith(".json") or request.query.get("format") == "json":
        return True
    if request.method == "POST" and request.content_type == "application/json":
        return True
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def wants_html_error(request: web.Request) -> bool:
    """An error page only for browsers (they name text/html, or post a form); every
    other client, including one that sends no Accept header, gets the JSON error."""
    if wants_json(request):
        return False
    if "text/html" in request.headers.get("Accept", ""):
        return True
    return request.method == "POST" and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    )


def _catalog(request: web.Request) -> PackageCatalog:
    return request.app[BUILDER].names.catalog


async def _revision(builder: ImageBuilder, tag: str = "latest", wait: float = 5.0) -> Revision | None:
    try:
        return await asyncio.wait_for(builder.source.resolve(tag), wait)
    except Exception as exc:  # the page still renders; the source's problem is shown
        log.info("web.source_unavailable", error=str(exc)[:300])
        return None


def _html_errors(handler: Handler) -> Handler:
    """Failures become a friendly page for browsers; API clients get the registry's JSON error."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (web.HTTPRedirection, web.HTTPSuccessful):
            raise
        except Exception as exc:
            if not wants_html_error(request):
                raise
            error = registry_error(exc)
            if isinstance(error, errors.InternalError):
                log.exception("http.internal_error", path=request.path[:300], method=request.method)
            return error_page(request, error)

    return wrapped


def error_page(
    request: web.Request, error: errors.RegistryError, *, form: dict[str, str] | None = None
) -> web.Response:
    titles = {400: "That name does not work", 403: "Not allowed", 404: "Not found", 405: "Not supported"}
    title = titles.get(error.status, "Something went wrong")
    body = f"""
<section class="card error">
  <h1>{h(title)}</h1>
  <p class="message">{h(error.message)}</p>
  <p class="muted">Error code <code>{h(error.code)}</code> · HTTP {error.status}</p>
</section>"""
    if form is not None:
        body += _build_form(form.get("image", ""), form.get("tag", ""))
    body += '<p><a href="/">Back to the start page</a></p>'
    return page(request, title, body, status=error.status)


def page(request: web.Request, title: str, body: str, *, status: int = 200, head: str = "") -> web.Response:
    document = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{h(title)} · Nixery</title>
<link rel="stylesheet" href="/static/style.css?v={h(__version__)}">
{head}
</head>
<body>
<header class="top">
  <a class="brand" href="/">Nixery</a>
  <nav><a href="/packages">Packages</a><a href="/docs">Docs</a><a href="/metrics">Metrics</a></nav>
</header>
<main>
{body}
</main>
<footer>nixery {h(__version__)} · serving <code>{h(registry_host(request))}</code></footer>
</body>
</html>
"""
    return web.Response(text=document, status=status, content_type="text/html", charset="utf-8")


def _build_form(image: str = "", tag: str = "", *, example: str = "shell/curl") -> str:
    return f"""
<form class="build-form" method="post" action="/builds">
  <label for="build-image">Build an image</label>
  <div class="row">
    <input id="build-image" name="image" value="{h(image)}" placeholder="{h(example)}" required
      autocomplete="off" autocapitalize="off" spellcheck="false">
    <input id="build-tag" name="tag" value="{h(tag)}" placeholder="latest" aria-label="tag" class="tag"
      autocomplete="off" autocapitalize="off" spellcheck="false">
    <button type="submit">Build</button>
  </div>
  <p class="hint">Packages separated by <code>/</code>; <code>shell</code> adds a shell and core utilities.
  Optional tag (selects the package set's revision for git sources).</p>
</form>"""


def _search_form(query: str = "") -> str:
    return f"""
<form class="search-form" method="get" action="/packages" role="search">
  <label for="search-q">Search packages</label>
  <div class="row">
    <input id="search-q" type="search" name="q" value="{h(query)}" placeholder="e.g. curl"
      autocomplete="off" autocapitalize="off" spellcheck="false">
    <button type="submit">Search</button>
  </div>
</form>"""


# ---- landing page --------------------------------------------------------------


async def landing(request: web.Request) -> web.Response:
    builder = request.app[BUILDER]
    host = registry_host(request)
    revision = await _revision(builder)
    catalog = await _catalog(request).get(revision, wait=0.5) if revision else None
    example = _example_package(catalog)
    pull = f"docker run -ti {host}/shell/{example} bash"
    body = f"""
<section class="intro">
  <h1>Container images, built from their names</h1>
  <p>This is a container registry that builds images on demand with <a href="https://nixos.org/">Nix</a>.
  Every path component of an image name is a package: <code>{h(host)}/shell/git/htop</code> is an image
  with a shell, git and htop. The first pull of a new combination builds it; later pulls are served from
  storage, and layers are shared between images.</p>
</section>

<section class="card">
  <h2>Pull an image</h2>
  <pre class="command" data-copy><code>{h(pull)}</code></pre>
  <p class="hint">Works with any registry client: <code>podman run -ti {h(host)}/shell/{h(example)} sh</code>,
  <code>skopeo</code>, containerd. If this registry is served over plain HTTP, allow it as an insecure registry
  (<code>--tls-verify=false</code> for podman). Prefix <code>arm64/</code> for other architectures if the
  registry can build them. The first pull may take a while: start it below to watch its progress.</p>
</section>

<section class="card">
  {_build_form(example=f"shell/{example}")}
</section>

<section class="card">
  <h2>Package source</h2>
  {_source_block(builder, revision, catalog)}
  {_search_form()}
  <div id="live-results" aria-live="polite"></div>
</section>

{_recent_builds(builder)}
{_recent_images(builder)}
{_docs_block()}
<script src="/static/nixery.js?v={h(__version__)}" defer></script>
"""
    return page(request, "A container registry that builds images with Nix", body)


def _example_package(catalog: Catalog | None) -> str:
    if catalog is None:
        return "curl"
    names = catalog.names()
    for candidate in ("curl", "hello", "git"):
        if candidate in names:
            return candidate
    packages = [e.name for e in catalog.entries if e.kind in ("package", None) and e.name != "shell"]
    return packages[0] if packages else "curl"


def _short(revision_id: str) -> str:
    return revision_id if len(revision_id) <= 20 else revision_id[:16] + "…"


def _source_block(builder: ImageBuilder, revision: Revision | None, catalog: Catalog | None) -> str:
    source = getattr(builder.source, "description", type(builder.source).__name__)
    if revision is None:
        return f'<p>Packages come from <strong>{h(source)}</strong>; its revision could not be read just now.</p>'
    if catalog is None:
        count = '<span class="muted">the package list is being read</span>'
    else:
        count = f"{len(catalog.entries)} top-level names"
        if not catalog.complete:
            count += " (names only: reading versions failed or took too long)"
        elif catalog.total > len(catalog.entries):
            count += f" (of {catalog.total})"
    return f"""
<dl class="facts">
  <dt>Source</dt><dd>{h(source)}</dd>
  <dt>Revision</dt><dd><code title="{h(revision.id)}">{h(_short(revision.id))}</code></dd>
  <dt>Packages</dt><dd>{count}</dd>
  <dt>Builds for</dt><dd><code>{h(host_system())}</code></dd>
</dl>"""


def _recent_builds(builder: ImageBuilder, limit: int = 8) -> str:
    builds = builder.builds.recent()[:limit]
    if not builds:
        return ""
    rows = "".join(
        f'<li><a href="/builds/{h(b.id)}"><code>{h(b.image)}</code></a> '
        f'<span class="badge stage-{h(b.stage.value)}">{h(b.stage.value)}</span> '
        f'<span class="muted">{h(ago(b.started))}</span></li>'
        for b in builds
    )
    return f'<section class="card"><h2>Recent builds</h2><ul class="plain">{rows}</ul></section>'


def _recent_images(builder: ImageBuilder) -> str:
    records = builder.recent_images()
    if not records:
        return """<section class="card"><h2>Recently built images</h2>
<p class="muted">None yet: the first pull or build of an image will show up here.</p></section>"""
    rows = "".join(
        f"""<tr><td><a href="/images/{h(r.name)}"><code>{h(r.name)}</code></a></td>
<td class="num">{h(size_text(r.compressed_size))}</td><td class="num">{len(r.layers)}</td>
<td class="muted">{h(ago(r.built_at))}</td></tr>"""
        for r in records
    )
    return f"""<section class="card"><h2>Recently built images</h2>
<div class="table-wrap"><table>
<thead><tr><th>Image</th><th class="num">Size</th><th class="num">Layers</th><th>Built</th></tr></thead>
<tbody>{rows}</tbody></table></div></section>"""


def _docs_block() -> str:
    pages = docs_pages()
    if not pages:
        return ""
    items = []
    for slug, title, sections in pages:
        items.append(f'<li><a href="/docs/{h(slug)}">{h(title)}</a>')
        if sections:
            links = " · ".join(f'<a href="/docs/{h(slug)}#{h(anchor)}">{h(text)}</a>' for anchor, text in sections[:8])
            items.append(f'<div class="sections">{links}</div>')
        items.append("</li>")
    return f'<section class="card"><h2>Documentation</h2><ul class="plain docs">{"".join(items)}</ul></section>'


# ---- package search ----------------------------------------------------------


async def packages(request: web.Request) -> web.StreamResponse:
    query = request.query.get("q", "")[:100]
    tag = check_tag(request.query.get("tag") or "latest")
    builder = request.app[BUILDER]
    revision = await builder.source.resolve(tag)
    catalog = await _catalog(request).get(revision, wait=20.0)
    results = catalog.search(query) if catalog else []
    if wants_json(request):
        return web.json_response(
            {
                "query": query,
                "source": revision.source,
                "revision": revision.id,
                "loading": catalog is None and _catalog(request).error(revision) is None,
                "error": _catalog(request).error(revision) if catalog is None else None,
                "complete": catalog.complete if catalog else False,
                "total": catalog.total if catalog else None,
                "results": [e.to_json() for e in results],
            }
        )
    head = ""
    error = _catalog(request).error(revision) if catalog is None else None
    if error is not None:
        listing = f'<p class="message">The package list could not be read: {h(error)}</p>'
    elif catalog is None:
        head = '<meta http-equiv="refresh" content="5">'
        listing = '<p class="muted">The package list is still being read; this page reloads by itself.</p>'
    elif not query.strip():
        listing = (
            f'<p class="muted">{len(catalog.entries)} top-level names in {h(revision.source)}. Type a name above.</p>'
        )
    elif not results:
        listing = f"<p>No package matches <strong>{h(query)}</strong>.</p>"
    else:
        listing = _results_table(results)
    body = f"""<section class="card">{_search_form(query)}
<p class="muted">Source {h(revision.source)},
revision <code title="{h(revision.id)}">{h(_short(revision.id))}</code></p>
<div id="live-results" aria-live="polite">{listing}</div></section>
<script src="/static/nixery.js?v={h(__version__)}" defer></script>"""
    return page(request, f"Packages matching {query}" if query else "Packages", body, head=head)


def _results_table(results: list[Any]) -> str:
    rows = []
    for entry in results:
        version = h(entry.version) if entry.version else '<span class="muted">–</span>'
        description = h(entry.description) if entry.description else ""
        kind = "" if entry.kind in ("package", None) else f' <span class="badge">{h(entry.kind)}</span>'
        action = guidance.build_button(f"shell/{entry.name}") if entry.kind in ("package", None) else ""
        rows.append(
            f"<tr><td><code>{h(entry.name)}</code>{kind}<div class='desc'>{description}</div></td>"
            f"<td>{version}</td><td>{action}</td></tr>"
        )
    return f"""<div class="table-wrap"><table class="results">
<thead><tr><th>Name</th><th>Version</th><th></th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>"""


# ---- builds --------------------------------------------------------------------


def _split_reference(text: str, tag: str, host: str) -> tuple[str, str]:
    """`HOST/shell/curl:tag` as typed or pasted: drop this registry's host, split off the tag."""
    text = text.strip().strip("/")
    text = text.removeprefix("docker://").removeprefix(f"{host}/")
    if ":" in text:
        text, given = text.split(":", 1)
        tag = tag or given
    return text, tag or "latest"


async def _image_request(request: web.Request, name: str, tag: str) -> ImageRequest:
    resolver = request.app.get(RESOLVER)
    if resolver is not None:
        declared = await resolver.resolve(name, tag)
        if declared is not None:
            return declared
    return parse_image_name(name)


async def start_build(request: web.Request) -> web.StreamResponse:
    csrf.refuse_cross_site(request)
    json_api = wants_json(request)
    fields: dict[str, str] = {}
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise errors.NameInvalid("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise errors.NameInvalid("the request body must be a JSON object with `image`")
        fields = {k: str(v) for k, v in body.items() if k in ("image", "tag") and v is not None}
    else:
        form = await request.post()
        fields = {k: str(form[k]) for k in ("image", "tag") if k in form}
    try:
        name, tag = _split_reference(fields.get("image", ""), fields.get("tag", "").strip(), registry_host(request))
        tag = check_tag(tag)
        image = await _image_request(request, name, tag)
        # With access control on: viewing a built image needs pull, building a new one build.
        built = await request.app[BUILDER].built(image, tag)
        await http_auth.require(request, name, PULL if built is not None else BUILD)
        build = await request.app[BUILDER].start(image, tag)
    except Exception as exc:
        if not wants_html_error(request):
            raise
        return error_page(request, registry_error(exc), form=fields)
    tags = request.app[BUILD_TAGS]
    tags[build.id] = tag
    while len(tags) > 1000:
        tags.popitem(last=False)
    location = f"/builds/{build.id}"
    progress = guidance.progress_path(build.id, name, tag)  # the name as given: a declared one stays one
    log.info(
        "http.build_started", image=image.display_name, tag=tag, build=build.id,
        progress=f"{request.url.origin()}{progress}",
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


def _get_build(request: web.Request) -> Build:
    build = request.app[BUILDER].builds.get(request.match_info["id"])
    if build is None:
        raise errors.NameUnknown("no build with this id (it may be too old to be kept)")
    return build


def event_json(index: int, event: Event) -> dict[str, Any]:
    return {"index": index, **event.to_json()}


class Progress:
    """What a build's events add up to (the progress page's numbers)."""

    def __init__(self, build: Build):
        self.reached: set[Stage] = set()
        self.current = Stage.QUEUED
        self.messages: dict[Stage, str] = {}
        self.data: dict[str, Any] = {}
        self.compress_started: float | None = None
        self.last_time = build.started
        for event in build.events:
            self.add(event)

    def add(self, event: Event) -> None:
        self.reached.add(event.stage)
        self.current = event.stage
        self.messages[event.stage] = event.message
        self.data.update(event.data)
        self.last_time = event.time
        if event.stage is Stage.COMPRESSING and self.compress_started is None:
            self.compress_started = event.time

    @property
    def rate(self) -> float | None:
        """Compressed MB per second over the compressing stage so far."""
        if self.compress_started is None or not self.data.get("compressed_bytes"):
            return None
        seconds = self.last_time - self.compress_started
        return self.data["compressed_bytes"] / seconds / 1e6 if seconds > 0 else None

    def detail(self, stage: Stage) -> str:
        d = self.data
        if stage is Stage.BUILDING and stage in self.reached:
            built, fetched = d.get("built", 0), d.get("fetched", 0)
            if not (built or fetched or d.get("to_build") or d.get("to_fetch")):
                if self.current is Stage.BUILDING:
                    return self.messages[stage]
                return "nothing to build: all in the Nix store"
            to_build, to_fetch = max(built, d.get("to_build", 0)), max(fetched, d.get("to_fetch", 0))
            if self.current is Stage.BUILDING:  # Nix names each derivation as it starts
                parts = [f"building {built} of {to_build} derivations"]
                if to_fetch:
                    parts.append(f"fetching {fetched} of {to_fetch} paths")
            else:
                parts = [f"{to_build} derivations built"] + ([f"{to_fetch} paths fetched"] if to_fetch else [])
            return ", ".join(parts)
        if stage is Stage.LAYERING and "paths" in d:
            return f"{d['paths']} store paths"
        if stage is Stage.COMPRESSING and "layers_total" in d:
            text = f"{d.get('layers_done', 0)}/{d['layers_total']} layers"
            text += f" · {d.get('layers_created', 0)} new, {size_text(d.get('compressed_bytes', 0))} compressed"
            if self.rate and self.rate >= 0.1:
                text += f" · {self.rate:.1f} MB/s"
            return text
        if stage is Stage.DONE and "digest" in d:
            return f"{size_text(d.get('size'))} in {d.get('layers')} layers"
        return self.messages.get(stage, "")


def _stage_list(build: Build, progress: Progress) -> str:
    failed = build.stage is Stage.FAILED
    furthest = max((_STAGE_ORDER.index(s) for s in progress.reached if s in _STAGE_ORDER), default=-1)
    items = []
    for position, stage in enumerate(_STAGE_ORDER):
        if stage is progress.current and not build.finished:
            state = "current"
        elif stage in progress.reached:
            state = "past"
        elif position < furthest:
            state = "skipped"
        else:
            state = "pending"
        if failed and stage is Stage.DONE:
            stage_li = (
                f'<li class="failed" data-stage="failed"><span class="label">{_STAGE_LABELS[Stage.FAILED]}</span>'
                f'<span class="detail">{h(progress.messages.get(Stage.FAILED, ""))}</span></li>'
            )
            items.append(stage_li)
            continue
        items.append(
            f'<li class="{state}" data-stage="{stage.value}"><span class="label">{_STAGE_LABELS[stage]}</span>'
            f'<span class="detail">{h(progress.detail(stage) if state in ("past", "current") else "")}</span></li>'
        )
    return f'<ol class="stages" id="stages">{"".join(items)}</ol>'


def _outcome(request: web.Request, build: Build, progress: Progress) -> str:
    d = progress.data
    tag = request.app[BUILD_TAGS].get(build.id, "latest")
    if build.stage is Stage.DONE and "digest" in d:
        name = d.get("image", build.image)  # the image's own name: as first asked for, resolved
        note = guidance.same_image_note(build.image, name) if name != build.image else ""
        ref = guidance.pull_reference(registry_host(request), name, tag)
        return f"""<div class="outcome done" id="outcome" data-image="{h(name)}">
<p><strong>Image ready.</strong> {h(size_text(d.get("size")))} in {h(d.get("layers"))} layers.</p>{note}
<p class="digest">Digest <code id="digest">{h(d["digest"])}</code></p>
<pre class="command" data-copy><code>docker pull {h(ref)}</code></pre>
<p><a href="{h(guidance.image_path(name, tag))}">Layers and store paths</a></p>
</div>"""
    if build.stage is Stage.FAILED:
        tail = d.get("log")
        log_html = f"<details open><summary>Nix's last lines</summary><pre>{h(tail)}</pre></details>" if tail else ""
        return f"""<div class="outcome failed" id="outcome">
<p><strong>The build failed.</strong></p><p class="message" id="error">{h(progress.messages.get(Stage.FAILED, ""))}</p>
{guidance.suggestion_button(build.image, tag, d.get("suggestions"))}{log_html}</div>"""
    return '<div class="outcome" id="outcome" hidden></div>'


def _event_items(build: Build) -> str:
    start = max(0, len(build.events) - SHOWN_EVENTS)
    return "".join(
        f'<li data-index="{i}"><span class="t">+{e.time - build.started:.1f}s</span> '
        f'<span class="badge stage-{e.stage.value}">{e.stage.value}</span> {h(e.message)}</li>'
        for i, e in enumerate(build.events[start:], start)
    )


async def build_page(request: web.Request) -> web.Response:
    if request.app[BUILDER].builds.get(request.match_info["id"]) is None and wants_html_error(request):
        return await _unknown_build_page(request)
    build = _get_build(request)
    progress = Progress(build)
    head = "" if build.finished else '<noscript><meta http-equiv="refresh" content="3"></noscript>'
    state = build.stage.value
    body = f"""
<section class="card build" id="build" data-id="{h(build.id)}" data-events="{len(build.events)}"
  data-started="{build.started}" data-stage="{h(state)}">
  <h1><span id="verb">{h(_VERBS.get(build.stage, "Building"))}</span> <code>{h(build.image)}</code></h1>
  <p class="muted">Build <code>{h(build.id)}</code> · started {h(ago(build.started))} ·
    <span id="state" class="badge stage-{h(state)}">{h(state)}</span></p>
  {_stage_list(build, progress)}
  {_outcome(request, build, progress)}
</section>
<section class="card">
  <h2>Events</h2>
  <ol class="events" id="events">{_event_items(build)}</ol>
  <p class="hint">Also as <a href="/builds/{h(build.id)}.json">JSON</a> and as a
  <a href="/builds/{h(build.id)}/events">stream of server-sent events</a>.</p>
</section>
<script src="/static/build.js?v={h(__version__)}" defer></script>
"""
    return page(request, f"Building {build.image}", body, head=head)


async def _unknown_build_page(request: web.Request) -> web.Response:
    """A forgotten build (a restart, a bookmark): what became of its image, when the address names it."""
    image_name, record = request.query.get("image"), None
    tag = check_tag(request.query.get("tag") or "latest")
    if image_name is not None:
        image = await _image_request(request, image_name, tag)
        await http_auth.require(request, image_name, PULL)
        record = await request.app[BUILDER].built(image, tag)
    body = guidance.unknown_build(request.match_info["id"], image_name, tag, record, registry_host(request))
    return page(request, "Unknown build", body, status=404)


async def build_json(request: web.Request) -> web.Response:
    build = _get_build(request)
    return web.json_response(
        {
            **build.summary(),
            "finished": build.finished,
            "events": [event_json(i, e) for i, e in enumerate(build.events)],
        }
    )


def _first_index(request: web.Request) -> int:
    """Where the stream starts: after `Last-Event-ID` (a reconnect) or at `?after=`."""
    start = 0
    last = request.headers.get("Last-Event-ID", "")
    if last.isdigit():
        start = int(last) + 1
    after = request.query.get("after", "")
    if after.isdigit():
        start = max(start, int(after))
    return start


async def build_events(request: web.Request) -> web.StreamResponse:
    build = _get_build(request)
    start = _first_index(request)
    if build.finished and start >= len(build.events):
        return web.Response(status=204)  # tells EventSource not to reconnect
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        await response.write(b"retry: 2000\n\n")
        async for index, event in _follow(build, start):
            if event is None:
                await response.write(b": keepalive\n\n")
                continue
            data = json.dumps(event_json(index, event), separators=(",", ":"))
            await response.write(f"id: {index}\nevent: {event.stage.value}\ndata: {data}\n\n".encode())
        await response.write_eof()
    return response


async def _follow(build: Build, start: int) -> AsyncIterator[tuple[int, Event | None]]:
    """The build's events from `start` on, with None every KEEPALIVE_SECONDS of silence."""
    queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump() -> None:
        index = 0
        async for event in build.follow():
            if index >= start:
                queue.put_nowait((index, event))
            index += 1
        queue.put_nowait(None)

    task = asyncio.ensure_future(pump())
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
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---- images --------------------------------------------------------------------


def image_json(record: ImageRecord, tag: str) -> dict[str, Any]:
    paths = record.layer_paths or tuple(() for _ in record.layers)
    return {
        "name": record.name,
        "tag": tag,
        "digest": str(record.default_manifest.digest),
        "oci_digest": str(record.manifests[ManifestFormat.OCI].digest),
        "config": str(record.config),
        "size": record.compressed_size,
        "source": record.source,
        "revision": record.revision,
        "packages": list(record.packages),
        "architecture": record.architecture,
        "built_at": record.built_at,
        "paths_recorded": bool(record.layer_paths),
        "layers": [
            {**layer.to_json(), "paths": list(layer_paths)}
            for layer, layer_paths in zip(record.layers, paths, strict=True)
        ],
    }


async def image_info(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    as_json = name.endswith(".json")
    if as_json:
        name = name[: -len(".json")]
    if "%" in request.raw_path.split("?", 1)[0]:
        raise errors.NameInvalid("percent-encoded characters are not allowed in image names")
    tag = check_tag(request.query.get("tag") or "latest")
    image = await _image_request(request, name, tag)
    await http_auth.require(request, name, PULL)
    record = await request.app[BUILDER].built(image, tag)
    if record is None:
        await request.app[BUILDER].check_names(image, tag)  # a misspelt name is told so, with the nearest names
        if wants_html_error(request):
            return page(request, f"{name} is not built yet",
                        guidance.not_built(image.display_name, tag, registry_host(request)), status=404)
        reference = image.display_name + ("" if tag == "latest" else f":{tag}")
        raise errors.ManifestUnknown(
            f"{reference} has not been built yet: pull it, or build it with `nixery build {reference}`",
            detail={"name": image.display_name, "tag": tag},
        )
    doc = image_json(record, tag)
    if as_json:
        return web.json_response(doc)
    rows = []
    for number, layer in enumerate(doc["layers"], 1):
        paths = layer["paths"]
        listing = "".join(f"<li><code>{h(p)}</code></li>" for p in paths)
        count = f"{len(paths)} store path" + ("" if len(paths) == 1 else "s")
        held = f"<details><summary>{count}</summary><ul class='paths'>{listing}</ul></details>"
        rows.append(
            f"<tr><td class='num'>{number}</td>"
            f"<td><code class='nowrap' title='{h(layer['digest'])}'>{h(layer['digest'][7:19])}</code></td>"
            f"<td class='num'>{h(size_text(layer['size']))}</td>"
            f"<td>{h(layer['description'])}{held if paths else ''}</td></tr>"
        )
    ref = guidance.pull_reference(registry_host(request), record.name, tag)
    query = "" if tag == "latest" else "?" + h(urlencode({"tag": tag}))
    body = f"""<section class="card">
<h1><code>{h(record.name)}</code></h1>
{guidance.same_image_note(image.display_name, record.name)}
<pre class="command" data-copy><code>docker pull {h(ref)}</code></pre>
<dl class="facts">
<dt>Digest</dt><dd><code class="digest">{h(doc["digest"])}</code></dd>
<dt>Size</dt><dd>{h(size_text(doc["size"]))} compressed, {len(record.layers)} layers</dd>
<dt>Packages</dt><dd>{h(", ".join(record.packages))}</dd>
<dt>Source</dt><dd>{h(record.source)} <code title="{h(record.revision)}">{h(_short(record.revision))}</code></dd>
<dt>Built</dt><dd>{h(ago(record.built_at))}</dd>
</dl></section>
<section class="card"><h2>Layers</h2><div class="table-wrap"><table>
<thead><tr><th class="num">#</th><th>Digest</th><th class="num">Size</th><th>Holds</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table></div>
<p class="hint">Also as <a href="/images/{h(record.name)}.json{query}">JSON</a>.</p>
</section>
<script src="/static/nixery.js?v={h(__version__)}" defer></script>"""
    return page(request, record.name, body)


# ---- docs ----------------------------------------------------------------------

_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")


def _doc_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    if README.is_file():
        files["readme"] = README
    if DOCS_DIR.is_dir():
        for path in sorted(DOCS_DIR.glob("*.md")):
            slug = path.stem.lower()
            if _SLUG.fullmatch(slug) and slug != "readme":  # docs/README.md is the index: /docs
                files[slug] = path
    return files


def heading_anchor(text: str) -> str:
    """GitHub-style anchors: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@lru_cache(maxsize=32)
def _render(path: Path, mtime_ns: int) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(title, HTML, level-2 sections) of a Markdown file; raw HTML in it is not passed through."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    tokens = md.parse(path.read_text(errors="replace"))
    title, sections, seen = path.stem, [], set()
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            text = tokens[i + 1].content if i + 1 < len(tokens) else ""
            anchor = base = heading_anchor(text) or "section"
            n = 1
            while anchor in seen:
                anchor, n = f"{base}-{n}", n + 1
            seen.add(anchor)
            token.attrSet("id", anchor)
            if token.tag == "h1" and title == path.stem:
                title = text
            elif token.tag == "h2":
                sections.append((anchor, text))
        if token.type == "inline" and token.children:
            for child in token.children:
                if child.type == "link_open":
                    child.attrSet("href", _doc_link(str(child.attrGet("href") or "")))
    return title, md.renderer.render(tokens, md.options, {}), tuple(sections)


def _doc_link(href: str) -> str:
    """Links between the Markdown files point at their rendered pages."""
    if "://" in href or href.startswith(("#", "/", "mailto:")):
        return href
    target, _, anchor = href.partition("#")
    if target.endswith(".md") and Path(target).parent.name in ("", "..", "docs"):
        slug = Path(target).stem.lower()
        if slug == "readme" and Path(target).parent.name == "docs":
            return "/docs" + (f"#{anchor}" if anchor else "")
        return f"/docs/{slug}" + (f"#{anchor}" if anchor else "")
    return href


def docs_pages() -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    pages = []
    for slug, path in _doc_files().items():
        try:
            title, _, sections = _render(path, path.stat().st_mtime_ns)
        except OSError:
            continue
        pages.append((slug, title, sections))
    return pages


async def docs_index(request: web.Request) -> web.Response:
    index = DOCS_DIR / "README.md"
    body = ""
    if index.is_file():
        _, rendered, _ = _render(index, index.stat().st_mtime_ns)
        body = f'<article class="card doc">{rendered}</article>'
    body += _docs_block() or '<section class="card"><p>No documentation is installed with this registry.</p></section>'
    return page(request, "Documentation", body)


async def docs_page(request: web.Request) -> web.Response:
    slug = request.match_info["page"].lower().removesuffix(".md")
    path = _doc_files().get(slug)
    if path is None:
        raise errors.NameUnknown(f"no documentation page {slug!r}")
    title, rendered, _ = _render(path, path.stat().st_mtime_ns)
    return page(request, title, f'<article class="card doc">{rendered}</article>')


# ---- wiring --------------------------------------------------------------------


def add_web_routes(app: web.Application) -> None:
    """Pages, the build API and static files. The package catalogue is the builder's
    (`builder.names.catalog`): read on first use (a page, a search, a missing name),
    not at start-up, so a registry that nobody browses never evaluates it."""
    app[BUILD_TAGS] = OrderedDict()
    app.router.add_get("/", _html_errors(landing))
    app.router.add_get("/packages", _html_errors(packages))
    app.router.add_post("/builds", _html_errors(start_build))
    app.router.add_get(f"/builds/{{id:{_BUILD_ID}}}.json", build_json)
    app.router.add_get(f"/builds/{{id:{_BUILD_ID}}}/events", build_events)
    app.router.add_get(f"/builds/{{id:{_BUILD_ID}}}", _html_errors(build_page))
    app.router.add_get("/images/{name:.+}", _html_errors(image_info))
    app.router.add_get("/docs", _html_errors(docs_index))
    app.router.add_get("/docs/{page}", _html_errors(docs_page))
    app.router.add_static("/static/", STATIC_DIR, name="static")

