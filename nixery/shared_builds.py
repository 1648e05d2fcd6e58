"""Builds shared by the worker processes of one registry (`NIXERY_WORKERS` above 1).

Each worker keeps its builds in memory (`nixery.progress.BuildLog`), and the kernel hands
each connection to any worker: a progress page's next request, a proxy's pooled connection
or a browser's reconnect may reach a worker that did not start the build. So with several
workers each also writes its builds into a directory they share, made by the parent process
(`nixery.cli`) and removed when it ends:

    DIR/ID.jsonl   a build: {"id", "image", "tag", "started", "pid"} on its first line, then one
                   event a line, appended as it happens (and {"part_of", "platform"} when it
                   is one platform's build of an image of several); removed once its worker
                   no longer keeps the build (the last 200 of each worker)
    DIR/kept/PID.json  the builds worker PID keeps, oldest first: [{"id", "image",
                   "started"}], replaced as a whole on each new build; once PID has ended,
                   removed with its builds' files when they are older than all the builds
                   a live worker keeps
    DIR/locks/KEY  the id of the build that holds the storage's build lock of image KEY

A worker asked for a build it does not know reads its file: a copy of the build, whose
`follow` reads the lines added since every POLL_SECONDS, until the build ends (live, a
fraction of a second late), or its worker process is gone. The recent builds (the start
page) are every worker's, newest first: the others' from their `kept` lists, and only those
shown read from their files.

A build that waits for the build lock another worker's build holds repeats that build's
events (all but its outcome: its own comes once it has the lock), so it shows the progress
of the build it waits for instead of "queued" until it jumps to "done".

The directory is on one machine: replicas on other machines share storage, not this; each
answers for its own workers' builds (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from nixery.processes import process_alive
from nixery.progress import FINAL, Build, BuildLog, Event, PartOf, Stage

log = structlog.get_logger(__name__)

#: How often a copy of another worker's build looks for new events (and a waiting build for
#: the build holding the lock): files have no change notification without inotify.
POLL_SECONDS = 0.2

_BUILD_ID = re.compile(r"[0-9a-f]{1,64}")


class SharedBuildLog(BuildLog):
    """This worker's builds, written to `directory`; and the other workers' builds, read from it."""

    def __init__(self, directory: Path, keep: int = 200):
        super().__init__(keep)
        self.directory = directory
        self._locks = directory / "locks"
        self._locks.mkdir(exist_ok=True)
        self._kept = directory / "kept"
        self._kept.mkdir(exist_ok=True)

    def _path(self, build_id: str) -> Path:
        return self.directory / f"{build_id}.jsonl"

    def _added(self, build: Build) -> None:
        path = self._path(build.id)
        head = {"id": build.id, "image": build.image, "tag": build.tag, "started": build.started, "pid": os.getpid()}
        _append(path, head)
        build.listener = lambda heard: _append(path, _record(heard))

    def _dropped(self, build: Build) -> None:
        self._path(build.id).unlink(missing_ok=True)

    def new(self, image: str, tag: str = "latest") -> Build:
        build = super().new(image, tag)
        kept = [{"id": own.id, "image": own.image, "started": own.started} for own in self._builds.values()]
        _replace(self._kept / f"{os.getpid()}.json", json.dumps(kept, separators=(",", ":")))
        self._forget_ended_workers()
        return build

    def _forget_ended_workers(self) -> None:
        """Drop the kept lists (and build files) of workers that ended once their builds are
        all older than every build this worker keeps: it would have dropped its own that old.
        They stayed until the registry stopped, one more list for each worker replaced, and each
        listing of the recent builds read them all."""
        if len(self._builds) < self._keep:
            return
        oldest = next(iter(self._builds.values())).started
        for path in self._kept.glob("*.json"):
            if not path.stem.isdigit() or int(path.stem) == os.getpid() or process_alive(int(path.stem)):
                continue
            heads = json.loads(_read_text(path) or "[]")
            if all(head["started"] < oldest for head in heads):
                for head in heads:
                    self._path(head["id"]).unlink(missing_ok=True)
                path.unlink(missing_ok=True)

    def recent(self, limit: int | None = None, shown: Callable[[str], bool] = lambda image: True) -> list[Build]:
        """This worker's builds and the others', newest first (the others' read only when listed)."""
        listed: list[tuple[float, Build | str]] = [(build.started, build) for build in super().recent(limit, shown)]
        listed += [(head["started"], head["id"]) for head in self._kept_by_others() if shown(head["image"])]
        listed.sort(key=lambda item: item[0], reverse=True)
        builds: list[Build] = []
        for _, build_or_id in listed:
            if limit is not None and len(builds) >= limit:
                break
            build = CopiedBuild.read(self._path(build_or_id)) if isinstance(build_or_id, str) else build_or_id
            if build is not None:  # not dropped meanwhile
                builds.append(build)
        return builds

    def _kept_by_others(self) -> list[dict[str, Any]]:
        heads: list[dict[str, Any]] = []
        for path in self._kept.glob("*.json"):
            if path.stem != str(os.getpid()) and (text := _read_text(path)):
                heads += json.loads(text)
        return heads

    def get(self, build_id: str) -> Build | None:
        own = super().get(build_id)
        if own is not None or not _BUILD_ID.fullmatch(build_id):
            return own
        return CopiedBuild.read(self._path(build_id))

    @contextlib.asynccontextmanager
    async def locked(self, key: str, build: Build, lock: AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
        marker = self._locks / key
        waiting = asyncio.ensure_future(self._repeat_holders(marker, build))
        try:
            async with lock:
                await _stopped(waiting)
                _replace(marker, build.id)
                try:
                    yield
                finally:
                    if _read_text(marker) == build.id:  # the lock is still ours: no one else wrote it
                        marker.unlink(missing_ok=True)
        finally:
            await _stopped(waiting)

    async def _repeat_holders(self, marker: Path, build: Build) -> None:
        """Until cancelled (the lock is `build`'s): the events of each build that holds the
        lock in turn, in another worker, repeated in `build`, all but their outcome."""
        followed = {build.id}
        while True:
            holder_id = _read_text(marker)
            holder = self.get(holder_id) if holder_id and holder_id not in followed else None
            if holder is None:
                await asyncio.sleep(POLL_SECONDS)
                continue
            followed.add(holder.id)
            build.emit(Stage.QUEUED, f"waiting for build {holder.id} of this image", waiting_for=holder.id)
            async for event in holder.follow():
                if event.stage not in FINAL:
                    build.emit(event.stage, event.message, **event.data)


@dataclass
class CopiedBuild(Build):
    """Another worker's build as its file says; `follow` reads on as the file grows."""

    path: Path = Path()
    pid: int = 0
    _offset: int = 0

    @classmethod
    def read(cls, path: Path) -> CopiedBuild | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        end = data.find(b"\n")
        if end < 0:
            return None
        head = json.loads(data[:end])
        build = cls(id=head["id"], image=head["image"], tag=head["tag"], started=head["started"], path=path,
                    pid=head["pid"])
        build._offset = end + 1
        build._read_on(data[end + 1 :])
        return build

    def _take(self, data: bytes) -> None:
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read once it is whole
        self._offset += len(complete)
        for line in complete.splitlines():
            record = json.loads(line)
            if "part_of" in record:
                self.part_of = PartOf(record["part_of"], record["platform"])
                continue
            self.events.append(Event(Stage(record["stage"]), record["message"], record["time"], record["data"]))

    def _read_on(self, data: bytes | None = None) -> None:
        """The events added since the last read (`data`, when just read); a failure when its
        worker process ended without saying the build did."""
        running = process_alive(self.pid)  # asked first: what it wrote before it ended is read below
        if data is None or not running:
            data = b""
            with contextlib.suppress(FileNotFoundError), self.path.open("rb") as file:
                file.seek(self._offset)
                data = file.read()
        self._take(data)
        if not self.finished and not running:
            message = "the worker process running this build ended before it did"
            self.events.append(Event(Stage.FAILED, message, self.events[-1].time if self.events else self.started, {}))

    async def follow(self) -> AsyncIterator[Event]:
        sent = 0
        while True:
            while sent < len(self.events):
                yield self.events[sent]
                sent += 1
            if self.finished:
                return
            await asyncio.sleep(POLL_SECONDS)
            self._read_on()


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _record(heard: Event | PartOf) -> dict[str, Any]:
    if isinstance(heard, PartOf):
        return {"part_of": heard.build_id, "platform": heard.platform}
    return {"stage": heard.stage.value, "message": heard.message, "time": heard.time, "data": heard.data}


def _append(path: Path, record: dict[str, Any]) -> None:
    """One line, in one write: a reader sees whole lines, or the start of the last one."""
    line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, line)
        finally:
            os.close(descriptor)
    except OSError as exc:  # the build goes on; only other workers miss its events
        log.warning("build.not_shared", path=str(path), error=str(exc))


def _replace(path: Path, text: str) -> None:
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        staged.write_text(text)
        os.replace(staged, path)
    except OSError as exc:  # the build goes on; only other workers' waiting builds miss its events
        log.warning("build.not_shared", path=str(path), error=str(exc))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None

