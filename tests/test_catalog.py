"""The package catalogue of a large package set, read from Nix and from storage."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from nixery.http.errors import error_middleware
from nixery.http.routes import BUILDER
from nixery.http.web.packages import packages
from nixery.nix.catalog import Catalog, CatalogEntry, PackageCatalog
from nixery.nix.packages import host_system
from nixery.package_names import PackageNames
from nixery.resolver import Revision
from nixery.storage.filesystem import FilesystemStorage

T = TypeVar("T")

#: As many top-level names as the catalogue reads (its default limit), each with a
#: version and a description, as nixpkgs has: ~13 MB of JSON.
LARGE_SET = """{ ... }: builtins.listToAttrs (builtins.genList (i: {
  name = "package-name-${toString i}";
  value = { type = "derivation"; name = "p-1.${toString i}"; version = "1.${toString i}.0";
            meta.description = "A fairly typical one-line description of what this package does"; };
}) 100000)
"""


async def longest_pause(work: Awaitable[T], *, tick: float = 0.005) -> tuple[T, float, float]:
    """`work`'s result, the longest time the event loop went without running anything else
    meanwhile (measured by a task that sleeps `tick` seconds at a time), and how long `work` took."""
    pauses: list[float] = []
    done = False

    async def ticks() -> None:
        last = time.monotonic()
        while not done:
            await asyncio.sleep(tick)
            now = time.monotonic()
            pauses.append(now - last)
            last = now

    ticking = asyncio.ensure_future(ticks())
    await asyncio.sleep(0.02)
    started = time.monotonic()
    try:
        result = await work
    finally:
        took = time.monotonic() - started
        done = True
        await ticking
    return result, max(pauses), took


async def test_a_large_catalogue_is_read_and_stored_while_the_event_loop_answers(tmp_path: Path) -> None:
    """The JSON of 100,000 names is parsed and written off the event loop, from Nix's output and
    from storage: the loop is never held for half the time that reading it back from storage
    takes. (It was held all that time and more: 0.4-0.6 s here, every request waiting; what
    remains are the interpreter's garbage collections.)"""
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "default.nix").write_text(LARGE_SET)
    storage = FilesystemStorage(tmp_path / "storage")
    revision = Revision("a large set", "large-1", tmp_path / "set")

    pauses, took = {}, 0.0
    # The interpreter's collections pause every thread for as long as they take to walk the
    # live objects: late in a test run, pytest's. Frozen, those are left out of the walk, so
    # the pauses measured are the catalogue's own (a registry's heap is far smaller).
    gc.collect()
    gc.freeze()
    try:
        for source in ("Nix", "storage"):  # the first reading stores the catalogue, the second reads it back
            catalog, pauses[source], took = await longest_pause(
                PackageCatalog(system=host_system(), storage=storage).get(revision)
            )
            assert catalog is not None and catalog.complete and catalog.total == len(catalog.entries) == 100_000
            assert {entry.name: entry.version for entry in catalog.entries}["package-name-7"] == "1.7.0"
            assert catalog.search("name-99999")[0].name == "package-name-99999"
    finally:
        gc.unfreeze()
    assert max(pauses.values()) < took / 2, f"the loop was held {pauses} s; reading from storage took {took:.3f} s"


class _LargeCatalogBuilder:
    """What GET /packages asks of the builder: the revision of a tag, and its catalogue."""

    def __init__(self, catalog: Catalog):
        self.source = self
        self.names = PackageNames(None)  # its search, over this catalogue
        self.names.catalog = self  # type: ignore[assignment]
        self._catalog = catalog

    async def resolve(self, tag: str) -> Revision:
        return Revision("a large set", "large-1", Path("/nonexistent"))

    async def get(self, revision: Revision, wait: float) -> Catalog:
        return self._catalog

    def error(self, revision: Revision) -> str | None:
        return None


async def test_searching_a_large_catalogue_does_not_hold_the_event_loop(aiohttp_client) -> None:
    """A search of 100,000 names ran on the event loop, building and sorting a ranking of every
    match: a query most names match (`package`, or one letter, as the search box sends while
    one types) held every other request ~130 ms here, per search. Now the best matches are
    picked without sorting them all, in a worker thread."""
    entries = tuple(
        CatalogEntry(f"package-name-{i}", "package", f"1.{i}.0", "A fairly typical one-line description")
        for i in range(100_000)
    )
    app = web.Application(middlewares=[error_middleware])
    app[BUILDER] = _LargeCatalogBuilder(Catalog("large-1", "a large set", entries, 100_000, True, 0.0))
    app.router.add_get("/packages", packages)
    client = await aiohttp_client(app)

    async def search(query: str) -> list[str]:
        response = await client.get("/packages", params={"q": query, "format": "json"})
        assert response.status == 200
        return [result["name"] for result in (await response.json())["results"]]

    await search("warm-up")  # the first request's one-time set-up is not the search's
    gc.collect()
    gc.freeze()  # pytest's heap left out of the interpreter's collections, as above
    found, pauses = [], []
    try:
        for query in ("package", "e", "name-9"):  # as the search box sends them while one types
            results, pause, _ = await longest_pause(search(query))
            found.append(results)
            pauses.append(pause)
    finally:
        gc.unfreeze()
    assert found[0][:3] == ["package-name-0", "package-name-1", "package-name-2"]  # shortest, then by name
    assert len(found[1]) == 50 and found[2][:2] == ["package-name-9", "package-name-90"]
    assert max(pauses) < 0.06, f"the event loop was held {max(pauses):.3f} s"
