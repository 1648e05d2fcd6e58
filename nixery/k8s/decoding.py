"""The API server's JSON, read whatever one object holds.

Python's `json` cannot read a value nested deeper than the interpreter's
recursion limit (about 1,000 levels): it raises `RecursionError`. The API
server stores deeper ones wherever a CRD's schema lets them in. Read with
`json.loads`, one such NixImage made a whole list page unreadable: the watch
listed again and again and saw no change at all until someone deleted that
object.

`read_json` reads a document as `json.loads` does. Only when that fails for
depth, and the document is an object, it reads it again by hand, member by
member, down to `MAX_DEPTH_BY_HAND` levels (a list, its items, an item, its
`data` or `metadata`, ...): every value `json` still cannot read becomes
`TOO_DEEP` and is skipped, and everything else is read as usual. So a list
page loses one field of one object, whose name, version and status stay
readable; `too_deep_fields` says where. The slow part (finding where a
skipped value ends) runs only for such documents, and callers run it off the
event loop.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Levels of objects and arrays read by hand below the document, at most; deeper, a value json
#: cannot read is skipped whole. Enough for a list's item's `metadata.managedFields[i].fieldsV1`.
MAX_DEPTH_BY_HAND = 6

_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")
# A string (skipped whole: brackets inside it do not count) or a bracket.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class TooDeep:
    """Stands for a value nested too deep to read."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<nested too deep>"


TOO_DEEP = TooDeep()


def read_json(document: str | bytes) -> Any:
    """`document` as `json.loads` reads it; but an object whose values nest too deep for it is read
    with each such value replaced by `TOO_DEEP`. Raises as `json.loads` does otherwise (`ValueError`
    for malformed JSON, `RecursionError` for a document too deep that is not an object)."""
    text = document.decode() if isinstance(document, bytes) else document
    try:
        return json.loads(text)
    except RecursionError:
        if not text.lstrip(" \t\n\r").startswith("{"):
            raise
    value, end = _read_value(text, _skip_space(text, 0), 0)
    if _skip_space(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def too_deep_fields(value: Any, path: str) -> list[str]:
    """Where `read_json` left out a value in `value` (found at `path`): `data.arch`, `data.env[2]`."""
    return _too_deep(value, path, 0)


def _too_deep(value: Any, path: str, depth: int) -> list[str]:
    if value is TOO_DEEP:
        return [path]
    if depth > MAX_DEPTH_BY_HAND:  # none is deeper: this bounds the walk, not what json read
        return []
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _too_deep(item, f"{path}.{key}", depth + 1)]
    if isinstance(value, list):
        return [p for index, item in enumerate(value) for p in _too_deep(item, f"{path}[{index}]", depth + 1)]
    return []


def _skip_space(text: str, at: int) -> int:
    match = _WHITESPACE.match(text, at)
    return match.end() if match else at


def _read_value(text: str, at: int, depth: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, at)
    except RecursionError:
        pass  # only an object or an array can be too deep
    if depth >= MAX_DEPTH_BY_HAND:
        return TOO_DEEP, _end_of_value(text, at)
    if text[at] == "{":
        return _read_object(text, at, depth + 1)
    return _read_array(text, at, depth + 1)


def _read_object(text: str, at: int, depth: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    at = _skip_space(text, at + 1)
    if text.startswith("}", at):
        return result, at + 1
    while True:
        if not text.startswith('"', at):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
        key, at = _DECODER.raw_decode(text, at)  # a string: never too deep
        at = _skip_space(text, at)
        if not text.startswith(":", at):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
        result[key], at = _read_value(text, _skip_space(text, at + 1), depth)
        at = _skip_space(text, at)
        if text.startswith("}", at):
            return result, at + 1
        if not text.startswith(",", at):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
        at = _skip_space(text, at + 1)


def _read_array(text: str, at: int, depth: int) -> tuple[list[Any], int]:
    result: list[Any] = []
    at = _skip_space(text, at + 1)
    if text.startswith("]", at):
        return result, at + 1
    while True:
        value, at = _read_value(text, at, depth)
        result.append(value)
        at = _skip_space(text, at)
        if text.startswith("]", at):
            return result, at + 1
        if not text.startswith(",", at):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
        at = _skip_space(text, at + 1)


def _end_of_value(text: str, at: int) -> int:
    """Where the object or array at `at` ends: counting brackets (without recursion) outside strings."""
    depth = 0
    for match in _STRUCTURE.finditer(text, at):
        char = text[match.start()]
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return match.end()
    raise json.JSONDecodeError("Unterminated object or array", text, at)
