"""Content digests, parsed and validated once at the edge.

The rest of the code only ever sees `Digest` values, never raw strings.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from nixery.errors import DigestInvalid

_SHA256 = re.compile(r"sha256:([a-f0-9]{64})")


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
