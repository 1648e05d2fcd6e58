"""The web side of the registry: pages for people, JSON and events for tools.

    GET  /                       landing page: how to pull, the package source, search,
                                 a build form, recent builds and images, docs   (landing.py)
    GET  /packages?q=            package search (HTML; JSON with ?format=json or Accept) (packages.py)
    POST /builds                 start a build; its progress page, JSON and events (builds.py)
    GET  /builds/{id}[.json]
    GET  /builds/{id}/events
    GET  /images/{name}[.json]   a built image: layers, sizes, the store paths of each layer (images.py)
    GET  /docs, /docs/{page}     README.md and docs/**/*.md, rendered                    (docs.py)
    GET  /static/...             style sheet and scripts

Pages are plain server-rendered HTML that work without JavaScript; scripts
only add live updates. Everything taken from a request (the Host header, image
names, queries) is escaped before it is written into a page (layout.py holds the
page shell and the markup pages share). A failed page request is rendered by the
one error middleware (nixery.http.errors) with `layout.error_page` for browsers,
and as the registry's JSON error for every other client (nixery.http.pages).
The pages read Nix's answers only through the builder (`source`, `names.catalog`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from nixery.http.pages import ERROR_PAGE, page_route
from nixery.http.web.builds import (
    BUILD_ID,
    BUILD_TAGS,
    BUILD_TAGS_KEPT,
    STREAMS_STOPPING,
    build_events,
    build_json,
    build_page,
    start_build,
)
from nixery.http.web.docs import PAGE, docs_index, docs_page
from nixery.http.web.images import image_info
from nixery.http.web.landing import landing
from nixery.http.web.layout import error_page, static_cache_headers, static_file
from nixery.http.web.packages import packages
from nixery.lru import LRU


def add_web_routes(app: web.Application) -> None:
    """Pages, the build API and static files. The package catalogue is the builder's
    (`builder.names.catalog`): read on first use (a page, a search, a missing name),
    not at start-up, so a registry that nobody browses never evaluates it."""
    app[BUILD_TAGS] = LRU(BUILD_TAGS_KEPT)
    app[ERROR_PAGE] = error_page
    app[STREAMS_STOPPING] = asyncio.Event()
    app.router.add_get("/", landing, name=page_route("landing"))
    app.router.add_get("/packages", packages, name=page_route("packages"))
    app.router.add_post("/builds", start_build, name=page_route("start_build"))
    app.router.add_get(f"/builds/{{id:{BUILD_ID}}}.json", build_json)
    app.router.add_get(f"/builds/{{id:{BUILD_ID}}}/events", build_events)
    app.router.add_get(f"/builds/{{id:{BUILD_ID}}}", build_page, name=page_route("build"))
    app.router.add_get("/images/{name:.+}", image_info, name=page_route("image"))
    app.router.add_get("/docs", docs_index, name=page_route("docs"))
    app.router.add_get(f"/docs/{{page:{PAGE}}}", docs_page, name=page_route("doc"))
    app.router.add_get("/static/{name}", static_file)
    app.on_response_prepare.append(static_cache_headers)
