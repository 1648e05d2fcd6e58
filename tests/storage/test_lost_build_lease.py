"""A builder that stops renewing its build lease (stalled, cut off from the bucket) loses it
while still at work: another process takes the lease over, finds no image record, and builds
the image too. When the two planned the layers against different layering histories, their
manifests differ; the first record stored must then be the one both serve, or replicas give
different digests for one tag.

Two builders in this process, each with its own driver on one bucket (SeaweedFS,
fake-gcs-server), as two replicas have; real Nix (the busybox set). On the filesystem the
build lock is a flock, which its holder keeps while it lives: no takeover to force there.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nixery import config
from nixery.app import open_builder
from nixery.builder import ImageBuilder
from nixery.images import IMAGE_PREFIX, ImageRecord
from nixery.registry.digest import Digest
from nixery.registry.names import parse_image_name
from nixery.storage.lease import LeasedStorage
from tests.storage.conftest import Backend

BUSYBOX_SET = Path(__file__).resolve().parents[2] / "pkgs" / "busybox"
#: Short, so that the stalled builder's lease is taken over within seconds.
LEASE_TTL = 2.0


class Stall:
    """Holds a driver's writes (lease renewals, blobs, documents: its layering history's entry
    too) until `resume` is set, as a process that the bucket stopped answering (`writing`: it
    has planned and compressed its layers)."""

    def __init__(self, storage: LeasedStorage):
        self.resume, self.writing = asyncio.Event(), asyncio.Event()
        renew, put_blob, put_meta = storage._lease_replace, storage.put_blob, storage.put_meta

        async def stalled_renewal(name: str, body: bytes, version: str) -> str | None:
            await self.resume.wait()
            return await renew(name, body, version)

        async def stalled_put_blob(digest: Digest, staged: Path) -> None:
            self.writing.set()
            await self.resume.wait()
            await put_blob(digest, staged)

        async def stalled_put_meta(key: str, data: bytes) -> None:
            await self.resume.wait()
            await put_meta(key, data)

        storage._lease_replace = stalled_renewal  # type: ignore[method-assign]
        storage.put_blob = stalled_put_blob  # type: ignore[method-assign]
        storage.put_meta = stalled_put_meta  # type: ignore[method-assign]


def served(record: ImageRecord) -> list[Digest]:
    """The manifest digests clients get for the image."""
    return [descriptor.digest for descriptor in record.descriptors]


async def image(builder: ImageBuilder, name: str) -> ImageRecord:
    return await builder.image(parse_image_name(name), "latest")


@pytest.mark.nix
async def test_a_builder_that_lost_its_lease_serves_the_record_stored_first(
    cloud_backend: Backend, tmp_path: Path
) -> None:
    settings = config.load(
        {"NIXERY_PKGS_PATH": str(BUSYBOX_SET), "STORAGE_PATH": str(tmp_path / "settings"),
         "NIXERY_NIX_EVALUATOR": "process"}
    )
    stalled_storage = cloud_backend.open()
    cloud_backend.storage_path = tmp_path / "replica-2"  # own staging, same bucket
    other_storage = cloud_backend.open()
    assert isinstance(stalled_storage, LeasedStorage) and isinstance(other_storage, LeasedStorage)
    for storage in (stalled_storage, other_storage):
        storage.lease_ttl = LEASE_TTL
    stall = Stall(stalled_storage)
    stalled, other = open_builder(settings, stalled_storage), open_builder(settings, other_storage)
    try:
        with capture_logs() as logs:
            # The stalled builder plans fortune/cowsay against an empty history, then stalls.
            first_build = asyncio.ensure_future(image(stalled, "fortune/cowsay"))
            await asyncio.wait_for(stall.writing.wait(), 120)
            # The other one builds shell/fortune (its history now holds those layers), then
            # fortune/cowsay: it takes the unrenewed lease over and plans against that history.
            await asyncio.wait_for(image(other, "shell/fortune"), 120)
            second = await asyncio.wait_for(image(other, "fortune/cowsay"), 120)
            assert not first_build.done()
            stall.resume.set()
            first = await asyncio.wait_for(first_build, 120)

            assert served(first) == served(second), "the two builders serve different manifests for one tag"
            assert served(await image(stalled, "fortune/cowsay")) == served(second)
            stored = await other_storage.get_meta(f"{IMAGE_PREFIX}{second.key}")
            assert stored is not None and served(ImageRecord.from_json(stored)) == served(second)
    finally:
        stall.resume.set()
        await asyncio.gather(stalled.close(), other.close())

    events = {entry["event"]: entry for entry in logs}
    assert "lease.taken_over" in events and "lease.lost" in events
    adopted = events["build.record_adopted"]
    assert adopted["served"] == [str(digest) for digest in served(second)]
    assert adopted["built"] != adopted["served"], "both planned the same layers: the histories did not differ"
