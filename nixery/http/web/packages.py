"""Package search: GET /packages?q= as a page (a Build button for each package) or
as JSON (?format=json or Accept), over the builder's package catalogue of the
revision that `tag` selects. The catalogue is read on first use; until it is, the
page says so and reloads itself, and the JSON says `loading`."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nixery.http import guidance
from nixery.http.markup import h
from nixery.http.pages import wants_json
from nixery.http.routes import BUILDER
from nixery.http.web.layout import page, search_form, short
from nixery.registry.names import check_build_tag


async def packages(request: web.Request) -> web.StreamResponse:
    query = request.query.get("q", "")[:100]
    tag = check_build_tag(request.query.get("tag") or "latest")  # its Build buttons build under it
    builder = request.app[BUILDER]
    revision = await builder.source.resolve(tag)
    catalogue = builder.names.catalog
    catalog = await catalogue.get(revision, wait=20.0)
    results = await builder.names.search(catalog, query) if catalog else []
    if wants_json(request):
        return web.json_response(
            {
                "query": query,
                "source": revision.source,
                "revision": revision.id,
                "loading": catalog is None and catalogue.error(revision) is None,
                "error": catalogue.error(revision) if catalog is None else None,
                "complete": catalog.complete if catalog else False,
                "total": catalog.total if catalog else None,
                "results": [e.to_json() for e in results],
            }
        )
    head = ""
    error = catalogue.error(revision) if catalog is None else None
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
    body = f"""<section class="card"><h1>Packages</h1>{search_form(query)}
<p class="muted">Source {h(revision.source)},
revision <code title="{h(revision.id)}">{h(short(revision.id))}</code></p>
<div id="live-results" aria-live="polite">{listing}</div></section>"""
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
<thead><tr><th>Name</th><th>Version</th><th><span class="visually-hidden">Build</span></th></tr></thead>
<tbody>{"".join(rows)}</tbody></table></div>"""
