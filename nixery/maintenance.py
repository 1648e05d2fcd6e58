"""Storage upkeep: checking consistency and collecting garbage.

Both run against live storage while registries serve from it:

* `check` walks every blob and verifies its bytes against its digest (where
  the backend can do so cheaply: the filesystem; on S3 and GCS that would mean
  downloading everything, so there only presence and sizes are checked), and
  every image record against the blobs it names. A blob that does not match
  is set aside as the registry itself does (`Storage.set_aside_damaged_blob`:
  the filesystem's quarantine) and running registries are told (`nixery.collected`):
  a registry that hashed it before it rotted in place trusts it while its file
  looks the same, and kept serving it, every pull failing on its digest; now
  they find it gone, and rebuild its images on their next pull.
* `collect_garbage` removes images not used within a time limit, then blobs no
  remaining image uses, and the names' evaluations kept for package-set
  revisions that no remaining image was built from, and the records of layers whose blobs are gone.
  An image in use is never removed: registries record a
  use at least once an hour (`usage/<key>` for a pull by tag, `pulls/<manifest hex>` for one by
  digest: `nixery.pulls`), and the limit is longer than that.
  Blobs written or reused (`touch_blob`) by a running build are fresh, so a
  grace period keeps them until the build has written its image record; a
  blob's dates are read again as it is deleted (`delete_unused_blob`), since
  the listing's are stale by then. A blob that a gc killed mid-way had set aside
  (S3's `parked/` copies) is put back first (`restore_parked_blobs`).
  An image's record is removed while holding its build lock (no build of it is
  under way, and the lock leaves no file behind), after reading the record and
  its uses again under that lock (a pull or a rebuild since keeps it). Running registries hear of
  what was removed through `nixery.collected`: gc leaves a note after removing
  records, waits until every registry has read it (so none answers from memory
  with an image whose blobs are about to go, and a pull rebuilds it instead),
  then removes blobs and leaves another note. The signatures of a kept
  image's manifests (`nixery.signatures`) are kept with it; those of removed
  manifests go with their blobs, entries included. An image record that cannot
  be read (damaged) vouches for no blob: check reports it, gc removes it, and a
  registry builds its image again on its next pull. gc also empties the
  quarantine (blobs set aside as damaged, on the filesystem) of what has been
  there longer than a retention period (QUARANTINE_RETENTION: a week, for an
  operator to look at them).

Both need the backend's optional listing and deleting capabilities, which all
three drivers have; on a bucket the credentials need list and delete rights.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from nixery import collected, pulls, signatures
from nixery.evaluations import PREFIX as EVALUATIONS
from nixery.images import (
    IMAGE_PREFIX,
    MANIFESTS_PREFIX,
    RECHECK_INTERVAL,
    REFERRERS_PREFIX,
    USAGE_PREFIX,
    ImageRecord,
    RecordUnreadable,
    build_lock,
    manifest_keys,
    referrer_keys,
)
from nixery.layers.store import LAYER_PREFIX, LAYER_RECORD_UNREADABLE, read_layer_record
from nixery.registry.digest import Digest
from nixery.storage.base import Storage, StorageFull

#: Shortest allowed GC age: several times the interval at which use is recorded.
MIN_AGE = 3 * 3600.0
BLOB_GRACE = 3600.0
#: How long gc keeps the blobs set aside as damaged (the filesystem's `quarantine/`), for an
#: operator to look at: a disk that keeps damaging blobs filled it for ever before.
QUARANTINE_RETENTION = 7 * 86400.0
#: How far ahead of gc's clock a date may be before gc says so: clocks of machines sharing a
#: bucket agree within minutes.
CLOCK_SLACK = 600.0


@dataclass
class CheckReport:
    blobs: int = 0
    bytes: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)
    set_aside: int = 0  # damaged blobs taken out of service (quarantined), so that their images are rebuilt

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GarbageReport:
    images_removed: int = 0
    images_kept: int = 0
    unreadable_removed: int = 0  # image records that could not be read
    blobs_removed: int = 0
    bytes_freed: int = 0
    evaluations_removed: int = 0
    layer_records_removed: int = 0  # `layers/<key>` records of layers whose blobs are gone
    orphan_notes_removed: int = 0  # usage notes, referrers and manifest pointers of images without a record
    locks_removed: int = 0  # locks (leases) that processes which died left behind
    quarantined_removed: int = 0  # damaged blobs set aside longer than the retention period
    # Kept only because they are dated ahead of gc's clock (more than CLOCK_SLACK): written by
    # a registry whose clock was ahead, and kept until that date has passed.
    images_ahead: int = 0
    blobs_ahead: int = 0
    most_ahead: float = 0.0  # seconds
    dry_run: bool = False

    def note_ahead(self, seconds: float) -> bool:
        """Whether a date `seconds` ahead of gc's clock is ahead by more than the slack (noted)."""
        if seconds <= CLOCK_SLACK:
            return False
        self.most_ahead = max(self.most_ahead, seconds)
        return True


async def _records(storage: Storage) -> tuple[dict[str, ImageRecord], dict[str, str]]:
    """The image records by key, and why each record that cannot be read cannot."""
    records, unreadable = {}, {}
    for key in await storage.list_meta("images"):
        data = await storage.get_meta(key)
        if data is not None:
            try:
                records[key] = ImageRecord.from_json(data)
            except RecordUnreadable as exc:
                unreadable[key] = str(exc)
    return records, unreadable


async def holds_anything(storage: Storage) -> bool:
    """Whether the storage has an image record or a blob: with neither, a maintenance
    command was most likely pointed at the wrong place (STORAGE_PATH, a bucket)."""
    if await storage.list_meta("images"):
        return True
    async for _ in storage.list_blobs():
        return True
    return False


async def check(storage: Storage) -> CheckReport:
    report = CheckReport()
    present: dict[Digest, int] = {}
    async for blob in storage.list_blobs():
        present[blob.digest] = blob.size
        report.blobs += 1
        report.bytes += blob.size
        if await storage.verify_blob(blob.digest) is False:
            outcome = await _set_aside(storage, report, blob.digest)
            report.problems.append(f"blob {blob.digest} does not match its digest{outcome}")
    if report.set_aside:  # registries drop what they hold in memory, and find the blobs gone
        try:
            await collected.announce(storage, "blobs")
        except (StorageFull, OSError) as exc:  # the blobs are out of service all the same
            report.problems.append(
                f"could not leave the note that tells running registries ({exc}): they find the blobs "
                f"gone when they next check an image's blobs (every {RECHECK_INTERVAL:g} s at most)"
            )
    records, unreadable = await _records(storage)
    for key, reason in unreadable.items():
        report.problems.append(f"{key} cannot be read ({reason}): the registry builds the image again on its next pull")
    for key, record in records.items():
        report.images += 1
        for digest in sorted(record.blobs()):
            if digest not in present:
                report.problems.append(f"{key} ({record.name}) names missing blob {digest}")
        # Cheap on every backend, and the check that remains where hashing
        # would mean downloading every blob (S3, GCS: verify_blob is None).
        for layer in record.layers:
            if present.get(layer.digest, layer.size) != layer.size:
                report.problems.append(
                    f"{key} ({record.name}): layer {layer.digest} is {present[layer.digest]} bytes, not {layer.size}"
                )
    return report


async def _set_aside(storage: Storage, report: CheckReport, digest: Digest) -> str:
    """Take a damaged blob out of service (`Storage.set_aside_damaged_blob`): what became of it,
    for its problem's line."""
    try:
        if not await storage.set_aside_damaged_blob(digest):
            return ""  # gone or replaced meanwhile, or a backend that sets nothing aside
    except OSError as exc:  # a user who may only read the storage: the damage is still reported
        return f" (could not set it aside: {exc.strerror or exc})"
    report.set_aside += 1
    return ": set aside"


def check_age(older_than: float) -> None:
    """Raises ValueError for an age gc does not take (below MIN_AGE)."""
    if older_than < MIN_AGE:
        raise ValueError(f"images younger than {MIN_AGE / 3600:g} hours are never collected")


async def collect_garbage(
    storage: Storage, *, older_than: float, dry_run: bool = False, quarantine_older_than: float = QUARANTINE_RETENTION
) -> GarbageReport:
    check_age(older_than)
    now = time.time()
    report = GarbageReport(dry_run=dry_run)
    live: set[Digest] = set()
    live_revisions: set[str] = set()
    records, unreadable = await _records(storage)
    for key in unreadable:  # vouches for no blob: the registry builds its image again on its next pull
        report.unreadable_removed += 1
        if not dry_run:
            async with storage.exclusive(build_lock(key.removeprefix(IMAGE_PREFIX))):
                if await _still_unreadable(storage, key):  # not built again meanwhile
                    await storage.delete_meta(key)
    pulled = await pulls.pulled_keys(storage)
    for key, record in records.items():
        image_key = key.removeprefix(IMAGE_PREFIX)
        last_use = await _last_use_of(storage, image_key, record, pulled, now)
        unused = now - last_use > older_than
        if report.note_ahead(last_use - now):
            report.images_ahead += 1
        if unused and not dry_run:
            async with storage.exclusive(build_lock(image_key)):
                # Read again under the lock: a pull recorded or a rebuild since the first read keeps it.
                current = await _readable_record(storage, key)
                if current is not None:
                    unused = now - await _last_use_of(storage, image_key, current, None, now) > older_than
                if unused:
                    await storage.delete_meta(key)
                    await storage.delete_meta(f"{USAGE_PREFIX}{image_key}")
                    # Its SBOMs' subjects and its manifests' digests lead to it no more.
                    for pointer in [*referrer_keys(current or record), *manifest_keys(current or record)]:
                        await storage.delete_meta(pointer)
                else:
                    record = current or record
        if unused:
            report.images_removed += 1
        else:
            report.images_kept += 1
            live |= record.blobs()
            live_revisions.add(record.revision)
    report.orphan_notes_removed = await _remove_orphan_notes(storage, dry_run=dry_run)
    live |= await signatures.kept_by_live(storage, live)  # signatures go with their manifests
    if not dry_run:  # a gc killed mid-way through deleting a blob: put back what it set aside
        await storage.restore_parked_blobs()
    listed: set[Digest] = set()
    unused_blobs = []
    async for blob in storage.list_blobs():
        listed.add(blob.digest)
        if blob.digest not in live and now - blob.modified >= BLOB_GRACE:
            unused_blobs.append(blob)
        elif blob.digest not in live and report.note_ahead(blob.modified - now):
            report.blobs_ahead += 1
    if (report.images_removed or unused_blobs) and not dry_run:
        # Every registry drops the records it holds before a blob goes: also the records an
        # earlier gc removed when it was stopped (Ctrl-C, killed) before it could say so.
        await collected.announce(storage, "images")
        await asyncio.sleep(collected.SETTLE)
    removed: set[Digest] = set()
    for blob in unused_blobs:
        # The listing's dates may be minutes old: the blob goes only if it is still unused now.
        if dry_run or await storage.delete_unused_blob(blob.digest, now - BLOB_GRACE):
            report.blobs_removed += 1
            report.bytes_freed += blob.size
            listed.discard(blob.digest)
            removed.add(blob.digest)
    if report.blobs_removed and not dry_run:
        await collected.announce(storage, "blobs")
        await signatures.remove_orphans(storage)
        await pulls.remove_orphans(storage)
    # A dry run removed nothing: the blobs it would have removed count as gone all the same.
    gone = removed if dry_run else set()
    report.layer_records_removed = await _remove_layer_records(storage, listed, gone, dry_run=dry_run)
    if not dry_run:  # a dead holder's lock stops nobody (it is taken over): this only tidies
        report.locks_removed = await storage.remove_abandoned_locks()
    # Nothing serves or names them: a blob is quarantined only once it is out of service.
    report.quarantined_removed = await storage.remove_quarantined(quarantine_older_than, dry_run=dry_run)
    for key in await storage.list_meta(EVALUATIONS):
        if _evaluated_revision(await storage.get_meta(key)) in live_revisions:
            continue
        report.evaluations_removed += 1
        if not dry_run:
            await storage.delete_meta(key)
    return report


async def _remove_orphan_notes(storage: Storage, *, dry_run: bool) -> int:
    """Remove the usage notes, referrers and manifest pointers of images that have no record: what a
    registry killed between writing an image's pointers and its record left, or a gc killed
    between removing a record and its notes. Each goes under its image's build lock, and only
    if the record is still absent: a build writes the pointers, then the record, holding it."""
    stored = {key.removeprefix(IMAGE_PREFIX) for key in await storage.list_meta(IMAGE_PREFIX)}
    notes: dict[str, list[str]] = {}
    for key in [*await storage.list_meta(USAGE_PREFIX), *await storage.list_meta(REFERRERS_PREFIX),
                *await storage.list_meta(MANIFESTS_PREFIX)]:
        image_key = key.rsplit("/", 1)[-1]
        if image_key not in stored:
            notes.setdefault(image_key, []).append(key)
    removed = 0
    for image_key, keys in sorted(notes.items()):
        if dry_run:
            removed += len(keys)
            continue
        async with storage.exclusive(build_lock(image_key)):
            if await storage.get_meta(f"{IMAGE_PREFIX}{image_key}") is not None:  # built meanwhile
                continue
            for key in keys:
                await storage.delete_meta(key)
                removed += 1
    return removed


async def _remove_layer_records(storage: Storage, stored: set[Digest], gone: set[Digest], *, dry_run: bool) -> int:
    """Remove the layer records (`layers/<key>`, nixery.layers.store) whose blob is gone: not
    among the `stored` blobs gc listed and kept, and not stored now. A build finds the layer by
    its record no more than before (a record is believed only when its blob is there), but the
    records would pile up, one per layer ever made. A build that writes a layer's record while
    its blob is still on its way, all through gc's listing, loses the record: the next image
    that needs the layer compresses it again (and finds the blob stored). `gone`: blobs a dry
    run would have removed, and so counts as gone though they are still stored."""
    removed = 0
    for key in await storage.list_meta(LAYER_PREFIX):
        digest = _layer_digest(await storage.get_meta(key))
        if digest is None or digest in stored:
            continue
        if digest not in gone and await storage.stat_blob(digest) is not None:
            continue
        removed += 1
        if not dry_run:
            await storage.delete_meta(key)
    return removed


def _layer_digest(data: bytes | None) -> Digest | None:
    """The blob a layer record names; None if gone or unreadable (a build writes it again)."""
    if data is None:
        return None
    try:
        return read_layer_record(data).digest
    except LAYER_RECORD_UNREADABLE:
        return None


async def _still_unreadable(storage: Storage, key: str) -> bool:
    """Whether the record under `key` still cannot be read (a registry may have built the image again)."""
    data = await storage.get_meta(key)
    return data is not None and _parsed(data) is None


async def _readable_record(storage: Storage, key: str) -> ImageRecord | None:
    """The record under `key` as it is now; None if it is gone or cannot be read."""
    data = await storage.get_meta(key)
    return None if data is None else _parsed(data)


def _parsed(data: bytes) -> ImageRecord | None:
    try:
        return ImageRecord.from_json(data)
    except RecordUnreadable:
        return None


async def _last_use_of(
    storage: Storage, image_key: str, record: ImageRecord, pulled: set[str] | None, now: float
) -> float:
    """When the image was built or last pulled, by tag or by the digest of one of its documents;
    `pulled`: the pulls by digest recorded (None: look each up)."""
    usage = await storage.get_meta(f"{USAGE_PREFIX}{image_key}")
    manifests = (descriptor.digest for descriptor in record.descriptors)
    return max(_last_use(record, usage, now), await pulls.last_pulled(storage, manifests, pulled))


def _last_use(record: ImageRecord, usage: bytes | None, now: float) -> float:
    """When the image was last built or pulled by tag; `now` when its usage note cannot be read
    (damaged: the image is kept; its next pull writes the note again)."""
    try:
        used = float(json.loads(usage)["last_used"]) if usage else 0.0
    except (ValueError, KeyError, TypeError):
        return now
    return max(record.built_at, used)


def _evaluated_revision(data: bytes | None) -> str | None:
    """The revision an evaluation was made at; None if gone or unreadable (then it goes)."""
    try:
        revision = json.loads(data or b"null")["revision"]
    except (ValueError, KeyError, TypeError):
        return None
    return revision if isinstance(revision, str) else None
