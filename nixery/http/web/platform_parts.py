"""The progress page of one platform's build of an image of several platforms (NIXERY_PLATFORMS).

Its image is pulled, and shown, as part of the image of several platforms, whose build has the
pull command and the link to the image once it is done: the name alone names that image, which
may have failed (on another platform) or not be done yet. The page names that image and links
to its build; a pull command and a link of the name led to an error or a 404.
"""

from __future__ import annotations

from typing import Any

from nixery.amounts import size_text
from nixery.http import guidance
from nixery.http.markup import h
from nixery.progress import Build, BuildLog


def part_of(builds: BuildLog, build: Build) -> tuple[Build, str] | None:
    """The build of the image of several platforms that `build` is one platform's build of,
    and that platform, while `builds` (the registry's) keeps that build."""
    if build.part_of is None:
        return None
    image = builds.get(build.part_of.build_id)
    return None if image is None else (image, build.part_of.platform)


def note(part: tuple[Build, str] | None, tag: str) -> str:
    if part is None:
        return ""
    image, platform = part
    path = guidance.progress_path(image.id, image.image, tag)
    return f"""<p class="hint" id="part-of">The <code>{h(platform)}</code> image of
<code>{h(image.image)}</code>, an image of several platforms: pull it and see its layers from
<a href="{h(path)}">that image's build</a>
(<span class="badge stage-{h(image.stage.value)}">{h(image.stage.value)}</span>).</p>"""


def outcome(build: Build, data: dict[str, Any]) -> str:
    """The platform's image, done: its size and digest, without a pull command or link of its own."""
    return f"""<div class="outcome done" id="outcome" data-image="{h(data.get("image", build.image))}">
<p><strong>Image ready.</strong> {h(size_text(data.get("size")))} in {h(data.get("layers"))} layers.</p>
<p class="digest">Digest <code id="digest">{h(data["digest"])}</code></p>
</div>"""
