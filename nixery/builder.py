"""From an image name to stored layers and manifests: where the package source,
layering, the caches and storage meet. A build is a short pipeline, one method
per step (for several platforms, `nixery.platforms`: one pipeline each, then an index):

    closure   the package source's resolver (`nixery.resolver`) resolves the
              names (kept per name: `nixery.evaluations`) and realises them
    plan      store paths grouped into layers, guided by the layering history
              shared through storage (`nixery.history`)
    layers    each found stored, or compressed once in a worker process
              (`nixery.layers.store`); and the entry-point layer
    assemble  the config, the Docker and OCI manifests (OCI only with zstd
              layers: Docker schema 2 has no zstd media type), the record
              (`nixery.assembly`)
    attach    documents about the image (`nixery.attachments`)
    publish   every blob, and the record (`nixery.images`): written side by
              side, but the record appears only once its blobs are stored

This module runs no Nix itself. Image records, layers and evaluations are kept
in storage (their keys: `nixery.images`, `nixery.layers.store`), so they
survive restarts and are shared by replicas: a new image of known, built names
starts no Nix process.

An image is stored under the names its packages resolved to (their
`pullName`: the attribute path, in lower case when that finds the same
attribute), so `Curl/Shell`, `curl/shell` and `shell/curl` are one image with
one record, named as first asked for (`shell/curl` if that came first). A
request spelt otherwise finds it through what its names evaluated to, without
Nix once they were evaluated.

In memory, each process keeps the image records it used most recently, and
only while their blobs are stored (`nixery.images`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from nixery import metrics
from nixery.amounts import plural
from nixery.assembly import AssembledImage, assemble
from nixery.attachments import Closure, attach
from nixery.background import retrieve
from nixery.baseline import DEFAULT_BASELINE, Baseline, linked_packages
from nixery.closure import ClosureGraph, GraphError, Registration
from nixery.evaluations import EvaluationCache
from nixery.failures import DEFAULT_TTL as DEFAULT_FAILED_BUILD_TTL
from nixery.failures import FailedBuilds, RememberedFailure
from nixery.fair import FairSlots, requester
from nixery.history import PlatformHistories
from nixery.images import DEFAULT_CAPACITY, RECENT, ImageRecord, ImageStore, image_key
from nixery.layers import nixdb
from nixery.layers.cost import DEFAULT_LAYER_COST_MB, CostModel
from nixery.layers.entrypoints import ENTRY_POINT_LAYERS
from nixery.layers.grouping import plan_layers
from nixery.layers.popularity import Popularity
from nixery.layers.rootlinks import LinkedPackage
from nixery.layers.store import LayerStore, StoredLayer
from nixery.lru import LRU
from nixery.nix import store_db
from nixery.nix.errors import NixError, PackagesNotFound, RefInvalid, RefNotFound, SourceUnavailable
from nixery.package_names import PackageNames
from nixery.platforms import (
    PlatformFailed,
    each_image_once,
    each_platform,
    host_arch,
    image_summary,
    index_image,
    index_key,
    platform_name,
)
from nixery.progress import Build, BuildLog, LayerCounter, NixLogProgress, PlatformRelay, Stage, report_links
from nixery.recipes import build_recipe, names_manifest, read_recipe
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import Compression
from nixery.registry.names import Arch, ImageRequest
from nixery.resolver import PackageResolver, ResolvedPackage, Revision
from nixery.singleflight import SingleFlight, WorkStopped
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)


#: The last event of a build stopped by closing the builder (its progress page shows it as the error).
STOPPED_MESSAGE = "stopped: the registry is shutting down"


def _say_stopped(build: Build) -> None:
    """The build's last event: stopped, not failed (its page offers to build it again)."""
    build.emit(Stage.FAILED, STOPPED_MESSAGE, error="stopped")


def _shutting_down(request: ImageRequest) -> WorkStopped:
    return WorkStopped(
        f"the registry is shutting down and stopped building {request.display_name}; pull again: "
        "another replica, or this one once it is back, builds it"
    )


def _by_resolved_names(request: ImageRequest, resolved: Sequence[ResolvedPackage]) -> ImageRequest:
    """The request under the names its packages resolved to, in the order it gave them."""
    return request.renamed({package.name: package.pull_name for package in resolved})


class ImageBuilder:
    def __init__(
        self,
        *,
        storage: Storage,
        source: PackageResolver,
        max_layers: int,
        max_concurrent_builds: int,
        layer_cost_mb: float = DEFAULT_LAYER_COST_MB,
        layer_workers: int | None = None,
        layer_compression: Compression = Compression.GZIP,
        record_cache: int = DEFAULT_CAPACITY,
        platforms: Sequence[Arch] = (),
        popularity: Popularity | None = None,
        baseline: Sequence[str] = DEFAULT_BASELINE,
        nix_annotations: bool = False,
        builds: BuildLog | None = None,
        failed_build_ttl: float = DEFAULT_FAILED_BUILD_TTL,
    ):
        self.storage = storage
        #: The package source, through its resolver: tags to revisions, names to closures.
        self.source = source
        self.max_layers = max_layers
        #: NIXERY_LAYER_COST_MB: how the layering weighs a layer against the bytes it saves.
        self.layer_cost = CostModel.for_layer_cost_mb(layer_cost_mb)
        #: Of every layer this builder writes; it decides the manifest formats its images have.
        self.compression = layer_compression
        # In turn by client: one client's twenty queued builds hold back no other's.
        self._build_slots = FairSlots(max_concurrent_builds)
        self._evaluation_slot = FairSlots(1)  # for `find`: what names resolve to, no build
        self._images: SingleFlight[ImageRecord] = SingleFlight()
        #: Built images: their records in storage, the most recently used in memory.
        self.images = ImageStore(storage, capacity=record_cache)
        self.layers = LayerStore(storage, compression=layer_compression, workers=layer_workers or os.cpu_count() or 2)
        #: NIXERY_PLATFORMS: with several, a name without a platform gets an image index.
        self.platforms = tuple(platforms) or (host_arch(),)
        #: NIXERY_NIX_ANNOTATIONS: layers list their store paths for nix-snapshotter.
        self.nix_annotations = nix_annotations
        #: The layering history (one per platform), shared through storage with the other processes.
        self.histories = PlatformHistories(storage, host_arch().nix_system)
        #: NIX_POPULARITY_URL's counts, for the layering of a registry whose history is young.
        self.popularity = popularity
        #: Builds by id, with their progress (with several worker processes, theirs too).
        self.builds = builds or BuildLog()
        self._in_flight: dict[str, Build] = {}
        #: NIXERY_FAILED_BUILD_TTL: builds Nix failed, answered with their error for a while.
        self.failures = FailedBuilds(failed_build_ttl)
        #: What image names evaluated to: a new image of known, built names starts no Nix process.
        self.evaluations = EvaluationCache(storage)
        #: The package list (search, the names a set lacks, suggestions for them).
        self.names = PackageNames(storage)
        #: NIXERY_BASELINE: packages every image gets (a CA bundle, /etc/services).
        self.baseline = Baseline(baseline)
        #: The tag each recent revision was last resolved from: stored with the images built from it.
        self._tags: LRU[str, str] = LRU(256)
        #: The "already built" answer of each recent name and image, given again while the build log keeps it.
        self._answers: LRU[tuple[str, str, str], Build] = LRU(256)

    async def warm_up(self) -> None:
        """Start the layer writers and the package source's resolver, and load the layering
        history, so the first image need not; start following `nixery gc`."""
        self.images.start()
        await asyncio.gather(asyncio.to_thread(self.layers.start), self.source.warm_up(), self._warm_history(),
                             *([self.popularity.load()] if self.popularity else []))

    async def _warm_history(self) -> None:
        try:
            await self.histories.of(host_arch().nix_system).current()
        except Exception as exc:  # the first build tries again
            log.info("build.history_not_loaded", error=str(exc)[:200])

    async def close(self) -> None:
        """Stop the builds in flight, then what they use. A build stopped here has killed and
        reaped its Nix processes; one left running would go on without the package source's
        evaluator (starting Nix processes of its own), and asyncio's own shutdown, which cancels
        every task at once, can leave a process start waiting for its child forever (CPython 3.11)."""
        await self._images.cancel_all()
        await self.baseline.close()  # shared by builds, so not stopped with them
        await self.images.close()
        await self.layers.close()
        await self.evaluations.flush()
        await self.names.close()
        await self.histories.close()
        await self.source.close()

    # ---- lookups -------------------------------------------------------

    async def image(
        self, request: ImageRequest, tag: str, *, on_wait: Callable[[Build], None] | None = None,
        client_waits: bool = True,
    ) -> ImageRecord:
        """The image for a request, built on first use. `on_wait` hears of a build it waits for.
        Without `client_waits` (a declaration's prebuild), a shutdown stops the build at once."""
        revision, key, record = await self._lookup(request, tag)
        if record is not None:
            self.images.note_use(record.key)
            return record
        return await self._build_once(request, revision, key, tag, on_wait, client_waits=client_waits)

    async def rebuilt_naming(self, manifest: Digest) -> ImageRecord | None:
        """The image whose manifest (or index, or attached document) `manifest` is, built again,
        for a pull by digest of an image that lost a blob (gone, or set aside as damaged): as a
        pull by tag finds the image incomplete and rebuilds it. Builds are deterministic, so the
        image built again from the same revision has the same manifests (but where a reused layer
        with paths outside the closure is gone and the store here lacks them: `_servable`). None when no stored
        image names it (never built here, or removed by `nixery gc`), or the package set's
        revision it was built from can no longer be had."""
        for key, data in await self.images.recipes_naming(manifest):
            recipe = read_recipe(data)
            if recipe is None:
                log.warning("build.recipe_unreadable", key=key[:12], manifest=str(manifest))
                continue
            request, tag, revision_id = recipe
            revision = await self._revision(tag, revision_id)
            if revision is None:
                log.warning("build.revision_gone", key=key[:12], manifest=str(manifest), tag=tag,
                            revision=revision_id, note="the image cannot be built again")
                continue
            log.info("build.rebuilding_for_digest", key=key[:12], manifest=str(manifest), image=request.display_name)
            found_key, record = await self._find(revision, request)
            if record is None:
                record = await self._build_once(request, revision, found_key, tag)
            if names_manifest(record, manifest):
                self.images.note_use(record.key)
                return record
            log.warning("build.rebuilt_other_manifests", key=key[:12], manifest=str(manifest),
                        built=[str(d.digest) for d in record.descriptors])
        return None

    async def _revision(self, tag: str, revision_id: str) -> Revision | None:
        """The revision `revision_id`, as `tag` selects it still, or (a branch moved on) as its
        own id selects it (a git commit); None when neither does."""
        for name in dict.fromkeys([tag, revision_id]):
            try:
                revision = await self.source.resolve(name)
            except Exception as exc:  # e.g. a revision id that is no tag: reported as the revision gone
                log.info("build.revision_not_resolved", tag=name[:80], error=str(exc)[:200])
                continue
            if revision.id == revision_id:
                self._tags.put(revision.id, name)  # the rebuilt image's record is stored with its recipe too
                return revision
        return None

    async def _build_once(
        self, request: ImageRequest, revision: Revision, key: str, tag: str,
        on_wait: Callable[[Build], None] | None = None, *, client_waits: bool = True,
    ) -> ImageRecord:
        if (failed := self.failures.recent(key)) is not None:
            log.info("build.failure_remembered", image=request.display_name, key=key[:12], error=failed.message[:300])
            raise failed
        build = self._build_for(key, request, tag)
        try:
            if on_wait is not None:
                on_wait(build)
            return await self._images.run(key, lambda: self._build(request, revision, key, build), counted=client_waits)
        except WorkStopped:
            self._not_begun(key, build)
            raise _shutting_down(request) from None
        except BaseException as exc:
            self._not_started(key, build, exc)
            raise

    async def stop_unwaited_builds(self) -> None:
        """The registry begins to shut down: stop the builds no request waits for (started by
        `start`: a build form, a declaration's prebuild), and start no more such builds. Their
        progress says they were stopped."""
        await self._images.stop_unwaited()
        for key, build in list(self._in_flight.items()):
            self._not_begun(key, build)

    def _not_begun(self, key: str, build: Build) -> None:
        """A build refused as the registry shuts down, or cancelled before `_build` ran (which says
        it stopped and forgets it): said to be stopped, and forgotten."""
        if not self._images.in_flight(key):
            _say_stopped(build)
            if self._in_flight.get(key) is build:
                del self._in_flight[key]

    def _not_started(self, key: str, build: Build, exc: BaseException) -> None:
        """A failure before `_build` ran (which ends the build's record and forgets it): its record
        ends as failed, and is forgotten. Left unfinished, every later request for the image joined
        it and none built it, and the build log stopped dropping old builds behind it."""
        if not self._images.in_flight(key) and self._in_flight.get(key) is build:
            error = type(exc).__name__
            build.emit(Stage.FAILED, f"the build did not start: {str(exc) or error}", error=error)
            del self._in_flight[key]

    def stop_builds(self) -> None:
        """The registry's time to shut down is nearly up: stop every build and start no more. Their
        progress says so at once, and the requests waiting for them get WorkStopped at once, while
        the builds' Nix processes are still being stopped (`close` waits for that), so that both
        are answered before they are cut off."""
        for build in list(self._in_flight.values()):
            _say_stopped(build)
        self._images.stop()

    async def built(self, request: ImageRequest, tag: str) -> ImageRecord | None:
        """The image if it is already built, without building it (for access control)."""
        return (await self._lookup(request, tag, counted=False))[2]

    async def find(self, request: ImageRequest, tag: str) -> ImageRecord | None:
        """The image if it is built, under any spelling of its names (`CURL/Shell`, `Python3`):
        what `built` finds, else what the names resolve to, evaluated if need be (no build).
        Raises PackagesNotFound, as a pull would, for names the package set lacks."""
        revision, _, record = await self._lookup(request, tag, counted=False)
        if record is not None:
            return record
        await self.check_names(request, tag)  # names the set's list surely lacks: no Nix process
        system = request.arch.nix_system
        if await self.evaluations.lookup(revision, system, request.packages) is None:
            # One at a time, in turn by client: page views of ever new names start one Nix
            # process at most (the build slots' would make a page wait for a build).
            async with self._evaluation_slot.hold(requester.get()):
                until = time.monotonic() + self.source.timeout
                try:
                    await self._resolve(revision, system, request.packages, until=until)
                except PackagesNotFound:
                    raise
                except NixError:  # the pull will say what Nix said: here, the image is not built
                    return None
        return await self._record_by_resolved_names(revision, request)

    async def failed_lately(self, request: ImageRequest, tag: str) -> RememberedFailure | None:
        """The failure a pull of the image is answered with now, instead of a build (`nixery.failures`)."""
        revision = await self.source.resolve(tag)
        return self.failures.remembered(self._image_key(revision, request))

    async def _resolve(
        self, revision: Revision, system: str, packages: Sequence[str], *, until: float
    ) -> tuple[list[ResolvedPackage], bool]:
        """What the names resolve to: the kept evaluation, or else one made now (and kept);
        and whether it was made now."""
        resolved = await self.evaluations.lookup(revision, system, packages)
        if resolved is not None:
            return resolved, False
        resolved = await self.source.evaluate(revision, packages, system, until=until)
        self.evaluations.remember(revision, system, resolved)
        return resolved, True

    async def names_missing(self, request: ImageRequest, tag: str) -> str | None:
        """What `check_names` would raise, as its message; None when it would not."""
        try:
            await self.check_names(request, tag)
        except PackagesNotFound as exc:
            return str(exc)
        return None

    async def check_names(self, request: ImageRequest, tag: str) -> None:
        """Raise PackagesNotFound (with the nearest names) for the names the package set's
        list surely lacks: an image that can never be built (no Nix process is started)."""
        await self._check_names(request, await self.source.resolve(tag))

    async def _check_names(self, request: ImageRequest, revision: Revision, *, loaded_only: bool = False) -> None:
        if request.platforms or request.arch is host_arch():
            await self.names.check(request.packages, revision, loaded_only=loaded_only)
        else:  # `arm64/NAME` on another machine: that platform's list, which may lack what the host's has
            await self.names.check(
                request.packages, revision, system=request.arch.nix_system, platform=platform_name(request.arch),
                loaded_only=loaded_only,
            )

    async def start(self, request: ImageRequest, tag: str) -> Build:
        """Start building in the background (if needed); returns the build to follow."""
        revision, key, record = await self._lookup(request, tag)
        if record is not None:
            return self._already_built(request, record, tag)
        # Asked for explicitly: a failure remembered is built again, of each platform too.
        self.failures.forget(key)
        for one in each_platform(request) if request.platforms else ():
            self.failures.forget(self._image_key(revision, one))
        build = self._build_for(key, request, tag)
        try:
            self._images.begin(key, lambda: self._build(request, revision, key, build))  # its failure: in its events
        except WorkStopped:
            self._not_begun(key, build)
            raise _shutting_down(request) from None
        return build

    def _already_built(self, request: ImageRequest, record: ImageRecord, tag: str) -> Build:
        """The finished build that says the image is built: one per name, image and tag while the
        build log keeps it. A new one for each ask let a client that posted the same built image 250
        times push every other build out of the log (their pages and streams then 404); one for
        every tag made each tag's page name the tag posted last (its page shows the build's tag)."""
        answer = self._answers.get((request.display_name, record.key, tag))
        if answer is None or self.builds.get(answer.id) is not answer:
            answer = self.builds.new(request.display_name, tag)
            answer.emit(Stage.DONE, "already built", **image_summary(record))
            self._answers.put((request.display_name, record.key, tag), answer)
        return answer

    async def _lookup(
        self, request: ImageRequest, tag: str, *, counted: bool = True
    ) -> tuple[Revision, str, ImageRecord | None]:
        """The revision a tag selects, the image's key, and the image if it is built."""
        revision = await self.source.resolve(tag)
        self._tags.put(revision.id, tag)
        key, record = await self._find(revision, request)
        if counted:
            metrics.cache_lookup("image", hit=record is not None)
        return revision, key, record

    async def _find(self, revision: Revision, request: ImageRequest) -> tuple[str, ImageRecord | None]:
        key = self._image_key(revision, request)
        return key, await self.images.get(key) or await self._record_by_resolved_names(revision, request)

    def _image_key(self, revision: Revision, request: ImageRequest) -> str:
        if request.platforms:
            return index_key([self._image_key(revision, one) for one in each_platform(request)])
        return image_key(
            revision, request, self.max_layers, self.compression, self.baseline.key(),
            nix_annotations=self.nix_annotations,
        )

    async def _record_by_resolved_names(self, revision: Revision, request: ImageRequest) -> ImageRecord | None:
        """The image a request spelt otherwise names (`Curl/Shell`: `curl/shell`), when what its
        names resolve to is known (no Nix process) and that image is built."""
        resolved = await self.evaluations.lookup(revision, request.arch.nix_system, request.packages)
        if resolved is None:
            return None
        named = _by_resolved_names(request, resolved)
        return None if named == request else await self.images.get(self._image_key(revision, named))

    def _build_for(self, key: str, request: ImageRequest, tag: str) -> Build:
        build = self._in_flight.get(key)
        if build is None:
            build = self._in_flight[key] = self.builds.new(request.display_name, tag)
        return build

    def recent_images(self, limit: int = 20) -> list[ImageRecord]:
        """The most recently built images this process has seen, newest first, each once (an
        image of several platforms without its default platform's record: `each_image_once`)."""
        return each_image_once(self.images.recent(RECENT))[:limit]

    def forget_images_using(self, digest: Digest) -> None:
        """A blob was found missing or corrupt: its images are checked in storage on their next use."""
        self.images.forget_using(digest)

    # ---- building: closure ─► plan ─► layers ─► assemble ─► attach ─► publish

    async def _build(self, request: ImageRequest, revision: Revision, key: str, build: Build) -> ImageRecord:
        try:
            await self._names_listed(request, revision)
            async with self.builds.locked(key, build, self.images.building(key)):
                # Another process sharing this storage may have built it while we waited.
                record = await self.images.get(key)
                if record is None:
                    record = await self._counted_build(request, revision, key, build)
                else:
                    metrics.build_waited()
        # By close() or stop_builds(): the registry stops (or `build --local` was interrupted); an
        # image index's build may first hear it from a platform's build it waits for (WorkStopped).
        except (asyncio.CancelledError, WorkStopped):
            # Not a failure of the build: said as what it is, not as an empty error.
            _say_stopped(build)
            log.info("build.stopped", image=request.display_name, build=build.id,
                     reason="the registry is shutting down")
            raise
        except BaseException as exc:
            tail = getattr(exc, "log_tail", "") or None  # Nix's last lines, for the progress page
            kind = type(exc.cause if isinstance(exc, PlatformFailed) else exc).__name__
            build.emit(
                Stage.FAILED, str(exc) or type(exc).__name__, error=kind, log=tail,
                suggestions=getattr(exc, "suggestions", None) or None,  # nearest names for missing ones
                missing=getattr(exc, "missing", None) or None,  # with or without a nearest name
            )
            log.warning("build.failed", image=request.display_name, build=build.id, error=str(exc)[:500])
            self.failures.remember(key, exc)
            raise
        else:
            build.emit(Stage.DONE, "image ready", **image_summary(record))
            return record
        finally:
            if self._in_flight.get(key) is build:  # not a later request's, for the next build
                del self._in_flight[key]

    async def _names_listed(self, request: ImageRequest, revision: Revision) -> None:
        """PackagesNotFound for names the package list (once read: a missing name's first answer
        reads it) surely lacks, before the image's storage lock (an object written on S3 and GCS),
        a build slot or Nix is taken: misspelt pulls held a slot for seconds each. Counted as a
        build whose names were not found, as one that asked Nix is."""
        started = time.monotonic()
        lacking: dict[Arch, PackagesNotFound] = {}
        # Of several platforms, names one platform's list has build (the others are left out of
        # the index); only names every list lacks are answered here, by the default's error.
        for one in each_platform(request) if request.platforms else [request]:
            try:
                await self._check_names(one, revision, loaded_only=True)
                return
            except PackagesNotFound as missing:
                lacking[one.arch] = missing
        for _ in lacking:  # as each platform's build is counted (`_counted_build`)
            metrics.build_started()
            metrics.build_finished("not_found", time.monotonic() - started)
        raise lacking[request.arch]

    async def _counted_build(self, request: ImageRequest, revision: Revision, key: str, build: Build) -> ImageRecord:
        """A build that runs here (the metrics count it; not a wait for another process's).
        Names the package set lacks are counted apart from failures, and answered with the
        nearest names it has. Of an image of several platforms, each platform's build is
        counted, and not the index that joins them: one broken package of one platform was
        counted as two failed builds, and every image of two platforms as three builds."""
        started, result = time.monotonic(), "failed"
        counted = not request.platforms
        if counted:
            metrics.build_started()
        try:
            stages = self._build_platforms if request.platforms else self._build_stages
            record = await stages(request, revision, key, build)
            result = "done"
            return record
        except PackagesNotFound as exc:
            result = "not_found"
            if exc.suggestions or exc.sets or exc.elsewhere:  # an index's, from a platform's build: its own
                raise
            other_platform = not request.platforms and request.arch is not host_arch()
            if exc.platform is None and other_platform:
                # Another platform's package set may lack what the host's has: say which one.
                exc = PackagesNotFound(exc.missing, exc.source, platform=platform_name(request.arch))
            system = request.arch.nix_system if other_platform else None  # that platform's names
            raise await self.names.with_suggestions(exc, revision, system, requested=request.packages) from None
        except (asyncio.CancelledError, WorkStopped):  # the registry stops: not a failure of the build
            result = "stopped"
            raise
        finally:
            if counted:
                metrics.build_finished(result, time.monotonic() - started)

    async def _build_stages(self, request: ImageRequest, revision: Revision, key: str, build: Build) -> ImageRecord:
        started = time.monotonic()
        bound = log.bind(image=request.display_name, source=revision.source, key=key[:12], build=build.id)
        build.emit(Stage.QUEUED, "waiting for a build slot", source=revision.source, revision=revision.id)
        bound.info("build.queued", revision=revision.id)
        async with self._build_slots.hold(requester.get()):
            resolved, baseline, graph = await self._closure(request, revision, bound, build)
        named = _by_resolved_names(request, resolved)
        named_key = self._image_key(revision, named)
        if named_key == key:
            return await self._store_image(named, revision, key, build, resolved, baseline, graph, bound, started)
        # Spelt otherwise than its resolved names: the image is theirs, built once under their key.
        async with self.images.building(named_key):
            record = await self.images.get(named_key)
            if record is not None:
                bound.info("build.found_by_resolved_names", name=record.name, key=named_key[:12])
                return record
            return await self._store_image(
                named, revision, named_key, build, resolved, baseline, graph, bound, started
            )

    async def _build_platforms(self, request: ImageRequest, revision: Revision, key: str, build: Build) -> ImageRecord:
        """The image for each platform, found or built side by side (each once, however many
        ask for it), joined by an index (`nixery.platforms`). Each platform's progress is
        relayed into this build's, tagged with the platform (`nixery.progress.PlatformRelay`).
        A platform whose package set lacks the names (the Debian set has no arm64 libcpuid16)
        is left out of the index, as registries list the platforms an image has: its clients
        are told so by their own client; when every platform lacks them, the default's error."""
        platforms = [platform_name(arch) for arch in request.platforms]
        build.emit(Stage.BUILDING, f"building an image for each platform: {', '.join(platforms)}", platforms=platforms)
        relay = PlatformRelay(build)

        async def image_for(one: ImageRequest) -> ImageRecord | PackagesNotFound:
            one_key, record = await self._find(revision, one)
            platform = platform_name(one.arch)
            if record is not None:
                relay.found(platform, **image_summary(record))
                return record
            try:
                return await self._build_once(
                    one, revision, one_key, build.tag, lambda own: relay.follow(platform, own)
                )
            except PackagesNotFound as missing:
                return missing
            except (SourceUnavailable, RefNotFound, RefInvalid):
                raise  # the package source's, not the platform's: every platform meets it
            except NixError as exc:  # Nix could not evaluate or build this platform's packages
                raise PlatformFailed(platform, exc) from exc

        try:
            found_or_missing = await asyncio.gather(*(image_for(one) for one in each_platform(request)))
            await relay.finish()
        finally:
            relay.stop()
        records = [one for one in found_or_missing if isinstance(one, ImageRecord)]
        lacking = {arch: one for arch, one in zip(request.platforms, found_or_missing, strict=True)
                   if isinstance(one, PackagesNotFound)}
        if not records:
            raise lacking[request.arch]
        if lacking:
            names = ", ".join(platform_name(arch) for arch in lacking)
            build.emit(Stage.BUILDING, f"not in the package set for {names}: the index lists the other platforms",
                       lacking=[platform_name(arch) for arch in lacking])
            # The lacking platforms' resolved names are unknown: the index keeps the key it was asked by.
            named_key = key
        else:  # spelt otherwise than its resolved names, the index is theirs, as each platform's image is
            named_key = index_key([record.key for record in records])
        if named_key == key:  # its build lock is held (`_build`)
            return await self._publish_index(named_key, records, request, revision, build)
        # Under the lock of the key it is stored by, as `_build_stages` stores an image spelt otherwise:
        # gc, which holds that lock, took the pointers written before the record for an orphan's.
        async with self.images.building(named_key):
            if (found := await self.images.get(named_key)) is not None:
                return found
            return await self._publish_index(named_key, records, request, revision, build)

    async def _publish_index(
        self, key: str, records: list[ImageRecord], request: ImageRequest, revision: Revision, build: Build
    ) -> ImageRecord:
        record, documents = index_image(key, records, request.arch)
        build.emit(Stage.UPLOADING, "storing the image index")
        return await self._publish(attach(AssembledImage(record, documents, ())), None, request, revision)

    async def _store_image(
        self, request: ImageRequest, revision: Revision, key: str, build: Build,
        resolved: list[ResolvedPackage], baseline: list[ResolvedPackage], graph: ClosureGraph, bound: Any,
        started: float,
    ) -> ImageRecord:
        """The steps after the closure, for a closure that is built."""
        roots = sorted({out for package in [*resolved, *baseline] for out in package.outputs})
        plan, found = await self._plan(graph, roots, request.arch, build, bound)
        linked = linked_packages(resolved, baseline)
        ca_bundle, layers, counter = await self._layers(plan, found, linked, graph, request, build, bound)
        assembled = assemble(
            request, revision, key, resolved, plan, layers, ca_bundle, self.compression,
            nix_annotations=self.nix_annotations,
        )
        # A reused stored layer may hold paths outside the closure: the graph has no size for them.
        outside = [[path for path in layer if path not in graph.nodes] for layer in plan]
        sbom_closure = Closure(resolved, graph, request.arch.nix_system, sorted(p for paths in outside for p in paths))
        image = await asyncio.to_thread(attach, assembled, sbom_closure)  # the SBOM reads the store
        build.emit(Stage.UPLOADING, "storing the config and manifests")
        sizes = [None if gone else sum(map(graph.size, layer)) for layer, gone in zip(plan, outside, strict=True)]
        record = await self._publish(image, plan, request, revision, sizes)
        bound.info(
            "build.done",
            seconds=round(time.monotonic() - started, 3),
            layers=len(record.layers),
            bytes=record.compressed_size,
            new_layers=counter.created,
        )
        return record

    async def _closure(
        self, request: ImageRequest, revision: Revision, bound: Any, build: Build
    ) -> tuple[list[ResolvedPackage], list[ResolvedPackage], ClosureGraph]:
        """What the names resolve to and the baseline's packages, built, and the closure graph of their outputs."""
        until = time.monotonic() + self.source.timeout  # for every step of this image's resolving
        system = request.arch.nix_system
        bound.info("build.evaluating")
        build.emit(Stage.EVALUATING, f"evaluating {', '.join(request.order or request.packages)}")
        resolved, evaluated = await self._resolve(revision, system, request.packages, until=until)
        baseline = await self.baseline.packages(self.source, self.evaluations, revision, system, until=until)
        bound.info("build.realising", derivations=len(resolved), evaluated=evaluated, baseline=len(baseline))
        build.emit(Stage.BUILDING, f"building {plural(len(resolved), 'package')} with Nix", built=0, to_build=0)
        graph = await self.source.realise([*resolved, *baseline], system, until=until, on_line=NixLogProgress(build))
        return resolved, baseline, graph

    async def _plan(
        self, graph: ClosureGraph, roots: list[str], arch: Arch, build: Build, bound: Any
    ) -> tuple[list[frozenset[str]], dict[frozenset[str], StoredLayer]]:
        """The closure's store paths grouped into layers, within the layer budget, and the stored
        layers `_servable` looked up on the way."""
        build.emit(Stage.LAYERING, f"grouping {len(graph)} store paths into layers", paths=len(graph))
        async with self.histories.planning(arch.nix_system):
            history = await self.histories.of(arch.nix_system).current()
            popularity = None if self.popularity is None else await self.popularity.until(len(history))
            plan = await asyncio.to_thread(
                plan_layers, graph, roots, max_layers=self.max_layers - ENTRY_POINT_LAYERS, history=history,
                cost=self.layer_cost,
                popularity=popularity,
            )
        bound.info("build.layers_planned", layers=len(plan), paths=len(graph))
        return await self._servable(plan, graph, bound)

    async def _servable(
        self, plan: list[frozenset[str]], graph: ClosureGraph, bound: Any
    ) -> tuple[list[frozenset[str]], dict[frozenset[str], StoredLayer]]:
        """The plan, where each stored layer it reuses whole although it holds paths outside the
        closure (`CostModel.takes_stored_layer`) can be served: this machine's store holds those
        paths (so the layer is made again byte for byte if it must be), or storage holds the
        layer (returned, so that it is not looked up again and missed). Else it gives way to
        its paths in the closure that no layer before it holds (a stored layer reused whole may
        hold paths another one holds too: the image then has other digests than the plan would give)."""
        found: dict[frozenset[str], StoredLayer] = {}
        gone: set[frozenset[str]] = set()
        for layer in plan:
            outside = sorted(path for path in layer if path not in graph.nodes)
            if outside and await store_db.valid_paths(outside) != frozenset(outside):
                if (stored := await self.layers.stored(sorted(layer))) is not None:
                    found[layer] = stored
                else:
                    bound.info("build.stored_layer_gone", paths=len(layer), outside=len(outside))
                    gone.add(layer)
        # A layer that gives way keeps the paths no layer served whole holds, nor one given way before
        # it: no path is lost, and none of these is another layer again.
        held = set().union(*(layer for layer in plan if layer not in gone))
        servable: list[frozenset[str]] = []
        for layer in plan:
            if layer in gone:
                layer = frozenset(path for path in layer if path in graph.nodes and path not in held)
                if not layer:
                    continue
                held |= layer
            servable.append(layer)
        return servable, found

    async def _layers(
        self, plan: list[frozenset[str]], found: dict[frozenset[str], StoredLayer], linked: list[LinkedPackage],
        graph: ClosureGraph, request: ImageRequest, build: Build, bound: Any,
    ) -> tuple[str | None, list[StoredLayer], LayerCounter]:
        """Every layer of the image, `found` stored already, stored before or compressed now,
        and the CA bundle that the entry-point layer links (if any)."""
        counter = LayerCounter(build, total=len(plan) + ENTRY_POINT_LAYERS)
        counter.emit(f"storing {counter.total} layers (compressing those not stored yet)")

        async def store_paths(paths: frozenset[str]) -> StoredLayer:
            if (known := found.get(paths)) is not None:
                return counter.count(known)
            return counter.count(await self.layers.store_paths(sorted(paths)))

        async def store_entry_points() -> tuple[str | None, StoredLayer]:
            closure = list(graph.nodes.keys())
            registrations = None  # an image with Nix gets a Nix database of its paths (nixery.layers.nixdb)
            if await asyncio.to_thread(nixdb.has_nix, linked):
                registrations = await self._registrations(closure, bound)
            written, layer = await self.layers.store_entry_points(linked, closure, request.config, registrations)
            report_links(build, bound, written.linked)
            return written.ca_bundle, counter.count(layer)

        # The entry-point layer is last in the image but made alongside the others.
        stored, (ca_bundle, last) = await asyncio.gather(
            asyncio.gather(*(store_paths(paths) for paths in plan)), store_entry_points()
        )
        stored.append(last)
        bound.info("build.layers_compressed", layers=len(stored), created=counter.created, bytes=counter.bytes)
        return ca_bundle, stored, counter

    async def _registrations(self, closure: list[str], bound: Any) -> list[Registration] | None:
        """What the store records of the closure, for the Nix database of an image with Nix; None
        (the image goes without one, as before there was one) when it cannot be read."""
        try:
            return await self.source.registrations(closure, until=time.monotonic() + self.source.timeout)
        except (NixError, GraphError) as exc:
            bound.warning("build.no_nix_database", error=str(exc)[:300], note="the image's Nix will not know its paths")
            return None

    async def _publish(
        self, image: AssembledImage, plan: list[frozenset[str]] | None, request: ImageRequest, revision: Revision,
        sizes: list[int | None] | None = None,
    ) -> ImageRecord:
        """Every blob, then the record, and the plan (if any: an index has none) into the
        platform's layering history, with the bytes of each layer that lies in the closure
        (`sizes`); the record to serve: this one, or the one another
        process stored first (`ImageStore.put`). With the record, how to build it again
        (`build_recipe`), for a pull by digest that finds it incomplete (`rebuilt_naming`).

        Everything is written side by side, each piece fsync'd, but the record appears only
        once every blob it names is stored. Shielded: a layer's writes serve every build
        that uses it, not only this one. The history only guides the layering of later images.
        """
        own = [asyncio.ensure_future(self.storage.put_blob_bytes(blob)) for blob in image.blobs]
        shared = (asyncio.shield(layer.stored) for layer in image.layers if layer.stored is not None)
        blobs_stored = asyncio.gather(*own, *shared)
        blobs_stored.add_done_callback(retrieve)  # when the record fails first, the build reports that error
        history = [] if plan is None else [self.histories.of(request.arch.nix_system).record(plan, sizes)]
        tag = self._tags.peek(revision.id)
        recipe = None if tag is None else build_recipe(request, tag, revision)
        served = asyncio.ensure_future(self.images.put(image.record, blobs_stored, recipe=recipe))
        try:
            await asyncio.gather(served, *history)
        except BaseException:  # a failed or stopped build ends once its own writes are done: none is left staging
            await asyncio.gather(*own, return_exceptions=True)
            raise
        return served.result()


