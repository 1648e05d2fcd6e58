"""The signatures of the manifests a registry serves, in storage (`nixery.signing` makes them).

A signature names the repository as the client names it, `HOST/NAME`
(`docker-reference`); containers/image, cosign and policy-controller compare
it with the image they pull. The registry learns that name only from a pull:
the same image is reached under several names (`curl/shell`, `Curl/Shell`)
and hosts. So each repository's signatures are made on the first pull of a
tag of an image through it (before the manifest is answered: the signature is
there when the client asks for it next), once for all the image's manifests
(every platform, every format, the index) and the documents attached to
them (SBOMs, provenance statements), and stored:

    signatures/<key id>/<sha256 of HOST/NAME, 32 hex>/<manifest hex>

holds the signature's `Attached` entry (its manifest, the config and payload
it names, its tag), written after those blobs are stored. Registries sharing
a storage find each other's; as signing is deterministic, two that sign at
once write the same bytes. Another key (a new NIXERY_SIGNING_KEY) has another
key id: its signatures are made anew on the next pull. `nixery gc` keeps a
signature's blobs while its subject is kept, and removes the entry with it.

An entry whose blobs are gone (collected while the image was rebuilt, say)
is made again when its tag is asked for: the entry itself shows the registry
signed that manifest for that repository.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from nixery.errors import DigestInvalid
from nixery.images import Attached
from nixery.lru import LRU
from nixery.registry.descriptors import Descriptor
from nixery.registry.digest import Digest
from nixery.registry.image import canonical_json
from nixery.registry.mediatypes import OCI_MANIFEST
from nixery.signing import SIMPLE_SIGNING, SigningKey, signature_documents, signature_tag
from nixery.storage.base import Storage

log = structlog.get_logger(__name__)

PREFIX = "signatures/"

#: Repositories (HOST/NAME) one process signs a manifest for, at most. A manifest is reached
#: under many names (any order and case of its packages) and, without NIXERY_PUBLIC_HOST, under
#: any Host header, and each signature is stored: unbounded, a client could fill storage by
#: naming one image in ever new ways. Real clients name an image a few ways. Past the bound a
#: pull is answered as before, unsigned for that repository, and a warning says why.
MAX_REPOSITORIES_PER_MANIFEST = 16


def entry_key(key_id: str, identity: str, subject: Digest) -> str:
    return f"{PREFIX}{key_id}/{hashlib.sha256(identity.encode()).hexdigest()[:32]}/{subject.hex}"


@dataclass
class _Repositories:
    """The repositories one manifest was signed for, by this process."""

    names: set[str] = field(default_factory=set)
    warned: bool = False  # that the bound was reached


class Signatures:
    """Signatures by one key, made once per repository and manifest (module docstring)."""

    def __init__(self, storage: Storage, key: SigningKey, *, public_host: str | None = None, capacity: int = 4096):
        self.storage = storage
        self.key = key
        self.public_host = public_host
        # (identity, subject) -> its entry, as found or written by this process.
        self._known: LRU[tuple[str, Digest], Attached] = LRU(capacity)
        # subject -> the identities this process signed it for or found it signed for.
        self._repositories: LRU[Digest, _Repositories] = LRU(capacity)

    def identity(self, host: str, name: str) -> str:
        """The repository as clients name it: NIXERY_PUBLIC_HOST when set, else the request's Host."""
        return f"{self.public_host or host}/{name}"

    def forget(self) -> None:
        """Blobs were collected (`nixery gc`): entries are checked in storage again."""
        self._known.clear()

    async def ensure(self, identity: str, subjects: Iterable[Digest]) -> None:
        """Every manifest in `subjects` signed for `identity`, in storage."""
        missing = [
            subject for subject in subjects
            if self._known.get((identity, subject)) is None and self._admits(identity, subject)
        ]
        if missing:
            await asyncio.gather(*(self._ensure_one(identity, subject) for subject in missing))

    def _admits(self, identity: str, subject: Digest) -> bool:
        """Whether `subject` may be signed for one more repository (MAX_REPOSITORIES_PER_MANIFEST)."""
        repositories = self._repositories.get(subject)
        if repositories is None:
            repositories = _Repositories()
            self._repositories.put(subject, repositories)
        if identity in repositories.names:
            return True
        if len(repositories.names) < MAX_REPOSITORIES_PER_MANIFEST:
            repositories.names.add(identity)
            return True
        if not repositories.warned:
            repositories.warned = True
            log.warning(
                "signing.too_many_repositories", identity=identity[:300], subject=str(subject),
                limit=MAX_REPOSITORIES_PER_MANIFEST,
                problem=f"this manifest is signed for {MAX_REPOSITORIES_PER_MANIFEST} repositories already; pulls"
                " through other names or hosts get no signature (with NIXERY_PUBLIC_HOST set, hosts do not count)",
            )
        return False

    async def find(self, identity: str, subject: Digest, *, recheck: bool = False) -> Attached | None:
        """The signature of `subject` for `identity`, if the registry has signed it; made again
        when its blobs are gone. `recheck`: its blobs are looked for in storage again, not taken
        from memory (the caller found one gone: set aside as damaged, say)."""
        if recheck:
            self._known.pop((identity, subject))
        known = self._known.get((identity, subject))
        if known is not None:
            return known
        return await self._ensure_one(identity, subject, only_if_signed=True)

    async def _ensure_one(self, identity: str, subject: Digest, *, only_if_signed: bool = False) -> Attached | None:
        key = entry_key(self.key.key_id, identity, subject)
        data = await self.storage.get_meta(key)
        attached = _entry(data) if data is not None else None
        if attached is not None:
            sizes = await asyncio.gather(
                *(self.storage.stat_blob(blob) for blob in (attached.manifest.digest, *attached.blobs))
            )
            if all(size is not None for size in sizes):
                self._known.put((identity, subject), attached)
                return attached
        elif data is None and only_if_signed:
            return None
        attached = await self._sign(identity, subject)
        await self.storage.put_meta(key, canonical_json(attached.to_json()))
        self._known.put((identity, subject), attached)
        return attached

    async def _sign(self, identity: str, subject: Digest) -> Attached:
        documents = await asyncio.to_thread(signature_documents, self.key, identity, subject)
        for blob in documents.blobs:  # the manifest last: what it names is stored before it
            await self.storage.put_blob_bytes(blob)
        log.info("signing.signed", identity=identity[:300], subject=str(subject), key=self.key.key_id)
        return Attached(
            manifest=Descriptor(OCI_MANIFEST, Digest.of(documents.manifest), len(documents.manifest),
                                artifact_type=SIMPLE_SIGNING),
            subject=subject,
            blobs=(Digest.of(documents.config), Digest.of(documents.payload)),
            tag=signature_tag(subject),
        )


def _entry(data: bytes) -> Attached | None:
    """A stored entry, or None for one that cannot be read (it is written again)."""
    try:
        return Attached.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError, DigestInvalid):
        return None


async def kept_by_live(storage: Storage, live: set[Digest]) -> set[Digest]:
    """For `nixery gc`: the blobs of every signature (by any key) of a manifest in `live`."""
    kept: set[Digest] = set()
    for key in await storage.list_meta(PREFIX.rstrip("/")):
        if _subject(key) in live:
            attached = _entry(await storage.get_meta(key) or b"")
            if attached is not None:
                kept.update((attached.manifest.digest, *attached.blobs))
    return kept


async def remove_orphans(storage: Storage) -> int:
    """For `nixery gc`, once it has removed blobs: the entries whose manifest is no longer
    stored go too (those of a manifest stored since, within gc's grace, stay)."""
    removed = 0
    for key in await storage.list_meta(PREFIX.rstrip("/")):
        subject = _subject(key)
        if subject is not None and await storage.stat_blob(subject) is None:
            await storage.delete_meta(key)
            removed += 1
    return removed


def _subject(key: str) -> Digest | None:
    try:
        return Digest.parse(f"sha256:{key.rsplit('/', 1)[-1]}")
    except DigestInvalid:
        return None
