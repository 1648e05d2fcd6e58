"""Signatures over HTTP: cosign's `sha256-<hex>.sig` tags and the public key (docs/signing.md).

Without NIXERY_SIGNING_KEY nothing here changes what the registry serves: a
`.sig` tag is an unknown manifest, and /signing-key.pub is not found.
"""

from __future__ import annotations

import re

import structlog
from aiohttp import web

from nixery.errors import ManifestUnknown, NameUnknown
from nixery.http import hosts
from nixery.images import ImageRecord, all_attached
from nixery.registry.digest import Digest
from nixery.signatures import Signatures

log = structlog.get_logger(__name__)

SIGNATURES = web.AppKey("signatures", Signatures)
PUBLIC_KEY_PATH = "/signing-key.pub"

_SIGNATURE_TAG = re.compile(r"sha256-([0-9a-f]{64})\.sig")


def signature_subject(reference: str) -> Digest | None:
    """The manifest a cosign signature tag is about, or None for any other reference."""
    match = _SIGNATURE_TAG.fullmatch(reference)
    return Digest.parse(f"sha256:{match.group(1)}") if match else None


def _identity(request: web.Request, signatures: Signatures) -> str:
    return signatures.identity(hosts.pull_host(request), request.match_info["name"])


async def sign_pulled(request: web.Request, record: ImageRecord) -> None:
    """A tag was pulled: the image's manifests are signed for the repository it was pulled
    through (once; at once after its build), so that its signature tag answers next. So are
    the documents attached to them (SBOMs, provenance), which are manifests the registry
    serves too: `cosign verify --key ... HOST/NAME@<SBOM manifest digest>` checks that an
    SBOM found through the referrers API is the registry's."""
    signatures = request.app.get(SIGNATURES)
    if signatures is None:
        return
    identity = _identity(request, signatures)
    subjects = [descriptor.digest for descriptor in record.descriptors]
    subjects += [attached.manifest.digest for attached in all_attached(record) if attached.tag is None]
    try:
        await signatures.ensure(identity, subjects)
    except Exception as exc:  # the image is still served: only clients that require a signature refuse it
        log.warning("signing.failed", identity=identity[:300], image=record.name, error=str(exc)[:300])


async def signature_manifest_digest(request: web.Request, subject: Digest, *, recheck: bool = False) -> Digest:
    """The digest of the signature manifest of `subject` in this repository; `recheck`: the one
    known was not served (a blob of it gone), so its blobs are looked for again, and it is made
    again if they are gone (`Signatures.find`)."""
    signatures = request.app.get(SIGNATURES)
    found = (
        await signatures.find(_identity(request, signatures), subject, recheck=recheck)
        if signatures is not None else None
    )
    if found is None:
        raise ManifestUnknown(
            f"no signature of {subject} in this repository",
            detail={"digest": str(subject), "signing": signatures is not None},
        )
    return found.manifest.digest


async def public_key(request: web.Request) -> web.Response:
    signatures = request.app.get(SIGNATURES)
    if signatures is None:
        # Said as the registry's error: a web.HTTPNotFound's text was lost for "no such endpoint".
        raise NameUnknown("this registry does not sign its images (NIXERY_SIGNING_KEY is not set): it has no key")
    return web.Response(body=signatures.key.public_pem, content_type="application/x-pem-file")


def add_routes(app: web.Application) -> None:
    app.router.add_get(PUBLIC_KEY_PATH, public_key)
