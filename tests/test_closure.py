"""NAR hashes as Nix prints them, read into the form Nix's database keeps (nixery.closure)."""

from __future__ import annotations

import pytest

from nixery.closure import GraphError, base16_nar_hash

#: One hash in every form Nix prints: its database (hex), `nix hash to-base32`, SRI (`nix path-info`
#: from 2.8 in its JSON), and plain base 64. Checked with Nix 2.8 on this machine.
HEX = "sha256:f423dbc7e23e836f1a7c931276aa73ca771692d5ba68174b34c72b9f216ac821"
FORMS = [
    HEX,
    "sha256:08f8d8hryay76i5ifs5ssn91cxyaffm7c4lkghd6z0rywb3xn8zl",
    "sha256-9CPbx+I+g28afJMSdqpzyncWktW6aBdLNMcrnyFqyCE=",
    "sha256:9CPbx+I+g28afJMSdqpzyncWktW6aBdLNMcrnyFqyCE=",
]


@pytest.mark.parametrize("text", FORMS)
def test_every_form_nix_prints_is_read_as_the_same_hash(text: str) -> None:
    assert base16_nar_hash(text) == HEX


@pytest.mark.parametrize(
    "text",
    ["md5:00", "sha256:" + "e" * 52, "sha256:abc", "sha256-AAAA", "sha256:" + "0" * 63, "f423dbc7"],
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(GraphError, match="not a NAR hash Nix prints"):
        base16_nar_hash(text)
