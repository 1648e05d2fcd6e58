"""What a registry holds in memory after it read `nixery gc`'s note (nixery/collected.py):
a lookup that was reading storage when the note came is answered, but what it read is not
put back into the cache that the note just cleared (nixery/images.py `ImageStore.get`,
nixery/http/routes.py `stored_manifest`).

gc removes an unused image's record, leaves its note, waits SETTLE, then removes the blobs.
Before, a pull by tag that had read the record before gc removed it, and was still checking
its blobs (a HEAD each on S3 and GCS) when the note was read, cached the record after the
clear: the registry then handed out the collected image's manifest from memory, and every
blob of it was 404, until gc's next note. Likewise a manifest read by digest. The blob
checks are held back here (as a bucket's HEADs are slow), and gc's steps are done with the
real storage calls at that moment; the note is read by the real CollectionWatch.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from nixery import collected
from nixery.errors import ManifestUnknown
from nixery.http import routes
from nixery.images import IMAGE_PREFIX, ImageRecord, ImageStore, ManifestRef
from nixery.registry.digest import Digest
from nixery.registry.image import LayerDescriptor
from nixery.registry.mediatypes import ManifestFormat
from nixery.storage.filesystem import FilesystemStorage


class SlowBlobChecks(FilesystemStorage):
    """Filesystem storage whose blob checks wait for `gate`, as S3 and GCS do (no recheck of
    the records held in memory either)."""

    checks_blobs_locally = False
    gate: asyncio.Event | None = None

    async def blob_servable(self, digest: Digest, size: int | None = None) -> bool:
        if self.gate is not None:
            await self.gate.wait()
        return await super().blob_servable(digest, size)

    async def stat_blob(self, digest: Digest) -> int | None:
        if self.gate is not None:
            await self.gate.wait()
        return await super().stat_blob(digest)


async def _collect(storage: FilesystemStorage, key: str) -> None:
    """gc's first step on an image unused for hours: its record goes, its note is left."""
    await storage.delete_meta(f"{IMAGE_PREFIX}{key}")
    await collected.announce(storage, "images")


async def test_an_image_read_while_gc_s_note_is_read_is_not_held_after_it(tmp_path: Path) -> None:
    storage = SlowBlobChecks(tmp_path / "storage")
    layer = await storage.put_blob_bytes(os.urandom(2048))
    config = await storage.put_blob_bytes(b'{"config":1}')
    manifest = await storage.put_blob_bytes(b'{"manifest":1}')
    key = "ab" * 32
    record = ImageRecord(key=key, name="shell", source="test", revision="r1", packages=("shell",),
                         architecture="amd64", config=config,
                         manifests={ManifestFormat.DOCKER: ManifestRef(manifest, 14)},
                         layers=(LayerDescriptor(layer, layer, 2048, "shell"),), built_at=0.0)  # fmt: skip
    await storage.create_meta(f"{IMAGE_PREFIX}{key}", record.to_json())
    images = ImageStore(storage)
    watch = images._collections  # the real CollectionWatch, polled by hand instead of every 2 s
    await collected.announce(storage, "images")  # an earlier gc's note, seen at start-up
    await watch.check()

    storage.gate = asyncio.Event()
    pull = asyncio.ensure_future(images.get(key))  # a pull by tag: reads the record, checks its blobs
    await asyncio.sleep(0.05)
    await _collect(storage, key)
    assert await watch.check(), "the registry read gc's note"
    storage.gate.set()
    answered = await pull
    assert answered is not None and answered.key == key, "the pull in flight is answered (its blobs are still there)"
    storage.gate = None
    assert len(images.cached) == 0, "but the collected image is not held in memory"

    for digest in (layer, config, manifest):  # gc, SETTLE later
        await storage.delete_unused_blob(digest, cutoff=float("inf"))
    assert await images.get(key) is None, "the next pull builds the image again"
    await images.close()
    await storage.close()


async def test_a_manifest_read_while_gc_s_note_is_read_is_not_held_after_it(tmp_path: Path) -> None:
    storage = SlowBlobChecks(tmp_path / "storage")
    layer = await storage.put_blob_bytes(os.urandom(2048))
    config = await storage.put_blob_bytes(b'{"config":1}')
    document = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        f'"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":12}},'
        f'"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":2048}}]}}'
    ).encode()
    manifest = await storage.put_blob_bytes(document)
    app = web.Application()
    app[routes.STORAGE] = storage
    app[routes.MANIFESTS] = cache = routes.ManifestCache()
    request = make_mocked_request("GET", f"/v2/shell/manifests/{manifest}", app=app)

    storage.gate = asyncio.Event()
    pull = asyncio.ensure_future(routes.stored_manifest(request, manifest, check_blobs=True))  # a pull by digest
    await asyncio.sleep(0.05)
    cache.clear()  # gc's note read (nixery.app wires ImageStore.on_collected to it)
    storage.gate.set()
    assert (await pull)[0] == document
    storage.gate = None
    assert cache.get(manifest) is None, "the manifest read across gc's note is not held"

    for digest in (layer, config, manifest):  # gc, SETTLE later
        await storage.delete_unused_blob(digest, cutoff=float("inf"))
    with pytest.raises(ManifestUnknown):  # not answered from memory
        await routes.stored_manifest(request, manifest, check_blobs=True)
    await storage.close()
