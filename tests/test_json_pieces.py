"""nixery.json_pieces reads and writes what the json module does, a value at a time."""

from __future__ import annotations

import json

import pytest

from nixery import json_pieces

DOCUMENTS = [
    {}, [], 7, "text", None, {"a": []}, [1, "x", [2, {"y": None}]],
    {"paths": ["/nix/store/a", "/nix/store/é"], "layers": [[0, 1, 2, [0, 1]]], "version": 2, "nested": {"b": [1]}},
]  # fmt: skip


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documents_read_and_write_as_with_json(document: object) -> None:
    compact = json.dumps(document, separators=(",", ":"))
    assert json_pieces.dumps(document) == compact
    for text in (compact, json.dumps(document, indent=2), f" \n{json.dumps(document)}\r\n"):
        assert json_pieces.loads(text) == json.loads(text)


REFUSED = ["", "{", "[1,", "[1,]", '{"a":1,}', "{1:2}", '{"a" 1}', '{"a":[1 2]}', "[1] x", "{}}"]


@pytest.mark.parametrize("text", REFUSED)
def test_what_json_refuses_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        json_pieces.loads(text)
