"""Errors that reach a client, as a catalogue of registry error codes.

    RegistryError                 code, HTTP status, message, detail
    ├── RequestInvalid            400 REQUEST_INVALID   not parseable HTTP (request line, header); input never echoed
    ├── NameInvalid               400 NAME_INVALID      image path is not a valid list of packages
    ├── TagInvalid                400 TAG_INVALID       tag is not a valid tag / git ref
    ├── DigestInvalid             400 DIGEST_INVALID    not a sha256 digest
    ├── NameUnknown               404 NAME_UNKNOWN
    ├── ManifestUnknown           404 MANIFEST_UNKNOWN  unknown packages, unknown refs
    ├── BlobUnknown               404 BLOB_UNKNOWN
    ├── Unsupported               405 UNSUPPORTED       push, delete
    ├── Unauthorized              401 UNAUTHORIZED      no or bad credentials; carries a WWW-Authenticate challenge
    ├── Denied                    403 DENIED            the user lacks the permission (e.g. to build), a cross-site post
    ├── RequestTooLarge           413 REQUEST_TOO_LARGE the request body is over the limit
    ├── TooManyRequests           429 TOOMANYREQUESTS
    ├── BuildFailed               500 BUILD_FAILED      Nix evaluation or build failed
    ├── BuildTimeout              504 BUILD_TIMEOUT     NIX_TIMEOUT elapsed
    ├── StorageUnavailable        503 STORAGE_UNAVAILABLE  the storage backend did not answer
    ├── StorageFull               507 STORAGE_FULL      no space left where storage writes (names where)
    ├── SourceUnavailable         502 SOURCE_UNAVAILABLE   a git repository or channel did not answer
    └── InternalError             500 UNKNOWN           a bug; details only in the log

Every module raises these (or its own errors, mapped here by the HTTP layer);
one middleware turns them into `{"errors": [{"code", "message", "detail"}]}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class RegistryError(Exception):
    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(self, message: str, detail: Any = None, *, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        #: Extra response headers, e.g. the `WWW-Authenticate` challenge of a 401.
        self.headers: dict[str, str] = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        return {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}


class RequestInvalid(RegistryError):
    """The request is not HTTP that can be parsed."""

    code = "REQUEST_INVALID"
    status = 400


class NameInvalid(RegistryError):
    """The image name is not valid."""

    code = "NAME_INVALID"
    status = 400


class TagInvalid(RegistryError):
    """The tag is not valid."""

    code = "TAG_INVALID"
    status = 400


class DigestInvalid(RegistryError):
    """The digest is not valid."""

    code = "DIGEST_INVALID"
    status = 400


class NameUnknown(RegistryError):
    """No such repository."""

    code = "NAME_UNKNOWN"
    status = 404


class ManifestUnknown(RegistryError):
    """No such manifest."""

    code = "MANIFEST_UNKNOWN"
    status = 404


class BlobUnknown(RegistryError):
    """No such blob."""

    code = "BLOB_UNKNOWN"
    status = 404


class Unsupported(RegistryError):
    """The operation is not supported."""

    code = "UNSUPPORTED"
    status = 405


class Unauthorized(RegistryError):
    """Authentication is required."""

    code = "UNAUTHORIZED"
    status = 401


class Denied(RegistryError):
    """Access is denied."""

    code = "DENIED"
    status = 403


class RequestTooLarge(RegistryError):
    """The request body is larger than the registry accepts."""

    code = "REQUEST_TOO_LARGE"
    status = 413


class TooManyRequests(RegistryError):
    """Too many requests."""

    code = "TOOMANYREQUESTS"
    status = 429


class BuildFailed(RegistryError):
    """Nix could not evaluate or build the image."""

    code = "BUILD_FAILED"
    status = 500


class BuildTimeout(RegistryError):
    """The build took longer than NIX_TIMEOUT."""

    code = "BUILD_TIMEOUT"
    status = 504


class StorageUnavailable(RegistryError):
    """The storage backend did not answer."""

    code = "STORAGE_UNAVAILABLE"
    status = 503


class StorageFull(RegistryError):
    """No space is left where the storage writes; what is stored is still served."""

    code = "STORAGE_FULL"
    status = 507


class SourceUnavailable(RegistryError):
    """The package source (git repository, channel) could not be reached."""

    code = "SOURCE_UNAVAILABLE"
    status = 502


class InternalError(RegistryError):
    """Something failed that should not have; the log has the details."""

    code = "UNKNOWN"
    status = 500
