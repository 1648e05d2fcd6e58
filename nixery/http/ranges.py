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
* one `bytes=` range (the unit in any case: `BYTES=`): 206 with its `Content-Range`; a range that starts at or
  past the end (or the empty suffix `-0`): 416 RANGE_NOT_SATISFIABLE with
  `Content-Range: bytes */SIZE`.
* several ranges (`bytes=0-1,5-9`): as distribution answers (Go's
  `http.ServeContent`), those that cannot be satisfied are dropped (416 when
  none is left, one 206 when one is), the others are sent in the order asked as
  one 206 `multipart/byteranges` body (RFC 9110 14.6), each part with its
  `Content-Type` and `Content-Range`. Ranges that add up to more than the blob
  (overlapping ones, such as `0-,0-`) get the whole blob instead, as in Go, and
  so do more than MAX_RANGES (RFC 9110 14.2 lets a server ignore many small
  ranges; from an object store each is a request of its own). The whole blob was
  sent for any two ranges: a client reading a few chunks of a layer (a lazy
  puller's multi-range request) got all of it.
* another unit, a malformed value: ignored, the whole blob (RFC 9110: a server
  ignores a unit it does not know and may ignore an invalid range; every client
  can take the whole). distribution refuses these with a plain-text 416.
  Whitespace is taken where RFC 9110 allows it: around the commas of the list
  (`1#range-spec`, 5.6.1) and after `=` (erratum 7306: `bytes= 0-999, -1000`),
  not inside a range: `int-range = first-pos "-" [ last-pos ]` has none, so
  `bytes=0 - 1` is malformed and ignored (Go's net/http trims it, and
  distribution then sends the range).

aiohttp's FileResponse, which answered these requests before, put its own
ETag (of the file's time and size) on them, so that the conditions a client
made with the ETag it had been given never held; it refused several ranges or
an unknown unit with 416; and its 412 and 416 had no error body.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from multidict import MultiMapping

from nixery.errors import PreconditionFailed, RangeNotSatisfiable

_RANGE_SPEC = re.compile(r"([0-9]{0,30})-([0-9]{0,30})")

#: The most ranges one request is sent in parts; more get the whole blob.
MAX_RANGES = 64


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of an answer's body: `lead` (the delimiter and headers of a multipart part; empty
    for a single range or the whole blob), then `count` bytes of the blob from `start`."""

    lead: bytes
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class Selected:
    """What to send of a blob of `size` bytes: 200 (all of it), 206 (one range, or several as a
    multipart body) or 304 (nothing); the body is `segments` then `trailer`, whose length and
    framing `headers` give (Content-Length, and Content-Range or the multipart Content-Type)."""

    status: int
    size: int
    segments: tuple[Segment, ...] = ()
    trailer: bytes = b""  # a multipart body's closing delimiter
    headers: tuple[tuple[str, str], ...] = ()


def select(headers: MultiMapping[str], etag: str, size: int, media_type: str) -> Selected:
    """What a GET with these request headers gets of a blob whose ETag is `etag` (quoted) and whose
    Content-Type is `media_type`."""
    whole = _single(200, 0, size, size)
    if not_modified(headers, etag):
        return Selected(304, size)
    requested = headers.get("Range")
    if requested is None or not size or headers.get("If-Range", etag).strip() != etag:
        return whole  # an empty blob has no range to send
    ranges = _satisfiable(requested, size)
    if ranges is None:
        return whole  # another unit, not a range at all, too many: ignored
    if not ranges:
        raise _unsatisfiable(size, requested)
    if len(ranges) == 1:
        return _single(206, *ranges[0], size)
    if sum(count for _, count in ranges) > size:
        return whole  # overlapping ranges: the blob once is less to send (Go's rule)
    return _multipart(ranges, size, media_type)


def _satisfiable(requested: str, size: int) -> list[tuple[int, int]] | None:
    """The (start, count) of each range of a `Range` value that the blob can satisfy, in the order
    asked; None when the value is to be ignored."""
    unit, equals, specs = requested.strip().partition("=")
    if unit.lower() != "bytes" or not equals:  # a unit's name is case-insensitive (RFC 9110 14.1)
        return None
    items = [item.strip() for item in specs.split(",")]
    items = [item for item in items if item]  # a list may hold empty elements (RFC 9110 5.6.1)
    if not items or len(items) > MAX_RANGES:
        return None
    ranges = []
    for item in items:
        match = _RANGE_SPEC.fullmatch(item)
        if match is None or not any(match.groups()):
            return None
        first, last = match.groups()
        if not first:  # the last `last` bytes; none (`-0`) cannot be satisfied
            if int(last):
                start = max(0, size - int(last))
                ranges.append((start, size - start))
            continue
        start = int(first)
        if last and int(last) < start:
            return None  # not a valid range
        if start < size:  # one that starts past the end cannot be satisfied
            end = min(int(last), size - 1) if last else size - 1
            ranges.append((start, end - start + 1))
    return ranges


def _single(status: int, start: int, count: int, size: int) -> Selected:
    headers = [("Content-Length", str(count))]
    if status == 206:
        headers.append(("Content-Range", f"bytes {start}-{start + count - 1}/{size}"))
    return Selected(status, size, (Segment(b"", start, count),), headers=tuple(headers))


def _multipart(ranges: list[tuple[int, int]], size: int, media_type: str) -> Selected:
    """A multipart/byteranges body (RFC 9110 14.6) of `ranges`: a delimiter line and headers before
    each part; the CRLF that ends a part's bytes belongs to the next delimiter (RFC 2046 5.1.1)."""
    boundary = secrets.token_hex(24)  # random: never in the bytes sent
    segments: list[Segment] = []
    for start, count in ranges:
        delimiter = f"\r\n--{boundary}\r\n" if segments else f"--{boundary}\r\n"
        part_headers = f"Content-Type: {media_type}\r\nContent-Range: bytes {start}-{start + count - 1}/{size}\r\n"
        segments.append(Segment(f"{delimiter}{part_headers}\r\n".encode(), start, count))
    trailer = f"\r\n--{boundary}--\r\n".encode()
    length = sum(len(segment.lead) + segment.count for segment in segments) + len(trailer)
    headers = (("Content-Length", str(length)), ("Content-Type", f"multipart/byteranges; boundary={boundary}"))
    return Selected(206, size, tuple(segments), trailer, headers)


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


def _unsatisfiable(size: int, requested: str) -> RangeNotSatisfiable:
    """The refusal of a `Range` whose every range starts past the end or is an empty suffix (`-0`)."""
    specs = [item.strip() for item in requested.partition("=")[2].split(",") if item.strip()]
    empty_suffixes = [spec for spec in specs if spec.startswith("-")]  # a suffix of any other length is sent
    if len(empty_suffixes) == len(specs):
        message = "the requested range asks for the last 0 bytes (-0): a suffix range must ask for at least one"
    elif empty_suffixes:
        message = (f"none of the requested ranges can be sent: each starts past the end of this {size}-byte "
                   "blob or asks for its last 0 bytes (-0)")
    else:
        message = f"the requested range starts past the end of this {size}-byte blob"
    return RangeNotSatisfiable(message, detail={"size": size}, headers={"Content-Range": f"bytes */{size}"})


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
