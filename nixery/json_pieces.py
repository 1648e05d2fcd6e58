"""Big JSON documents read and written a piece at a time, so that other threads run meanwhile.

`json.loads` and `json.dumps` are each one C call that holds the interpreter
for the whole document: 0.2 s for a package catalogue of 100,000 names, tens of
milliseconds for a layering history of 20,000 layers. Run in a thread, they
still stop the event loop for all that time. Here the arrays of a document
(its own, or those its top-level object holds) are decoded and encoded a value
at a time, by the stdlib's decoder and encoder; the interpreter can switch
threads between two values. The results are those of `json.loads` and of
`json.dumps(value, separators=(",", ":"))`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterator
from typing import Any

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def array_items(text: str) -> Iterator[Any]:
    """The values of the JSON array `text`, decoded one at a time. Raises ValueError
    where `text` is not one JSON array."""
    end = yield from _array(text, _after_space(text, 0))
    _check_end(text, end)


def loads(text: str) -> Any:
    """`json.loads(text)`, with the arrays of a top-level array or object decoded value by
    value. Raises ValueError where `text` is not JSON."""
    at = _after_space(text, 0)
    if text[at : at + 1] == "[":
        return list(array_items(text))
    if text[at : at + 1] != "{":
        return _DECODER.decode(text)
    document: dict[str, Any] = {}
    at = _after_space(text, at + 1)
    if text[at : at + 1] == "}":
        _check_end(text, at + 1)
        return document
    while True:
        key, at = _DECODER.raw_decode(text, at)
        if not isinstance(key, str):
            raise ValueError(f"expected a member name at character {at}")
        at = _after_space(text, at)
        if text[at : at + 1] != ":":
            raise ValueError(f"expected ':' at character {at}")
        at = _after_space(text, at + 1)
        if text[at : at + 1] == "[":
            document[key], at = _collected(_array(text, at))
        else:
            document[key], at = _DECODER.raw_decode(text, at)
        at = _after_space(text, at)
        if text[at : at + 1] == "}":
            _check_end(text, at + 1)
            return document
        if text[at : at + 1] != ",":
            raise ValueError(f"expected ',' or '}}' at character {at}")
        at = _after_space(text, at + 1)


def dumps(value: Any) -> str:
    """`json.dumps(value, separators=(",", ":"))`, with the arrays of a top-level array or
    object (lists, tuples) encoded value by value."""
    if isinstance(value, dict):
        members = (f"{_compact(str(key))}:{_pieces(item)}" for key, item in value.items())
        return "{" + ",".join(members) + "}"
    return _pieces(value)


def _pieces(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_compact(item) for item in value) + "]"
    return _compact(value)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _collected(values: Generator[Any, None, int]) -> tuple[list[Any], int]:
    """What `values` yields, and what it returns."""
    items = []
    while True:
        try:
            items.append(next(values))
        except StopIteration as stop:
            return items, stop.value


def _array(text: str, at: int) -> Generator[Any, None, int]:
    """The values of the array that starts at `at`; returns where it ends."""
    if text[at : at + 1] != "[":
        raise ValueError(f"not a JSON array at character {at}")
    at = _after_space(text, at + 1)
    if text[at : at + 1] == "]":
        return at + 1
    while True:
        value, at = _DECODER.raw_decode(text, at)
        yield value
        at = _after_space(text, at)
        if text[at : at + 1] == "]":
            return at + 1
        if text[at : at + 1] != ",":
            raise ValueError(f"expected ',' or ']' at character {at}")
        at = _after_space(text, at + 1)


def _check_end(text: str, at: int) -> None:
    if _after_space(text, at) != len(text):
        raise ValueError(f"extra data after the document at character {at}")


def _after_space(text: str, at: int) -> int:
    """Where the JSON white space at `at` ends."""
    match = _SPACE.match(text, at)
    assert match is not None  # it matches the empty string too
    return match.end()
