"""What a declaration's problems are made of: `InvalidDeclaration`, and values quoted briefly.

A problem quotes at most a few dozen characters of any value (`_short`), so a
hostile document costs one short log line.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from typing import Any

SHORT_VALUE = 40  # characters of a value quoted in a problem


class InvalidDeclaration(ValueError):
    """A NixImage document that cannot be served; the message says why."""


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxstring = _SHORT_REPR.maxlong = _SHORT_REPR.maxother = SHORT_VALUE
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 4


def _cut(text: str, limit: int = SHORT_VALUE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    """`repr(value)` cut to a few dozen characters, for problems and log lines that quote a
    value from a file or object. reprlib looks at a few items and levels only, so even a value
    that stands for millions of others costs nothing to show."""
    return _cut(_SHORT_REPR.repr(value))


def _field_names(keys: Iterable[Any]) -> str:
    names = sorted(_cut(str(k)) for k in keys)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more
