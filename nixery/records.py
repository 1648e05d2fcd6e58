"""Image records, and the bounded set of them a registry process keeps in memory.

An image record (`images/<key>` in storage) names every blob of one built
image: its config, its manifests and its layers. A process keeps the records
it used most recently in a `RecordCache`, so that a warm manifest needs no
trip to storage. The cache guarantees:

* it holds at most `capacity` records (NIXERY_RECORD_CACHE): the least
  recently used go first, so memory stays flat however many images storage
  holds; records share the descriptors and store paths of the layers they
  have in common, so each costs little more than what is its own;
* `forget_using(digest)` drops every record naming a blob, in time
  proportional to the records that name it (an index by blob), so a request
  for an unknown digest costs nothing;
* `recent(n)` lists the most recently built images it has seen without
  sorting the cache (the landing page asks on every request).
"""

from __future__ import annotations

import bisect
import json
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from nixery.lru import LRU
from nixery.registry.descriptors import Descriptor, Platform
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor, canonical_json
from nixery.registry.mediatypes import ManifestFormat

#: Default of NIXERY_RECORD_CACHE: images (their records, and as many manifests) held per process.
DEFAULT_CAPACITY = 500
#: Most recently built images kept for the landing page.
RECENT = 50


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
    #: The documents a client can be given for this image (nixery.registry.negotiation picks
    #: one per request): its manifests, one per format, in the order stored. Made once, here.
    descriptors: tuple[Descriptor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        platform = Platform("linux", self.architecture)
        manifests = self.manifests.items()
        descriptors = tuple(Descriptor(fmt.value, ref.digest, ref.size, platform) for fmt, ref in manifests)
        object.__setattr__(self, "descriptors", descriptors)

    def to_json(self) -> bytes:
        return canonical_json(
            {
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
        )

    @classmethod
    def from_json(cls, data: bytes) -> ImageRecord:
        doc: dict[str, Any] = json.loads(data)
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
        )

    def blobs(self) -> set[Digest]:
        """Every blob the image needs: config, manifests and layers."""
        return {self.config, *(ref.digest for ref in self.manifests.values()), *(x.digest for x in self.layers)}

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(slots=True)
class _Entry:
    record: ImageRecord
    use_written: float = 0.0  # when this process last wrote the image's use to storage (for GC)


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

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> ImageRecord | None:
        entry = self._entries.get(key)
        return entry.record if entry is not None else None

    def put(self, record: ImageRecord) -> None:
        self.discard(record.key)
        record = self._shared(record)
        for digest in (record.config, *(ref.digest for ref in record.manifests.values())):
            self._blobs.setdefault(digest, _Blob(set())).keys.add(record.key)
        for layer, paths in zip(record.layers, record.layer_paths or [()] * len(record.layers), strict=True):
            blob = self._blobs.get(layer.digest)
            if blob is None:
                blob = self._blobs[layer.digest] = _Blob(set(), layer, paths)
            blob.keys.add(record.key)
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

    def discard(self, key: str) -> None:
        """Forget one image: it is checked in storage (and rebuilt if need be) on its next use."""
        entry = self._entries.pop(key)
        if entry is not None:
            self._release_blobs(key, entry)
        self._recent = [item for item in self._recent if item[1] != key]

    def forget_using(self, digest: Digest) -> int:
        """Forget every image that names `digest`; how many there were."""
        blob = self._blobs.get(digest)
        keys = list(blob.keys) if blob is not None else []
        for key in keys:
            self.discard(key)
        return len(keys)

    def clear(self) -> None:
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
