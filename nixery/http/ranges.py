"""Range and conditional requests on the blobs the registry sends itself: files, and
blobs relayed from an object store (which then sends only the range asked for);
conditional requests (`not_modified`) on manifests and on HEADs too.

A blob or manifest never changes: its digest is its strong validator, the `ETag` of every
answer (200, 206, 304 and the errors). RFC 9110 (sections 13 and 14) then
comes down to, in its order of evaluation:

* `If-Match` naming neither the ETag nor `*`: 412 PRECONDITION_FAILED.
* `If-None-Match` naming the ETag (weakly) or `*`: 304 Not Modified.
* `If-Unmodified-Since`, `If-Modified-Since`: ignored, as a blob is sent
  without a modification date.
* `If-Range` other than the ETag: the whole blob.
* one `bytes=` range: 206 with its `Content-Range`; a range that starts at or
  past the end (or the empty suffix `-0`): 416 RANGE_NOT_SATISFIABLE with
  `Content-Range: bytes */SIZE`.
* several ranges, another unit, a malformed value: ignored, the whole blob (a
  server may always ignore `Range`; every client can take the whole).

aiohttp's FileResponse, which answered these requests before, put its own
ETag (of the file's time and size) on them, so that the conditions a client
made with the ETag it had been given never held; it refused several ranges or
an unknown unit with 416; and its 412 and 416 had no error body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from multidict import MultiMapping

from nixery.errors import PreconditionFailed, RangeNotSatisfiable

_ONE_RANGE = re.compile(r"bytes=([0-9]{0,30})-([0-9]{0,30})")


@dataclass(frozen=True, slots=True)
class Selected:
    """What to send of a blob of `size` bytes: 200 (all of it), 206 (`count` bytes
    from `start`) or 304 (nothing)."""

    status: int
    start: int
    count: int
    size: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.start + self.count - 1}/{self.size}"


def select(headers: MultiMapping[str], etag: str, size: int) -> Selected:
    """What a GET with these request headers gets of a blob whose ETag is `etag` (quoted)."""
    whole = Selected(200, 0, size, size)
    if not_modified(headers, etag):
        return Selected(304, 0, 0, size)
    requested = headers.get("Range")
    if requested is None or not size or headers.get("If-Range", etag).strip() != etag:
        return whole  # an empty blob has no range to send
    match = _ONE_RANGE.fullmatch(requested.strip())
    if match is None or not any(match.groups()):
        return whole  # several ranges, another unit, or not a range at all
    first, last = match.groups()
    if not first:  # the last `last` bytes
        if int(last) == 0:
            raise _unsatisfiable(size)
        start = max(0, size - int(last))
        return Selected(206, start, size - start, size)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return whole  # not a valid range: ignored
    if start >= size:
        raise _unsatisfiable(size)
    return Selected(206, start, end - start + 1, size)


def not_modified(headers: MultiMapping[str], etag: str) -> bool:
    """Whether a GET or HEAD with these request headers is answered 304 (its `If-None-Match`
    names `etag`, quoted); raises PreconditionFailed (412) when its `If-Match` names neither
    `etag` nor `*`. Range requests are GET's alone (RFC 9110 14.2): a HEAD is checked with this."""
    if_match = _list(headers, "If-Match")
    if if_match is not None and not _names(if_match, etag, weak=False):
        raise PreconditionFailed(f"If-Match names none of this document's ETags ({etag})", headers={"ETag": etag})
    if_none_match = _list(headers, "If-None-Match")
    return if_none_match is not None and _names(if_none_match, etag, weak=True)


def _list(headers: MultiMapping[str], name: str) -> str | None:
    """A list header as one value: sent on several lines, it is their values joined by commas
    (RFC 9110 5.3; only the first line was read)."""
    lines = headers.getall(name, [])
    return ", ".join(lines) if lines else None


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(
        f"the requested range starts past the end of this {size}-byte blob",
        detail={"size": size},
        headers={"Content-Range": f"bytes */{size}"},
    )


def _names(header: str, etag: str, *, weak: bool) -> bool:
    """Whether an If-Match/If-None-Match list names `etag` or is `*` (weak: W/ tags count too).

    Read in one pass, split at commas: a regular expression tried at each position of a
    16 KB header took seconds (on the event loop). An entity tag may hold a comma, but the
    registry's (a quoted digest) never does, so a split one never names it."""
    for item in header.split(","):
        value = item.strip()
        is_weak = value.startswith("W/")
        if value == "*" or (value.removeprefix("W/") == etag and (weak or not is_weak)):
            return True
    return False
