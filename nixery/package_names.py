"""What the registry can say about package names without running Nix for them.

The package catalogue (`nixery.nix.catalog`: the package set's top-level
names, read once per revision and kept in storage) answers the web pages'
search, tells which names of an image the set surely lacks, and gives the
nearest names it has for each one that is missing (`nixery.suggestions`), so
that `shell/curll` is answered with "did you mean curl?".

Guarantees: nothing here runs Nix per name or blocks the event loop (the
comparisons and the web pages' searches run in a worker thread, one query at a
time: a search of a catalogue of 100,000 names took a few hundred milliseconds,
which every other client waited for when it ran on the loop; `CatalogSearch`
makes it milliseconds); a catalogue not
read yet is waited for at most SUGGESTION_WAIT seconds and keeps loading
afterwards, so an error is never held up long for the sake of a suggestion.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from nixery.nix.catalog import Catalog, CatalogEntry, CatalogSearch, PackageCatalog
from nixery.nix.errors import PackagesNotFound
from nixery.nix.packages import host_system
from nixery.nix.sources import Revision
from nixery.platforms import platform_name
from nixery.registry.names import Arch
from nixery.storage.base import Storage
from nixery.suggestions import Suggestions

log = structlog.get_logger(__name__)

#: Seconds a missing name's answer waits for a catalogue that is still being read.
SUGGESTION_WAIT = 5.0


class PackageNames:
    def __init__(self, storage: Storage | None):
        #: The package lists by revision, read on first use (a page, a search, a missing name).
        self.catalog = PackageCatalog(system=host_system(), storage=storage)
        self._storage = storage
        #: Other platforms' lists (`arm64/NAME`), read only when asked about a name of theirs.
        self._other_catalogs: dict[str, PackageCatalog] = {}
        self._suggestions = Suggestions()
        self._search_lock = asyncio.Lock()  # a burst of searches queues instead of taking every thread
        self._prepared: tuple[tuple[str, float], CatalogSearch] | None = None  # for the last catalogue searched

    async def close(self) -> None:
        for catalog in (self.catalog, *self._other_catalogs.values()):
            await catalog.close()

    def catalog_of(self, system: str) -> PackageCatalog:
        """The package lists of one Nix system (the host's: `catalog`)."""
        if system == self.catalog.system:
            return self.catalog
        if system not in self._other_catalogs:
            self._other_catalogs[system] = PackageCatalog(system=system, storage=self._storage)
        return self._other_catalogs[system]

    async def search(self, catalog: Catalog, query: str) -> list[CatalogEntry]:
        """The catalogue's entries that match `query` (`Catalog.search`), off the event loop."""
        key = (catalog.revision, catalog.read_at)
        async with self._search_lock:
            if self._prepared is None or self._prepared[0] != key:
                self._prepared = key, await asyncio.to_thread(CatalogSearch, catalog)
            return await asyncio.to_thread(self._prepared[1].search, query)

    async def with_suggestions(
        self, error: PackagesNotFound, revision: Revision, system: str | None = None, requested: Sequence[str] = ()
    ) -> PackagesNotFound:
        """The error, with the nearest names the package set has (for `system`, else the host) for
        each missing one (if its list is read), but those `requested` already (`shell/hello` on a
        set without hello: not "did you mean shell?"). For another system than the host's, the
        missing names the host's list has are said to be the host platform's only, with no
        nearest names: `arm64/libcpuid16` of the Debian set was asked "did you mean libuuid1?"."""
        elsewhere = await self._only_on_host(error.missing, revision, system) if error.platform else {}
        catalog = await self._catalog(revision, system)
        found: dict[str, list[str]] = {}
        sets: dict[str, str] = {}
        if catalog is not None:
            # `debian` (a set, not a package) and `debian.curll`: said so, not compared with the
            # top-level names (`debian.curll` was asked "did you mean debianutils?").
            sets = await asyncio.to_thread(catalog.sets_holding, error.missing)
            found = await self._suggestions.suggest(
                (catalog.revision, catalog.read_at), catalog.package_names,
                [name for name in error.missing if name not in elsewhere and name not in sets],
            )
            found = {name: kept for name, near in found.items() if (kept := [n for n in near if n not in requested])}
        if not found and not elsewhere and not sets:
            return error
        return PackagesNotFound(error.missing, error.source, found, error.platform, elsewhere, sets)

    async def _only_on_host(self, missing: Sequence[str], revision: Revision, system: str | None) -> dict[str, str]:
        """Of names another system's list lacks, those the host's has, each with the host's platform."""
        if system is None or system == self.catalog.system:
            return {}
        host = await self._catalog(revision)
        if host is None:
            return {}
        lacking = set(await asyncio.to_thread(host.missing, list(missing)))
        platform = next((platform_name(arch) for arch in Arch if arch.nix_system == self.catalog.system),
                        self.catalog.system)
        return {name: platform for name in missing if name not in lacking}

    async def check(
        self, names: Sequence[str], revision: Revision, *, system: str | None = None, platform: str | None = None,
        loaded_only: bool = False,
    ) -> None:
        """Raise PackagesNotFound, with suggestions, for the names the package list surely lacks;
        `system`: another platform's list than the host's (`platform`, e.g. linux/arm64, names it
        in the error), which may lack names the host's has (the Debian set's libcpuid16).
        `loaded_only`: only with a list read already (a build does not wait for one)."""
        if loaded_only:
            catalog = self.catalog_of(system or self.catalog.system).loaded(revision)
        else:
            catalog = await self._catalog(revision, system)
        if catalog is None:
            return
        missing = await asyncio.to_thread(catalog.missing, names)
        if missing:
            error = PackagesNotFound(missing, revision.source, platform=platform if system else None)
            raise await self.with_suggestions(error, revision, system, requested=names)

    async def _catalog(self, revision: Revision, system: str | None = None) -> Catalog | None:
        try:
            return await self.catalog_of(system or self.catalog.system).get(revision, wait=SUGGESTION_WAIT)
        except Exception as exc:  # the list could not be read: the answer goes without suggestions
            log.info("package_names.no_catalog", revision=revision.id, error=str(exc)[:200])
            return None
