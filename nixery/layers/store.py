"""Layers in storage: each written once, found again by the store paths it holds.

`layers/<key>` maps a layer's exact path set (and the compression) to its
blob's descriptor. What this module guarantees:

* A layer is compressed at most once at a time in this process: concurrent
  builds that need it share one compression (and one background write).
* A layer record is believed only when its blob is stored at the recorded
  size; a reused blob is touched, so a concurrent `nixery gc` keeps it.
* A new layer is returned as soon as it is compressed; its blob and record
  are written in the background (`StoredLayer.stored`), so that the image's
  config and manifests are written beside them. The staging file is removed
  whatever happens; a failed write fails the builds using it, and the next
  build compresses the layer again.
* Compression runs in worker processes (`nixery.layers.writers`), never on
  the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from nixery.closure import Registration
from nixery.errors import DigestInvalid
from nixery.layers.entrypoints import EntryLayer, write_entry_points
from nixery.layers.rootlinks import LinkedPackage
from nixery.layers.tarball import cache_tag, write_store_layer
from nixery.layers.writers import LayerWrite, LayerWriters, write_file
from nixery.registry.image import LayerDescriptor, canonical_json
from nixery.registry.mediatypes import Compression
from nixery.registry.runconfig import RunConfig
from nixery.singleflight import SingleFlight
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)

#: Bumped when the bytes we produce for the same closure change (it is part of image keys too).
FORMAT_VERSION = "1"
LAYER_PREFIX = "layers/"


#: What reading a damaged layer record raises (`read_layer_record`).
LAYER_RECORD_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, DigestInvalid)


def read_layer_record(data: bytes) -> LayerDescriptor:
    """The layer a `layers/<key>` record describes; raises one of LAYER_RECORD_UNREADABLE."""
    return LayerDescriptor.from_json(json.loads(data))


def layer_key(store_paths: Sequence[str], compression: Compression = Compression.GZIP) -> str:
    material = "\n".join([f"{FORMAT_VERSION}:{cache_tag(compression)}", *sorted(store_paths)])
    return hashlib.sha256(material.encode()).hexdigest()


def describe_layer(store_paths: Sequence[str]) -> str:
    """A layer's description in its descriptor: the first few package names."""
    names = sorted(os.path.basename(p).split("-", 1)[-1] for p in store_paths)
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


@dataclass(frozen=True, slots=True)
class StoredLayer:
    descriptor: LayerDescriptor
    created: bool  # compressed by this call, not found in storage
    seconds: float  # time spent compressing
    stored: asyncio.Future[None] | None = None  # writing its blob and record; None: stored already


class LayerStore:
    """The layers of one registry process, in one compression (see the module docstring)."""

    def __init__(self, storage: Storage, *, compression: Compression, workers: int):
        self.storage = storage
        self.compression = compression
        self._writers = LayerWriters(workers)
        self._layers: SingleFlight[StoredLayer] = SingleFlight()
        #: New layers whose blob and record are being written, by layer key.
        self._storing: dict[str, StoredLayer] = {}

    def start(self) -> None:
        """Start the worker processes (blocking: call it in a thread)."""
        self._writers.start()

    async def close(self) -> None:
        # Compressions still under way are for builds that were stopped: one let go on would stage
        # its layer after the storage closed, leaving the staging directory made again behind it.
        await self._layers.cancel_all()
        writes = [layer.stored for layer in self._storing.values() if layer.stored is not None]
        await asyncio.gather(*writes, return_exceptions=True)
        await self._writers.close()

    async def store_paths(self, store_paths: list[str]) -> StoredLayer:
        """The layer of exactly these store paths, from storage or compressed now."""
        key = layer_key(store_paths, self.compression)
        write = functools.partial(write_store_layer, store_paths, compression=self.compression)
        return await self._layers.run(key, lambda: self._cached_or_new_layer(key, describe_layer(store_paths), write))

    async def stored(self, store_paths: list[str]) -> StoredLayer | None:
        """The layer of exactly these store paths if storage holds it (touched, so that a
        concurrent `nixery gc` keeps it); None where it would have to be compressed."""
        return await self._known_layer(layer_key(store_paths, self.compression))

    async def store_entry_points(
        self, packages: Sequence[LinkedPackage], closure: Sequence[str], config: RunConfig | None = None,
        registrations: Sequence[Registration] | None = None,
    ) -> tuple[EntryLayer, StoredLayer]:
        """The entry-point layer (with the account of `config`'s user), and what its worker found
        (the CA bundle it links, the packages' conflicts).

        Its cache key depends on what the worker finds, so it is written first and
        dropped when storage has it already (it is a few kilobytes).
        """
        started = time.monotonic()
        write = functools.partial(
            write_entry_points, packages, closure, compression=self.compression, config=config,
            registrations=registrations,
        )
        staged = self._new_staged_file()
        try:
            written = await self._writers.run(write_file, staged, write)
            known = await self._known_layer(written.key)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        if known is not None:
            staged.unlink()
            return written, known
        blob = written.blob
        descriptor = LayerDescriptor(blob.digest, blob.diff_id, blob.size, "entry points (/bin, /etc, /tmp)")
        return written, self._start_storing(written.key, descriptor, staged, time.monotonic() - started)

    async def _cached_or_new_layer(self, key: str, description: str, write: LayerWrite) -> StoredLayer:
        """The layer for `key`, compressed only if it is not stored or being stored yet.

        A new layer is returned once compressed; its blob and record are written in
        `stored`, beside its image's config and manifests.
        """
        if (known := await self._known_layer(key)) is not None:
            return known
        started = time.monotonic()
        staged = self._new_staged_file()
        try:
            blob = await self._writers.write(staged, write)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        descriptor = LayerDescriptor(blob.digest, blob.diff_id, blob.size, description)
        return self._start_storing(key, descriptor, staged, time.monotonic() - started)

    async def _known_layer(self, key: str) -> StoredLayer | None:
        """The layer for `key` if it is stored (at its recorded size) or being stored."""
        if (storing := self._storing.get(key)) is not None:
            return storing
        cached = await self.storage.get_meta(f"{LAYER_PREFIX}{key}")
        if cached is None:
            return None
        try:
            descriptor = read_layer_record(cached)
        except LAYER_RECORD_UNREADABLE as exc:
            # Damaged (a disk's fault, a hand's edit): as good as none, and written again with the layer.
            log.warning("build.layer_record_unreadable", key=key[:12], error=str(exc)[:200])
            return None
        # Touched first: a concurrent garbage collection then keeps the blob, or the touch finds it
        # gone (deleted meanwhile) and the layer is made again. A check before the touch would let
        # gc delete the blob between the two, and the image name a blob that is gone.
        if await self.storage.touch_blob(descriptor.digest) != descriptor.size:
            return None
        return StoredLayer(descriptor, created=False, seconds=0.0)

    def _new_staged_file(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.storage.staging_dir(), prefix="layer-")
        os.close(fd)  # a worker opens it by name; held here, it would outlive the blob it becomes
        return Path(name)

    def _start_storing(self, key: str, descriptor: LayerDescriptor, staged: Path, seconds: float) -> StoredLayer:
        """Write a compressed layer's blob and record in the background (`stored`)."""
        if (storing := self._storing.get(key)) is not None:  # another build wrote the same layer meanwhile
            staged.unlink(missing_ok=True)
            return storing
        stored = asyncio.ensure_future(self._publish(key, descriptor, staged))
        self._storing[key] = StoredLayer(descriptor, created=False, seconds=0.0, stored=stored)
        stored.add_done_callback(lambda task: self._published(key, task))
        return StoredLayer(descriptor, created=True, seconds=seconds, stored=stored)

    async def _publish(self, key: str, descriptor: LayerDescriptor, staged: Path) -> None:
        try:
            # Side by side: the record is only believed (above) when its blob is stored, at its size.
            await asyncio.gather(
                self.storage.put_blob(descriptor.digest, staged),
                self.storage.put_meta(f"{LAYER_PREFIX}{key}", canonical_json(descriptor.to_json())),
            )
        finally:
            staged.unlink(missing_ok=True)

    def _published(self, key: str, task: asyncio.Future[None]) -> None:
        self._storing.pop(key, None)
        if not task.cancelled() and task.exception() is not None:  # its builds report it; a later one retries
            log.warning("build.layer_not_stored", key=key[:12], error=str(task.exception())[:200])
