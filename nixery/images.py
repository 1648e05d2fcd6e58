"""The image store: image records in storage, their key layout, and the bounded
set of them a registry process keeps in memory.

Storage layout (shared by every registry process and by `nixery gc`; it must
not change, or existing storage stops being found):

    images/<key>   the image record (`ImageRecord`, JSON): every blob of one image
    usage/<key>    when a registry last served it by tag (for gc; by digest: `nixery.pulls`)
    builds/<key>   the lock held while it is built, or removed by gc
    referrers/<subject hex>/<key>
                   the image under <key> has documents about its manifest <subject>
                   (`ImageRecord.attached`): how the referrers API finds them; written
                   before the record, removed by gc with it
    manifests/<manifest hex>/<key>
                   the image under <key> names the manifest or index <manifest hex>
                   (`manifest_keys`), and how to build it again (the builder's recipe,
                   opaque here): how a pull by digest whose image lost a blob finds the
                   image to rebuild (`ImageStore.recipes_naming`); written before the
                   record, removed by gc with it

`<key>` is `image_key(...)`: the package set's revision, the package names,
the architecture, the layer budget, the layer compression (gzip keys as
they were before zstd existed), the baseline packages (NIXERY_BASELINE;
none: keys as before it existed) and NIXERY_NIX_ANNOTATIONS (keys as they were
before it existed when it is off).

An image record names every blob of one built image: its config, its
manifests and its layers; an image of several platforms (`nixery.platforms`)
also its index documents and the other platforms' records, whole. A process
keeps the records it used most recently in a `RecordCache`, so that a warm
manifest needs no trip to storage. The cache guarantees:

* it holds at most `capacity` records (NIXERY_RECORD_CACHE): the least
  recently used go first, so memory stays flat however many images storage
  holds; records share the descriptors and store paths of the layers they
  have in common, so each costs little more than what is its own;
* `forget_using(digest)` drops every record naming a blob, in time
  proportional to the records that name it (an index by blob), so a request
  for an unknown digest costs nothing;
* `recent(n)` lists the most recently built images it has seen without
  sorting the cache (the landing page asks on every request).

`ImageStore` answers only with records whose blobs would all be served
(`Storage.blob_servable`: stored, layers at their recorded sizes, and on the
filesystem hashed once per process and intact): one read from storage is
checked blob by blob, one held in memory again every RECHECK_INTERVAL where
that costs no request (and otherwise not answered, so the image is built
again before a client is handed a manifest it could not pull), and one
written appears only once its blobs are.
A record is created only if absent: when two processes built one image at
once (a build lease lost), the first complete record stored is the one both
serve, whatever their layering histories made of it (`ImageStore.put`); a
damaged one is replaced only if it is still the version read, so of processes
that all found it damaged and rebuilt, the first to replace it wins. It
drops from memory the records naming a blob found missing or corrupt, and all
of them when `nixery gc` says it removed something (`nixery.collected`).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from nixery.background import spawn
from nixery.collected import CollectionWatch
from nixery.errors import DigestInvalid
from nixery.layers.store import FORMAT_VERSION
from nixery.lru import LRU
from nixery.pulls import PullLog, due_again_after_failure
from nixery.registry.descriptors import Descriptor, Platform
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor, canonical_json
from nixery.registry.mediatypes import Compression, ManifestFormat
from nixery.registry.names import ImageRequest
from nixery.resolver import Revision
from nixery.singleflight import SingleFlight
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)

#: Default of NIXERY_RECORD_CACHE: images (their records, and as many manifests) held per process.
DEFAULT_CAPACITY = 500
#: Most recently built images kept for the landing page.
RECENT = 50

IMAGE_PREFIX = "images/"
USAGE_PREFIX = "usage/"
BUILD_LOCK_PREFIX = "builds/"
REFERRERS_PREFIX = "referrers/"
MANIFESTS_PREFIX = "manifests/"
#: How often an image's use is written to storage (for garbage collection).
USAGE_INTERVAL = 3600.0
#: Seconds after a failed use write before a pull writes it again.
USAGE_RETRY = 60.0
#: How often the blobs of an image held in memory are checked again before its manifest is
#: handed out, where that is cheap (`Storage.checks_blobs_locally`): a stat each, and a hash once
#: per process for a file that changed. Not on every request: a stat of each of 100 layers costs
#: more than answering the manifest from memory does.
RECHECK_INTERVAL = 5.0


def image_key(
    revision: Revision, request: ImageRequest, max_layers: int, compression: Compression = Compression.GZIP,
    baseline: Sequence[str] | None = None,
    *, nix_annotations: bool = False,
) -> str:
    material: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "revision": revision.id,
        "packages": list(request.packages),
        "system": request.arch.nix_system,
        "max_layers": max_layers,
    }
    if compression is not Compression.GZIP:  # gzip images keep the keys they had before zstd
        material["compression"] = compression.value
    if request.config is not None:  # images of names keep the keys they had before declared configs
        material["config"] = request.config.to_json()
    if baseline:  # NIXERY_BASELINE (nixery.baseline); without one, the keys of before it
        material["baseline"] = list(baseline)
    if nix_annotations:  # other manifests (NIXERY_NIX_ANNOTATIONS); without, the keys they always had
        material["nix_annotations"] = True
    return hashlib.sha256(canonical_json(material)).hexdigest()


def build_lock(key: str) -> str:
    """The storage lock held while the image under `key` is built (or collected)."""
    return f"{BUILD_LOCK_PREFIX}{key}"


def referrer_keys(record: ImageRecord) -> list[str]:
    """The storage keys that lead the referrers API from each subject of the record's
    attached documents (its platforms' too) to the record."""
    subjects = sorted({attached.subject.hex for attached in all_attached(record)})
    return [f"{REFERRERS_PREFIX}{subject}/{record.key}" for subject in subjects]


def manifest_digests(record: ImageRecord) -> set[Digest]:
    """Each manifest and index of the record, its platforms' and its attached documents' too:
    all a client may pull by digest."""
    return {descriptor.digest for descriptor in record.descriptors} | {
        attached.manifest.digest for attached in all_attached(record)
    }


def manifest_keys(record: ImageRecord) -> list[str]:
    """The storage keys that lead from each of the record's `manifest_digests` to the record."""
    return [f"{MANIFESTS_PREFIX}{manifest.hex}/{record.key}" for manifest in sorted(manifest_digests(record))]


def all_attached(record: ImageRecord) -> list[Attached]:
    """The documents attached to the record's manifests and to its platforms' manifests."""
    return [*record.attached, *(attached for one in record.platforms for attached in all_attached(one))]


def _manifest_digests(record: ImageRecord) -> list[str]:
    """The digests clients are given for the image (for logs)."""
    return [str(descriptor.digest) for descriptor in record.descriptors]


class RecordUnreadable(ValueError):
    """A stored document that is not an image record: damaged (a disk's fault, a hand's edit)
    or of a shape this version cannot read. The registry builds the image again over it."""


@dataclass(frozen=True, slots=True)
class Attached:
    """A document about one of an image's manifests (a signature, an SBOM, a provenance
    statement): a manifest stored with the image, listed by the referrers API under its
    subject and, for clients older than that API, served under a tag."""

    manifest: Descriptor  # as the referrers API lists it: media type, digest, size, artifactType, annotations
    subject: Digest  # the manifest it is about
    blobs: tuple[Digest, ...]  # what the manifest names (config, layers): collected with the image
    tag: str | None = None  # e.g. cosign's `sha256-<hex>.sig`

    def to_json(self) -> dict[str, Any]:
        document = {
            "manifest": self.manifest.to_json(),
            "subject": str(self.subject),
            "blobs": [str(blob) for blob in self.blobs],
        }
        if self.tag is not None:
            document["tag"] = self.tag
        return document

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Attached:
        return cls(
            manifest=Descriptor.from_json(doc["manifest"]),
            subject=Digest.parse(doc["subject"]),
            blobs=tuple(Digest.parse(blob) for blob in doc["blobs"]),
            tag=doc.get("tag"),
        )


@dataclass(frozen=True, slots=True)
class ManifestRef:
    digest: Digest
    size: int


@dataclass(frozen=True, slots=True)
class ImageRecord:
    key: str
    name: str
    source: str
    revision: str
    packages: tuple[str, ...]  # resolved attribute paths
    architecture: str
    config: Digest
    manifests: dict[ManifestFormat, ManifestRef]
    layers: tuple[LayerDescriptor, ...]
    built_at: float
    # The store paths of each layer, in layer order (empty for the entry-point
    # layer, and for records written before paths were kept).
    layer_paths: tuple[tuple[str, ...], ...] = ()
    #: An image with several platforms (`nixery.platforms`): its index documents (an OCI
    #: image index, a Docker manifest list) and the records of its other platforms' builds.
    #: This record's own config, manifests and layers are those of its default platform.
    indexes: tuple[Descriptor, ...] = ()
    platforms: tuple[ImageRecord, ...] = ()
    #: Documents about the image's manifests (signatures, SBOMs, provenance), stored with it
    #: (`nixery.attachments`).
    attached: tuple[Attached, ...] = ()
    #: The documents a client can be given for this image (nixery.registry.negotiation picks
    #: one per request): its indexes, then its manifests, one per format, in the order stored,
    #: then the other platforms' manifests. Made once, here.
    descriptors: tuple[Descriptor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        platform = Platform("linux", self.architecture)
        manifests = self.manifests.items()
        own = tuple(Descriptor(fmt.value, ref.digest, ref.size, platform) for fmt, ref in manifests)
        others = tuple(descriptor for record in self.platforms for descriptor in record.descriptors)
        object.__setattr__(self, "descriptors", (*self.indexes, *own, *others))

    def to_json(self) -> bytes:
        return canonical_json(self._document())

    def _document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "key": self.key,
            "name": self.name,
            "source": self.source,
            "revision": self.revision,
            "packages": list(self.packages),
            "architecture": self.architecture,
            "config": str(self.config),
            "manifests": {
                fmt.name.lower(): {"digest": str(ref.digest), "size": ref.size}
                for fmt, ref in self.manifests.items()
            },
            "layers": [
                {**layer.to_json(), "paths": list(paths)}
                for layer, paths in zip(self.layers, self.layer_paths or [()] * len(self.layers), strict=True)
            ],
            "built_at": self.built_at,
        }
        if self.indexes:  # records of one platform stay as they were written before indexes
            document["indexes"] = [descriptor.to_json() for descriptor in self.indexes]
            document["platforms"] = [record._document() for record in self.platforms]
        if self.attached:  # records without attachments stay as they were written before them
            document["attached"] = [attached.to_json() for attached in self.attached]
        return document

    @classmethod
    def from_json(cls, data: bytes) -> ImageRecord:
        """Raises RecordUnreadable for a document that is not an image record."""
        try:
            return cls._from_document(json.loads(data))
        except (ValueError, KeyError, TypeError, AttributeError, DigestInvalid) as exc:
            raise RecordUnreadable(f"not an image record: {type(exc).__name__}: {exc}"[:300]) from exc

    @classmethod
    def _from_document(cls, doc: dict[str, Any]) -> ImageRecord:
        return cls(
            key=doc["key"],
            name=doc["name"],
            source=doc["source"],
            revision=doc["revision"],
            packages=tuple(doc["packages"]),
            architecture=doc["architecture"],
            config=Digest.parse(doc["config"]),
            manifests={
                ManifestFormat[fmt.upper()]: ManifestRef(Digest.parse(ref["digest"]), int(ref["size"]))
                for fmt, ref in doc["manifests"].items()
            },
            layers=tuple(LayerDescriptor.from_json(layer) for layer in doc["layers"]),
            built_at=float(doc["built_at"]),
            layer_paths=tuple(tuple(layer.get("paths", ())) for layer in doc["layers"]),
            indexes=tuple(Descriptor.from_json(index) for index in doc.get("indexes", ())),
            platforms=tuple(cls._from_document(record) for record in doc.get("platforms", ())),
            attached=tuple(Attached.from_json(attached) for attached in doc.get("attached", ())),
        )

    def blobs(self) -> set[Digest]:
        """Every blob the image needs: config, manifests and layers, and with several
        platforms its indexes and every platform's blobs."""
        own = {self.config, *(ref.digest for ref in self.manifests.values()), *(x.digest for x in self.layers)}
        own.update(digest for attached in self.attached for digest in (attached.manifest.digest, *attached.blobs))
        return own.union((index.digest for index in self.indexes), *(record.blobs() for record in self.platforms))

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


def _blob_sizes(record: ImageRecord) -> dict[Digest, int | None]:
    """Every blob the record names, with its size where the record has it (layers)."""
    sizes: dict[Digest, int | None] = dict.fromkeys(record.blobs())
    for one in (record, *record.platforms):
        sizes.update((layer.digest, layer.size) for layer in one.layers)
    return sizes


@dataclass(slots=True)
class _Entry:
    record: ImageRecord
    use_written: float = 0.0  # when this process last wrote the image's use to storage (for GC)
    #: When (time.monotonic) its blobs were last found stored and intact (or it was built).
    checked: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class _Blob:
    """A blob named by cached records: which ones, and, for a layer, the descriptor and store
    paths they all share (images share most of their layers: one copy each in memory)."""

    keys: set[str]
    layer: LayerDescriptor | None = None
    paths: tuple[str, ...] = ()


class RecordCache:
    """Image records by key, least recently used dropped first (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._entries: LRU[str, _Entry] = LRU(capacity)
        self._blobs: dict[Digest, _Blob] = {}
        self._recent: list[tuple[float, str, ImageRecord]] = []  # (built_at, key, record), oldest first
        #: Incremented whenever records are dropped because storage changed under them (`clear`,
        #: `forget_using`): a reader that read a record before that puts it only if this is unchanged.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> ImageRecord | None:
        entry = self._entries.get(key)
        return entry.record if entry is not None else None

    def put(self, record: ImageRecord, *, read_at: int | None = None) -> None:
        """Hold `record`; with `read_at` (the `generation` before it was read from storage), only
        if nothing was dropped since: else it may be what `nixery gc` has just removed."""
        if read_at is not None and read_at != self.generation:
            return
        self.discard(record.key)
        record = self._shared(record)
        for layer, paths in zip(record.layers, record.layer_paths or [()] * len(record.layers), strict=True):
            blob = self._blobs.get(layer.digest)
            if blob is None:
                blob = self._blobs[layer.digest] = _Blob(set(), layer, paths)
            blob.keys.add(record.key)
        # Its config and manifests; with several platforms, its indexes and the other platforms' blobs.
        for digest in record.blobs():
            self._blobs.setdefault(digest, _Blob(set())).keys.add(record.key)
        self._note_recent(record)
        for key, entry in self._entries.put(record.key, _Entry(record)):
            self._release_blobs(key, entry)

    def should_write_use(self, key: str, now: float, interval: float) -> bool:
        """Whether this process should write the image's use to storage now (at most once per
        `interval` while the record stays cached); notes the write when it says yes."""
        entry = self._entries.peek(key)
        if entry is None or now - entry.use_written < interval:
            return False
        entry.use_written = now
        return True

    def use_not_written(self, key: str, written_at: float, interval: float) -> None:
        """The use write that `should_write_use` said yes to at `written_at` failed: the image's
        next pull after USAGE_RETRY writes it again, not one `interval` later (a store that failed
        these writes for two hours, while serving reads, let gc take an image in use)."""
        entry = self._entries.peek(key)
        if entry is not None and entry.use_written == written_at:
            entry.use_written = due_again_after_failure(written_at, interval, USAGE_RETRY)

    def check_due(self, key: str, now: float, interval: float) -> bool:
        """Whether the cached image's blobs were last checked `interval` or more before `now`."""
        entry = self._entries.peek(key)
        return entry is not None and now - entry.checked >= interval

    def note_checked(self, key: str, now: float) -> None:
        if (entry := self._entries.peek(key)) is not None:
            entry.checked = now

    def discard(self, key: str) -> None:
        """Forget one image: it is checked in storage (and rebuilt if need be) on its next use."""
        entry = self._entries.pop(key)
        if entry is not None:
            self._release_blobs(key, entry)
        self._recent = [item for item in self._recent if item[1] != key]

    def naming(self, digest: Digest) -> list[str]:
        """The keys of the cached images that name `digest`."""
        blob = self._blobs.get(digest)
        return list(blob.keys) if blob is not None else []

    def forget_using(self, digest: Digest) -> int:
        """Forget every image that names `digest`; how many there were."""
        keys = self.naming(digest)
        if keys:  # only then: a blob no held image names changes nothing held
            self.generation += 1
        for key in keys:
            self.discard(key)
        return len(keys)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._blobs.clear()
        self._recent.clear()

    def recent(self, limit: int = 20) -> list[ImageRecord]:
        """The most recently built images seen by this process, newest first."""
        return [record for _, _, record in reversed(self._recent[-limit:])]

    def _shared(self, record: ImageRecord) -> ImageRecord:
        """The record, its layers' descriptors and store paths replaced by those that cached
        records already hold (and store path strings interned: layers of other paths share them)."""
        layers, layer_paths = [], []
        for layer, paths in zip(record.layers, record.layer_paths or [()] * len(record.layers), strict=True):
            blob = self._blobs.get(layer.digest)
            if blob is not None and blob.layer == layer:
                layer, paths = blob.layer, blob.paths if blob.paths == paths else paths
            else:
                paths = tuple(sys.intern(path) for path in paths)
            layers.append(layer)
            layer_paths.append(paths)
        return replace(record, layers=tuple(layers), layer_paths=tuple(layer_paths) if record.layer_paths else ())

    def _release_blobs(self, key: str, entry: _Entry) -> None:
        """`key` is out of the cache (it may stay among the recent ones: those are few)."""
        for digest in entry.record.blobs():
            blob = self._blobs.get(digest)
            if blob is not None:
                blob.keys.discard(key)
                if not blob.keys:
                    del self._blobs[digest]

    def _note_recent(self, record: ImageRecord) -> None:
        """Among the recent ones if it is one of the RECENT newest (`put` has taken out its old entry)."""
        recent = self._recent
        if len(recent) >= RECENT and record.built_at <= recent[0][0]:
            return
        bisect.insort(recent, (record.built_at, record.key, record), key=lambda item: (item[0], item[1]))
        del recent[:-RECENT]


class ImageStore:
    """Image records in storage, the most recently used also in memory (module docstring)."""

    def __init__(self, storage: Storage, *, capacity: int = DEFAULT_CAPACITY):
        self.storage = storage
        #: The image records used most recently (NIXERY_RECORD_CACHE of them).
        self.cached = RecordCache(capacity)
        self._usage_writes: set[asyncio.Task[None]] = set()
        #: Manifests pulled by digest (for gc: those pulls name no image).
        self.pulls = PullLog(storage, interval=USAGE_INTERVAL, retry=USAGE_RETRY)
        storage.on_corrupt_blob(self.forget_using)
        #: Notes from `nixery gc` (nixery.collected): what it removed is dropped from memory.
        self._collections = CollectionWatch(storage, self._collected)
        self._collection_listeners: list[Callable[[], None]] = []
        #: Checks of the blobs of images held in memory (`get`), one at a time per image.
        self._rechecks: SingleFlight[bool] = SingleFlight()

    def start(self) -> None:
        """Start following `nixery gc`'s notes."""
        self._collections.start()

    async def close(self) -> None:
        await self._collections.close()
        await self.pulls.close()

    def on_collected(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever `nixery gc` has removed something (after the records are dropped)."""
        self._collection_listeners.append(listener)

    def _collected(self) -> None:
        self.cached.clear()
        for listener in self._collection_listeners:
            listener()

    def building(self, key: str) -> AbstractAsyncContextManager[None]:
        """Held while the image under `key` is built: by one process of all sharing the storage."""
        return self.storage.exclusive(build_lock(key))

    async def get(self, key: str) -> ImageRecord | None:
        """The built image under `key`, if every blob it names would be served (`_servable`):
        from memory (checked again every RECHECK_INTERVAL where that is cheap), else from
        storage. None (the image is built again) before a client is handed a manifest whose
        pull would fail on a damaged blob: before, the first pull failed on it (404) and only
        the next one was rebuilt."""
        record = self.cached.get(key)
        if record is None:
            # Noted before the read: a note from `nixery gc` read meanwhile (`_collected`) may
            # concern this record, which is then served to this request but not held.
            generation = self.cached.generation
            data = await self.storage.get_meta(f"{IMAGE_PREFIX}{key}")
            if data is None or (record := await self._complete(key, data, note="rebuilding")) is None:
                return None
            self.cached.put(record, read_at=generation)
        elif self.storage.checks_blobs_locally and self.cached.check_due(key, time.monotonic(), RECHECK_INTERVAL):
            return await self._rechecked(record)
        return record

    async def _rechecked(self, record: ImageRecord) -> ImageRecord | None:
        """The record held in memory, if its blobs would still be served; else None, forgotten."""
        checked_at = time.monotonic()
        if not await self._rechecks.run(record.key, lambda: self._servable(record, parallel=False)):
            log.warning("build.record_incomplete", key=record.key[:12], image=record.name, note="rebuilding")
            self.cached.discard(record.key)  # a damaged blob set aside has dropped it already; one cut short not
            return None
        self.cached.note_checked(record.key, checked_at)
        return record

    async def put(
        self, record: ImageRecord, blobs_stored: Awaitable[Any], *, recipe: bytes | None = None
    ) -> ImageRecord:
        """Publish a new image's record, to appear in storage once `blobs_stored` is done, and
        the keys that find it by the subjects of its attached documents before that (a key
        whose record is not there leads nowhere); with a `recipe` (how the builder builds the
        image again), the keys that find it by its manifests' digests too. Returns the record
        to serve from now on.

        The first complete record stored under a key wins, for every process: the record is
        created only if absent (`Storage.create_meta_after`). When another process stored
        one meanwhile (both built the image: one lost its build lease, stalled or cut off
        from the bucket, and another took it over), this process serves that record instead
        of its own: had they planned the layers against different layering histories, their
        manifests differ, and replicas would serve different digests for one tag. A record
        there that is not complete (damaged, or naming blobs that are gone: what this build
        was started to replace) is replaced, only if it is still the version read
        (`Storage.replace_meta`): every process that found it damaged rebuilt the image, and
        the first replacement stored is the one they all serve.
        """
        pointers = [self.storage.put_meta(key, b"{}") for key in referrer_keys(record)]
        if recipe is not None:
            pointers += [self.storage.put_meta(key, recipe) for key in manifest_keys(record)]
        stored = asyncio.gather(blobs_stored, *pointers) if pointers else blobs_stored
        key, data = f"{IMAGE_PREFIX}{record.key}", record.to_json()
        written = await self.storage.create_meta_after(key, data, stored)
        while not written:
            existing = await self.storage.get_versioned_meta(key)
            if existing is None:  # removed meanwhile (`nixery gc`)
                written = await self.storage.create_meta(key, data)
                continue
            if existing.data == data:  # its own, from a write retried after its answer was lost
                break
            if (first := await self._complete(record.key, existing.data, note="replacing it")) is not None:
                # Other manifests: another process built the image meanwhile (a build lease lost,
                # or it too found the record damaged, and replaced it first).
                # The same ones: this build restored the blobs that the stored record lacked.
                served, built = _manifest_digests(first), _manifest_digests(record)
                (log.warning if served != built else log.info)(
                    "build.record_adopted", key=record.key[:12], image=record.name, served=served, built=built,
                    note="a complete record was stored first: it is served instead of this build's",
                )
                self.cached.put(first)
                return first
            # Not if another process replaced it meanwhile: that one is read next, and served.
            written = await self.storage.replace_meta(key, data, existing.version)
        self.cached.put(record)
        return record

    async def referrers(self, subject: Digest) -> list[Attached]:
        """The documents attached to the manifest `subject` by the images that are stored
        (none for a digest no image has), by artifact type and digest."""
        keys = await self.storage.list_meta(f"{REFERRERS_PREFIX}{subject.hex}/")
        records = await asyncio.gather(*(self.get(key.rsplit("/", 1)[-1]) for key in keys))
        found = {
            attached.manifest.digest: attached
            for record in records if record is not None
            for attached in all_attached(record) if attached.subject == subject
        }
        return sorted(found.values(), key=lambda one: (one.manifest.artifact_type or "", str(one.manifest.digest)))

    async def recipes_naming(self, manifest: Digest) -> list[tuple[str, bytes]]:
        """The keys of the stored images that name the manifest or index `manifest`, each with
        the recipe stored with it (`put`); not of images whose record is gone. One listing of
        storage: asked only when a manifest is not served as it is (gone, or its image lost a blob)."""
        try:
            pointers = await self.storage.list_meta(f"{MANIFESTS_PREFIX}{manifest.hex}/")
        except NotImplementedError:  # a backend that cannot list: no image is found by digest
            return []
        found = []
        for pointer in sorted(pointers):
            key = pointer.rsplit("/", 1)[-1]
            # Only of an image still stored: a pointer that outlived its record (a gc cut short)
            # leads nowhere, as the record's removal says the image is no longer wanted.
            if (recipe := await self.storage.get_meta(pointer)) is not None and await self.storage.get_meta(
                f"{IMAGE_PREFIX}{key}"
            ) is not None:
                found.append((key, recipe))
        return found

    async def held_naming_servable(self, manifest: Digest) -> bool:
        """Whether the images held in memory that name `manifest` would be served, checked as
        `get` checks them (every RECHECK_INTERVAL where that is cheap: no request to a bucket);
        those that would not are forgotten. True when none is held: nothing to check in memory."""
        for key in self.cached.naming(manifest):
            if self.cached.get(key) is not None and await self.get(key) is None:
                return False
        return True

    async def _complete(self, key: str, data: bytes, *, note: str) -> ImageRecord | None:
        """The record stored under `key` if it is readable and all its blobs are stored;
        otherwise None, logged with `note` (what becomes of it)."""
        try:
            record = ImageRecord.from_json(data)
        except RecordUnreadable as exc:  # as good as none: the build writes a whole one over it
            log.warning("build.record_unreadable", key=key[:12], error=str(exc), note=note)
            return None
        if not await self._servable(record, parallel=True):
            log.warning("build.record_incomplete", key=key[:12], image=record.name, note=note)
            return None
        return record

    async def _servable(self, record: ImageRecord, *, parallel: bool) -> bool:
        """Whether every blob the record names would be served (`Storage.blob_servable`): stored,
        layers with their recorded sizes, and on the filesystem hashed (once per process) and
        intact. `parallel` for a record read from storage (blobs not hashed yet: two hash at
        once); else one after the other, which for blobs already hashed is a stat each, without
        a task each."""
        sizes = _blob_sizes(record)
        if parallel:
            return all(await asyncio.gather(*(self.storage.blob_servable(blob, size) for blob, size in sizes.items())))
        for blob, size in sizes.items():
            if not await self.storage.blob_servable(blob, size):
                return False
        return True

    def note_use(self, key: str) -> None:
        """Record that an image was pulled, at most once per USAGE_INTERVAL (for GC)."""
        now = time.time()
        if not self.cached.should_write_use(key, now, USAGE_INTERVAL):
            return
        spawn(
            self.storage.put_meta(f"{USAGE_PREFIX}{key}", canonical_json({"last_used": now})),
            failure_event="build.usage_not_recorded", keep=self._usage_writes,
            on_failure=lambda: self.cached.use_not_written(key, now, USAGE_INTERVAL),
        )

    def note_pull(self, digest: Digest) -> None:
        """Record that a manifest was pulled by its digest (for GC): as a use of the images in
        memory that name it, else under the digest (`nixery.pulls`)."""
        keys = self.cached.naming(digest)
        for key in keys:
            self.note_use(key)
        if not keys:
            self.pulls.note(digest)

    def forget_using(self, digest: Digest) -> None:
        """A blob was found missing or corrupt: its images are checked in storage (and rebuilt)
        on their next use."""
        if forgotten := self.cached.forget_using(digest):
            log.info("build.images_forgotten", blob=str(digest), images=forgotten)

    def recent(self, limit: int = 20) -> list[ImageRecord]:
        """The most recently built images this process has seen, newest first."""
        return self.cached.recent(limit)
