"""Builds that failed, remembered for a while (NIXERY_FAILED_BUILD_TTL).

A Nix build that failed fails again from the same package-set revision: Nix
builds are deterministic, and the image's key names the revision. Without a
memory, every pull of such an image ran the whole build again, taking a build
slot for as long as the failure took to come (a compiler that breaks after ten
minutes). Kubernetes retries a failed pull on every node, first after 10 s,
and a CI job often retries at once: each ran a build bound to fail.

So a build that Nix failed is answered, for `ttl` seconds after it ended, with
the same error, at once, saying when it failed and until when the answer
stands (absolute times, so that a declared image's status, which repeats the
message, does not change on every retry). Only failures that would come again
are kept (`lasting`): Nix's evaluation or a builder failed (exit code 1-255),
or an evaluation passed NIXERY_EVALUATOR_MEMORY_MB. Not kept: a build that ran
out of time (`NIX_TIMEOUT`), a process killed by a signal (the kernel's
out-of-memory killer), a package source, binary cache or download that could
not be reached, a full disk, a platform Nix cannot build for, a storage error
or a name the set lacks: they may pass, or are answered at once anyway. A
build asked for explicitly (the build form, `nixery build`) forgets the
failure and runs. The memory is each process's own: another replica or worker
may build the image again once.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from nixery.lru import LRU
from nixery.nix.errors import MemoryLimitExceeded, NixError
from nixery.platforms import PlatformFailed

#: NIXERY_FAILED_BUILD_TTL's default, in seconds.
DEFAULT_TTL = 60.0
#: The image keys remembered at most (the least recently failed are forgotten first).
CAPACITY = 1024

#: How a Nix process that failed is said (`nixery.nix.process`), and the repl's evaluation.
_NIX_FAILED = re.compile(r"\S+ failed with exit code [1-9][0-9]*\b|the evaluation failed")
#: What a failure that may pass says, in Nix's words or its builders': a download, a network,
#: a disk or memory that ran out, a signal. Erring towards not keeping a failure costs a build.
_MAY_PASS = re.compile(
    r"unable to download|cannot download|could not resolve|resolve host|name resolution|temporary failure"
    r"|timed out|time-out|timeout|connection (refused|reset|closed|timed)|cannot connect|couldn't connect"
    r"|network is unreachable|no route to host|http error|curl: \(|ssl|tls"
    r"|no space left|disk quota|out of memory|cannot allocate memory|killed|due to signal|resource temporarily"
    r"|too many open files|database is locked|interrupted|substituter|binary cache|cannot build on",
    re.IGNORECASE,
)


def lasting(exc: BaseException) -> bool:
    """Whether the same build is bound to fail again with `exc` (module docstring)."""
    if isinstance(exc, PlatformFailed):
        return lasting(exc.cause)
    if type(exc) is MemoryLimitExceeded:
        return True
    if type(exc) is not NixError or not _NIX_FAILED.match(exc.message):
        return False
    return _MAY_PASS.search(f"{exc.message}\n{exc.log_tail}") is None


@dataclass(frozen=True, slots=True)
class _Failure:
    """What is kept of a failure: its words, not the exception (whose traceback holds the build)."""

    at: float  # the clock's time
    wall: float  # seconds since the epoch, for the message
    kind: type[NixError]
    message: str
    log_tail: str
    platform: str | None  # of an image of several platforms: the one whose build failed

    def error(self, note: str | None = None) -> NixError | PlatformFailed:
        """The error it was, with `note` added to its message."""
        cause = self.kind(self.message if note is None else f"{self.message} ({note})", self.log_tail)
        return cause if self.platform is None else PlatformFailed(self.platform, cause)


@dataclass(frozen=True, slots=True)
class RememberedFailure:
    """A failure as pulls are answered with it: from `failed_at` until `until` (whole seconds
    since the epoch, as the answer says them: `utc_time`), `message` and Nix's last lines."""

    failed_at: int
    until: int
    message: str
    log_tail: str


class FailedBuilds:
    """The image keys whose build failed lastingly in the last `ttl` seconds, with their errors."""

    def __init__(
        self, ttl: float = DEFAULT_TTL, *, clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        if not (math.isfinite(ttl) and ttl >= 0):
            raise ValueError(f"ttl must be a finite number of seconds >= 0, not {ttl!r}")
        self.ttl = ttl
        self._clock = clock
        self._wall_clock = wall_clock
        self._failed: LRU[str, _Failure] = LRU(CAPACITY)

    def remember(self, key: str, exc: BaseException) -> None:
        """The build of `key` ended with `exc`: kept if it is a lasting failure."""
        if not self.ttl or not lasting(exc):
            return
        platform = exc.platform if isinstance(exc, PlatformFailed) else None
        cause = exc.cause if isinstance(exc, PlatformFailed) else exc
        assert isinstance(cause, NixError)  # lasting() said so
        self._failed.put(key, _Failure(self._clock(), self._wall_clock(), type(cause), cause.message,
                                       cause.log_tail, platform))

    def forget(self, key: str) -> None:
        """A build of `key` was asked for explicitly."""
        self._failed.pop(key)

    def recent(self, key: str) -> NixError | PlatformFailed | None:
        """The failure to answer with instead of building `key`, or None: the kept error, its
        message saying when the build failed and until when this answer stands."""
        failure = self._kept(key)
        if failure is None:
            return None
        failed_at, until = self._times(failure)
        note = (f"this build failed at {utc_time(failed_at)} and is not run again until {utc_time(until)}, "
                f"NIXERY_FAILED_BUILD_TTL; `nixery build` or the image page's Build button runs it now")
        return failure.error(note)

    def remembered(self, key: str) -> RememberedFailure | None:
        """The failure pulls of `key` are answered with now, for a page to say so, or None."""
        failure = self._kept(key)
        if failure is None:
            return None
        return RememberedFailure(*self._times(failure), failure.error().message, failure.log_tail)

    def _kept(self, key: str) -> _Failure | None:
        failure = self._failed.peek(key)
        if failure is not None and self._clock() - failure.at >= self.ttl:
            self._failed.pop(key)
            return None
        return failure

    def _times(self, failure: _Failure) -> tuple[int, int]:
        """When it failed and until when it is answered, in whole seconds (the span rounded outwards)."""
        return math.floor(failure.wall), math.ceil(failure.wall + self.ttl)


def utc_time(seconds: int) -> str:
    """A time of day as a remembered failure's answer says it (`12:00:01 UTC`)."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(seconds))
