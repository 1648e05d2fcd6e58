"""From an image name to stored layers and manifests: the one place where
Nix, layering, the caches and storage meet.

    name, tag ──► package source revision ──► image cache hit? ──► record
                                   │ miss
                                   ▼
        evaluation (a long-running nix repl) ─► realise ─► closure
        (evaluations are kept per name, and the other two read from Nix's
        store database: a new image of known, built names runs no Nix)
                                   ▼
        plan layers (with the history of stored layers, shared through storage)
                                   ▼
        each layer: layer cache hit? else tar+compress+hash once, in a
        worker process (nixery.layers.writers) ─► storage
                                   ▼
        entry-point layer, config, Docker and OCI manifests ─► storage
        (OCI only with zstd layers: Docker schema 2 has no zstd media type)
                                   ▼
        image record under images/<key> (written beside the blobs, but it
        appears only once they are stored: a record only ever names blobs
        that are already stored)

Caches live in storage, so they survive restarts and are shared by replicas:
`images/<key>` maps (source revision, packages, architecture) to an image
record, and `layers/<key>` maps a layer's exact path set to its blob. Both
keys include the layer compression (gzip keys as they were before zstd
existed), so switching NIXERY_LAYER_COMPRESSION never serves one for the other.
`evaluations/<key>` maps (source revision, system, name) to what the name
evaluated to (`nixery.evaluations`), and the layering history is a snapshot
plus one entry per build (`nixery.history`).

An image is stored under the names its packages resolved to (their
`pullName`: the attribute path, in lower case when that finds the same
attribute), so `Curl/Shell`, `curl/shell` and `shell/curl` are one image with
one record, named as first asked for (`shell/curl` if that came first). A
request spelt otherwise finds it through what its names evaluated to, without
Nix once they were evaluated.

In memory, each process keeps the image records it used most recently
(`nixery.records`, NIXERY_RECORD_CACHE of them); it drops those naming a blob
found missing or corrupt, and all of them when `nixery gc` says it removed
something (`nixery.collected`), so that a record it answers with names only
stored blobs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from nixery import metrics
from nixery.collected import CollectionWatch
from nixery.config import Settings
from nixery.evaluations import EvaluationCache
from nixery.history import SharedHistory
from nixery.layers.entrypoints import SSL_CERT_FILE, write_entry_points
from nixery.layers.graph import ClosureGraph
from nixery.layers.grouping import plan_layers
from nixery.layers.tarball import cache_tag, write_store_layer
from nixery.layers.writers import LayerWrite, LayerWriters, write_file
from nixery.nix import packages as nix
from nixery.nix.errors import PackagesNotFound
from nixery.nix.evaluator import Evaluators
from nixery.nix.packages import ResolvedPackage
from nixery.nix.process import Deadline
from nixery.nix.sources import PackageSource, Revision, open_source
from nixery.package_names import PackageNames
from nixery.progress import Build, BuildLog, NixLogProgress, Stage
from nixery.records import DEFAULT_CAPACITY, ImageRecord, ManifestRef, RecordCache
from nixery.registry.descriptors import image_manifest
from nixery.registry.digest import Digest
from nixery.registry.image import (
    DEFAULT_PATH,
    LayerDescriptor,
    canonical_json,
    image_config,
)
from nixery.registry.mediatypes import Compression
from nixery.registry.names import ImageRequest
from nixery.registry.negotiation import pull_digests
from nixery.singleflight import SingleFlight
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)

#: Bumped when the bytes we produce for the same closure change.
FORMAT_VERSION = "1"
USAGE_PREFIX = "usage/"
#: How often an image's use is written to storage (for garbage collection).
USAGE_INTERVAL = 3600.0


def image_key(
    revision: Revision, request: ImageRequest, max_layers: int, compression: Compression = Compression.GZIP
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
    return hashlib.sha256(canonical_json(material)).hexdigest()


def build_lock(key: str) -> str:
    """The storage lock held while the image under `key` is built (or collected)."""
    return f"builds/{key}"


def layer_key(store_paths: Sequence[str], compression: Compression = Compression.GZIP) -> str:
    material = "\n".join([f"{FORMAT_VERSION}:{cache_tag(compression)}", *sorted(store_paths)])
    return hashlib.sha256(material.encode()).hexdigest()


def _describe_layer(store_paths: Sequence[str]) -> str:
    names = sorted(os.path.basename(p).split("-", 1)[-1] for p in store_paths)
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _by_resolved_names(request: ImageRequest, resolved: Sequence[ResolvedPackage]) -> ImageRequest:
    """The request under the names its packages resolved to, in the order it gave them."""
    return request.renamed({package.name: package.pull_name for package in resolved})


def _image_cmd(request: ImageRequest, resolved: Sequence[ResolvedPackage]) -> list[str] | None:
    """`shell` images start the shell; a one-package image starts its main program."""
    for package in resolved:
        if package.name.lower() == "shell" and package.main_program:
            return [f"/bin/{package.main_program}"]
    if len(request.packages) == 1 and len(resolved) == 1 and resolved[0].main_program:
        return [f"/bin/{resolved[0].main_program}"]
    return None


class ImageBuilder:
    def __init__(
        self,
        *,
        storage: Storage,
        source: PackageSource,
        nix_timeout: float,
        max_layers: int,
        max_concurrent_builds: int,
        layer_workers: int | None = None,
        layer_compression: Compression = Compression.GZIP,
        evaluators: Evaluators | None = None,
        record_cache: int = DEFAULT_CAPACITY,
    ):
        self.storage = storage
        #: Long-running Nix evaluators (None: one nix-instantiate per image).
        self.evaluators = evaluators
        self.source = source
        self.nix_timeout = nix_timeout
        self.max_layers = max_layers
        #: Of every layer this builder writes; it decides the manifest formats its images have.
        self.compression = layer_compression
        self._build_slots = asyncio.Semaphore(max_concurrent_builds)
        self._images: SingleFlight[ImageRecord] = SingleFlight()
        self._layers: SingleFlight[_StoredLayer] = SingleFlight()
        #: New layers whose blob and record are being written, by layer key.
        self._storing: dict[str, _StoredLayer] = {}
        #: The image records used most recently (NIXERY_RECORD_CACHE of them).
        self._records = RecordCache(record_cache)
        #: The layering history, shared through storage with the other processes.
        self.history = SharedHistory(storage)
        self._planning = asyncio.Lock()
        self.builds = BuildLog()
        self._in_flight: dict[str, Build] = {}
        self._background: set[asyncio.Task[ImageRecord]] = set()
        self._background_writes: set[asyncio.Task[None]] = set()
        storage.on_corrupt_blob(self.forget_images_using)
        #: Notes from `nixery gc` (nixery.collected): what it removed is dropped from memory.
        self._collections = CollectionWatch(storage, self._collected)
        self._collection_listeners: list[Callable[[], None]] = []
        #: What image names evaluated to: a new image of known, built names starts no Nix process.
        self.evaluations = EvaluationCache(storage)
        #: The package list (search, the names a set lacks, suggestions for them).
        self.names = PackageNames(storage)
        self._writers = LayerWriters(layer_workers or os.cpu_count() or 2)

    @classmethod
    def from_settings(cls, settings: Settings, storage: Storage) -> ImageBuilder:
        return cls(
            storage=storage,
            source=open_source(settings),
            nix_timeout=settings.nix_timeout,
            max_layers=settings.max_layers,
            max_concurrent_builds=settings.max_concurrent_builds,
            layer_compression=settings.layer_compression,
            evaluators=Evaluators(
                memory_limit=settings.evaluator_memory_limit, repl=settings.nix_evaluator == "repl"
            ),
            record_cache=settings.record_cache,
        )

    async def warm_up(self) -> None:
        """Start the layer writers, and this host's evaluator on a local package set, and load
        the layering history, so the first image need not; start following `nixery gc`."""
        self._collections.start()
        await asyncio.gather(asyncio.to_thread(self._writers.start), self._warm_evaluator(), self._warm_history())

    async def _warm_history(self) -> None:
        try:
            await self.history.current()
        except Exception as exc:  # the first build tries again
            log.info("build.history_not_loaded", error=str(exc)[:200])

    async def _warm_evaluator(self) -> None:
        if self.evaluators is None:
            return
        try:
            revision = await self.source.resolve("latest")
        except Exception as exc:  # the first build reports it
            log.info("build.warm_up_skipped", error=str(exc)[:200])
            return
        if revision.path is not None:  # fetched sources warm up with their first build
            await self.evaluators.warm(
                revision.id, revision.path, system=nix.host_system(), deadline=Deadline.after(self.nix_timeout)
            )

    async def close(self) -> None:
        await self._collections.close()
        await asyncio.gather(*(layer.stored for layer in self._storing.values()), return_exceptions=True)
        await self.evaluations.flush()
        await self.names.close()
        await self.history.close()
        if self.evaluators is not None:
            await self.evaluators.close()
        await self._writers.close()

    # ---- lookups -------------------------------------------------------

    async def image(
        self, request: ImageRequest, tag: str, *, on_wait: Callable[[Build], None] | None = None
    ) -> ImageRecord:
        """The image for a request, built on first use. `on_wait` hears of a build it waits for."""
        revision = await self.source.resolve(tag)
        key = self._image_key(revision, request)
        record = await self._cached_record(key) or await self._record_by_resolved_names(revision, request)
        metrics.cache_lookup("image", hit=record is not None)
        if record is not None:
            self._note_use(record.key)
            return record
        build = self._build_for(key, request)
        if on_wait is not None:
            on_wait(build)
        return await self._images.run(key, lambda: self._build(request, revision, key, build))

    async def built(self, request: ImageRequest, tag: str) -> ImageRecord | None:
        """The image if it is already built, without building it (for access control)."""
        revision = await self.source.resolve(tag)
        record = await self._cached_record(self._image_key(revision, request))
        return record or await self._record_by_resolved_names(revision, request)

    async def check_names(self, request: ImageRequest, tag: str) -> None:
        """Raise PackagesNotFound (with the nearest names) for the names the package set's
        list surely lacks: an image that can never be built (no Nix process is started)."""
        await self.names.check(request.packages, await self.source.resolve(tag))

    async def start(self, request: ImageRequest, tag: str) -> Build:
        """Start building in the background (if needed); returns the build to follow."""
        revision = await self.source.resolve(tag)
        key = self._image_key(revision, request)
        record = await self._cached_record(key) or await self._record_by_resolved_names(revision, request)
        metrics.cache_lookup("image", hit=record is not None)
        if record is not None:
            build = self.builds.new(request.display_name)
            build.emit(Stage.DONE, "already built", **_record_summary(record))
            return build
        build = self._build_for(key, request)
        task = asyncio.ensure_future(self._images.run(key, lambda: self._build(request, revision, key, build)))
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return build

    def _image_key(self, revision: Revision, request: ImageRequest) -> str:
        return image_key(revision, request, self.max_layers, self.compression)

    async def _record_by_resolved_names(self, revision: Revision, request: ImageRequest) -> ImageRecord | None:
        """The image a request spelt otherwise names (`Curl/Shell`: `curl/shell`), when what its
        names resolve to is known (no Nix process) and that image is built."""
        resolved = await self.evaluations.lookup(revision, request.arch.nix_system, request.packages)
        if resolved is None:
            return None
        named = _by_resolved_names(request, resolved)
        return None if named == request else await self._cached_record(self._image_key(revision, named))

    def _background_done(self, task: asyncio.Task[ImageRecord]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # reported through the build's events

    def _build_for(self, key: str, request: ImageRequest) -> Build:
        build = self._in_flight.get(key)
        if build is None:
            build = self._in_flight[key] = self.builds.new(request.display_name)
        return build

    def recent_images(self, limit: int = 20) -> list[ImageRecord]:
        """The most recently built images this process has seen, newest first."""
        return self._records.recent(limit)

    async def _cached_record(self, key: str) -> ImageRecord | None:
        """The built image under `key`: from memory, else from storage if all its blobs are there."""
        record = self._records.get(key)
        if record is None:
            data = await self.storage.get_meta(f"images/{key}")
            if data is None:
                return None
            record = ImageRecord.from_json(data)
            if not await self._blobs_present(record):
                log.warning("build.record_incomplete", key=key[:12], image=record.name, note="rebuilding")
                return None
            self._records.put(record)
        return record

    async def _blobs_present(self, record: ImageRecord) -> bool:
        sizes = await asyncio.gather(*(self.storage.stat_blob(digest) for digest in record.blobs()))
        return all(size is not None for size in sizes)

    def _note_use(self, key: str) -> None:
        """Record that an image was pulled, at most once per USAGE_INTERVAL (for GC)."""
        now = time.time()
        if not self._records.should_write_use(key, now, USAGE_INTERVAL):
            return
        task = asyncio.ensure_future(
            self.storage.put_meta(f"{USAGE_PREFIX}{key}", canonical_json({"last_used": now}))
        )
        self._background_writes.add(task)
        task.add_done_callback(self._write_done)

    def _write_done(self, task: asyncio.Task[None]) -> None:
        self._background_writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("build.usage_not_recorded", error=str(task.exception()))

    def forget_images_using(self, digest: Digest) -> None:
        """A blob was found missing or corrupt: its images are checked in storage (and rebuilt)
        on their next use."""
        if forgotten := self._records.forget_using(digest):
            log.info("build.images_forgotten", blob=str(digest), images=forgotten)

    def on_collected(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever `nixery gc` has removed something (after the records are dropped)."""
        self._collection_listeners.append(listener)

    def _collected(self) -> None:
        self._records.clear()
        for listener in self._collection_listeners:
            listener()

    # ---- building ------------------------------------------------------

    async def _build(self, request: ImageRequest, revision: Revision, key: str, build: Build) -> ImageRecord:
        try:
            async with self.storage.exclusive(build_lock(key)):
                # Another process sharing this storage may have built it while we waited.
                record = await self._cached_record(key)
                if record is None:
                    record = await self._counted_build(request, revision, key, build)
                else:
                    metrics.build_waited()
        except BaseException as exc:
            tail = getattr(exc, "log_tail", "") or None  # Nix's last lines, for the progress page
            build.emit(
                Stage.FAILED, str(exc) or type(exc).__name__, error=type(exc).__name__, log=tail,
                suggestions=getattr(exc, "suggestions", None) or None,  # nearest names for missing ones
            )
            log.warning("build.failed", image=request.display_name, build=build.id, error=str(exc)[:500])
            raise
        else:
            build.emit(Stage.DONE, "image ready", **_record_summary(record))
            return record
        finally:
            self._in_flight.pop(key, None)

    async def _counted_build(self, request: ImageRequest, revision: Revision, key: str, build: Build) -> ImageRecord:
        """A build that runs here (the metrics count it; not a wait for another process's).
        Names the package set lacks are counted apart from failures, and answered with the
        nearest names it has."""
        started, result = time.monotonic(), "failed"
        metrics.build_started()
        try:
            record = await self._build_stages(request, revision, key, build)
            result = "done"
            return record
        except PackagesNotFound as exc:
            result = "not_found"
            raise await self.names.with_suggestions(exc, revision) from None
        finally:
            metrics.build_finished(result, time.monotonic() - started)

    async def _build_stages(self, request: ImageRequest, revision: Revision, key: str, build: Build) -> ImageRecord:
        started = time.monotonic()
        bound = log.bind(image=request.display_name, source=revision.source, key=key[:12], build=build.id)
        build.emit(Stage.QUEUED, "waiting for a build slot", source=revision.source, revision=revision.id)
        bound.info("build.queued", revision=revision.id)
        async with self._build_slots:
            resolved, graph = await self._nix_closure(request, revision, bound, build)
        named = _by_resolved_names(request, resolved)
        named_key = self._image_key(revision, named)
        if named_key == key:
            return await self._store_image(named, revision, key, build, resolved, graph, bound, started)
        # Spelt otherwise than its resolved names: the image is theirs, built once under their key.
        async with self.storage.exclusive(build_lock(named_key)):
            record = await self._cached_record(named_key)
            if record is not None:
                bound.info("build.found_by_resolved_names", name=record.name, key=named_key[:12])
                return record
            return await self._store_image(named, revision, named_key, build, resolved, graph, bound, started)

    async def _store_image(
        self, request: ImageRequest, revision: Revision, key: str, build: Build,
        resolved: list[ResolvedPackage], graph: ClosureGraph, bound: Any, started: float,
    ) -> ImageRecord:
        """Layers, config, manifests and the record of a closure that is built."""
        roots = sorted({out for package in resolved for out in package.outputs})
        build.emit(Stage.LAYERING, f"grouping {len(graph)} store paths into layers", paths=len(graph))
        async with self._planning:
            history = await self.history.current()
            plan = await asyncio.to_thread(
                plan_layers, graph, roots, max_layers=self.max_layers - 1, history=history
            )
        bound.info("build.layers_planned", layers=len(plan), paths=len(graph))
        counter = _LayerCounter(build, total=len(plan) + 1)
        counter._emit(f"storing {counter.total} layers (compressing those not stored yet)")

        # The entry-point layer is last in the image but made alongside the others.
        *stored, (ca_bundle, last) = await asyncio.gather(
            *(self._store_layer(sorted(paths), counter) for paths in plan),
            self._store_entry_layer(roots, list(graph.nodes.keys()), counter),
        )
        stored.append(last)
        layers = [layer.descriptor for layer in stored]
        bound.info("build.layers_compressed", layers=len(layers), created=counter.created, bytes=counter.bytes)

        env = [f"PATH={DEFAULT_PATH}"]
        if ca_bundle:
            env.append(f"SSL_CERT_FILE={SSL_CERT_FILE}")
        config = image_config(
            layers,
            architecture=request.arch.oci_name,
            env=env,
            cmd=_image_cmd(request, resolved),
            labels={"org.nixos.nixery.packages": " ".join(sorted(p.attr for p in resolved))},
        )
        build.emit(Stage.UPLOADING, "storing the config and manifests")
        formats = self.compression.manifest_formats
        documents = [image_manifest(fmt, config, layers, self.compression) for fmt in formats]
        manifests = {
            fmt: ManifestRef(Digest.of(document), len(document))
            for fmt, document in zip(formats, documents, strict=True)
        }
        record = ImageRecord(
            key=key,
            name=request.display_name,
            source=revision.source,
            revision=revision.id,
            packages=tuple(sorted(p.attr for p in resolved)),
            architecture=request.arch.oci_name,
            config=Digest.of(config),
            manifests=manifests,
            layers=tuple(layers),
            built_at=time.time(),
            layer_paths=tuple(tuple(sorted(paths)) for paths in plan) + ((),),  # the entry layer holds no store path
        )
        # Everything is written side by side, each piece fsync'd, but the record appears only
        # once every blob it names is stored. Shielded: a layer's writes serve every build
        # that uses it, not only this one. The history only guides the layering of later images.
        blobs_stored = asyncio.gather(
            *(self.storage.put_blob_bytes(blob) for blob in (config, *documents)),
            *(asyncio.shield(layer.stored) for layer in stored if layer.stored is not None),
        )
        blobs_stored.add_done_callback(_retrieved)  # when the record fails first, the build reports that error
        await asyncio.gather(
            self.storage.put_meta_after(f"images/{key}", record.to_json(), blobs_stored),
            self.history.record(plan),
        )
        self._records.put(record)
        bound.info(
            "build.done",
            seconds=round(time.monotonic() - started, 3),
            layers=len(layers),
            bytes=record.compressed_size,
            new_layers=counter.created,
        )
        return record

    async def _nix_closure(
        self, request: ImageRequest, revision: Revision, bound: Any, build: Build
    ) -> tuple[list[ResolvedPackage], ClosureGraph]:
        deadline = Deadline.after(self.nix_timeout)  # for every Nix process of this image
        system = request.arch.nix_system
        nix.check_buildable(system)
        bound.info("build.evaluating")
        build.emit(Stage.EVALUATING, f"evaluating {', '.join(request.order or request.packages)}")
        resolved = await self.evaluations.lookup(revision, system, request.packages)
        evaluated = resolved is None
        if resolved is None:
            resolved = await nix.evaluate(
                await self.source.checkout(revision), request.packages, system, source=revision.source,
                deadline=deadline, evaluators=self.evaluators, revision=revision.id,
            )
            self.evaluations.remember(revision, system, resolved)
        bound.info("build.realising", derivations=len(resolved), evaluated=evaluated)
        build.emit(Stage.BUILDING, f"building {len(resolved)} packages with Nix", built=0, to_build=0)
        outputs = [out for package in resolved for out in package.outputs]
        graph = await nix.ensure_built_closure(
            [p.drv_path for p in resolved], outputs, deadline=deadline, on_line=NixLogProgress(build)
        )
        return resolved, graph

    async def _store_layer(self, store_paths: list[str], counter: _LayerCounter) -> _StoredLayer:
        key = layer_key(store_paths, self.compression)
        write = functools.partial(write_store_layer, store_paths, compression=self.compression)
        return counter.count(
            await self._layers.run(key, lambda: self._cached_or_new_layer(key, _describe_layer(store_paths), write))
        )

    async def _store_entry_layer(
        self, outputs: Sequence[str], closure: Sequence[str], counter: _LayerCounter
    ) -> tuple[str | None, _StoredLayer]:
        """The entry-point layer and the CA bundle it links, if any.

        Its cache key depends on what the worker finds, so it is written first and
        dropped when storage has it already (it is a few kilobytes).
        """
        started = time.monotonic()
        write = functools.partial(write_entry_points, outputs, closure, compression=self.compression)
        staged = self._new_staged_file()
        try:
            written = await self._writers.run(write_file, staged, write)
            known = await self._known_layer(written.key)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        if known is not None:
            staged.unlink()
            return written.ca_bundle, counter.count(known)
        blob = written.blob
        descriptor = LayerDescriptor(blob.digest, blob.diff_id, blob.size, "entry points (/bin, /etc, /tmp)")
        return written.ca_bundle, counter.count(
            self._start_storing(written.key, descriptor, staged, time.monotonic() - started)
        )

    async def _cached_or_new_layer(self, key: str, description: str, write: LayerWrite) -> _StoredLayer:
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

    async def _known_layer(self, key: str) -> _StoredLayer | None:
        """The layer for `key` if it is stored (at its recorded size) or being stored."""
        if (storing := self._storing.get(key)) is not None:
            return storing
        cached = await self.storage.get_meta(f"layers/{key}")
        if cached is None:
            return None
        descriptor = LayerDescriptor.from_json(json.loads(cached))
        if await self.storage.stat_blob(descriptor.digest) != descriptor.size:
            return None
        # Tell a concurrent garbage collection that this blob is in use again.
        await self.storage.touch_blob(descriptor.digest)
        return _StoredLayer(descriptor, created=False, seconds=0.0)

    def _new_staged_file(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.storage.staging_dir(), prefix="layer-")
        os.close(fd)  # a worker opens it by name; held here, it would outlive the blob it becomes
        return Path(name)

    def _start_storing(self, key: str, descriptor: LayerDescriptor, staged: Path, seconds: float) -> _StoredLayer:
        """Write a compressed layer's blob and record in the background (`stored`)."""
        if (storing := self._storing.get(key)) is not None:  # another build wrote the same layer meanwhile
            staged.unlink(missing_ok=True)
            return storing
        stored = asyncio.ensure_future(self._publish_layer(key, descriptor, staged))
        self._storing[key] = _StoredLayer(descriptor, created=False, seconds=0.0, stored=stored)
        stored.add_done_callback(lambda task: self._published(key, task))
        return _StoredLayer(descriptor, created=True, seconds=seconds, stored=stored)

    async def _publish_layer(self, key: str, descriptor: LayerDescriptor, staged: Path) -> None:
        try:
            # Side by side: the record is only believed (above) when its blob is stored, at its size.
            await asyncio.gather(
                self.storage.put_blob(descriptor.digest, staged),
                self.storage.put_meta(f"layers/{key}", canonical_json(descriptor.to_json())),
            )
        finally:
            staged.unlink(missing_ok=True)

    def _published(self, key: str, task: asyncio.Future[None]) -> None:
        self._storing.pop(key, None)
        if not task.cancelled() and task.exception() is not None:  # its builds report it; a later one retries
            log.warning("build.layer_not_stored", key=key[:12], error=str(task.exception())[:200])


@dataclass(frozen=True, slots=True)
class _StoredLayer:
    descriptor: LayerDescriptor
    created: bool  # compressed by this call, not found in storage
    seconds: float  # time spent compressing
    stored: asyncio.Future[None] | None = None  # writing its blob and record; None: stored already


class _LayerCounter:
    """Counts an image's layers as they are found in the cache or compressed."""

    def __init__(self, build: Build, total: int):
        self.build = build
        self.total = total
        self.done = 0
        self.created = 0
        self.bytes = 0

    def count(self, stored: _StoredLayer) -> _StoredLayer:
        layer = stored.descriptor
        self.done += 1
        metrics.layer_stored(stored.created, layer.size)
        if not stored.created:
            self._emit(f"layer {layer.digest.hex[:12]} already stored")
            return stored
        self.created += 1
        self.bytes += layer.size
        rate = layer.size / stored.seconds / 1e6 if stored.seconds > 0 else 0.0
        self._emit(f"compressed layer {layer.digest.hex[:12]} ({layer.size / 1e6:.1f} MB, {rate:.0f} MB/s)")
        return stored

    def _emit(self, message: str) -> None:
        self.build.emit(
            Stage.COMPRESSING, message, layers_done=self.done, layers_total=self.total,
            layers_created=self.created, compressed_bytes=self.bytes,
        )


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _record_summary(record: ImageRecord) -> dict[str, Any]:
    digests = pull_digests(record.descriptors)
    return {
        "image": record.name,
        "digest": str(digests.default),
        "oci_digest": str(digests.oci),
        "layers": len(record.layers),
        "size": record.compressed_size,
    }

