"""Build progress: every build has an id and a stream of events.

A `Build` keeps its events, so a late subscriber first sees what happened so
far and then follows live events until the build ends. The HTTP layer turns
the stream into server-sent events; the CLI turns it into a progress bar.

An image of several platforms is built once per platform, each build with its
own id and events; `PlatformRelay` repeats them in the image's build, tagged
with the platform (see there), so one stream shows every platform's progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from nixery import metrics
from nixery.amounts import rate_text, size_text

if TYPE_CHECKING:
    from nixery.layers.rootlinks import Linked
    from nixery.layers.store import StoredLayer


class Stage(StrEnum):
    QUEUED = "queued"
    EVALUATING = "evaluating"
    BUILDING = "building"
    LAYERING = "layering"
    COMPRESSING = "compressing"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"


FINAL = (Stage.DONE, Stage.FAILED)


@dataclass(frozen=True, slots=True)
class Event:
    stage: Stage
    message: str
    time: float
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage.value, "message": self.message, "time": self.time, **self.data}


@dataclass(frozen=True, slots=True)
class PartOf:
    """A platform's build is relayed in `build_id`, the build of an image of several platforms."""

    build_id: str
    platform: str


@dataclass
class Build:
    id: str
    image: str
    #: The tag it was started for (the first, when requests for several tags share the build):
    #: pages name the image by it (its pull command, links).
    tag: str = "latest"
    started: float = field(default_factory=time.time)
    events: list[Event] = field(default_factory=list)
    #: Set when this is one platform's build of an image of several platforms (`PlatformRelay`),
    #: so a page finds the image's build without reading every build's events.
    part_of: PartOf | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Hears each event, and the build's `part_of`, as it is set (`nixery.shared_builds` writes
    #: them where other workers read them).
    listener: Callable[[Event | PartOf], None] | None = field(default=None, repr=False)

    @property
    def stage(self) -> Stage:
        return self.events[-1].stage if self.events else Stage.QUEUED

    @property
    def finished(self) -> bool:
        return self.stage in FINAL

    def relayed_in(self, part_of: PartOf) -> None:
        self.part_of = part_of
        if self.listener is not None:
            self.listener(part_of)

    def emit(self, stage: Stage, message: str, **data: Any) -> None:
        if self.finished:
            return
        event = Event(stage, message, time.time(), data)
        self.events.append(event)
        if self.listener is not None:
            self.listener(event)
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[Event]:
        """Past events, then live ones, until the build is done or failed."""
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if self.finished:
                return
            await changed.wait()

    def summary(self) -> dict[str, Any]:
        last = self.events[-1].to_json() if self.events else None
        return {
            "id": self.id, "image": self.image, "tag": self.tag, "started": self.started, "stage": self.stage.value,
            "last": last,
        }


class BuildLog:
    """Builds by id: the running ones and the most recent finished ones, of this process
    (with several worker processes, `nixery.shared_builds.SharedBuildLog` knows the others' too)."""

    def __init__(self, keep: int = 200):
        self._builds: OrderedDict[str, Build] = OrderedDict()
        self._keep = keep

    def new(self, image: str, tag: str = "latest") -> Build:
        build = Build(id=secrets.token_hex(8), image=image, tag=tag)
        self._builds[build.id] = build
        self._added(build)
        if len(self._builds) > self._keep:
            self._drop_oldest_finished(len(self._builds) - self._keep)
        return build

    def _drop_oldest_finished(self, count: int) -> None:
        """Drop up to `count` of the oldest finished builds. Running ones are passed over, not waited
        for: one that never finished kept every later build for the life of the process."""
        finished = itertools.islice((build for build in self._builds.values() if build.finished), count)
        for build in list(finished):
            del self._builds[build.id]
            self._dropped(build)

    def _added(self, build: Build) -> None:
        """A new build, before any event."""

    def _dropped(self, build: Build) -> None:
        """A finished build no longer kept."""

    @contextlib.asynccontextmanager
    async def locked(self, key: str, build: Build, lock: AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
        """`lock`, the storage's build lock of the image `key`, held for `build`. (Other
        processes' builds waiting for it can follow `build`: `nixery.shared_builds`.)"""
        async with lock:
            yield

    def get(self, build_id: str) -> Build | None:
        return self._builds.get(build_id)

    def recent(self, limit: int | None = None, shown: Callable[[str], bool] = lambda image: True) -> list[Build]:
        """The newest builds (`limit` of them) of the images `shown` accepts, newest first."""
        return [build for build in reversed(self._builds.values()) if shown(build.image)][:limit]


#: The fields a relayed event of one platform's build carries besides its own (`PlatformRelay`).
PLATFORM_FIELDS = ("platform", "platform_stage", "platform_build")


class PlatformRelay:
    """Each platform's build of an image of several platforms, shown in the image's build.

    A platform's events are repeated as BUILDING events of the image's build (its
    message and data, plus `platform`: `linux/arm64`, `platform_stage`: the
    platform's own stage, and `platform_build`: its own build's id). The image's
    build keeps its own stages, so a follower that knows nothing of platforms sees
    one build that ends once, with the index.
    """

    def __init__(self, build: Build):
        self.build = build
        self._relays: list[asyncio.Task[None]] = []

    def follow(self, platform: str, own: Build) -> None:
        """Relay the platform's build `own` (its past events first) until it ends."""
        own.relayed_in(PartOf(self.build.id, platform))
        self._relays.append(asyncio.ensure_future(self._relay(platform, own)))

    def found(self, platform: str, **summary: Any) -> None:
        """The platform's image was built already: no build of its own to follow."""
        self._emit(platform, Stage.DONE, "already built", None, summary)

    async def _relay(self, platform: str, own: Build) -> None:
        async for event in own.follow():
            self._emit(platform, event.stage, event.message, own.id, event.data)

    def _emit(self, platform: str, stage: Stage, message: str, build_id: str | None, data: dict[str, Any]) -> None:
        tags = {"platform": platform, "platform_stage": stage.value, "platform_build": build_id}
        self.build.emit(Stage.BUILDING, message, **{**data, **tags})

    async def finish(self) -> None:
        """Once every platform's build ended: their last events are relayed before the image's."""
        await asyncio.gather(*self._relays)

    def stop(self) -> None:
        for relay in self._relays:
            relay.cancel()


# Nix says "these 3 derivations will be built:" but "this derivation will be built:".
_WILL_BUILD = re.compile(r"(?:these (\d+) derivations|this derivation) will be built")
_WILL_FETCH = re.compile(r"(?:these (\d+) paths|this path) will be fetched")
_BUILDING = re.compile(r"building '(/nix/store/[^']+)'")
_COPYING = re.compile(r"copying path '(/nix/store/[^']+)'")


class NixLogProgress:
    """Reads `nix-store --realise` output and reports derivations built and paths fetched."""

    def __init__(self, build: Build):
        self.build = build
        self.to_build = 0
        self.to_fetch = 0
        self.built = 0
        self.fetched = 0

    def __call__(self, line: str) -> None:
        if match := _WILL_BUILD.search(line):
            self.to_build = int(match.group(1) or 1)
        elif match := _WILL_FETCH.search(line):
            self.to_fetch = int(match.group(1) or 1)
        elif match := _BUILDING.search(line):
            self.built += 1
            self._report(f"building {match.group(1)}")
        elif match := _COPYING.search(line):
            self.fetched += 1
            self._report(f"fetching {match.group(1)}")

    def _report(self, message: str) -> None:
        self.build.emit(
            Stage.BUILDING,
            message,
            built=self.built,
            to_build=self.to_build,
            fetched=self.fetched,
            to_fetch=self.to_fetch,
        )


class LayerCounter:
    """Counts an image's layers as they are found in the cache or compressed."""

    def __init__(self, build: Build, total: int):
        self.build = build
        self.total = total
        self.done = 0
        self.created = 0
        self.bytes = 0

    def count(self, stored: StoredLayer) -> StoredLayer:
        layer = stored.descriptor
        self.done += 1
        metrics.layer_stored(stored.created, layer.size)
        if not stored.created:
            self.emit(f"layer {layer.digest.hex[:12]} already stored")
            return stored
        self.created += 1
        self.bytes += layer.size
        rate = rate_text(layer.size, stored.seconds)  # none for a layer compressed too fast to time
        said = size_text(layer.size) + (f", {rate}" if rate else "")
        self.emit(f"compressed layer {layer.digest.hex[:12]} ({said})")
        return stored

    def emit(self, message: str) -> None:
        self.build.emit(
            Stage.COMPRESSING, message, layers_done=self.done, layers_total=self.total,
            layers_created=self.created, compressed_bytes=self.bytes,
        )


def report_links(build: Build, log: Any, linked: Linked) -> None:
    """Say which files of the requested packages lost a conflict at `/`, or were left out
    for the entry-point layer's limits (`nixery.layers.rootlinks`), in the log and the progress
    (as an event of the stage under way: the entry-point layer is made beside the others)."""
    if linked.conflict_count:
        shown = "; ".join(map(str, linked.conflicts[:5]))
        more = f" and {linked.conflict_count - 5} more" if linked.conflict_count > 5 else ""
        build.emit(
            Stage.COMPRESSING, f"{linked.conflict_count} paths at / provided by several packages, "
            f"the first one's kept: {shown}{more}", **linked.summary(),
        )
        log.warning("build.link_conflicts", **linked.summary())
    if linked.left_out_count:
        build.emit(
            Stage.COMPRESSING, f"{linked.left_out_count} paths not linked at / (the entry-point layer's limits), "
            f"the first: {linked.left_out}", **linked.summary(),
        )
        log.warning("build.links_left_out", **linked.summary())
