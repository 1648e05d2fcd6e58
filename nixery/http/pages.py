"""Which requests come from a person's browser on a web page, and how an error reaches one.

The web package (`nixery.http.web`) names its page routes with `page_route()`
and sets ERROR_PAGE. The one error middleware (`nixery.http.errors`) renders a
failure as an HTML page with it when `wants_error_page()`: the route is a page
and the request comes from a browser (it names text/html, or posts a form).
Every other request — container clients, scripts, the JSON API, a client that
sends no Accept header — gets the registry's JSON error body.
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from nixery import errors
from nixery.http.bodies import content_type

_PAGE_ROUTE = "page."


class ErrorPage(Protocol):
    def __call__(self, request: web.Request, error: errors.RegistryError) -> web.StreamResponse: ...


#: Renders a registry error as a page of the site; set by the web package.
ERROR_PAGE = web.AppKey("error_page", ErrorPage)


def page_route(name: str) -> str:
    """The route name that marks a route as a page for people (its errors are pages too)."""
    return _PAGE_ROUTE + name


def on_page(request: web.Request) -> bool:
    """The request is for a page: a page route's, or a path no route serves outside the registry
    API (`/nosuch`, `/images/`), which a browser asked for as a page too."""
    name = request.match_info.route.name
    if name is not None:
        return name.startswith(_PAGE_ROUTE)
    unmatched = getattr(request.match_info, "http_exception", None)
    # A GET of a path only posted to (`/builds`, where a form's error page sits) is one too.
    page_like = isinstance(unmatched, web.HTTPNotFound) or (
        isinstance(unmatched, web.HTTPMethodNotAllowed) and request.method in ("GET", "HEAD")
    )
    return page_like and not (request.path + "/").startswith("/v2/")


def _body_type(request: web.Request) -> str:
    """The request body's media type, or "" for a Content-Type too long to parse (refused as
    the request's error by `bodies.content_type`; asked here again while rendering that error)."""
    try:
        return content_type(request)
    except errors.RequestInvalid:
        return ""


def wants_json(request: web.Request) -> bool:
    if request.path.endswith(".json") or request.query.get("format") == "json":
        return True
    if request.method == "POST" and _body_type(request) == "application/json":
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
    return request.method == "POST" and _body_type(request) in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    )


def wants_error_page(request: web.Request) -> bool:
    return on_page(request) and wants_html_error(request)
