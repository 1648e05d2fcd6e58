"""Errors that reach a client: typed exceptions, each a code of the distribution spec
(the only codes strict clients accept) and a kind of this registry's own.

The answer is `{"errors": [{"code", "message", "detail"}]}`: `code` is one of the
OCI distribution spec's codes, or `UNKNOWN`/`UNAVAILABLE` as distribution's errcode
catalogue uses them; `detail.kind` says which of this registry's errors it is
(`BUILD_FAILED`, `STORAGE_FULL`, ...), and is what clients that know this registry
read. docs/errors.md is the catalogue: every kind, its code, status and meaning.

Every module raises these (or its own errors, mapped by the HTTP layer in
`nixery.http.errors`); one middleware turns them into the JSON body.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class RegistryError(Exception):
    #: A code of the distribution spec: what every client can parse.
    code: ClassVar[str] = "UNKNOWN"
    #: This registry's own name for the error, sent as `detail.kind`.
    kind: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(
        self, message: str, detail: Mapping[str, Any] | None = None, *, headers: Mapping[str, str] | None = None
    ):
        super().__init__(message)
        self.message = message
        self.detail = detail
        #: Extra response headers, e.g. the `WWW-Authenticate` challenge of a 401.
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        detail = {**(self.detail or {}), "kind": self.kind}
        return {"errors": [{"code": self.code, "message": self.message, "detail": detail}]}


class RequestInvalid(RegistryError):
    """The request is not HTTP that can be parsed, its body cannot be read, or a query
    parameter is not valid."""

    code = "UNSUPPORTED"
    kind = "REQUEST_INVALID"
    status = 400


class NameInvalid(RegistryError):
    """The image name is not valid."""

    code = "NAME_INVALID"
    kind = "NAME_INVALID"
    status = 400


class TagInvalid(RegistryError):
    """The tag is not valid."""

    code = "NAME_INVALID"
    kind = "TAG_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    """The digest is not valid."""

    code = "DIGEST_INVALID"
    kind = "DIGEST_INVALID"
    status = 400


class NameUnknown(RegistryError):
    """No such repository."""

    code = "NAME_UNKNOWN"
    kind = "NAME_UNKNOWN"
    status = 404


class ManifestUnknown(RegistryError):
    """No such manifest."""

    code = "MANIFEST_UNKNOWN"
    kind = "MANIFEST_UNKNOWN"
    status = 404


class BlobUnknown(RegistryError):
    """No such blob."""

    code = "BLOB_UNKNOWN"
    kind = "BLOB_UNKNOWN"
    status = 404


class BlobUploadUnknown(RegistryError):
    """No such upload session (a pull-only registry has none)."""

    code = "BLOB_UPLOAD_UNKNOWN"
    kind = "BLOB_UPLOAD_UNKNOWN"
    status = 404


class Unsupported(RegistryError):
    """The operation is not supported."""

    code = "UNSUPPORTED"
    kind = "UNSUPPORTED"
    status = 405


class Unauthorized(RegistryError):
    """Authentication is required."""

    code = "UNAUTHORIZED"
    kind = "UNAUTHORIZED"
    status = 401


class Denied(RegistryError):
    """Access is denied."""

    code = "DENIED"
    kind = "DENIED"
    status = 403


class RequestTooLarge(RegistryError):
    """The request body is larger than the registry accepts."""

    code = "SIZE_INVALID"
    kind = "REQUEST_TOO_LARGE"
    status = 413


class RequestTimeout(RegistryError):
    """The request's body did not arrive in time."""

    code = "UNSUPPORTED"
    kind = "REQUEST_TIMEOUT"
    status = 408


class ClientClosedRequest(RegistryError):
    """The client hung up before its request's body arrived, or while its pull waited for a
    build (`nixery.http.departures`): nobody reads the answer, which the access log and the
    metrics record with nginx's status for this, 499 (not a 500)."""

    code = "UNSUPPORTED"
    kind = "CLIENT_CLOSED_REQUEST"
    status = 499


class PreconditionFailed(RegistryError):
    """An `If-Match` names none of the blob's ETags (its digest)."""

    code = "UNSUPPORTED"
    kind = "PRECONDITION_FAILED"
    status = 412


class ExpectationFailed(RegistryError):
    """An `Expect` header asks for something other than `100-continue`."""

    code = "UNSUPPORTED"
    kind = "EXPECTATION_FAILED"
    status = 417


class RangeNotSatisfiable(RegistryError):
    """A blob's requested byte range starts at or past its end."""

    code = "SIZE_INVALID"
    kind = "RANGE_NOT_SATISFIABLE"
    status = 416


class TooManyRequests(RegistryError):
    """Too many requests."""

    code = "TOOMANYREQUESTS"
    kind = "TOOMANYREQUESTS"
    status = 429


class BuildFailed(RegistryError):
    """Nix could not evaluate or build the image."""

    code = "UNKNOWN"
    kind = "BUILD_FAILED"
    status = 500


class BuildTimeout(RegistryError):
    """The build took longer than NIX_TIMEOUT."""

    code = "UNAVAILABLE"
    kind = "BUILD_TIMEOUT"
    status = 504


class BuildStopped(RegistryError):
    """The registry is shutting down and stopped the build a request waited for: another
    replica, or this one once it is back, builds the image again."""

    code = "UNAVAILABLE"
    kind = "BUILD_STOPPED"
    status = 503


class StorageUnavailable(RegistryError):
    """The storage backend did not answer."""

    code = "UNAVAILABLE"
    kind = "STORAGE_UNAVAILABLE"
    status = 503


class StorageFull(RegistryError):
    """No space is left where the storage writes; what is stored is still served."""

    code = "UNAVAILABLE"
    kind = "STORAGE_FULL"
    status = 507


class SourceUnavailable(RegistryError):
    """The package source (git repository, channel) could not be reached."""

    code = "UNAVAILABLE"
    kind = "SOURCE_UNAVAILABLE"
    status = 502


class InternalError(RegistryError):
    """Something failed that should not have; the log has the details."""

    code = "UNKNOWN"
    kind = "INTERNAL_ERROR"
    status = 500
