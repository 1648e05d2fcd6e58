"""README.md and docs/*.md as pages: /docs (docs/README.md and a table of contents)
and /docs/{page}.

Markdown is rendered with markdown-it (CommonMark and tables); raw HTML in a file is
not passed through. Headings get GitHub-style anchors, and links between the
Markdown files point at their rendered pages. A file is rendered again only when
it changes (its modification time keys the cache).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from aiohttp import web

from nixery import errors
from nixery.config import REPOSITORY
from nixery.http.markup import h
from nixery.http.web.layout import page

DOCS_DIR = REPOSITORY / "docs"
README = REPOSITORY / "README.md"

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
    body += docs_block() or '<section class="card"><p>No documentation is installed with this registry.</p></section>'
    return page(request, "Documentation", body)


async def docs_page(request: web.Request) -> web.Response:
    slug = request.match_info["page"].lower().removesuffix(".md")
    path = _doc_files().get(slug)
    if path is None:
        raise errors.NameUnknown(f"no documentation page {slug!r}")
    title, rendered, _ = _render(path, path.stat().st_mtime_ns)
    return page(request, title, f'<article class="card doc">{rendered}</article>')


def docs_block() -> str:
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
