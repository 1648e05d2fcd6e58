"""Error answers of the web pages, in process: the one error middleware renders a page's
failure as HTML for a browser and as the registry's JSON error for every other client, and
so it does for a path no route serves outside `/v2/`; routes that are not pages, and the
registry API's paths, answer JSON whatever the client accepts.

The app is the registry's own error middleware and web routes; the requests below
fail before any of them needs the builder or storage, so none is set up."""

from __future__ import annotations

import pytest
from aiohttp import web

from nixery.http.errors import error_middleware
from nixery.http.web import add_web_routes

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
async def client(aiohttp_client):
    app = web.Application(middlewares=[error_middleware])
    add_web_routes(app)
    return await aiohttp_client(app)


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "kind", "html"),
    [
        ("GET", "/docs/no-such-page", HTML, 404, "NAME_UNKNOWN", True),
        ("GET", "/docs/no-such-page", {"Accept": "*/*"}, 404, "NAME_UNKNOWN", False),
        ("GET", "/docs/no-such-page", {}, 404, "NAME_UNKNOWN", False),
        ("GET", "/docs/no-such-page?format=json", HTML, 404, "NAME_UNKNOWN", False),
        ("GET", "/images/shell%2Fcurl", HTML, 400, "NAME_INVALID", True),
        ("GET", "/images/shell%2Fcurl.json", HTML, 400, "NAME_INVALID", False),
        ("GET", "/images/shell/curl?tag=a..b", HTML, 400, "TAG_INVALID", True),
        ("GET", "/no/such/page", HTML, 404, "NAME_UNKNOWN", True),  # no route: a page to a browser
        ("GET", "/no/such/page", {"Accept": "*/*"}, 404, "NAME_UNKNOWN", False),
        ("GET", "/v2/no/such/endpoint", HTML, 404, "NAME_UNKNOWN", False),  # the registry API's: JSON
        ("PUT", "/docs", HTML, 405, "UNSUPPORTED", False),
        ("GET", "/builds", HTML, 405, "UNSUPPORTED", True),  # a form's error page's address, entered again
        ("GET", "/builds", {"Accept": "*/*"}, 405, "UNSUPPORTED", False),
    ],
)
async def test_the_middleware_picks_html_for_browsers_on_pages(
    client, method: str, path: str, headers: dict[str, str], status: int, kind: str, html: bool
) -> None:
    response = await client.request(method, path, headers=headers)
    assert response.status == status
    if html:
        assert response.content_type == "text/html"
        text = await response.text()
        assert f"Error <code>{kind}</code> · HTTP {status}" in text
        assert '<a href="/">Back to the start page</a>' in text
    else:
        assert response.content_type == "application/json"
        assert (await response.json())["errors"][0]["detail"]["kind"] == kind


async def test_a_failed_build_form_comes_back_filled_in(client) -> None:
    response = await client.post("/builds", data="image=shell%2Fno+such&tag=v1", headers={**FORM, **HTML})
    assert response.status == 400 and response.content_type == "text/html"
    text = await response.text()
    assert "invalid package name" in text
    assert 'value="shell/no such"' in text and 'value="v1"' in text  # the form, to correct the name
    json_api = await client.post("/builds", json={"image": "shell/no such"})
    assert json_api.status == 400 and (await json_api.json())["errors"][0]["code"] == "NAME_INVALID"
