"""A separate process that stages one big blob and publishes it, for the tests
that kill it mid-way or measure its memory.

    python -m tests.storage.worker '<json>'

The JSON names the settings (backend, storage_path, s3/gcs fields), the blob
size, a seed for its bytes, and whether to write the staged file slowly. The
worker prints one JSON event per line: `staging` (progress), `staged` (with
the digest), `uploading`, `done` (with how far its resident memory rose above
the level before put_blob, sampled every 5 ms, in bytes).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import resource
import sys
import threading
import time
from pathlib import Path

from nixery.app import open_storage
from nixery.config import GCSSettings, S3Settings, Settings
from nixery.registry.digest import Digest

CHUNK = 1024 * 1024


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class RSSSampler(threading.Thread):
    """The highest resident set size seen while running (sampled every 5 ms)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = current_rss()
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.wait(0.005):
            self.peak = max(self.peak, current_rss())

    def finish(self) -> int:
        self._finished.set()
        self.join()
        return max(self.peak, current_rss())


def settings_from(spec: dict) -> Settings:
    s3 = S3Settings(**spec["s3"]) if spec.get("s3") else None
    gcs = None
    if spec.get("gcs"):
        fields = dict(spec["gcs"])
        if fields.get("signing_key"):
            fields["signing_key"] = Path(fields["signing_key"])
        gcs = GCSSettings(**fields)
    return Settings(
        storage_backend=spec["backend"],
        storage_path=Path(spec["storage_path"]),
        s3=s3,
        gcs=gcs,
        signed_url_ttl=spec.get("signed_url_ttl", 300),
    )


def blob_chunks(size: int, seed: int):
    """The worker's blob: `size` pseudo-random bytes from `seed`, 1 MiB at a time."""
    rng = random.Random(seed)
    for start in range(0, size, CHUNK):
        yield rng.randbytes(min(CHUNK, size - start))


def expected_digest(size: int, seed: int) -> Digest:
    hasher = hashlib.sha256()
    for chunk in blob_chunks(size, seed):
        hasher.update(chunk)
    return Digest.from_hasher(hasher)


async def main(spec: dict) -> None:
    storage = open_storage(settings_from(spec))
    # Warm up clients, thread pools and runtimes so that they are not counted.
    await storage.put_blob_bytes(b"warm-up " + str(time.time()).encode())

    hasher = hashlib.sha256()
    staged = storage.staging_dir() / "layer.staged"
    with open(staged, "wb") as handle:
        written = 0
        for chunk in blob_chunks(spec["size"], spec.get("seed", 0)):
            handle.write(chunk)
            hasher.update(chunk)
            written += len(chunk)
            if spec.get("slow_staging"):
                handle.flush()
                emit("staging", written=written, path=str(staged))
                await asyncio.sleep(0.02)
    digest = Digest.from_hasher(hasher)
    emit("staged", digest=str(digest), path=str(staged))

    before = current_rss()
    sampler = RSSSampler()
    sampler.start()
    emit("uploading")
    await storage.put_blob(digest, staged)
    emit("done", rss_growth=sampler.finish() - before)
    await storage.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
