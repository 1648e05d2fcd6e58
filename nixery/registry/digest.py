"""Content digests, parsed and validated once at the edge.

The rest of the code only ever sees `Digest` values, never raw strings.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from nixery.errors import DigestInvalid

_SHA256 = re.compile(r"sha256:([a-f0-9]{64})")
#: Well-formed digests of the other algorithms distribution takes (go-digest's: sha384, and sha512,
#: which the OCI image spec registers beside sha256).
_OTHER_ALGORITHMS = re.compile(r"sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")


def names_another_algorithm(text: str) -> bool:
    """Whether `text` is a well-formed sha512 or sha384 digest: not a `Digest` (the registry stores
    sha256 digests only), but no malformed one either. A request that names one asks for something
    absent (404, as distribution answers), not with an invalid digest (400)."""
    return _OTHER_ALGORITHMS.fullmatch(text) is not None


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    hex: str  # 64 lowercase hex characters of a sha256

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _SHA256.fullmatch(text)
        if match is None:
            raise DigestInvalid(f"not a sha256 digest: {text[:100]!r}")
        return cls(match.group(1))

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest())

    @classmethod
    def from_hasher(cls, hasher: hashlib._Hash) -> Digest:
        return cls(hasher.hexdigest())

    def __str__(self) -> str:
        return f"sha256:{self.hex}"
