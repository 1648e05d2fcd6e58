"""The one place where errors become responses.

Handlers raise; this middleware maps lower-layer errors (Nix, storage,
aiohttp's own 404/405/413) to registry errors and writes the registry's JSON error
body: a code of the distribution spec, the registry's own kind in `detail.kind`
(docs/errors.md). No traceback ever reaches a client.

A full disk (storage's StorageFull, or an untyped ENOSPC/EDQUOT from a write
outside the storage interface) is 507, kind STORAGE_FULL, counted per refused
request (`nixery_storage_full_total`) and logged as an error at most once a
minute: a full disk fails every build, and every layer of each, until space
is made.

A 5xx answer also says its message in the status line's reason phrase: registry
clients (docker, podman, skopeo, containerd's ctr) read the JSON body of a 4xx
answer only, and of a 5xx print the status line alone ("received unexpected
HTTP status: 502 Bad Gateway"), which told a user nothing of why.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web

from nixery import errors, metrics
from nixery.http import pages
from nixery.logs import Throttle
from nixery.nix import errors as nix_errors
from nixery.platforms import PlatformFailed
from nixery.registry.names import platform_hint
from nixery.singleflight import WorkStopped
from nixery.storage import base as storage_errors

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def registry_error(exc: BaseException) -> errors.RegistryError:
    """The registry error a client sees for any exception."""
    match exc:
        case errors.RegistryError():
            return exc
        case PlatformFailed():  # one platform's build of an image of several: its error, naming it
            cause = registry_error(exc.cause)
            detail = {**(cause.detail or {}), "platform": exc.platform}
            return type(cause)(f"building the {exc.platform} image failed: {cause.message}", detail=detail,
                               headers=cause.headers)
        case nix_errors.PackagesNotFound():
            # Another platform's set lacks them (`detail.platform`), the host's may have them.
            platform: dict[str, Any] = {"platform": exc.platform} if exc.platform else {}
            if exc.elsewhere:  # names the host platform's set has: `{"libcpuid16": "linux/amd64"}`
                platform["elsewhere"] = exc.elsewhere
            hint = platform_hint(exc.missing)  # `riscv64/shell`: a platform prefix this registry lacks
            return errors.ManifestUnknown(
                f"{exc.message}; {hint}" if hint else exc.message,
                detail={"missing": exc.missing, "suggestions": exc.suggestions, **platform,
                        **({"hint": hint} if hint else {})},
            )
        case nix_errors.RefNotFound():
            return errors.ManifestUnknown(exc.message)
        case nix_errors.RefInvalid():
            return errors.TagInvalid(exc.message, detail={"tag": exc.ref})
        case nix_errors.UnsupportedSystem():
            return errors.ManifestUnknown(exc.message, detail={"log": exc.log_tail or None})
        case nix_errors.SourceUnavailable():
            return errors.SourceUnavailable(exc.message, detail={"log": exc.log_tail or None})
        case nix_errors.NixTimeout():
            return errors.BuildTimeout(f"{exc.message}; the next request retries", detail={"log": exc.log_tail})
        case nix_errors.NixError():
            tail = "\n".join(exc.log_tail.splitlines()[-8:])
            return errors.BuildFailed(f"{exc.message}:\n{tail}" if tail else exc.message, detail={"log": exc.log_tail})
        case WorkStopped():  # the registry is shutting down (nixery.http.shutdown)
            return errors.BuildStopped(str(exc) or "the registry is shutting down and stopped the build")
        case storage_errors.BlobNotFound():
            return errors.BlobUnknown(str(exc), detail={"digest": str(exc.digest)})
        case storage_errors.BackendUnavailable():
            return errors.StorageUnavailable(str(exc), detail={"backend": exc.backend})
        case storage_errors.StorageFull():
            return errors.StorageFull(str(exc), detail={"storage": exc.where})
        case OSError() if exc.errno in storage_errors.FULL_DISK_ERRNOS:  # a write outside the storage interface
            where = f"the file system of {exc.filename}" if exc.filename else "the registry's file system"
            return errors.StorageFull(f"{where} is full: {os.strerror(exc.errno)}", detail={"storage": where})
        case web.HTTPMethodNotAllowed():  # a page's (the registry API's are routes.unsupported)
            allowed = ", ".join(sorted(exc.allowed_methods))
            return errors.Unsupported(
                f"method {exc.method} is not allowed here; this path answers {allowed}", headers={"Allow": allowed}
            )
        case web.HTTPNotFound():
            return errors.NameUnknown("no such endpoint or repository")
        case web.HTTPExpectationFailed():  # aiohttp's message quotes the header: never sent back
            return errors.ExpectationFailed("the only expectation this registry meets is Expect: 100-continue")
        case web.HTTPRequestEntityTooLarge():
            return errors.RequestTooLarge("request body too large", detail={"reason": exc.text})
        case _:
            return errors.InternalError("internal error; see the registry's log")


#: Most characters of a message that a 5xx answer's status line carries.
REASON_MESSAGE_CHARS = 300


def reason_phrase(error: errors.RegistryError) -> str | None:
    """The status line's reason phrase for `error`: for a 5xx, the standard phrase and the message
    on one line of printable ASCII (`500 Internal Server Error: cannot build ...`), as clients print
    nothing else of a 5xx answer; None (the standard phrase) otherwise."""
    if error.status < 500:
        return None
    try:
        standard = HTTPStatus(error.status).phrase
    except ValueError:
        standard = "Server Error"
    message = " ".join(error.message.split())
    message = "".join(c if " " <= c <= "~" else "?" for c in message)
    if len(message) > REASON_MESSAGE_CHARS:
        message = message[: REASON_MESSAGE_CHARS - 3] + "..."
    return f"{standard}: {message}" if message else standard


def error_response(error: errors.RegistryError) -> web.Response:
    # To a HEAD, aiohttp sends the headers alone: the Content-Length says how long the body would be.
    return web.json_response(error.to_json(), status=error.status, reason=reason_phrase(error), headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as the registry's JSON error; for a browser on a web page, as an HTML
    page with the same message and status (`nixery.http.pages`)."""
    try:
        return await handler(request)
    except web.HTTPRedirection:
        raise
    except web.HTTPSuccessful:
        raise
    except Exception as exc:  # every failure becomes a registry error
        error = registry_error(exc)
        if isinstance(error, errors.InternalError):
            log.exception("http.internal_error", path=request.path[:300], method=request.method)
        elif isinstance(error, errors.StorageFull):
            _report_storage_full(error)
        elif error.status >= 500:
            log.warning(
                "http.error", status=error.status, code=error.code, kind=error.kind, message=error.message[:500]
            )
        error_page = request.app.get(pages.ERROR_PAGE)
        if error_page is not None and pages.wants_error_page(request):
            response = error_page(request, error)
            response.headers.update(error.headers)  # a 401's challenge: how a browser comes to ask for a password
            return response
        return error_response(error)


#: One error line a minute about a full storage; every refusal is counted in the metric.
_storage_full_lines = Throttle(60.0)


def _report_storage_full(error: errors.StorageFull) -> None:
    metrics.storage_full()
    held_back = _storage_full_lines.due()
    if held_back is not None:
        log.error("storage.full", message=error.message[:500], refused_since_last_line=held_back,
                  note="stored images are still served; new ones are refused until space is made")
