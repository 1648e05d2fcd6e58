"""A built image: GET /images/{name}[.json][?tag=]: its digest, size, packages and
layers, and the store paths each layer holds (JSON: `nixery.views.image_json`).

An image that is not built yet is 404: for a browser a page with a Build button
(nixery/http/guidance.py), which says so when its last build failed and pulls get that
error for a while; for others MANIFEST_UNKNOWN naming the command that builds it; a
misspelt package name is told so first, with the nearest names.
A tag of the documents attached to a manifest (`sha256-...`) names no image: 404
with the registry API's message (`nixery.registry.names.check_image_tag`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from nixery import errors
from nixery.amounts import size_text
from nixery.auth import PULL
from nixery.failures import utc_time
from nixery.http import auth as http_auth
from nixery.http import guidance
from nixery.http.markup import h
from nixery.http.pages import wants_html_error, wants_json
from nixery.http.routes import BUILDER, requested_image
from nixery.http.web.layout import ago, page, registry_host, short
from nixery.registry.names import check_image_tag
from nixery.views import image_json, image_reference

#: How the image page names the documents attached to an image's manifest (docs/sbom.md).
_DOCUMENT_NAMES = {
    "application/spdx+json": "SBOM (SPDX 2.3 JSON)", "application/vnd.cyclonedx+json": "SBOM (CycloneDX 1.5 JSON)",
    "application/vnd.in-toto+json": "provenance (in-toto, SLSA v1)",
}
#: The file a browser saves each as: the blob's own type is application/octet-stream, and its
#: address ends in the digest, so a click saved a file called `sha256:...` with no extension.
_DOCUMENT_FILES = {
    "application/spdx+json": "spdx.json", "application/vnd.cyclonedx+json": "cdx.json",
    "application/vnd.in-toto+json": "provenance.json",
}


def _attached_facts(name: str, doc: dict[str, Any]) -> str:
    """Links to the image's SBOM and provenance, and to the referrers API's list of them."""
    stem = name.replace("/", "_")
    links = [
        f'<a href="/v2/{h(name)}/blobs/{h(one["document"])}" '
        f'download="{h(stem)}.{h(_DOCUMENT_FILES.get(kind, "json"))}">{h(_DOCUMENT_NAMES.get(kind, kind))}</a>'
        for one in doc["attached"] if (kind := one["artifactType"])
    ]
    if not links:
        return ""
    # Of the manifest they are attached to: for several platforms `digest` is the index's, which has none.
    listing = f'<a href="/v2/{h(name)}/referrers/{h(doc["attached_to"])}">referrers</a>'
    how = '<a href="/docs/sbom">how to fetch them</a>'
    return f"<dt>Documents</dt><dd>{', '.join(links)} (all: {listing}; {how})</dd>"


async def image_info(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    as_json = name.endswith(".json")
    if as_json:
        name = name[: -len(".json")]
    # A tag of attachments (`sha256-<hex>`, `sha256-<hex>.sig`, or malformed) is not the image's: 404, as the API says.
    tag = check_image_tag(request.query.get("tag") or "latest")
    image = await requested_image(request, tag, name)
    await http_auth.require(request, name, PULL)
    record = await request.app[BUILDER].find(image, tag)  # a misspelt name is told so, with the nearest names
    if record is None:
        failure = await request.app[BUILDER].failed_lately(image, tag)
        if wants_html_error(request):
            body = guidance.not_built(image.display_name, tag, registry_host(request), failure)
            return page(request, f"{name} is not built yet", body, status=404)
        reference = image_reference(image.display_name, tag)
        if failure is None:
            raise errors.ManifestUnknown(
                f"{reference} has not been built yet: pull it, or build it with `nixery build {reference}`",
                detail={"name": image.display_name, "tag": tag},
            )
        # A pull would get this failure at once, not a build: say so here too.
        raise errors.ManifestUnknown(
            f"{reference} is not built: its last build failed at {utc_time(failure.failed_at)}, and until "
            f"{utc_time(failure.until)} pulls get that error instead of a build (NIXERY_FAILED_BUILD_TTL); "
            f"`nixery build {reference}` builds it now. The error: {failure.message}",
            detail={"name": image.display_name, "tag": tag, "failed_at": failure.failed_at,
                    "until": failure.until, "error": failure.message, "log_tail": failure.log_tail},
        )
    doc = image_json(record, tag)
    if as_json or wants_json(request):  # `.json`, or a client that asks for JSON (as its 404 is)
        return web.json_response(doc)
    ref = guidance.pull_reference(registry_host(request), record.name, tag)
    query = "" if tag == "latest" else "?" + h(urlencode({"tag": tag}))
    platform_note = f" <small class='muted'>linux/{h(record.architecture)}</small>" if "platforms" in doc else ""
    body = f"""<section class="card">
<h1><code>{h(record.name)}</code></h1>
{guidance.same_image_note(image.display_name, record.name)}
<pre class="command" data-copy><code>docker pull {h(ref)}</code></pre>
<dl class="facts">
<dt>Digest</dt><dd><code class="digest">{h(doc["digest"])}</code></dd>
<dt>Size</dt><dd>{h(size_text(doc["size"]))} compressed, {len(record.layers)} layers</dd>
<dt>Packages</dt><dd>{h(", ".join(record.packages))}</dd>
<dt>Source</dt><dd>{h(record.source)} <code title="{h(record.revision)}">{h(short(record.revision))}</code></dd>
<dt>Built</dt><dd>{h(ago(record.built_at))}</dd>
{_attached_facts(record.name, doc)}
</dl></section>
{_platforms(doc)}
<section class="card"><h2>Layers{platform_note}</h2>{_layer_table(doc["layers"])}
{"".join(_other_platform_layers(doc))}
<p class="hint">Also as <a href="/images/{h(record.name)}.json{query}">JSON</a>.</p>
</section>"""
    return page(request, record.name, body)


def _layer_table(layers: list[dict[str, Any]]) -> str:
    rows = []
    for number, layer in enumerate(layers, 1):
        paths = layer["paths"]
        listing = "".join(f"<li><code>{h(p)}</code></li>" for p in paths)
        count = f"{len(paths)} store path" + ("" if len(paths) == 1 else "s")
        held = f"<details><summary>{count}</summary><ul class='paths'>{listing}</ul></details>"
        rows.append(
            f"<tr><td class='num'>{number}</td>"
            f"<td><code class='nowrap' title='{h(layer['digest'])}'>{h(layer['digest'][7:19])}</code></td>"
            f"<td class='num'>{h(size_text(layer['size']))}</td>"
            f"<td class='holds'>{h(layer['description'])}{held if paths else ''}</td></tr>"
        )
    return f"""<div class="table-wrap"><table class="layers">
<thead><tr><th class="num">#</th><th>Digest</th><th class="num">Size</th><th>Holds</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table></div>"""


def _platforms(doc: dict[str, Any]) -> str:
    """An image of several platforms: each platform's manifest, as the index lists them."""
    if "platforms" not in doc:
        return ""
    rows = "".join(
        f"<tr data-platform='{h(one['platform'])}'><td><code>{h(one['platform'])}</code></td>"
        f"<td><code class='digest'>{h(one['oci_digest'])}</code></td>"
        f"<td class='num'>{h(size_text(one['size']))}</td><td class='num'>{len(one['layers'])}</td></tr>"
        for one in doc["platforms"]
    )
    return f"""<section class="card" id="platforms"><h2>Platforms</h2>
<p class="hint">The digest above is the image index's: each client picks its platform's manifest from it.</p>
<div class="table-wrap"><table>
<thead><tr><th>Platform</th><th>Manifest</th><th class="num">Size</th><th class="num">Layers</th></tr></thead>
<tbody>{rows}</tbody></table></div></section>"""


def _other_platform_layers(doc: dict[str, Any]) -> list[str]:
    """The layers of the platforms other than the default one (whose layers the table above lists)."""
    return [
        f"<details class='platform-layers' data-platform='{h(one['platform'])}'>"
        f"<summary>Layers of {h(one['platform'])}</summary>{_layer_table(one['layers'])}</details>"
        for one in doc.get("platforms", ())
        if one["platform"] != f"linux/{doc['architecture']}"
    ]
