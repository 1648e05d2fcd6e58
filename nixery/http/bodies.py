"""Request bodies: the forms and JSON that POST /builds and POST /token read.

aiohttp reads a body within its size limit (1 MiB: a larger one is 413
REQUEST_TOO_LARGE) but fails on a malformed one with whatever its parsers raise:
a multipart form without its boundary or with a broken part, a charset Python
does not know, a Content-Encoding the bytes do not match, JSON nested deeper
than Python's parser goes. Here each of those is the client's error, 400
REQUEST_INVALID, with a message that says what was wrong and quotes none of
the body; never a 500 with a traceback. JSON is parsed on the event loop, so
a JSON body over MAX_JSON_BYTES is refused unparsed (413 REQUEST_TOO_LARGE).
So are multipart forms, part by part, in Python: one of more than MAX_FORM_FIELDS
fields is refused (413), and so is a field whose Content-Disposition is over
MAX_DISPOSITION_LENGTH characters (400), before its parameters are parsed. aiohttp
read a megabyte of them, and wrote a plain-text warning to stderr for each parameter
it did not like: a 1 MB form held the event loop ~1.2 s and wrote ~150,000 lines.
A body must arrive within BODY_TIMEOUT (408 REQUEST_TIMEOUT), as a request's
head must (nixery.http.server). A client that hangs up before its body is in
is recorded as 499 CLIENT_CLOSED_REQUEST, the client's doing, not a 500.
"""

from __future__ import annotations

import asyncio
import io
import json
import warnings
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import BodyPartReader, hdrs, http_exceptions, multipart, web
from multidict import MultiDict, MultiDictProxy

from nixery.errors import ClientClosedRequest, RequestInvalid, RequestTimeout, RequestTooLarge
from nixery.registry.mediatypes import OCTET_STREAM

T = TypeVar("T")

#: The JSON bodies read here name an image and a tag (at most 100 names of 128 characters): a
#: bigger one is refused before it is parsed, as parsing a megabyte holds the event loop.
MAX_JSON_BYTES = 64 << 10

#: The longest form body read: aiohttp's own limit (its `client_max_size`, which the app keeps).
MAX_FORM_BYTES = 1 << 20

#: The longest Content-Type read (a multipart boundary is at most 70 characters): aiohttp parses
#: the header with Python's email parser, which took ~2 s for 15,000 semicolons, on the event
#: loop, and raised RecursionError on thousands of nested comments.
MAX_CONTENT_TYPE_LENGTH = 256

#: The most fields a multipart form may have: the forms read here have a few (`image` and `tag`;
#: the token endpoint's grant_type, username, password, scope, service, client_id). aiohttp's
#: own limit is 1,000, which took ~0.1 s of the event loop for a form of 53 KB.
MAX_FORM_FIELDS = 16

#: The longest Content-Disposition of a multipart form's field that is read (`form-data;
#: name="image"`, with a file name at most a few hundred characters). aiohttp parses its
#: parameters in Python, twice, on the event loop: 120 fields of 8 KiB each held it 0.4 s.
MAX_DISPOSITION_LENGTH = 1024

#: Seconds a client has to send a body once its head has come (NIXERY_HEADER_TIMEOUT, set by
#: nixery.app; none if unset): aiohttp waits for a body as long as the client keeps the connection.
BODY_TIMEOUT = web.AppKey("body_timeout", float)

#: What aiohttp raises for a body it cannot read or decode.
_UNREADABLE = (web.RequestPayloadError, http_exceptions.BadHttpMessage, ValueError, LookupError)


def content_type(request: web.Request) -> str:
    """The request body's media type; RequestInvalid for a Content-Type too long to be one."""
    length = len(request.headers.get("Content-Type", ""))
    if length > MAX_CONTENT_TYPE_LENGTH:
        raise RequestInvalid(
            f"the Content-Type header is {length} characters long; at most {MAX_CONTENT_TYPE_LENGTH} are read",
            detail={"limit": MAX_CONTENT_TYPE_LENGTH},
        )
    return request.content_type


#: The media types `read_form` reads as a form.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def holds_form(request: web.Request) -> bool:
    """Whether the request's body is a form (or there is none: an empty form). A body of another
    type (`text/plain`) read as a form was one without fields, and its error said that instead."""
    return not request.body_exists or content_type(request) in FORM_TYPES


async def read_form(request: web.Request) -> MultiDictProxy[Any]:
    """The fields of a url-encoded or multipart form (empty for any other body)."""
    kind = content_type(request)
    _check_declared_length(request, MAX_FORM_BYTES)
    try:
        if kind == "multipart/form-data":
            return await _in_time(request, _multipart_form(request))
        return await _in_time(request, request.post())
    except _UNREADABLE:
        raise RequestInvalid(f"the request body is not a well-formed {kind} form") from None


async def _multipart_form(request: web.Request) -> MultiDictProxy[Any]:
    """A multipart form's fields, as aiohttp's `post()` reads them (text, or a FileField for a
    file), within MAX_FORM_FIELDS, MAX_DISPOSITION_LENGTH and MAX_FORM_BYTES."""
    reader = await request.multipart()
    fields: MultiDict[Any] = MultiDict()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise RequestInvalid("the request body is not a well-formed multipart/form-data form: a part is multipart")
        if len(fields) >= MAX_FORM_FIELDS:
            raise RequestTooLarge(
                f"a form may have at most {MAX_FORM_FIELDS} fields", detail={"limit": MAX_FORM_FIELDS}
            )
        if len(part.headers.get(hdrs.CONTENT_DISPOSITION, "")) > MAX_DISPOSITION_LENGTH:
            raise RequestInvalid(
                f"a form field's Content-Disposition may be at most {MAX_DISPOSITION_LENGTH} characters long",
                detail={"limit": MAX_DISPOSITION_LENGTH},
            )
        if part.name is None:
            raise ValueError("a form field without a name")
        data = bytearray()
        while chunk := await part.read_chunk():
            if request.content.total_bytes > MAX_FORM_BYTES:
                raise RequestTooLarge(
                    f"a request body may be at most {MAX_FORM_BYTES} bytes", detail={"limit": MAX_FORM_BYTES}
                )
            data.extend(chunk)
        try:
            value = part.decode(data)  # its Content-Transfer-Encoding (form fields have no Content-Encoding)
        except RuntimeError:  # one aiohttp does not know
            raise ValueError("an unknown Content-Transfer-Encoding") from None
        field_type = part.headers.get(hdrs.CONTENT_TYPE)
        if part.filename:
            file = io.BytesIO(bytes(value))
            fields.add(
                part.name, web.FileField(part.name, part.filename, file, field_type or OCTET_STREAM, part.headers)
            )
        elif field_type is None or field_type.startswith("text/"):
            fields.add(part.name, bytes(value).decode(part.get_charset(default="utf-8")))
        else:
            fields.add(part.name, bytes(value))
    return MultiDictProxy(fields)


def quiet_form_warnings() -> None:
    """aiohttp warns (BadContentDispositionHeader, BadContentDispositionParam) of each malformed
    parameter of a form field's Content-Disposition, a client's doing: Python wrote each one to
    stderr, plain text among the log's JSON lines, thousands for one request."""
    warnings.filterwarnings("ignore", category=multipart.BadContentDispositionHeader)
    warnings.filterwarnings("ignore", category=multipart.BadContentDispositionParam)


async def read_json(request: web.Request) -> Any:
    """The body parsed as JSON, if it is at most MAX_JSON_BYTES long."""
    content_type(request)  # its charset is read to decode the body
    _check_declared_length(request, MAX_JSON_BYTES)
    try:
        text = await _in_time(request, request.text())  # in full (up to aiohttp's limit): the connection is reused
    except _UNREADABLE:
        raise RequestInvalid("the request body cannot be read: its charset or Content-Encoding is wrong") from None
    if len(text) > MAX_JSON_BYTES:
        raise RequestTooLarge(
            f"a JSON request body may be at most {MAX_JSON_BYTES} bytes", detail={"limit": MAX_JSON_BYTES}
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
        raise RequestInvalid("the request body is not valid JSON") from None


def _check_declared_length(request: web.Request, limit: int) -> None:
    """A body whose Content-Length passes `limit` is refused before any of it is read: it was
    waited for (until the body timeout, 408), only to be refused once it came."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(
            f"the request body is {request.content_length} bytes long; at most {limit} are read",
            detail={"limit": limit},
        )


async def _in_time(request: web.Request, reading: Awaitable[T]) -> T:
    seconds = request.app.get(BODY_TIMEOUT)
    try:
        async with asyncio.timeout(seconds):
            return await reading
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {seconds:g} seconds", detail={"seconds": seconds}
        ) from None
    except ConnectionResetError:  # aiohttp's word for a connection lost while a body is read
        raise ClientClosedRequest("the client closed the connection before its request body arrived") from None
