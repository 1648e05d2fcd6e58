"""The page shell and the markup that several pages share: the header and footer,
the build and search forms, the error page, times and revisions in words.

Every value taken from a request is escaped (`h`) before it is written into a page.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from aiohttp import web

from nixery import __version__, errors
from nixery.http import hosts, ranges
from nixery.http.markup import h

#: A page's form fields, kept on the request so that an error page can show the form again, filled in.
FORM = web.RequestKey("page_form", dict[str, str])


class Revision(Protocol):
    """What the pages show of a package set's revision (the builder's `source.resolve`)."""

    @property
    def id(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def fetched(self) -> float | None: ...


class PackageEntry(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str | None: ...


class PackageList(Protocol):
    """What the pages read of the package catalogue (the builder's `names.catalog`)."""

    @property
    def entries(self) -> Sequence[PackageEntry]: ...

    @property
    def total(self) -> int: ...

    @property
    def complete(self) -> bool: ...

    @property
    def revision(self) -> str: ...

    @property
    def read_at(self) -> float: ...

    def names(self) -> set[str]: ...


def ago(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, (now or time.time()) - timestamp)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return time.strftime("%Y-%m-%d", time.gmtime(timestamp))


def short(revision_id: str) -> str:
    return revision_id if len(revision_id) <= 20 else revision_id[:16] + "…"


def registry_host(request: web.Request) -> str:
    """The host clients use for this registry (from the Host header), as pull commands name it."""
    return hosts.pull_host(request)


#: The style sheet and scripts, served at /static/.
STATIC_DIR = Path(__file__).parent.parent / "static"
#: The files served at /static/NAME: only these (the directory holds nothing else).
STATIC_FILES = frozenset(path.name for path in STATIC_DIR.iterdir() if path.is_file())


#: The static files' media types (as Python's mimetypes names them, but not from the machine's tables).
_STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}


async def static_file(request: web.Request) -> web.StreamResponse:
    """GET /static/NAME: a few kilobytes, sent from memory, with their content's ETag.

    aiohttp's static route answered the directory itself with HTTPForbidden (a 500 here), a
    missing file with an empty 404, an unmet If-Match with an empty 412 and a range past the
    end (or several ranges) with an empty 416. Here any other name is the registry's 404, the
    conditions are those of blobs (`ranges.not_modified`), and a Range is ignored (RFC 9110
    allows it: the whole file is a few kilobytes)."""
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise errors.NameUnknown("no such endpoint or repository")
    path = STATIC_DIR / name
    body, tag = _static_content(path, path.stat().st_mtime_ns)
    headers = {"ETag": f'"{tag}"', "Content-Type": _STATIC_TYPES.get(path.suffix, "application/octet-stream")}
    if ranges.not_modified(request.headers, headers["ETag"]):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, headers=headers)


@lru_cache(maxsize=16)
def _static_content(path: Path, mtime_ns: int) -> tuple[bytes, str]:
    """A static file's bytes and the tag of its content (as `asset` names it), read again when it changes."""
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:16]


def asset(name: str) -> str:
    """The address of a static file, naming its content: browsers may keep it for good
    (`static_cache_headers`), and a changed file gets a new address. (The version number
    did not change between deployments of new code, so browsers ran stale scripts.)"""
    path = STATIC_DIR / name
    return f"/static/{name}?v={_static_content(path, path.stat().st_mtime_ns)[1]}"


async def static_cache_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Static files asked for by content (`asset`) are kept by browsers; other responses of the
    pages are checked with the registry each time (a progress page, a search). A `v` that is not
    the content served (a replica of another release answered during a rolling update) is not
    kept: browsers would keep the wrong file under the right address for a year."""
    named = f'"{request.query.get("v")}"' == response.headers.get("ETag")
    if request.path.startswith("/static/") and named and response.status == 200:
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    elif response.content_type == "text/html" or request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")


def script(name: str) -> str:
    return f'<script src="{h(asset(name))}" defer></script>'


#: What a page may load and who may show it. Pages are this registry's own markup, style sheet and
#: scripts: nothing else runs even if a value ever escaped unescaped, and no other site may frame a
#: page (its Build button could be clicked through a disguised frame) or post its forms elsewhere.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


def page(request: web.Request, title: str, body: str, *, status: int = 200, head: str = "") -> web.Response:
    """A page; every page runs nixery.js, so that each command on any page has its Copy button."""
    document = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{h(title)} · Nixery</title>
<link rel="stylesheet" href="{h(asset("style.css"))}">
<link rel="icon" href="{h(asset("favicon.svg"))}" type="image/svg+xml">
{script("nixery.js")}
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
    # A request's bytes that are not UTF-8 (aiohttp's surrogates) come out as "?", not as a failed page.
    encoded = document.encode("utf-8", "replace")
    return web.Response(body=encoded, status=status, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


def error_page(request: web.Request, error: errors.RegistryError) -> web.Response:
    """The page a browser gets for a failed page request (rendered by the error middleware);
    after a failed build form, the form again with what was typed."""
    titles = {400: "That name does not work", 403: "Not allowed", 404: "Not found", 405: "Not supported"}
    title = titles.get(error.status, "Something went wrong")
    body = f"""
<section class="card error">
  <h1>{h(title)}</h1>
  <p class="message">{h(error.message)}</p>
  <p class="muted">Error <code>{h(error.kind)}</code> · HTTP {error.status}</p>
</section>"""
    form = request.get(FORM)
    if form is not None:
        body += build_form(form.get("image", ""), form.get("tag", ""))
    body += '<p><a href="/">Back to the start page</a></p>'
    return page(request, title, body, status=error.status)


def build_form(image: str = "", tag: str = "", *, example: str = "shell/curl") -> str:
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


def search_form(query: str = "") -> str:
    return f"""
<form class="search-form" method="get" action="/packages" role="search">
  <label for="search-q">Search packages</label>
  <div class="row">
    <input id="search-q" type="search" name="q" value="{h(query)}" placeholder="e.g. curl"
      autocomplete="off" autocapitalize="off" spellcheck="false">
    <button type="submit">Search</button>
  </div>
</form>"""
