"""The nearest package names for a misspelt one: `curll` → `curl`.

`NameIndex` is pure and bounded, for the package catalogue's names (a few
hundred in the bundled sets, about 100,000 in nixpkgs: a query over those takes
about 0.1 s). Names are compared in lower case, as the resolver matches them,
with difflib's similarity ratio; only names of about the same length are
compared at all. `Suggestions` runs it in a worker thread, never on the event
loop, for the names a build did not find, one request at a time, in turn by
client (so that one client's stream of misspellings leaves another's its turn), each within
SECONDS of asking, its wait for the others included: past them it is answered
with the suggestions found so far. A name that resembles many (`generated-12z`
among `generated-0` ... `generated-99999`) took a second or more; ten of them in
one image name took 10-20 s, and another request's suggestions waited behind
them (39 s behind three such requests, where they took 0.2 s).

A suggestion is given as it can be pulled: in lower case when that spelling
finds the one package (registry clients refuse upper-case names), else as
the package set spells it.
"""

from __future__ import annotations

import asyncio
import difflib
import time
from collections.abc import Callable, Hashable, Iterable, Sequence

from nixery.fair import FairSlots, requester

#: Suggestions per missing name, and missing names given suggestions per request.
MOST = 3
MOST_NAMES = 10
#: difflib's ratio below which a name is not offered (`curll`/`curl` 0.89, `gti`/`git` 0.67).
CUTOFF = 0.6
#: How far below the closest name's ratio another may be and still be offered.
CLOSE = 0.1
#: Seconds one request's suggestions may take, from when it asks (its wait for others' included).
SECONDS = 2.0
#: Candidates compared between two looks at the clock.
_CHECK_EVERY = 512


class NameIndex:
    """Names grouped by their lower-case form, bucketed by length (build once, query often)."""

    def __init__(self, names: Iterable[str]):
        self._spellings: dict[str, list[str]] = {}
        for name in names:
            self._spellings.setdefault(name.lower(), []).append(name)
        self._by_length: dict[int, list[str]] = {}
        for lower in self._spellings:
            self._by_length.setdefault(len(lower), []).append(lower)

    def nearest(self, name: str, most: int = MOST, deadline: float | None = None) -> list[str] | None:
        """Up to `most` names like `name`, the most similar first; None once `deadline`
        (a `time.monotonic()` reading) has passed."""
        wanted = name.lower()
        spread = max(2, len(wanted) // 3)
        matcher = difflib.SequenceMatcher(autojunk=False)
        matcher.set_seq2(wanted)
        scored: list[tuple[float, int, str]] = []
        compared = 0
        for length in range(max(1, len(wanted) - spread), len(wanted) + spread + 1):
            for candidate in self._by_length.get(length, ()):
                compared += 1
                if deadline is not None and compared % _CHECK_EVERY == 0 and time.monotonic() >= deadline:
                    return None
                matcher.set_seq1(candidate)
                if matcher.real_quick_ratio() < CUTOFF or matcher.quick_ratio() < CUTOFF:
                    continue
                ratio = matcher.ratio()
                if ratio >= CUTOFF:
                    scored.append((-ratio, abs(length - len(wanted)), candidate))
        scored.sort()
        # Only names about as close as the closest: `curll` gets `curl`, not also `cll0`.
        best = -scored[0][0] if scored else 0.0
        shown: list[str] = []
        for _, _, lower in [item for item in scored if -item[0] >= best - CLOSE][: most + 1]:
            spellings = self._spellings[lower]
            # The lower-case name finds the package when it is the only spelling; of several, each is shown.
            shown.extend([lower] if len(spellings) == 1 else sorted(spellings))
        return [suggestion for suggestion in shown if suggestion != name][:most]

    def suggest(self, missing: Sequence[str], deadline: float | None = None) -> dict[str, list[str]]:
        """Suggestions for each of the first MOST_NAMES missing names that has any, those
        found by `deadline` (a `time.monotonic()` reading)."""
        found: dict[str, list[str]] = {}
        for name in missing[:MOST_NAMES]:
            names = self.nearest(name, deadline=deadline)
            if names is None:
                break
            if names:
                found[name] = names
        return found


class Suggestions:
    """Suggestions from one list of names at a time, off the event loop: its index is
    built once (in a worker thread, when another list is asked about) and one query
    runs at a time, so that a burst of misspellings queues instead of taking every thread;
    each within `seconds` of asking, so that the queue moves on."""

    def __init__(self, seconds: float = SECONDS) -> None:
        self._key: Hashable = None
        self._index: NameIndex | None = None
        self._slot = FairSlots(1)  # one query at a time, in turn by client (as builds are)
        self._seconds = seconds

    async def suggest(
        self, key: Hashable, names: Callable[[], Iterable[str]], missing: Sequence[str]
    ) -> dict[str, list[str]]:
        """Suggestions for `missing` among `names()` (the same names as long as `key` is the
        same), those found within the time given."""
        deadline = time.monotonic() + self._seconds
        async with self._slot.hold(requester.get()):
            if time.monotonic() >= deadline:  # waited out its time behind others
                return {}
            if self._index is None or self._key != key:
                self._index = await asyncio.to_thread(lambda: NameIndex(names()))
                self._key = key
            return await asyncio.to_thread(self._index.suggest, missing, deadline)
