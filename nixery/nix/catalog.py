"""The package catalogue: a package set's top-level names, with versions.

Read once per source revision with one `nix-instantiate --eval --json` call.
The package set's path and the limits are passed as string arguments, never
spliced into Nix code. Each attribute is evaluated under `builtins.tryEval`,
so attributes that throw (nixpkgs' removed-package aliases, broken or
unfree packages) are listed without a version instead of failing the listing.

Huge sets are bounded: at most `limit` names (in attribute order), and the
whole evaluation may take `timeout` seconds. When the evaluation with
versions fails or runs out of time, the catalogue falls back to the bare
attribute names (cheap even for nixpkgs), so search still works.

The result is kept in memory per revision id and, when storage is given, in
storage under `catalog/<revision id>-<system>` so that a restart does not
evaluate again. Reading starts on first use (the landing page, a search).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from nixery import json_pieces
from nixery.lru import LRU
from nixery.nix.errors import NixError
from nixery.nix.process import Deadline, run_nix
from nixery.nix.sources import Revision
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)

CATALOG_FORMAT = "2"  # "1" was one JSON object: read again once, as any other format is

# `system` and `limit` arrive as strings (--argstr). `describe` forces what it
# returns inside tryEval, so no error escapes into the JSON output. The output is
# one JSON array, the number of top-level names first, then a row per name
# (`nixery.json_pieces.array_items` reads it a row at a time).
_CATALOG_NIX = r"""
{ pkgsPath, system, limit, withVersions }:
let
  pkgs = import (/. + pkgsPath) { inherit system; };
  max = builtins.fromJSON limit;
  all = builtins.attrNames pkgs;
  names = if builtins.length all > max then builtins.genList (builtins.elemAt all) max else all;
  str = v: if builtins.isString v then v else null;
  describe = name:
    let
      value = pkgs.${name};
      isDrv = builtins.isAttrs value && (value.type or null) == "derivation";
      info =
        if isDrv then {
          kind = "package";
          version = str (value.version or (builtins.parseDrvName (value.name or "")).version);
          description = str (value.meta.description or null);
        }
        else if builtins.isAttrs value then { kind = "set"; version = null; description = null; }
        else { kind = "other"; version = null; description = null; };
      tried = builtins.tryEval (builtins.deepSeq info info);
    in
      if tried.success then [ name tried.value.kind tried.value.version tried.value.description ]
      else [ name "broken" null null ];
in [ (builtins.length all) ]
  ++ (if withVersions == "1" then map describe names else map (n: [ n null null null ]) names)
"""


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    kind: str | None  # package, set, other, broken; None when only names were read
    version: str | None
    description: str | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "version": self.version, "description": self.description}


@dataclass(frozen=True, slots=True)
class Catalog:
    revision: str
    source: str
    entries: tuple[CatalogEntry, ...]
    total: int  # top-level attributes in the set (entries may be fewer: `limit`)
    complete: bool  # versions were read (False: names only, after a failure or timeout)
    read_at: float

    def names(self) -> set[str]:
        return {entry.name for entry in self.entries}

    def package_names(self) -> Iterator[str]:
        """The names an image can be built of (what a misspelt name is compared with)."""
        yield from (entry.name for entry in self.entries if entry.kind in ("package", None))
        if "shell" not in self.names():
            yield "shell"  # nixery's meta-package, for sets without one (resolve.nix)

    def sets_holding(self, names: Iterable[str]) -> dict[str, str]:
        """Of `names`, those that are a set of packages (a top-level name of kind `set`), or a
        dotted name of a member of one (`debian.curl`), each with that set's name as written."""
        sets = {entry.name.lower() for entry in self.entries if entry.kind == "set"}
        found = {}
        for name in names:
            first = name.split(".", 1)[0]
            if first.lower() in sets:
                found[name] = first
        return found

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names the package set surely lacks, as the resolver would find them: in any
        case, a dotted name by its first part (nested sets are not listed). None is sure to be
        missing when the list was cut short (`limit`)."""
        if self.total > len(self.entries):
            return []
        known = {entry.name.lower() for entry in self.entries} | {"shell"}
        return [name for name in names if not (_spellings(name) | _spellings(name.split(".", 1)[0])) & known]

    def search(self, query: str, limit: int = 50) -> list[CatalogEntry]:
        """Entries whose name (or description) contains `query`, best first:
        exact name, then name prefix, then name substring, then description
        (`CatalogSearch`, which keeps what it prepares for the next query)."""
        return CatalogSearch(self).search(query, limit)

    def to_json(self) -> bytes:
        """One JSON array: a header, then a row per entry (written, and read, a row at a time)."""
        header = {
            "format": CATALOG_FORMAT,
            "revision": self.revision,
            "source": self.source,
            "total": self.total,
            "complete": self.complete,
            "read_at": self.read_at,
        }
        rows = ([e.name, e.kind, e.version, e.description] for e in self.entries)
        return json_pieces.dumps([header, *rows]).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Catalog | None:
        """The stored catalogue; None for one of another format. Raises ValueError,
        KeyError or TypeError for a damaged one."""
        if not data.lstrip().startswith(b"["):
            return None
        items = json_pieces.array_items(data.decode())
        header = next(items)
        if header.get("format") != CATALOG_FORMAT:
            return None
        return cls(
            revision=header["revision"],
            source=header["source"],
            entries=tuple(CatalogEntry(*row) for row in items),
            total=int(header["total"]),
            complete=bool(header["complete"]),
            read_at=float(header["read_at"]),
        )


class CatalogSearch:
    """A catalogue prepared for searches: names and descriptions in lower case, entries in the
    order results are given within a rank (packages before other kinds, shorter names first).

    A search walks that order rank by rank and stops at `limit` results: a query matching
    most of nixpkgs (a single letter) costs a few milliseconds rather than sorting every
    match (~300 ms). Preparing costs about as much as one such sort, once per catalogue."""

    def __init__(self, catalog: Catalog):
        def order(entry: CatalogEntry) -> tuple[int, int, str]:
            return (0 if entry.kind in ("package", None) else 1, len(entry.name), entry.name.lower())

        ordered = sorted(catalog.entries, key=order)  # stable: ties keep the catalogue's order
        self._entries = ordered
        self._names = [entry.name.lower() for entry in ordered]
        self._descriptions = [(entry.description or "").lower() for entry in ordered]
        # One string of each, searched in C first: a query found nowhere costs no walk.
        self._all_names = "\n".join(self._names)
        self._all_descriptions = "\n".join(self._descriptions)

    def search(self, query: str, limit: int = 50) -> list[CatalogEntry]:
        query = query.strip().lower()
        if not query or limit <= 0:
            return []
        names, descriptions = self._names, self._descriptions
        in_names, in_descriptions = query in self._all_names, query in self._all_descriptions
        found: list[int] = []
        for matches in (
            (i for i, name in enumerate(names) if name == query) if in_names else (),
            (i for i, name in enumerate(names) if name != query and name.startswith(query)) if in_names else (),
            (i for i, name in enumerate(names) if query in name and not name.startswith(query)) if in_names else (),
            (i for i, name in enumerate(names) if query not in name and query in descriptions[i])
            if in_descriptions else (),
        ):
            found.extend(itertools.islice(matches, limit - len(found)))
            if len(found) >= limit:
                break
        return [self._entries[i] for i in found]


_MAX_DESCRIPTION = 200
RETRY_AFTER = 60.0  # seconds before a failed reading is tried again
_KEY_SAFE = re.compile(r"[^a-z0-9._-]")


def _spellings(name: str) -> set[str]:
    """How the package set may spell a name, in lower case: `7zz` also as `_7zz` (resolve.nix)."""
    name = name.lower()
    return {name, f"_{name}"} if name[:1].isdigit() else {name}


def _entries(rows: Iterable[Any]) -> tuple[CatalogEntry, ...]:
    entries = []
    for row in rows:
        name, kind, version, description = row
        if description and len(description) > _MAX_DESCRIPTION:
            description = description[: _MAX_DESCRIPTION - 1] + "…"
        entries.append(CatalogEntry(str(name), kind, version or None, description or None))
    return tuple(entries)


def _listing(stdout: bytes) -> tuple[int, tuple[CatalogEntry, ...]]:
    items = json_pieces.array_items(stdout.decode())
    return int(next(items)), _entries(items)


def _stored_catalog(data: bytes) -> Catalog | None:
    """The catalogue stored in storage; None when it is of another format or damaged (it is read again)."""
    try:
        return Catalog.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration) as exc:
        log.warning("catalog.stored_unreadable", error=str(exc)[:200], note="reading the package set again")
        return None


class PackageCatalog:
    """Catalogues by revision: read on first use, one evaluation at a time per revision."""

    def __init__(
        self,
        *,
        system: str,
        storage: Storage | None = None,
        limit: int = 100_000,
        timeout: float = 180.0,
        keep: int = 4,
    ):
        self.system = system
        self.storage = storage
        self.limit = limit
        self.timeout = timeout
        self._catalogs: LRU[str, Catalog] = LRU(keep)
        self._loading: dict[str, asyncio.Task[Catalog]] = {}
        self._failed: dict[str, tuple[float, str]] = {}  # revision id -> (when, why) reading it last failed

    async def close(self) -> None:
        """Stop the readings under way."""
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def error(self, revision: Revision) -> str | None:
        """Why reading the revision's catalogue failed, if it did within RETRY_AFTER seconds."""
        failed = self._failed.get(revision.id)
        if failed is not None and time.monotonic() - failed[0] < RETRY_AFTER:
            return failed[1]
        return None

    def cached(self, revision: Revision) -> Catalog | None:
        return self._catalogs.peek(revision.id)

    def load(self, revision: Revision) -> asyncio.Task[Catalog]:
        """The task that reads the revision's catalogue (shared by concurrent callers)."""
        task = self._loading.get(revision.id)
        if task is None:
            task = self._loading[revision.id] = asyncio.ensure_future(self._load(revision))
            task.add_done_callback(functools.partial(self._loaded, revision.id))
        return task

    def loaded(self, revision: Revision) -> Catalog | None:
        """The catalogue if it is read already (none is started)."""
        return self._catalogs.get(revision.id)

    async def get(self, revision: Revision, *, wait: float | None = None) -> Catalog | None:
        """The catalogue; None if it is not read within `wait` seconds (it keeps loading)."""
        catalog = self._catalogs.get(revision.id)  # now the most recently used
        if catalog is not None:
            return catalog
        if self.error(revision) is not None:
            return None
        task = self.load(revision)
        try:
            async with asyncio.timeout(wait):  # not wait_for: see nixery.nix.process.run_nix
                return await asyncio.shield(task)
        except TimeoutError:
            return None

    def _loaded(self, revision_id: str, task: asyncio.Task[Catalog]) -> None:
        self._loading.pop(revision_id, None)
        if task.cancelled():
            return
        if task.exception() is not None:
            self._failed[revision_id] = (time.monotonic(), str(task.exception())[:500])
            log.warning("catalog.failed", revision=revision_id, error=str(task.exception())[:500])
            return
        self._catalogs.put(revision_id, task.result())

    def _storage_key(self, revision: Revision) -> str:
        return "catalog/" + _KEY_SAFE.sub("-", f"{revision.id.lower()}-{self.system}")[:200]

    async def _load(self, revision: Revision) -> Catalog:
        # A catalogue is megabytes of JSON (100,000 names: ~0.4 s to read, ~0.25 s to write):
        # made and read in a thread, so that the event loop answers meanwhile.
        if self.storage is not None:
            data = await self.storage.get_meta(self._storage_key(revision))
            if data is not None:
                stored = await asyncio.to_thread(_stored_catalog, data)
                if stored is not None and stored.revision == revision.id:
                    return stored
        catalog = await self.read(revision)
        if self.storage is not None and catalog.complete:
            await self.storage.put_meta(self._storage_key(revision), await asyncio.to_thread(catalog.to_json))
        return catalog

    async def read(self, revision: Revision) -> Catalog:
        """Evaluate the package set: names with versions, else names only."""
        started = time.monotonic()
        try:
            total, entries = await self._evaluate(revision, with_versions=True, timeout=self.timeout)
            complete = True
        except NixError as exc:
            log.warning("catalog.versions_failed", revision=revision.id, error=exc.message, log=exc.log_tail[-2000:])
            total, entries = await self._evaluate(revision, with_versions=False, timeout=max(30.0, self.timeout / 3))
            complete = False
        catalog = Catalog(
            revision=revision.id,
            source=revision.source,
            entries=entries,
            total=total,
            complete=complete,
            read_at=time.time(),
        )
        log.info(
            "catalog.read",
            revision=revision.id,
            entries=len(catalog.entries),
            total=catalog.total,
            complete=complete,
            seconds=round(time.monotonic() - started, 2),
        )
        return catalog

    async def _evaluate(
        self, revision: Revision, *, with_versions: bool, timeout: float
    ) -> tuple[int, tuple[CatalogEntry, ...]]:
        """The number of top-level names, and the entries of the first `limit` of them."""
        stdout = await run_nix(
            [
                "nix-instantiate", "--eval", "--strict", "--json", "--expr", _CATALOG_NIX,
                "--argstr", "pkgsPath", str(revision.path),
                "--argstr", "system", self.system,
                "--argstr", "limit", str(self.limit),
                "--argstr", "withVersions", "1" if with_versions else "0",
            ],
            deadline=Deadline.after(timeout, limit="the package listing's time limit"),
        )
        try:
            return await asyncio.to_thread(_listing, stdout)
        except (ValueError, TypeError, StopIteration) as exc:
            raise NixError(f"unexpected output from the package listing: {exc!r:.300}") from exc
