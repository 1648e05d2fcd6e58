"""What each image name evaluated to, kept so that a new image of known names
needs no Nix process at all.

Evaluating names is the one Nix process an image build of built packages
still starts (40-50 ms here just to start it, much more for nixpkgs), and it
answers the same for the same package-set revision, name and system. So each
name's answer (attribute, derivation, outputs, main program) is stored under
`evaluations/<key>` and reused by the next image that names it: `shell/git`
after `shell` and `git` were pulled in other images skips the evaluation, and
the checkout of the package set with it.

The answers are only used when the database of Nix's store says that every
output they name is still there (`nixery.nix.store_db`); otherwise, and for
every name not seen before, all the image's names are evaluated as usual.
Names that are not found are not kept: they cost an evaluation each time.
`nixery gc` removes the answers for package-set revisions that no kept image
was built from.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence

import structlog

from nixery.background import spawn
from nixery.lru import LRU
from nixery.nix import store_db
from nixery.registry.image import canonical_json
from nixery.resolver import ResolvedPackage, Revision
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)

#: Bumped when what eval.nix returns for a name changes (2: `pullName`).
FORMAT_VERSION = "2"
PREFIX = "evaluations/"
_MEMORY = 4096  # names kept in memory per process


def evaluation_key(revision: Revision, system: str, name: str) -> str:
    material = {"format": FORMAT_VERSION, "revision": revision.id, "system": system, "name": name}
    return hashlib.sha256(canonical_json(material)).hexdigest()


class EvaluationCache:
    def __init__(self, storage: Storage):
        self._storage = storage
        self._memory: LRU[str, tuple[ResolvedPackage, ...]] = LRU(_MEMORY)
        self._writes: set[asyncio.Task[None]] = set()

    async def lookup(self, revision: Revision, system: str, names: Sequence[str]) -> list[ResolvedPackage] | None:
        """The packages the names resolve to, in evaluation order, if every name is known
        and everything it names is built; else None (then evaluate them all)."""
        known = await asyncio.gather(*(self._known(evaluation_key(revision, system, name)) for name in names))
        if any(packages is None for packages in known):
            return None
        resolved = [package for packages in known for package in packages or ()]
        outputs = sorted({out for package in resolved for out in package.outputs})
        valid = await store_db.valid_paths(outputs)
        if valid is None or not valid.issuperset(outputs):
            return None  # collected by Nix's GC, or the database cannot tell
        return resolved

    def remember(self, revision: Revision, system: str, resolved: Sequence[ResolvedPackage]) -> None:
        """Keep each name's packages (a name may stand for several, like `shell`).

        Kept in memory at once; written to storage in the background, off the
        image's build, one record after another: a hundred fsync'd writes at
        once would hold every worker thread the build needs next. A write lost
        to a crash costs one evaluation later.
        """
        by_name: dict[str, list[ResolvedPackage]] = {}
        for package in resolved:
            by_name.setdefault(package.name, []).append(package)
        records = []
        for name, packages in by_name.items():
            key = evaluation_key(revision, system, name)
            self._memory.put(key, tuple(packages))
            # The revision is kept for `nixery gc`, which drops those of revisions no kept image uses.
            document = canonical_json({"revision": revision.id, "packages": [p.to_json() for p in packages]})
            records.append((PREFIX + key, document))
        spawn(self._write(records), failure_event="evaluations.not_kept", keep=self._writes)

    async def _write(self, records: Sequence[tuple[str, bytes]]) -> None:
        for key, document in records:
            await self._storage.put_meta(key, document)

    async def flush(self) -> None:
        """Wait for the writes `remember` started."""
        await asyncio.gather(*self._writes, return_exceptions=True)

    async def _known(self, key: str) -> tuple[ResolvedPackage, ...] | None:
        packages = self._memory.get(key)
        if packages is not None:
            return packages
        data = await self._storage.get_meta(PREFIX + key)
        if data is None:
            return None
        try:
            packages = tuple(ResolvedPackage.from_json(p) for p in json.loads(data)["packages"])
        except (ValueError, KeyError, TypeError) as exc:  # damaged: evaluate again (and overwrite it)
            log.warning("evaluations.unreadable", key=key[:12], error=str(exc)[:200])
            return None
        self._memory.put(key, packages)
        return packages

