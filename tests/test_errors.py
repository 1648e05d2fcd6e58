"""Error codes clients can parse: every error the registry can send carries a code of the
distribution spec and its own kind in `detail.kind`, and docs/errors.md lists them all."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

from nixery import errors
from nixery.http.errors import registry_error
from nixery.nix import errors as nix_errors
from nixery.singleflight import WorkStopped
from nixery.storage import base as storage_errors

#: The OCI distribution spec's error codes (spec.md, "Error Codes", code-1 to code-14) ...
OCI_DISTRIBUTION_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID", "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID", "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED",
    "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS",
}  # fmt: skip
#: ... and the two distribution's errcode catalogue adds (registry/api/errcode/register.go).
DISTRIBUTION_ERRCODE_CODES = {"UNKNOWN", "UNAVAILABLE"}

CATALOGUE = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def _kinds() -> list[type[errors.RegistryError]]:
    # Every module imported first: a kind defined outside nixery/errors.py is found whichever
    # tests ran before (one in nixery/http/routes.py was seen only in a full run).
    import nixery

    for module in pkgutil.walk_packages(nixery.__path__, "nixery."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found, pending = [], [errors.RegistryError]
    while pending:
        subclasses = pending.pop().__subclasses__()
        found.extend(subclasses)
        pending.extend(subclasses)
    return found


def test_every_code_the_registry_sends_is_one_clients_accept() -> None:
    kinds = _kinds()
    assert len(kinds) >= 18  # the catalogue of nixery/errors.py, found by walking the subclasses
    for kind in kinds:
        assert kind.code in OCI_DISTRIBUTION_CODES | DISTRIBUTION_ERRCODE_CODES, (kind.__name__, kind.code)
    assert len({kind.kind for kind in kinds}) == len(kinds), "two errors share a kind"


def test_the_catalogue_lists_every_kind_with_its_code_and_status() -> None:
    rows = re.findall(r"^\| `([A-Z_]+)` \| `([A-Z_]+)` \| (\d{3}) \|", CATALOGUE.read_text(), re.MULTILINE)
    assert sorted(rows) == sorted((kind.kind, kind.code, str(kind.status)) for kind in _kinds())


def test_the_kind_is_added_to_the_detail() -> None:
    error = errors.StorageFull("the disk is full", detail={"storage": "/srv"})
    assert error.to_json() == {"errors": [{
        "code": "UNAVAILABLE", "message": "the disk is full", "detail": {"storage": "/srv", "kind": "STORAGE_FULL"},
    }]}  # fmt: skip
    assert errors.Unsupported("pull-only").to_json()["errors"][0]["detail"] == {"kind": "UNSUPPORTED"}


@pytest.mark.parametrize(
    ("exception", "code", "kind", "status"),
    [
        (nix_errors.NixError("nix-build failed", "error: builder failed"), "UNKNOWN", "BUILD_FAILED", 500),
        (nix_errors.NixTimeout("nix-build took too long", ""), "UNAVAILABLE", "BUILD_TIMEOUT", 504),
        (nix_errors.SourceUnavailable("no answer"), "UNAVAILABLE", "SOURCE_UNAVAILABLE", 502),
        (WorkStopped("the registry is shutting down"), "UNAVAILABLE", "BUILD_STOPPED", 503),
        (storage_errors.StorageFull("/srv", "No space left on device"), "UNAVAILABLE", "STORAGE_FULL", 507),
        (RuntimeError("a bug"), "UNKNOWN", "INTERNAL_ERROR", 500),
    ],
)
def test_lower_layer_errors_keep_their_status_and_get_a_spec_code(exception, code, kind, status) -> None:
    error = registry_error(exception)
    assert (error.code, error.kind, error.status) == (code, kind, status)
    assert error.to_json()["errors"][0]["detail"]["kind"] == kind
