"""README.md and docs/**/*.md as pages: /docs (docs/README.md and a table of contents),
/docs/{page} and /docs/{directory}/{page} (a directory's README.md: /docs/{directory}).

Markdown is rendered with markdown-it (CommonMark and tables); raw HTML in a file is
not passed through. Headings get GitHub-style anchors, and links between the
Markdown files point at their rendered pages; a link to another file of the
repository (a config example) is shown as its text, since the registry does not
serve it. A file is rendered again only when it changes (its modification time
keys the cache).

Rendering and listing read files and parse Markdown: they run in a worker thread,
never on the event loop. The whole documentation took 0.2-0.4 s to render, on the
loop, for the first start page of each process; and once there were more pages
than the cache held (32), for every start page, /docs and page, every other client
waiting meanwhile. Each link was looked up by listing the documentation again.
"""

from __future__ import annotations

import asyncio
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nixery import errors
from nixery.config import REPOSITORY
from nixery.http.markup import h
from nixery.http.web.layout import page

if TYPE_CHECKING:
    from markdown_it.token import Token

DOCS_DIR = REPOSITORY / "docs"
README = REPOSITORY / "README.md"

_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*(/[a-z0-9][a-z0-9_-]*)?")
PAGE = r"[A-Za-z0-9][A-Za-z0-9_./-]*"  # the route's pattern of {page}; only slugs of _doc_files are served


def _doc_files() -> dict[str, Path]:
    """Pages by slug: `readme`, `usage` (docs/usage.md), `benchmarks` (docs/benchmarks/README.md),
    `benchmarks/serving`; docs/README.md is the index, /docs."""
    files: dict[str, Path] = {}
    if README.is_file():
        files["readme"] = README
    if DOCS_DIR.is_dir():
        for path in sorted([*DOCS_DIR.glob("*.md"), *DOCS_DIR.glob("*/*.md")]):
            slug = _slug(path)
            if slug is not None and _SLUG.fullmatch(slug):
                files[slug] = path
    return files


def _slug(path: Path) -> str | None:
    """The page of a Markdown file under docs/ (None for docs/README.md, the index)."""
    parts = [part.lower() for part in path.relative_to(DOCS_DIR).with_suffix("").parts]
    if parts[-1] == "readme":
        parts.pop()
    return "/".join(parts) or None


def heading_anchor(text: str) -> str:
    """GitHub-style anchors: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


#: Rendered pages kept: every page several times over (an edited page is a new entry).
_RENDERED = 1024


@lru_cache(maxsize=_RENDERED)
def _render(path: Path, mtime_ns: int) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(title, HTML, level-2 sections as (anchor, inline HTML)) of a Markdown file; raw HTML in it
    is not passed through (escaped, as in the sections' HTML)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    tokens = md.parse(path.read_text(errors="replace"))
    pages = _pages_by_file()
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
            elif token.tag == "h2":  # as inline HTML: its `code` showed as backticks in the lists of sections
                sections.append((anchor, _heading_html(md, tokens[i + 1].children or [])))
        if token.type == "inline" and token.children:
            _point_links(token.children, path, pages)
    return title, md.renderer.render(tokens, md.options, {}), tuple(sections)


def _heading_html(md: Any, children: list[Token]) -> str:
    """A heading's inline HTML for a link to it: without its own links and images (a link in a
    link, or an image fetched from elsewhere)."""
    kept = [t for t in children if t.type not in ("link_open", "link_close", "image")]
    return str(md.renderer.renderInline(kept, md.options, {})).strip()


def _pages_by_file() -> dict[Path, str]:
    """The path of each page (/docs, /docs/{slug}) by its file, resolved."""
    pages = {file.resolve(): f"/docs/{slug}" for slug, file in _doc_files().items()}
    pages[(DOCS_DIR / "README.md").resolve()] = "/docs"
    return pages


def _point_links(children: list[Token], source: Path, pages: dict[Path, str]) -> None:
    """Links to other Markdown files point at their pages; a link to a file of the repository
    that is not a page becomes its text (the registry has nothing to link to)."""
    unserved: list[bool] = []  # for each open link: is it shown as text?
    for child in children:
        if child.type == "link_open":
            href = _doc_link(str(child.attrGet("href") or ""), source, pages)
            unserved.append(href is None)
            if href is None:
                child.tag, child.attrs = "span", {"title": "a file of nixery's repository"}
            else:
                child.attrSet("href", href)
        elif child.type == "link_close" and unserved.pop():
            child.tag = "span"


def _doc_link(href: str, source: Path, pages: dict[Path, str]) -> str | None:
    """Where a link of the Markdown file `source` points on the registry (`pages`: each page's
    path by its file); None for a file of the repository that the registry does not serve."""
    if "://" in href or href.startswith(("#", "/", "mailto:")) or not href:
        return href
    target, _, anchor = href.partition("#")
    fragment = f"#{anchor}" if anchor else ""
    page_path = pages.get((source.parent / target).resolve())
    return None if page_path is None else page_path + fragment


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
    return page(request, "Documentation", await asyncio.to_thread(_index_body))


def _index_body() -> str:
    index = DOCS_DIR / "README.md"
    body = ""
    if index.is_file():
        _, rendered, _ = _render(index, index.stat().st_mtime_ns)
        body = f'<article class="card doc">{rendered}</article>'
    return body + (
        _docs_block() or '<section class="card"><p>No documentation is installed with this registry.</p></section>'
    )


async def docs_page(request: web.Request) -> web.Response:
    slug = request.match_info["page"].lower().removesuffix(".md")
    found = await asyncio.to_thread(_rendered_page, slug)
    if found is None:
        raise errors.NameUnknown(f"no documentation page {slug!r}")
    title, rendered = found
    return page(request, title, f'<article class="card doc">{rendered}</article>')


def _rendered_page(slug: str) -> tuple[str, str] | None:
    path = _doc_files().get(slug)
    if path is None:
        return None
    title, rendered, _ = _render(path, path.stat().st_mtime_ns)
    return title, rendered


async def docs_block() -> str:
    """The documentation's table of contents (for the start page)."""
    return await asyncio.to_thread(_docs_block)


def _docs_block() -> str:
    pages = docs_pages()
    if not pages:
        return ""
    items = []
    for slug, title, sections in pages:
        items.append(f'<li><a href="/docs/{h(slug)}">{h(title)}</a>')
        if sections:
            links = " · ".join(f'<a href="/docs/{h(slug)}#{h(anchor)}">{html}</a>' for anchor, html in sections[:8])
            items.append(f'<div class="sections">{links}</div>')
        items.append("</li>")
    return f'<section class="card"><h2>Documentation</h2><ul class="plain docs">{"".join(items)}</ul></section>'
