"""The start page: how to pull, the package source and its revision, a build form,
search, the recent builds and images, and the documentation's table of contents."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from aiohttp import web

from nixery import errors
from nixery.amounts import size_text
from nixery.builder import ImageBuilder
from nixery.http import auth as http_auth
from nixery.http import guidance
from nixery.http.markup import h
from nixery.http.routes import BUILDER, RESOLVER, requested_image
from nixery.http.signatures import PUBLIC_KEY_PATH, SIGNATURES
from nixery.http.web.docs import docs_block
from nixery.http.web.layout import (
    PackageList,
    Revision,
    ago,
    build_form,
    page,
    registry_host,
    search_form,
    short,
)
from nixery.images import ImageRecord
from nixery.lru import LRU
from nixery.progress import Build, Stage
from nixery.views import image_reference

log = structlog.get_logger(__name__)

_T = TypeVar("_T")


async def _within(step: Awaitable[_T], seconds: float) -> _T | None:
    """What `step` gives within `seconds`, or None: the page still renders, and says the source failed."""
    try:
        return await asyncio.wait_for(step, seconds)
    except Exception as exc:
        log.info("web.source_unavailable", error=str(exc)[:300])
        return None


async def landing(request: web.Request) -> web.Response:
    builder = request.app[BUILDER]
    host = registry_host(request)
    may_see = await http_auth.pull_filter(request)  # with access control on, only images the asker may pull
    revision = await _within(builder.source.resolve("latest"), 5.0)
    catalog = await builder.names.catalog.get(revision, wait=0.5) if revision else None
    example = _example_package(catalog)
    documentation = await docs_block()
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
  (<code>--tls-verify=false</code> for podman). Prefix <code>arm64/</code> for an aarch64 image:
  <code>podman run --arch arm64 {h(host)}/arm64/shell/{h(example)}</code> (on x86_64, it runs under emulation).
  The first pull may take a while: start it below to watch its progress.</p>
</section>

{_signing_block(request, host, example)}
<section class="card">
  {build_form(example=f"shell/{example}")}
</section>

<section class="card">
  <h2>Package source</h2>
  {_source_block(builder, revision, catalog)}
  {search_form()}
  <div id="live-results" aria-live="polite"></div>
</section>

{_recent_builds(builder, may_see)}
{await _recent_images(request, builder, may_see)}
{documentation}
"""
    return page(request, "A container registry that builds images with Nix", body)


async def _name_of(request: web.Request, record: ImageRecord) -> tuple[ImageRecord, str, str] | None:
    """(record, name, tag) that pull `record` on a registry of several platforms: its own name,
    or a declared image's (a declared image of one platform is no image of its packages' name,
    which names an image of each platform); None for the default platform's part of an index."""
    if await _named_by_its_name(request, record):
        return record, record.name, "latest"
    resolver = request.app.get(RESOLVER)
    declared = resolver.declared_as(record.name, record.architecture) if resolver is not None else None
    return None if declared is None else (record, *declared)


async def _named_by_its_name(request: web.Request, record: ImageRecord) -> bool:
    """Whether `record`'s name, as its link to /images/NAME reads it, names this image. With
    several NIXERY_PLATFORMS, a name without a platform names an image of each: the default
    platform's own image, stored as the index's part, is no image of that name. When the
    index failed (a package Nix cannot build for arm64), it was listed, linked to a 404."""
    if record.indexes:
        return True
    try:
        image = await requested_image(request, "latest", record.name)
    except errors.RegistryError:
        return False
    return not image.platforms


def _signing_block(request: web.Request, host: str, example: str) -> str:
    """With NIXERY_SIGNING_KEY: the public key that verifies the images' signatures (docs/signing.md)."""
    signatures = request.app.get(SIGNATURES)
    if signatures is None:
        return ""
    # cosign refuses plain HTTP without the flag, and with cosign 2 asks Rekor, where nothing is logged.
    plain_http = " --allow-insecure-registry --insecure-ignore-tlog" if request.scheme == "http" else ""
    verify = f"cosign verify{plain_http} --key nixery-signing.pub {host}/shell/{example}"
    return f"""<section class="card" id="signing">
  <h2>Signed images</h2>
  <p>The images this registry serves are signed in the sigstore (cosign) format by this key, each
  for the repository it is pulled through, as it is first pulled by tag there. Give verifiers
  a copy of the key from whoever runs the registry, not this page or
  <a href="{PUBLIC_KEY_PATH}"><code>{PUBLIC_KEY_PATH}</code></a>: a key fetched from the registry it
  vouches for proves nothing. Require it with a <code>policy.json</code>
  (podman, skopeo, CRI-O), sigstore policy-controller or Kyverno: <a href="/docs/signing">how</a>.</p>
  <pre class="command">{h(signatures.key.public_pem.decode())}</pre>
  <pre class="command" data-copy><code>{h(verify)}</code></pre>
</section>
"""


#: The example package of each catalogue (by revision and when it was read): choosing it walks the
#: whole list, 15 ms for nixpkgs' 100,000 names, which every landing page spent on the event loop.
_EXAMPLES: LRU[tuple[str, float], str] = LRU(8)


def _example_package(catalog: PackageList | None) -> str:
    if catalog is None:
        return "curl"
    key = (catalog.revision, catalog.read_at)
    example = _EXAMPLES.get(key)
    if example is None:
        example = _choose_example(catalog)
        _EXAMPLES.put(key, example)
    return example


def _choose_example(catalog: PackageList) -> str:
    names = catalog.names()
    for candidate in ("curl", "hello", "git"):
        if candidate in names:
            return candidate
    packages = [e.name for e in catalog.entries if e.kind in ("package", None) and e.name != "shell"]
    return packages[0] if packages else "curl"


def _source_block(builder: ImageBuilder, revision: Revision | None, catalog: PackageList | None) -> str:
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
    fetched = ""
    if revision.fetched is not None:  # a fetched source (a channel): when this revision was downloaded
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(revision.fetched))
        fetched = f' <span class="muted" title="{h(when)}">fetched {h(ago(revision.fetched))}</span>'
    return f"""
<dl class="facts">
  <dt>Source</dt><dd>{h(source)}</dd>
  <dt>Revision</dt><dd><code title="{h(revision.id)}">{h(short(revision.id))}</code>{fetched}</dd>
  <dt>Packages</dt><dd>{count}</dd>
  <dt>Builds for</dt><dd><code>{h(builder.names.catalog.system)}</code></dd>
</dl>"""


def _recent_builds(builder: ImageBuilder, may_see: Callable[[str], bool], limit: int = 8) -> str:
    builds = builder.builds.recent(limit, may_see)  # with several workers, theirs too
    if not builds:
        return ""
    rows = "".join(map(_build_row, builds))
    return f'<section class="card"><h2>Recent builds</h2><ul class="plain">{rows}</ul></section>'


def _build_row(build: Build) -> str:
    """A recent build: its image and tag, linked to its progress page, whose address names them
    (once the build is forgotten, the page still leads to that tag's image), and once built, to
    the image's page for that tag."""
    reference = image_reference(build.image, build.tag)
    link = f'<a href="{h(guidance.progress_path(build.id, build.image, build.tag))}"><code>{h(reference)}</code></a>'
    # A platform's build of an image of several platforms; the default one has the image's name.
    if build.part_of is not None:
        platform = build.part_of.platform
        link += (f' <span class="badge platform" title="the {h(platform)} image of an image of several platforms">'
                 f"{h(platform)}</span>")
    image = ""
    if build.stage is Stage.DONE and build.part_of is None:  # a platform's own image is pulled as the index's part
        name = build.events[-1].data.get("image", build.image)  # as first asked for, resolved
        image = (f' · <a href="{h(guidance.image_path(name, build.tag))}" '
                 f'aria-label="the image {h(image_reference(name, build.tag))}">image</a>')
    return (f'<li>{link} <span class="badge stage-{h(build.stage.value)}">{h(build.stage.value)}</span> '
            f'<span class="muted">{h(ago(build.started))}</span>{image}</li>')


async def _recent_images(request: web.Request, builder: ImageBuilder, may_see: Callable[[str], bool]) -> str:
    shown = [(record, record.name, "latest") for record in builder.recent_images()]
    if len(builder.platforms) > 1:
        shown = [named for record, _, _ in shown if (named := await _name_of(request, record)) is not None]
    shown = [(record, name, tag) for record, name, tag in shown if may_see(name)]
    if not shown:
        return """<section class="card"><h2>Recently built images</h2>
<p class="muted">None yet: the first pull or build of an image will show up here.</p></section>"""
    rows = "".join(
        f"""<tr><td><a href="{h(guidance.image_path(name, tag))}"><code>{h(image_reference(name, tag))}</code></a></td>
<td class="num">{h(size_text(r.compressed_size))}</td><td class="num">{len(r.layers)}</td>
<td class="muted">{h(ago(r.built_at))}</td></tr>"""
        for r, name, tag in shown
    )
    return f"""<section class="card"><h2>Recently built images</h2>
<div class="table-wrap"><table>
<thead><tr><th>Image</th><th class="num">Size</th><th class="num">Layers</th><th>Built</th></tr></thead>
<tbody>{rows}</tbody></table></div></section>"""
