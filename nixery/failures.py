"""Builds that failed, remembered for a while (NIXERY_FAILED_BUILD_TTL).

A Nix build that failed fails again from the same package-set revision: Nix
builds are deterministic, and the image's key names the revision. Without a
memory, every pull of such an image ran the whole build again, taking a build
slot for as long as the failure took to come (a compiler that breaks after ten
minutes). Kubernetes retries a failed pull on every node, first after 10 s,
and a CI job often retries at once: each ran a build bound to fail.

So a build that Nix failed is answered, for `ttl` seconds after it ended, with
the same error, at once, saying how long ago it failed and when the next pull
builds it again. Only failures of Nix itself are kept: a build that ran out of
time (`NIX_TIMEOUT`, "the next request retries"), a package source that could
not be fetched, a storage error or a name the set lacks are not, as they may
pass (or are answered at once anyway). A build asked for explicitly (the build
form, `nixery build`) forgets the failure and runs. The memory is each
process's own: another replica or worker may build the image again once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from nixery.lru import LRU
from nixery.nix.errors import MemoryLimitExceeded, NixError, UnsupportedSystem

#: NIXERY_FAILED_BUILD_TTL's default, in seconds.
DEFAULT_TTL = 60.0
#: The image keys remembered at most (the least recently failed are forgotten first).
CAPACITY = 1024

#: The failures kept: Nix could not evaluate or build the packages, an evaluation passed
#: NIXERY_EVALUATOR_MEMORY_MB, or Nix cannot build for the platform. Not their other subclasses.
_LASTING = (NixError, MemoryLimitExceeded, UnsupportedSystem)


def lasting(exc: BaseException) -> bool:
    """Whether the same build is bound to fail again with `exc` (not a timeout, nor a source
    that could not be fetched, nor a name the set lacks)."""
    return type(exc) in _LASTING


class FailedBuilds:
    """The image keys whose build failed lastingly in the last `ttl` seconds, with their errors."""

    def __init__(self, ttl: float = DEFAULT_TTL, *, clock: Callable[[], float] = time.monotonic):
        if not (math.isfinite(ttl) and ttl >= 0):
            raise ValueError(f"ttl must be a finite number of seconds >= 0, not {ttl!r}")
        self.ttl = ttl
        self._clock = clock
        self._failed: LRU[str, tuple[float, NixError]] = LRU(CAPACITY)

    def remember(self, key: str, exc: BaseException) -> None:
        """The build of `key` ended with `exc`: kept if it is a lasting failure."""
        if self.ttl and isinstance(exc, NixError) and lasting(exc):
            self._failed.put(key, (self._clock(), exc))

    def forget(self, key: str) -> None:
        """A build of `key` was asked for explicitly, or succeeded."""
        self._failed.pop(key)

    def recent(self, key: str) -> NixError | None:
        """The failure to answer with instead of building `key`, or None: a copy of the kept
        error whose message says how long ago it failed and when the image is built again."""
        kept = self._failed.peek(key)
        if kept is None:
            return None
        failed_at, exc = kept
        age = self._clock() - failed_at
        if age >= self.ttl:
            self._failed.pop(key)
            return None
        again = max(1, math.ceil(self.ttl - age))
        note = (f"this build failed {math.floor(age)} s ago and is not run again for {again} s, "
                f"NIXERY_FAILED_BUILD_TTL; `nixery build` or the image page's Build button runs it now")
        return type(exc)(f"{exc.message} ({note})", exc.log_tail)
