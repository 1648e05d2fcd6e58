"""The packages every image gets besides those it names: NIXERY_BASELINE.

By default a CA bundle (`cacert`; in the Debian-derived set an alias of
`ca-certificates`) and `/etc/services` with `/etc/protocols` (`iana-etc`; in
the Debian set an alias of `netbase`), as Nixery gives every image. The
bundled Debian set's default adds its terminfo database and C.UTF-8 locale
(`DEBIAN_SET_BASELINE`). Names the package set lacks are left out without a
word: a set need not have them.

What this module guarantees:

* The baseline packages are part of the image's closure (their store paths
  are layered and shared with every other image like any others) and are
  linked at `/` after the requested packages, so a requested package's file
  wins over a baseline one.
* The names are evaluated once per package-set revision and system in this
  process, however many builds ask at once (and found without Nix after a
  restart through the evaluation cache): one evaluation, two when the set
  lacks a name (one to learn which), per revision, not per image.
* The baseline is part of every image's key when it is not empty
  (`Baseline.key`): changing it builds images anew, and with it empty the
  keys are those of registries without a baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from nixery.evaluations import EvaluationCache
from nixery.layers.rootlinks import LinkedPackage
from nixery.lru import LRU
from nixery.nix.errors import PackagesNotFound
from nixery.resolver import PackageResolver, ResolvedPackage, Revision
from nixery.singleflight import SingleFlight

log = structlog.get_logger(__name__)

DEFAULT_BASELINE = ("cacert", "iana-etc")
#: The bundled Debian set's default, with what Debian has in every system (Essential packages, so
#: no package depends on them) and programs look for at fixed paths. Its terminfo database
#: (ncurses-base: /lib/terminfo, /usr/share/terminfo), where libtinfo looks: without it `python3`'s
#: curses, readline and every program the set does not wrap with TERMINFO_DIRS found no `xterm`
#: ("could not find terminfo database"). The C.UTF-8 locale (`locales-c-utf8`, libc-bin's
#: /usr/lib/locale/C.utf8 alone): without it LANG=C.UTF-8 was the C locale (bash: "setlocale:
#: cannot change locale", `wc -m` counted bytes). nixpkgs' ncurses and glibc find their own, so the
#: generic default goes without (and keeps its image keys).
DEBIAN_SET_BASELINE = (*DEFAULT_BASELINE, "ncurses-base", "locales-c-utf8")


class Baseline:
    def __init__(self, names: Sequence[str] = DEFAULT_BASELINE):
        self.names = tuple(dict.fromkeys(names))
        #: What the names found, by (revision id, system).
        self._found: LRU[tuple[str, str], list[ResolvedPackage]] = LRU(64)
        self._looking_up: SingleFlight[list[ResolvedPackage]] = SingleFlight()

    async def close(self) -> None:
        """Stop the look-ups under way (their builds were stopped)."""
        await self._looking_up.cancel_all()

    def key(self) -> list[str] | None:
        """Its part of an image's key; None when it is empty (keys as without a baseline)."""
        return list(self.names) or None

    async def packages(
        self, source: PackageResolver, evaluations: EvaluationCache, revision: Revision, system: str, *, until: float
    ) -> list[ResolvedPackage]:
        """What the baseline's names find in `revision`'s package set, in the baseline's order."""
        if not self.names:
            return []
        found = self._found.get((revision.id, system))
        if found is None:  # concurrent builds of one revision share one look-up
            found = await self._looking_up.run(
                (revision.id, system), lambda: self._look_up(source, evaluations, revision, system, until)
            )
        return found

    async def _look_up(
        self, source: PackageResolver, evaluations: EvaluationCache, revision: Revision, system: str, until: float
    ) -> list[ResolvedPackage]:
        found = await evaluations.lookup(revision, system, self.names)
        if found is None:
            found = await self._evaluate(source, evaluations, revision, system, until)
        self._found.put((revision.id, system), found)
        return found

    async def _evaluate(
        self, source: PackageResolver, evaluations: EvaluationCache, revision: Revision, system: str, until: float
    ) -> list[ResolvedPackage]:
        names: Sequence[str] = self.names
        while names:
            try:
                found = await source.evaluate(revision, names, system, until=until)
            except PackagesNotFound as exc:
                missing = set(exc.missing) & set(names)
                if not missing:  # not about these names
                    raise
                names = [name for name in names if name not in missing]
                continue
            evaluations.remember(revision, system, found)
            return found
        log.info("build.baseline_not_in_set", names=list(self.names), revision=revision.id)
        return []


def linked_packages(resolved: Sequence[ResolvedPackage], baseline: Sequence[ResolvedPackage]) -> list[LinkedPackage]:
    """The packages to link at `/`, in the order that settles conflicts: the requested ones
    by the names the image is known by (the order that identifies it: `jq/shell` and
    `shell/jq` are one image, so the same contents), then the baseline's."""
    requested = sorted(resolved, key=lambda package: package.pull_name)  # stable: `shell`'s members keep their order
    chosen = [LinkedPackage(package.pull_name, package.outputs) for package in requested]
    return chosen + [LinkedPackage(package.attr, package.outputs) for package in baseline]
