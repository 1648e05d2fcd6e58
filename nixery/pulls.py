"""Pulls by digest, recorded for `nixery gc`.

A pull by tag records its image's use under `usage/<key>` (`nixery.images`). A
pull by digest (a Kubernetes pod pinned to `name@sha256:...`, a deployment tool
that resolved the tag once) names no image: the manifest is read straight from
storage, often by a process that never looked the image up by tag (another
replica, or one restarted since). So such a pull is recorded as a use of the
images the process holds in memory that name the manifest
(`ImageStore.note_pull`), and when it holds none, under the digest:

    pulls/<manifest hex>   {"last_used": <seconds since the epoch>}

in the background, at most once per `interval` by each process for each digest
(it remembers the last `capacity` digests). gc counts an image as used when it
was pulled by tag or any of its manifests or indexes by digest within its limit,
and, once it has removed blobs, the entries of manifests no longer stored.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

from nixery.background import spawn
from nixery.errors import DigestInvalid
from nixery.lru import LRU
from nixery.registry.digest import Digest
from nixery.registry.image import canonical_json
from nixery.storage.base import Storage

PREFIX = "pulls/"


def due_again_after_failure(written_at: float, interval: float, retry: float) -> float:
    """What to note as last written when the write noted at `written_at` failed: a time at which
    the once-per-`interval` throttle lets the next write through `retry` seconds after it, not
    `interval` seconds (a store that failed these writes for hours while serving reads let gc
    take images in use)."""
    return written_at - interval + retry


def pull_key(digest: Digest) -> str:
    return f"{PREFIX}{digest.hex}"


class PullLog:
    """Writes the pulls by digest of one process (module docstring)."""

    def __init__(self, storage: Storage, *, interval: float, retry: float, capacity: int = 4096):
        self.storage = storage
        self.interval = interval
        self.retry = retry  # after a failed write
        self._written: LRU[Digest, float] = LRU(capacity)  # digest -> when this process last wrote it
        self._writes: set[asyncio.Task[Any]] = set()

    def note(self, digest: Digest) -> None:
        """A manifest was pulled by its digest."""
        now = time.time()
        last = self._written.get(digest)
        if last is not None and now - last < self.interval:
            return
        self._written.put(digest, now)
        spawn(
            self.storage.put_meta(pull_key(digest), canonical_json({"last_used": now})),
            failure_event="http.pull_not_recorded", keep=self._writes, digest=str(digest),
            on_failure=lambda: self._not_written(digest, now),
        )

    def _not_written(self, digest: Digest, written_at: float) -> None:
        """The write noted at `written_at` failed: the next pull after `retry` seconds writes it."""
        if self._written.get(digest) == written_at:
            self._written.put(digest, due_again_after_failure(written_at, self.interval, self.retry))

    async def close(self) -> None:
        await asyncio.gather(*self._writes, return_exceptions=True)


async def pulled_keys(storage: Storage) -> set[str]:
    """For gc: the keys of every recorded pull (one listing, so that images never pulled
    by digest cost no read)."""
    return set(await storage.list_meta(PREFIX.rstrip("/")))


async def last_pulled(storage: Storage, digests: Iterable[Digest], recorded: set[str] | None = None) -> float:
    """For gc: when any of `digests` was last pulled by digest (0 if never); only those among
    `recorded` are read, if given."""
    last = 0.0
    keys = {pull_key(digest) for digest in digests}
    for key in sorted(keys if recorded is None else keys & recorded):
        data = await storage.get_meta(key)
        try:
            last = max(last, float(json.loads(data or b"null")["last_used"]))
        except (ValueError, KeyError, TypeError):
            continue  # unreadable: as if never pulled
    return last


async def remove_orphans(storage: Storage) -> int:
    """For gc, once it has removed blobs: the entries of manifests no longer stored go
    (those of a manifest stored since, within gc's grace, stay)."""
    removed = 0
    for key in sorted(await pulled_keys(storage)):
        try:
            manifest: Digest | None = Digest.parse(f"sha256:{key.removeprefix(PREFIX)}")
        except DigestInvalid:
            manifest = None
        if manifest is None or await storage.stat_blob(manifest) is None:
            await storage.delete_meta(key)
            removed += 1
    return removed
