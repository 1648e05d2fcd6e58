"""The registry API (pull only): `/v2/`, manifests and blobs.

Handlers parse and validate at the edge (names, tags, digests), ask the image
builder or storage, and turn the answer into headers. Errors are raised and
rendered by `nixery.http.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
from collections.abc import Sequence
from typing import BinaryIO, Protocol

import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from nixery import metrics
from nixery.builder import ImageBuilder
from nixery.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RequestInvalid,
    Unsupported,
)
from nixery.http import hosts, ranges
from nixery.http.departures import unless_client_leaves
from nixery.http.guidance import progress_path
from nixery.http.signatures import sign_pulled
from nixery.lru import LRU
from nixery.platforms import every_platform
from nixery.progress import Build
from nixery.registry.descriptors import parse_manifest
from nixery.registry.digest import Digest, names_another_algorithm
from nixery.registry.image import layer_compression
from nixery.registry.mediatypes import OCTET_STREAM
from nixery.registry.names import ImageRequest, check_image_tag, parse_image_name
from nixery.registry.negotiation import check_acceptable, check_client_unpacks, choose, unpacks_zstd
from nixery.storage.base import BlobNotFound, ByteStream, LocalFile, Redirect, Storage

BUILDER = web.AppKey("builder", ImageBuilder)
STORAGE = web.AppKey("storage", Storage)
BLOB_REDIRECT = web.AppKey("blob_redirect", bool)
#: With nginx in front: blob files are named in X-Accel-Redirect under this prefix and nginx sends them.
BLOB_ACCEL_REDIRECT = web.AppKey("blob_accel_redirect", str)  # "": off
MANIFESTS: web.AppKey[ManifestCache] = web.AppKey("manifests")


class ImageResolver(Protocol):
    """Maps a repository name and tag to the image to build, when the name is
    not a list of packages (declared images, e.g. NixImage resources)."""

    async def resolve(self, name: str, tag: str) -> ImageRequest | None: ...

    async def tags(self, name: str) -> list[str]:
        """The tags `name` is declared under, sorted; none for a name read as packages."""
        ...

    def declared_as(self, name: str, architecture: str) -> tuple[str, str] | None:
        """`(name, tag)` of a declared image of one platform, `architecture`, whose packages `name`
        lists as an image record names them; None when there is none."""
        ...


#: Optional: consulted before a name is read as a list of packages.
RESOLVER = web.AppKey("resolver", ImageResolver)

log = structlog.get_logger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}


def is_registry_path(path: str) -> bool:
    """Whether a request path is the registry API's (`/v2` and everything under it)."""
    return path == "/v2" or path.startswith("/v2/")


async def api_version_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer under /v2, errors included, names the API version, as distribution's do
    (it sets the header before routing). Added here, as each answer is sent, it is also on the
    errors that middlewares (access control, the error middleware) and the server raise, on
    unknown routes, and on redirects; only the successful answers had it."""
    if is_registry_path(request.path):
        response.headers.update(API_VERSION)


class ManifestCache:
    """Manifest bytes by digest, kept in memory: they are small and hot.

    Each is dropped when a blob it names is found missing (`forget_naming`),
    and all are dropped when `nixery gc` has removed something (`clear`,
    wired in nixery.app). A count of the cached manifests naming each blob
    lets a missing blob that none names (any digest a client makes up) cost
    nothing; one that some name costs a walk of the cache, once.

    Blobs read and found to be no manifest (a layer or a config asked for as a
    manifest) are remembered too, as their bytes never change: each such request
    read up to 4 MiB from storage again (from the bucket, on S3 or GCS)."""

    def __init__(self, capacity: int = 4096):
        # (document, media type, hex digests of the blobs it names: interned, as most are shared)
        self._items: LRU[Digest, tuple[bytes, str, tuple[str, ...]]] = LRU(capacity)
        self._named: dict[str, int] = {}  # blob (hex) -> how many cached manifests name it
        self._not_manifests: LRU[Digest, bool] = LRU(capacity)
        #: Incremented whenever manifests are dropped because storage changed under them (`clear`,
        #: `forget_naming`): a reader that read one before that puts it only if this is unchanged.
        self.generation = 0

    def get(self, digest: Digest) -> tuple[bytes, str] | None:
        item = self._items.get(digest)
        return (item[0], item[1]) if item is not None else None

    def put(
        self, digest: Digest, document: bytes, media_type: str, blobs: Sequence[Digest], *, read_at: int | None = None
    ) -> None:
        """Hold a manifest; with `read_at` (the `generation` before it was read from storage), only
        if nothing was dropped since: else it may be what `nixery gc` has just removed."""
        if read_at is not None and read_at != self.generation:
            return
        self._drop(digest)
        names = tuple(sys.intern(blob.hex) for blob in blobs)
        for name in names:
            self._named[name] = self._named.get(name, 0) + 1
        for _, (_, _, dropped_names) in self._items.put(digest, (document, media_type, names)):
            self._release(dropped_names)

    def is_not_manifest(self, digest: Digest) -> bool:
        return self._not_manifests.get(digest) is not None

    def note_not_manifest(self, digest: Digest) -> None:
        self._not_manifests.put(digest, True)

    def forget_naming(self, blob: Digest) -> None:
        """Drop the manifests that name `blob` (or are it)."""
        if blob.hex in self._named or blob in self._items:
            # Only then: a client asking for blobs that were never stored would otherwise keep
            # every manifest read meanwhile out of memory.
            self.generation += 1
        if blob.hex in self._named:
            for digest in [digest for digest, item in self._items.items() if blob.hex in item[2]]:
                self._drop(digest)
        self._drop(blob)
        self._not_manifests.pop(blob)

    def clear(self) -> None:
        self.generation += 1
        self._items.clear()
        self._named.clear()
        self._not_manifests.clear()

    def _drop(self, digest: Digest) -> None:
        item = self._items.pop(digest)
        if item is not None:
            self._release(item[2])

    def _release(self, names: tuple[str, ...]) -> None:
        for name in names:
            if (count := self._named[name] - 1) > 0:
                self._named[name] = count
            else:
                del self._named[name]


def content_headers(digest: Digest, media_type: str) -> dict[str, str]:
    return {
        "Content-Type": media_type,
        "Docker-Content-Digest": str(digest),
        "ETag": f'"{digest}"',
    }


async def api_version(request: web.Request) -> web.Response:
    return web.json_response({})


async def stored_manifest(request: web.Request, digest: Digest, *, check_blobs: bool) -> tuple[bytes, str]:
    """The manifest or index from memory, else from storage; with `check_blobs`, one read
    from storage is served only if every blob it names is stored (by digest, no image
    record vouches for them). Raises ManifestUnknown for one not stored or incomplete, and for
    a blob that is no manifest."""
    cache = request.app[MANIFESTS]
    cached = cache.get(digest)
    if cached is not None:
        return cached
    if cache.is_not_manifest(digest):
        raise ManifestUnknown(f"{digest} is not a manifest", detail={"digest": str(digest)})
    storage = request.app[STORAGE]
    generation = cache.generation  # before the reads: gc's note read meanwhile keeps this one out of memory
    size = await storage.stat_blob(digest)
    if size is None:
        raise ManifestUnknown(f"no manifest with digest {digest}", detail={"digest": str(digest)})
    if size > 4 << 20:  # manifests are small; larger blobs are layers
        cache.note_not_manifest(digest)
        raise ManifestUnknown(f"{digest} is not a manifest", detail={"digest": str(digest)})
    try:
        document = await storage.read_blob(digest)
    except BlobNotFound:  # removed since the stat
        raise ManifestUnknown(f"no manifest with digest {digest}", detail={"digest": str(digest)}) from None
    parsed = await asyncio.to_thread(parse_manifest, document)
    if parsed is None:
        cache.note_not_manifest(digest)
        raise ManifestUnknown(f"{digest} is not a manifest", detail={"digest": str(digest)})
    media_type, blobs = parsed
    if check_blobs:
        sizes = await asyncio.gather(*(storage.stat_blob(blob) for blob in blobs))
        missing = [str(blob) for blob, size in zip(blobs, sizes, strict=True) if size is None]
        if missing:
            raise ManifestUnknown(
                f"the image of manifest {digest} is no longer stored ({len(missing)} of its blobs are gone)",
                detail={"digest": str(digest), "missing": missing[:10]},
            )
    cache.put(digest, document, media_type, blobs, read_at=generation)
    return document, media_type


def requested_digest(text: str, absent: type[BlobUnknown | ManifestUnknown]) -> Digest:
    """The digest a request's path names. A well-formed digest of another algorithm (sha512,
    sha384) is `absent` (404): nothing is stored under one, and distribution answers so, where
    a malformed digest, or one of an algorithm distribution does not know, is 400 DIGEST_INVALID."""
    try:
        return Digest.parse(text)
    except DigestInvalid:
        if names_another_algorithm(text):
            raise absent(f"nothing is stored under {text}: this registry stores sha256 digests only",
                         detail={"digest": text}) from None
        raise


def _blob_gone(request: web.Request, digest: Digest) -> None:
    """A blob is not (or no longer) stored: forget what in memory names it, so that the
    next pull of its image looks in storage again and rebuilds it."""
    request.app[BUILDER].forget_images_using(digest)
    request.app[MANIFESTS].forget_naming(digest)


def check_image_name(request: web.Request) -> ImageRequest:
    """The image request in the path, read as packages."""
    _refuse_percent_encoding(request)
    return parse_image_name(request.match_info["name"])


def _refuse_percent_encoding(request: web.Request) -> None:
    """Valid names, tags and digests never need percent-encoding, so an encoded character
    (such as an encoded slash) in the path is refused outright."""
    if "%" in request.raw_path.split("?", 1)[0]:
        raise NameInvalid(
            "percent-encoded characters are not allowed in registry paths (image names, tags and digests need none)"
        )


#: Per request: the images `requested_image` found, by (name, tag).
_REQUESTED_IMAGES = web.RequestKey("requested_images", dict[tuple[str, str], ImageRequest])


async def requested_image(request: web.Request, tag: str, name: str | None = None) -> ImageRequest:
    """The image that `name` (default: the path's) names under `tag`: a declared image
    (RESOLVER) when there is one, else the name read as packages.

    The one place that reads an image out of a request, for the registry routes, the
    web pages and access control. The answer is kept on the request, so that the
    access check and the route that follows it look the declarations up once."""
    _refuse_percent_encoding(request)
    name = request.match_info["name"] if name is None else name
    found = request.setdefault(_REQUESTED_IMAGES, {})
    image = found.get((name, tag))
    if image is None:
        resolver = request.app.get(RESOLVER)
        declared = await resolver.resolve(name, tag) if resolver is not None else None
        if declared is None:  # a name without a platform is, with several NIXERY_PLATFORMS, an index
            declared = every_platform(parse_image_name(name), request.app[BUILDER].platforms)
        image = found[(name, tag)] = declared
    return image


def _log_wait(request: web.Request, image: str, tag: str, build: Build) -> None:
    progress = f"{hosts.origin(request)}{progress_path(build.id, image, tag)}"
    log.info("http.waiting_for_build", image=image, build=build.id, progress=progress)


async def manifest(request: web.Request) -> web.Response:
    check_image_name(request)
    reference = request.match_info["reference"]
    user_agent = request.headers.get("User-Agent", "")
    if ":" in reference:
        digest = requested_digest(reference, ManifestUnknown)
        document, media_type = await _manifest_by_digest(request, digest)
        # A digest may name a zstd image; the manifest is read only for a client that would fail on one.
        if not unpacks_zstd(user_agent):
            check_client_unpacks(user_agent, layer_compression(document))
        request.app[BUILDER].images.note_pull(digest)  # in use, for gc: the pull names no image
    else:
        # The route of attachment tags (nixery.http.referrers) takes only well-formed ones: any other
        # tag of their prefix is 404, not the image as if it were a tag of the package set (a client
        # asking for a signature or a referrers index would be given an image manifest).
        digest, document, media_type = await _manifest_by_tag(request, check_image_tag(reference), user_agent)
    headers = content_headers(digest, media_type)
    if ":" not in reference:  # a tag's document is chosen by Accept: caches in front keep each apart
        headers["Vary"] = "Accept"
    if ranges.not_modified(request.headers, headers["ETag"]):  # a client revalidating its copy
        return web.Response(status=304, headers=headers)
    if request.method == "HEAD":
        headers["Content-Length"] = str(len(document))
        return web.Response(headers=headers)
    return web.Response(body=document, headers=headers)


async def _manifest_by_digest(request: web.Request, digest: Digest) -> tuple[bytes, str]:
    """The manifest `digest` names; when its image lost a blob (gone, or set aside as damaged),
    the image built again first, as a pull by tag would: a pull by digest (a pinned deployment)
    got 404 until someone pulled the image by tag. Builds are deterministic: the image built
    again has the same digests. The common case costs what it did: the manifest from memory,
    the images in memory that name it checked as a pull by tag checks them (only where that
    needs no request to a bucket); storage is asked which image to rebuild only when the
    manifest is gone or incomplete."""
    builder = request.app[BUILDER]
    if not await builder.images.held_naming_servable(digest):
        request.app[MANIFESTS].forget_naming(digest)  # its image is incomplete: not served from memory
    try:
        return await stored_manifest(request, digest, check_blobs=True)
    except ManifestUnknown:  # gone, or its image lost a blob; a blob that is no manifest names no image
        rebuilt = unless_client_leaves(request, builder.rebuilt_naming(digest), "its image was built again")
        if await rebuilt is None:  # never built here, or removed by gc
            raise
    return await stored_manifest(request, digest, check_blobs=True)


async def _manifest_by_tag(request: web.Request, tag: str, user_agent: str) -> tuple[Digest, bytes, str]:
    image = await requested_image(request, tag)
    builder = request.app[BUILDER]
    accept = request.headers.getall("Accept", [])
    # Before building: a client that cannot use the image is told so at once.
    check_acceptable(accept, user_agent, builder.compression, indexed=bool(image.platforms))

    def on_wait(build: Build) -> None:
        _log_wait(request, request.match_info["name"], tag, build)

    async def chosen() -> Digest:
        record = await unless_client_leaves(request, builder.image(image, tag, on_wait=on_wait), "its image was built")
        await sign_pulled(request, record)
        return choose(record.descriptors, accept, user_agent, builder.compression).digest

    digest = await chosen()
    try:
        return digest, *await stored_manifest(request, digest, check_blobs=False)
    except ManifestUnknown:  # the record held in memory outlived its manifest: the image is built again
        _blob_gone(request, digest)
    digest = await chosen()
    return digest, *await stored_manifest(request, digest, check_blobs=False)


#: On the blobs the registry sends itself (and their 304s): a blob never changes, so a client or a
#: private cache may keep it a year, as distribution answers. Shared caches still do not keep an
#: answer to a request with credentials (RFC 9111 3.5). Not on a redirect, whose URL expires.
BLOB_CACHE_CONTROL = "max-age=31536000"


async def blob(request: web.Request) -> web.StreamResponse:
    check_image_name(request)
    digest = requested_digest(request.match_info["digest"], BlobUnknown)
    storage = request.app[STORAGE]
    headers = {**content_headers(digest, OCTET_STREAM), "Cache-Control": BLOB_CACHE_CONTROL}
    if request.method == "HEAD":
        size = await storage.stat_blob(digest)
        if size is None:
            _blob_gone(request, digest)
            raise BlobUnknown(f"blob {digest} is not stored", detail={"digest": str(digest)})
        if ranges.not_modified(request.headers, headers["ETag"]):  # as the GET would answer
            return web.Response(status=304, headers=headers)
        # The GET's headers (RFC 9110 9.3.2); a store that redirects serves ranges too.
        return web.Response(headers={**headers, "Content-Length": str(size), "Accept-Ranges": "bytes"})
    try:
        source = await storage.blob_source(digest, allow_redirect=request.app[BLOB_REDIRECT])
    except BlobNotFound:
        _blob_gone(request, digest)
        raise
    match source:
        case LocalFile(relative_path=relative) if request.app[BLOB_ACCEL_REDIRECT] and relative:
            # nginx sends the file (and answers ranges); the registry has checked the request and the bytes.
            return web.Response(headers={**headers, "X-Accel-Redirect": request.app[BLOB_ACCEL_REDIRECT] + relative})
        case LocalFile(path=path, size=size):
            selected = ranges.select(request.headers, headers["ETag"], size, OCTET_STREAM)
            if selected.status == 304:
                return web.Response(status=304, headers=headers)
            try:
                handle = open(path, "rb")  # storage has just stat'ed it: no wait on the disk
            except FileNotFoundError:
                _blob_gone(request, digest)
                raise BlobUnknown(f"blob {digest} is not stored", detail={"digest": str(digest)}) from None
            return _SendFile(handle, selected, headers)
        case Redirect(url=url):
            return web.Response(status=307, headers={"Location": url})
        case ByteStream(chunks=chunks, size=size, read_range=read_range):
            selected = ranges.select(request.headers, headers["ETag"], size, OCTET_STREAM)
            if selected.status == 304:
                return web.Response(status=304, headers=headers)
            response = web.StreamResponse(status=selected.status, headers=_sent_headers(headers, selected))
            await response.prepare(request)
            sent = 0
            try:
                for segment in selected.segments:
                    if segment.lead:
                        await response.write(segment.lead)
                    # For a range, the whole blob's answer is dropped unread: the store sends the range only.
                    part = chunks if selected.status == 200 else await read_range(segment.start, segment.count)
                    async for chunk in part:
                        await response.write(chunk)
                        sent += len(chunk)
                if selected.trailer:
                    await response.write(selected.trailer)
                await response.write_eof()
            except ConnectionError:
                pass  # the client hung up (a cancelled pull): the answer is the 200 under way, cut short
            finally:
                metrics.blob_bytes_sent(sent)  # of a download cut short, the chunks that went out
            return response


def _sent_headers(headers: dict[str, str], selected: ranges.Selected) -> dict[str, str]:
    """The headers of a blob answer that sends what `selected` says (nixery.http.ranges)."""
    return {**headers, **dict(selected.headers), "Accept-Ranges": "bytes"}


class _SendFile(web.StreamResponse):
    """An open blob file, or the range or ranges of it `selected` (nixery.http.ranges), sent
    with sendfile(2) from the event loop (a multipart body's part headers written between).

    web.FileResponse makes two thread-pool round trips per request (stat and
    open, then close); it also leaves the socket uncorked, so the kernel sends
    smaller segments. Together: 30 % less CPU per 1 MB blob, a quarter less
    time for one 50 MB download (docs/benchmarks/README.md). As in
    FileResponse, the bytes go out when aiohttp prepares the response, after
    the handler and the middlewares have returned."""

    #: Its bytes go out in `prepare`: the access log waits for them (nixery.http.access).
    sent_on_prepare = True

    def __init__(self, handle: BinaryIO, selected: ranges.Selected, headers: dict[str, str]):
        super().__init__(status=selected.status, headers=_sent_headers(headers, selected))
        self._handle, self._segments, self._trailer = handle, selected.segments, selected.trailer

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        transport = request.transport
        sock: socket.socket | None = transport.get_extra_info("socket") if transport is not None else None
        corked = sock if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) else None
        sent = 0
        try:
            if corked is not None:  # full segments, headers sent with the body (nginx's tcp_nopush)
                corked.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            writer = await super().prepare(request)
            for segment in self._segments:  # one, but for several ranges (a multipart body)
                if segment.lead:  # a part's delimiter and headers: written before its bytes, in order
                    await self.write(segment.lead)
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("connection lost")
                offset, size = segment.start, segment.count
                now = _sendfile_now(transport, corked, self._handle, offset, size) if corked is not None else 0
                sent += now
                if now < size:
                    start = offset + now
                    self._handle.seek(start)
                    try:
                        await asyncio.get_running_loop().sendfile(transport, self._handle, start, size - now)
                    finally:
                        # asyncio leaves the file's position after the bytes it sent, also when the
                        # client went away (it stays at `start` when none went out).
                        sent += max(0, self._handle.tell() - start)
            if self._trailer:
                await self.write(self._trailer)
            await super().write_eof()
            return writer
        finally:
            metrics.blob_bytes_sent(sent)  # of a download cut short, what went out
            self._handle.close()
            if corked is not None:  # sends the last partial segment now; later answers on this connection are not held
                with contextlib.suppress(OSError):
                    corked.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


def _sendfile_now(transport: asyncio.Transport, sock: socket.socket, handle: BinaryIO, offset: int, size: int) -> int:
    """Bytes sent by one sendfile(2) call right away: as many as the socket's buffer takes.

    asyncio's loop.sendfile starts with the same call, but first pauses reading,
    waits for an empty write buffer, and stats and seeks the file: for a small
    blob that set-up costs more than the copy. It takes over for the rest (one
    call only: the event loop must not be held while a fast reader drains a big blob)."""
    if not size or transport.get_write_buffer_size():  # the headers are still queued: keep the order
        return 0
    try:
        return os.sendfile(sock.fileno(), handle.fileno(), offset, size)
    except (BlockingIOError, InterruptedError):
        return 0

#: The tag a name lists when its packages can be built: every tag names an image of them, and
#: `latest` is the one always there (for a declared name too: `name:latest` reads the name as
#: packages, unless declared). A declared image (RESOLVER) lists the tags it is declared under.
_BUILT_FROM_NAMES = "latest"
_PAGE_SIZE = re.compile(r"[0-9]{1,9}")


async def tags(request: web.Request) -> web.Response:
    """The listed tags, paged as distribution-spec says: only those after `last`, at most `n`
    (`n=0`: none), and a `Link` to the next page when some are left (not for `n=0`)."""
    check_image_name(request)
    resolver = request.app.get(RESOLVER)
    declared = await resolver.tags(request.match_info["name"]) if resolver is not None else []
    image = await requested_image(request, _BUILT_FROM_NAMES)
    missing = await request.app[BUILDER].names_missing(image, _BUILT_FROM_NAMES)
    if missing is not None and not declared:  # no tag to list: the repository is not known (distribution spec)
        raise NameUnknown(missing, detail={"name": request.match_info["name"]})
    every = {*declared, *([_BUILT_FROM_NAMES] if missing is None else [])}
    last, size = request.query.get("last"), request.query.get("n")
    listed = [tag for tag in sorted(every) if last is None or tag > last]
    headers: dict[str, str] = {}
    if size is not None:
        if not _PAGE_SIZE.fullmatch(size):
            raise RequestInvalid(
                f"n must be a number of tags from 0 to 999999999, not {size[:20]!r}", detail={"n": size[:20]}
            )
        listed, left = listed[: int(size)], listed[int(size) :]
        if left and listed:
            following = request.rel_url.with_query({"n": size, "last": listed[-1]})
            headers = {"Link": f'<{following}>; rel="next"'}
    return web.json_response({"name": request.match_info["name"], "tags": listed}, headers=headers)


_UPLOAD_STATUS = re.compile(r"^/v2/.+/blobs/uploads/")


async def unsupported(request: web.Request) -> web.Response:
    """Anything else under /v2/: a GET or HEAD finds no such endpoint; any other method is push,
    delete or unknown, which a pull-only registry does not do."""
    if request.method in ("GET", "HEAD"):
        if _UPLOAD_STATUS.match(request.path):  # what a client asks to resume an upload (OCI spec)
            raise BlobUploadUnknown("no such upload: this registry is pull-only (images are built from their names)")
        raise NameUnknown("no such endpoint or repository")
    raise Unsupported(
        f"{request.method} is not supported: this registry is pull-only (images are built from their names)",
        headers={"Allow": "GET, HEAD"},  # RFC 9110: a 405 names the methods that are
    )


#: The route patterns of a name and of a reference or digest. aiohttp's default for a variable,
#: `[^{}/]+`, left a name or tag with `{` or `}` to the catch-all's 404 NAME_UNKNOWN: these take
#: any character, so that the handlers' checks refuse them as they refuse any invalid name (400).
NAME = r"{name:.+?}"
REFERENCE = r"{reference:[^/]+}"
DIGEST = r"{digest:[^/]+}"


def add_routes(app: web.Application) -> None:
    app.on_response_prepare.append(api_version_header)
    app.router.add_get("/v2/", api_version)
    app.router.add_get("/v2", api_version)
    app.router.add_route("GET", f"/v2/{NAME}/manifests/{REFERENCE}", manifest)
    app.router.add_route("HEAD", f"/v2/{NAME}/manifests/{REFERENCE}", manifest)
    app.router.add_route("GET", f"/v2/{NAME}/blobs/{DIGEST}", blob)
    app.router.add_get(f"/v2/{NAME}/tags/list", tags)
    app.router.add_route("HEAD", f"/v2/{NAME}/blobs/{DIGEST}", blob)
    # Named so that /metrics counts what it answers as `unmatched`, with unknown paths elsewhere.
    app.router.add_route("*", "/v2/{tail:.*}", unsupported, name=metrics.UNMATCHED)
