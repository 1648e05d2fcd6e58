"""Amounts in words: counts (`1 derivation`, `2 derivations`), sizes (`12.3 MB`) and
rates (`850.0 kB/s`).

It imports nothing of nixery: a build's own event messages (`nixery.progress`) use these,
and so do the pages and the command line (`nixery.views`), which sit above it.
"""

from __future__ import annotations

#: A transfer shorter than this has no rate worth showing: a layer of a few kB is compressed in
#: milliseconds, mostly the cost of handing it to a worker, and its "rate" said `0 MB/s`.
MEASURABLE_SECONDS = 0.1


def plural(count: int, noun: str) -> str:
    """`1 derivation`, `2 derivations` (the pages said `1 derivations`)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def size_text(n: int | float | None, *, unknown: str = "–") -> str:
    """A byte count in words (`12.3 MB`); `unknown` for None."""
    if n is None:
        return unknown
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def rate_text(n: int | float, seconds: float) -> str | None:
    """`n` bytes in `seconds` as a rate in the unit that suits it (`36.0 MB/s`, `850.0 kB/s`);
    None for nothing moved, or a time too short to measure (`MEASURABLE_SECONDS`)."""
    if n <= 0 or seconds < MEASURABLE_SECONDS:
        return None
    return f"{size_text(n / seconds)}/s"
