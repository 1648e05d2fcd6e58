"""The OCI 1.1 referrers API, and its tag schema for older clients.

    GET /v2/<name>/referrers/<digest>[?artifactType=<type>]
        an OCI image index of the manifests whose `subject` is <digest> (the SBOMs and
        provenance statements of an image manifest, `nixery.attachments`): each entry with
        its artifactType and annotations. A digest no image has: an empty index, 200 (as
        distribution-spec requires). With `artifactType` (repeated: any of them), only the
        entries of that type, and the `OCI-Filters-Applied: artifactType` header says the
        filter was applied.

    GET|HEAD /v2/<name>/manifests/sha256-<hex>
        the same index (unfiltered) under the referrers tag schema; 404 MANIFEST_UNKNOWN
        when there are none, as for any tag a registry does not have. The index is stored
        as a blob when it is served, so that the digest it is served with
        (Docker-Content-Digest) names a manifest the registry serves by digest too.

    GET|HEAD /v2/<name>/manifests/sha256-<hex>.<suffix>
        cosign's signature of <hex> for this repository (`sha256-<hex>.sig`, `nixery.signatures`);
        any other suffix: 404 MANIFEST_UNKNOWN. So is any other tag that starts with
        `sha256-` (nixery.http.routes, nixery.registry.names), not the image as for a tag of the package set.

As for manifests by digest, the digest is the answer's key and the repository name is
only checked (every name of an image serves the same manifests).
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from nixery.errors import ManifestUnknown
from nixery.http import ranges, routes
from nixery.http.signatures import signature_manifest_digest, signature_subject
from nixery.images import Attached
from nixery.lru import LRU
from nixery.maintenance import BLOB_GRACE
from nixery.registry.descriptors import image_index
from nixery.registry.digest import Digest, names_another_algorithm
from nixery.registry.mediatypes import OCI_INDEX
from nixery.registry.names import ATTACHMENT_TAG_PATTERN, ATTACHMENT_TAG_PREFIX
from nixery.storage.base import StorageError

log = structlog.get_logger(__name__)

_PREFIX = len(ATTACHMENT_TAG_PREFIX) + 64  # the tag of a subject, before any suffix


async def _referrers(request: web.Request, subject: Digest) -> list[Attached]:
    """The referrers of `subject`: its attached documents that have no tag of their own."""
    found = await request.app[routes.BUILDER].images.referrers(subject)
    return [attached for attached in found if attached.tag is None]


async def referrers(request: web.Request) -> web.Response:
    routes.check_image_name(request)
    subject = request.match_info["digest"]
    # A well-formed sha512 digest: nothing here refers to one, an empty index as for any such digest.
    listed = [] if names_another_algorithm(subject) else await _referrers(request, Digest.parse(subject))
    headers = {"Content-Type": OCI_INDEX}
    if artifact_types := requested_artifact_types(request):
        listed = [attached for attached in listed if attached.manifest.artifact_type in artifact_types]
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=image_index([attached.manifest for attached in listed]), headers=headers)


def requested_artifact_types(request: web.Request) -> frozenset[str]:
    """The `artifactType` values a referrers request filters by; empty: no filter. Each repeat
    counts (`?artifactType=A&artifactType=B` lists both kinds, not A's alone as the first value
    would), and an empty value (`?artifactType=$UNSET`) filters nothing rather than everything."""
    # A media type has no spaces: one is a `+` sent unencoded (`?artifactType=application/spdx+json`).
    return frozenset(value.replace(" ", "+") for value in request.query.getall("artifactType", ()) if value.strip())


async def tagged(request: web.Request) -> web.Response:
    """A manifest by an attachment tag: the referrers index, or a cosign signature."""
    routes.check_image_name(request)
    reference = request.match_info["reference"]  # the route's pattern: ATTACHMENT_TAG_PATTERN
    subject = Digest.parse("sha256:" + reference[len(ATTACHMENT_TAG_PREFIX) : _PREFIX])
    if len(reference) == _PREFIX:
        listed = await _referrers(request, subject)
        if not listed:
            raise ManifestUnknown(f"no documents refer to {subject}", detail={"tag": reference})
        document, media_type = image_index([attached.manifest for attached in listed]), OCI_INDEX
        digest = await _stored_index(request, document)
    elif signature_subject(reference) is not None:  # cosign's `sha256-<hex>.sig`: signed per repository
        digest = await signature_manifest_digest(request, subject)
        try:
            document, media_type = await routes.stored_manifest(request, digest, check_blobs=True)
        except ManifestUnknown:  # a blob of it gone since it was made (set aside as damaged): made again
            digest = await signature_manifest_digest(request, subject, recheck=True)
            document, media_type = await routes.stored_manifest(request, digest, check_blobs=True)
    else:
        raise ManifestUnknown(f"no manifest tagged {reference}", detail={"tag": reference})
    headers = routes.content_headers(digest, media_type)
    if ranges.not_modified(request.headers, headers["ETag"]):
        return web.Response(status=304, headers=headers)
    if request.method == "HEAD":
        return web.Response(headers={**headers, "Content-Length": str(len(document))})
    return web.Response(body=document, headers=headers)


#: A referrers index stored this recently is not stored again: gc keeps any blob touched within
#: its grace period, so a tag that clients ask for often costs storage a touch per half grace
#: period (half an hour) instead of one per request.
STORE_AGAIN_AFTER = BLOB_GRACE / 2
_STORED_INDEXES: web.AppKey[LRU[Digest, float]] = web.AppKey("stored_referrers_indexes", LRU)


async def _stored_index(request: web.Request, document: bytes) -> Digest:
    """The digest of a referrers index served under its tag, stored as a blob: a client that
    resolves the tag and then fetches the manifest by the digest it was given (containerd,
    oras) got 404 for a manifest that the registry had just served. Left to gc once no tag
    answer has stored it for a while, as any blob no image names; the tag is served when
    storage cannot keep it (the fetch by digest alone fails then)."""
    digest, stored = Digest.of(document), request.app[_STORED_INDEXES]
    last = stored.get(digest)
    if last is not None and time.monotonic() - last < STORE_AGAIN_AFTER:
        return digest
    try:
        await request.app[routes.STORAGE].put_blob_bytes(document)
    except (StorageError, OSError) as exc:
        log.warning("referrers.index_not_stored", error=str(exc)[:300])
        return digest
    stored.put(digest, time.monotonic())
    return digest


def add_routes(app: web.Application) -> None:
    """Before `routes.add_routes`: an attachment tag is not a tag that names a package set."""
    app[_STORED_INDEXES] = LRU(4096)
    app.router.add_get(f"/v2/{routes.NAME}/referrers/{routes.DIGEST}", referrers)
    tag = f"{{reference:{ATTACHMENT_TAG_PATTERN}}}"
    app.router.add_route("GET", f"/v2/{routes.NAME}/manifests/{tag}", tagged)
    app.router.add_route("HEAD", f"/v2/{routes.NAME}/manifests/{tag}", tagged)
