"""What the pages say when what a person asked for is not there, and what to do next.

* A build id the registry does not know (builds live in memory: a bookmarked
  progress page after a restart): the page says so, and, when its address
  names the image (`/builds/ID?image=NAME`, as the registry's own links do),
  links to the image if it is built, or offers to build it.
* An image not built yet: a Build button; after a build that failed, what pulls are
  answered with meanwhile (`nixery.failures`), and that the button builds it now.
* A name the package set lacks: a Build button for the name with the nearest
  names put in (`shell/curll` → `shell/curl`).
* Another spelling or order of an image's names: a note that it is the same image.

Fragments of HTML only, for `nixery.http.web` to put into its pages; every
value taken from a request is escaped here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from urllib.parse import quote, urlencode

from nixery.failures import RememberedFailure, utc_time
from nixery.http.markup import h
from nixery.images import ImageRecord
from nixery.views import image_reference, other_order


def progress_path(build_id: str, image: str, tag: str) -> str:
    """A build's progress page, its address naming the image, so that it still helps once
    the build is forgotten."""
    query = {"image": image} | ({} if tag == "latest" else {"tag": tag})
    return f"/builds/{build_id}?{urlencode(query, safe='/')}"


def image_path(name: str, tag: str) -> str:
    return f"/images/{quote(name, safe='/')}" + ("" if tag == "latest" else "?" + urlencode({"tag": tag}))


def pull_reference(host: str, name: str, tag: str) -> str:
    return f"{host}/{image_reference(name, tag)}"


def build_button(image: str, tag: str = "latest", label: str = "Build") -> str:
    """A form that starts building `image` (POST /builds, as the build form does)."""
    tag_field = "" if tag == "latest" else f'<input type="hidden" name="tag" value="{h(tag)}">'
    named = "" if image in label else f' aria-label="{h(label)} {h(image)}"'  # a list's "Build" says which
    return f"""<form method="post" action="/builds" class="inline">
<input type="hidden" name="image" value="{h(image)}">{tag_field}
<button type="submit" class="small"{named}>{h(label)}</button></form>"""


def unknown_build(build_id: str, image: str | None, tag: str, record: ImageRecord | None, host: str) -> str:
    """The page body for a build id this registry process does not know."""
    intro = f"""<h1>Build <code>{h(build_id)}</code> is not known here</h1>
<p>Builds are kept in memory only, the last 200 of each registry process: it has restarted
since this build, or many builds came after it.</p>"""
    if image is None:
        after = """<p>Start the build again from the <a href="/">start page</a>: an image that was built
is found at once.</p>"""
    elif record is not None:
        link = f'<a href="{h(image_path(record.name, tag))}"><code>{h(record.name)}</code></a>'
        after = f"""<p>Its image is built: {link}, {len(record.layers)} layers.</p>
<pre class="command" data-copy><code>docker pull {h(pull_reference(host, record.name, tag))}</code></pre>"""
    else:
        after = f"""<p>Its image <code>{h(image)}</code> is not built (the build did not finish, or it failed).</p>
{build_button(image, tag, f"Build {image}")}"""
    return f'<section class="card" id="unknown-build">{intro}{after}</section>'


def not_built(name: str, tag: str, host: str, failure: RememberedFailure | None = None) -> str:
    """The page body for an image that is not built yet; after a build that failed (`failure`),
    what pulls get meanwhile instead of a build, and that the Build button runs it now."""
    if failure is not None:
        tail = (f"<details><summary>Nix's last lines</summary><pre>{h(failure.log_tail)}</pre></details>"
                if failure.log_tail else "")
        return f"""<section class="card" id="not-built">
<h1><code>{h(name)}</code> is not built yet</h1>
<div class="outcome failed" id="failed-lately">
<p><strong>Its last build failed</strong> at {_time(failure.failed_at)}. Until {_time(failure.until)},
pulls get this error at once instead of building it again (<code>NIXERY_FAILED_BUILD_TTL</code>):</p>
<p class="message">{h(failure.message)}</p>{tail}
</div>
<p>The Build button runs the build now, and shows its progress.</p>
{build_button(name, tag, f"Build {name}")}
</section>"""
    return f"""<section class="card" id="not-built">
<h1><code>{h(name)}</code> is not built yet</h1>
<p>Build it now and watch its progress, or pull it: the first pull builds it.</p>
{build_button(name, tag, f"Build {name}")}
<pre class="command" data-copy><code>docker pull {h(pull_reference(host, name, tag))}</code></pre>
</section>"""


def _time(seconds: int) -> str:
    """A time as a remembered failure's answer to pulls says it, for a reader to match."""
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    return f'<time datetime="{iso}">{h(utc_time(seconds))}</time>'


def corrected(image: str, suggestions: Mapping[str, Sequence[str]], missing: Sequence[str] = ()) -> str | None:
    """`image` with each missing name replaced by its nearest suggestion; None without any, or when
    a `missing` name has none (`shell/curll/cowsay` was offered `shell/curl/cowsay`, which fails too)."""
    if any(not suggestions.get(name) for name in missing):
        return None
    components = image.split("/")
    fixed = [suggestions[c][0] if suggestions.get(c) else c for c in components]
    return "/".join(fixed) if fixed != components else None


def suggestion_button(
    image: str, tag: str, suggestions: Mapping[str, Sequence[str]] | None, missing: Sequence[str] | None = None
) -> str:
    """A Build button for the image with the nearest names, or nothing."""
    fixed = corrected(image, suggestions or {}, missing or ())
    if fixed is None:
        return ""
    return f'<div class="suggestion">{build_button(fixed, tag, f"Build {fixed} instead")}</div>'


def same_image_note(asked: str, name: str) -> str:
    """Says that other spellings and orders of the names are the same image."""
    if asked != name:
        return (f'<p class="hint" id="same-image"><code>{h(asked)}</code> is this image: the order and the '
                "case of the names do not change it.</p>")
    other = other_order(name)
    if other is None:
        return ""
    return (f'<p class="hint" id="same-image">Other orders of the names (<code>{h(other)}</code>) '
            "are the same image.</p>")
