"""The small layer every image gets on top: the paths users expect at `/`.

Store paths live under /nix/store; this layer makes an image feel like a
normal system: `/bin` holds symlinks to every program of the requested
packages, `/usr/bin/env` exists for `#!/usr/bin/env` scripts, `/etc/ssl/certs`
points at a CA bundle from the closure when there is one, `/tmp` is writable,
and `/etc/passwd` knows root (and a declared image's user, `nixery.registry.runconfig`,
whose home directory is writable like `/tmp`: tar entries here are owned by root).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from nixery.layers.tarball import Entry, LayerBlob, cache_tag, write_entry_layer
from nixery.registry.image import canonical_json
from nixery.registry.mediatypes import Compression
from nixery.registry.runconfig import RunConfig, account

#: Layers of every image that hold no store path: this entry-point layer, on top.
#: NIXERY_MAX_LAYERS counts them (clients and registries limit the layers of an
#: image, not only those of store paths), so the store paths are planned into
#: NIXERY_MAX_LAYERS minus these.
ENTRY_POINT_LAYERS = 1

CA_BUNDLE_CANDIDATES = ("etc/ssl/certs/ca-bundle.crt", "etc/ssl/certs/ca-certificates.crt")
SSL_CERT_FILE = "/etc/ssl/certs/ca-certificates.crt"

_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = b"root:x:0:\nnobody:x:65534:\n"
_NSSWITCH = b"passwd: files\ngroup: files\nhosts: files dns\n"


@dataclass(frozen=True, slots=True)
class EntryPoints:
    entries: tuple[Entry, ...]
    ca_bundle: str | None  # store path of the CA bundle linked at SSL_CERT_FILE


@dataclass(frozen=True, slots=True)
class EntryLayer:
    """The entry-point layer as a worker wrote it: only what the server needs back."""

    key: str  # identifies the layer's bytes in the layer cache
    ca_bundle: str | None
    blob: LayerBlob


def _programs(output: str) -> Iterable[tuple[str, str]]:
    for subdir in ("bin", "sbin"):
        directory = os.path.join(output, subdir)
        try:
            names = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            yield name, os.path.join(directory, name)


def find_ca_bundle(closure: Iterable[str]) -> str | None:
    for store_path in sorted(closure):
        for candidate in CA_BUNDLE_CANDIDATES:
            path = os.path.join(store_path, candidate)
            if os.path.isfile(path):
                return path
    return None


def entry_points(outputs: Sequence[str], closure: Iterable[str], config: RunConfig | None = None) -> EntryPoints:
    """The entries for the requested packages' outputs, first package winning a name clash.

    Reads the store (directory listings), so call it off the event loop.
    """
    entries: dict[str, Entry] = {}

    def add(entry: Entry) -> None:
        entries.setdefault(entry.name, entry)

    for directory in ("bin", "etc", "usr", "usr/bin", "root"):
        add(Entry(directory, "dir", 0o755))
    add(Entry("tmp", "dir", 0o1777))
    user = account(config)
    if user is not None:
        add(Entry("home", "dir", 0o755))
        add(Entry(user.home, "dir", 0o1777))
    add(Entry("etc/passwd", "file", 0o644, content=_PASSWD + (user.passwd if user else b"")))
    add(Entry("etc/group", "file", 0o644, content=_GROUP + (user.group if user else b"")))
    add(Entry("etc/nsswitch.conf", "file", 0o644, content=_NSSWITCH))

    for output in outputs:
        for name, target in _programs(output):
            add(Entry(f"bin/{name}", "symlink", target=target))
    env = entries.get("bin/env")
    if env is not None:
        add(Entry("usr/bin/env", "symlink", target=env.target))

    ca_bundle = find_ca_bundle(closure)
    if ca_bundle is not None:
        for directory in ("etc/ssl", "etc/ssl/certs"):
            add(Entry(directory, "dir", 0o755))
        for name in ("ca-certificates.crt", "ca-bundle.crt"):
            add(Entry(f"etc/ssl/certs/{name}", "symlink", target=ca_bundle))
    return EntryPoints(tuple(sorted(entries.values(), key=lambda e: e.name)), ca_bundle)


def entry_layer_key(entries: Sequence[Entry], compression: Compression = Compression.GZIP) -> str:
    material = canonical_json(
        [[e.name, e.kind, e.mode, e.target, hashlib.sha256(e.content).hexdigest()] for e in entries]
    )
    return "entry-" + hashlib.sha256(material + cache_tag(compression).encode()).hexdigest()


def write_entry_points(
    outputs: Sequence[str], closure: Iterable[str], dest: BinaryIO, *,
    compression: Compression = Compression.GZIP, config: RunConfig | None = None,
) -> EntryLayer:
    """Find the entry points and write their layer to `dest`, in one call.

    One trip to a worker instead of two: the entries themselves (hundreds of
    them for busybox) cost ~2 ms to pickle each way, more than writing them.
    """
    points = entry_points(outputs, closure, config)
    blob = write_entry_layer(points.entries, dest, compression=compression)
    return EntryLayer(entry_layer_key(points.entries, compression), points.ca_bundle, blob)
