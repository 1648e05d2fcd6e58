"""Replicas that find an image's record damaged (naming a blob that is gone: collected, or
found corrupt and removed) each build the image again, and each replaces the record when it
publishes its build. Their builds may differ (planned against different layering histories:
tests/storage/test_lost_build_lease.py), so the first replacement stored must be the one both
serve; otherwise each serves its own manifests for one tag, and a client that asks one
replica for the tag's digest (HEAD) and fetches it from the other (GET) finds it changed.

Two image stores, each with its own driver on one store as two replicas have (the
filesystem, SeaweedFS, fake-gcs-server), publish two builds of one image whose manifests
differ, both after reading the damaged record and before either replaced it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from nixery.images import IMAGE_PREFIX, ImageRecord, ImageStore, ManifestRef
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor
from nixery.registry.mediatypes import ManifestFormat
from nixery.storage import Storage
from tests.storage.conftest import Backend


async def stored_image(storage: Storage, key: str, build: str, *, gone: Digest | None = None) -> ImageRecord:
    """A record of one build of the image under `key`, its blobs stored; with `gone`, it also
    names that layer, which is not stored."""
    config, manifest, layer = [
        await storage.put_blob_bytes(f"{part} of build {build} of {key}".encode())
        for part in ("config", "manifest", "layer")
    ]
    # Its true size: a layer stored with another size than its record's is damaged (blob_servable).
    layers = [LayerDescriptor(layer, layer, len(f"layer of build {build} of {key}"), "busybox")]
    if gone is not None:
        layers.append(LayerDescriptor(gone, gone, 30, "fortune"))
    return ImageRecord(
        key=key, name="shell/fortune", source="test", revision="r", packages=("busybox", "fortune"),
        architecture="amd64", config=config, manifests={ManifestFormat.OCI: ManifestRef(manifest, 40)},
        layers=tuple(layers), built_at=time.time(),
    )  # fmt: skip


def served(record: ImageRecord | None) -> list[Digest]:
    """The manifest digests clients get for the image."""
    assert record is not None
    return [descriptor.digest for descriptor in record.descriptors]


def found_damaged_together(replicas: list[Storage], gone: Digest) -> None:
    """Each replica's check of the missing layer answers only once every replica has asked:
    all have read the damaged record before any replaces it."""
    asked = [asyncio.Event() for _ in replicas]

    def together(blob_servable: Callable[[Digest, int | None], Awaitable[bool]], mine: asyncio.Event) -> Any:
        async def blob_servable_together(digest: Digest, size: int | None = None) -> bool:
            if digest == gone:
                mine.set()
                await asyncio.wait_for(asyncio.gather(*(event.wait() for event in asked)), 30)
            return await blob_servable(digest, size)

        return blob_servable_together

    for storage, mine in zip(replicas, asked, strict=True):
        storage.blob_servable = together(storage.blob_servable, mine)  # type: ignore[method-assign]


async def test_replicas_that_replaced_a_damaged_record_serve_the_first_replacement(
    backend: Backend, tmp_path: Path
) -> None:
    first_storage = backend.open()
    if backend.name != "filesystem":  # own local staging, same store
        backend.storage_path = tmp_path / "replica-2"
    second_storage = backend.open()
    key = uuid.uuid4().hex * 2
    gone = Digest.of(f"a layer of {key} collected since".encode())
    damaged = await stored_image(first_storage, key, "old", gone=gone)
    await first_storage.put_meta(f"{IMAGE_PREFIX}{key}", damaged.to_json())
    builds = [await stored_image(storage, key, name) for storage, name in ((first_storage, "a"), (second_storage, "b"))]
    assert served(builds[0]) != served(builds[1])
    replicas = [ImageStore(first_storage), ImageStore(second_storage)]
    found_damaged_together([first_storage, second_storage], gone)
    try:
        with capture_logs() as logs:
            published = await asyncio.wait_for(asyncio.gather(*(
                images.put(build, asyncio.sleep(0)) for images, build in zip(replicas, builds, strict=True)
            )), 60)  # fmt: skip
        assert served(published[0]) == served(published[1]), "the replicas serve different manifests for one tag"
        assert served(await replicas[0].get(key)) == served(await replicas[1].get(key)) == served(published[0])
        stored = await second_storage.get_meta(f"{IMAGE_PREFIX}{key}")
        assert stored is not None and served(ImageRecord.from_json(stored)) == served(published[0])
        started_later = ImageStore(first_storage)  # a replica that reads it from storage
        assert served(await started_later.get(key)) == served(published[0])
        await started_later.close()
    finally:
        await asyncio.gather(*(images.close() for images in replicas))

    events = [entry["event"] for entry in logs]
    assert events.count("build.record_incomplete") >= 2  # both found it damaged
    [adopted] = [entry for entry in logs if entry["event"] == "build.record_adopted"]
    assert adopted["served"] == [str(digest) for digest in served(published[0])]
    assert adopted["built"] != adopted["served"]
