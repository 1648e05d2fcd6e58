"""The small layer every image gets on top: the paths users expect at `/`.

Store paths live under /nix/store; this layer makes an image feel like a
normal system: the requested packages' trees are linked at `/`
(`nixery.layers.rootlinks`: `/bin` with every program, `/share`, `/lib`,
`/etc`, Debian's `/usr/...`), `/bin/sh` and `/usr/bin/env` exist for scripts,
`system()` and `popen()` whenever the closure has a shell and an `env` (a
requested package's first, so `python3` alone still runs `os.system`, with the
`sh` its own scripts use), `/etc/ssl/certs` (and OpenSSL's `cert.pem` in
`/etc/ssl` and `/usr/lib/ssl`) point at a CA bundle from the closure when there
is one, `/tmp` and `/var/tmp` are writable, `/etc/hosts` knows localhost, Nix
(when a requested package has it) builds as root without a sandbox, and
`/etc/passwd` knows root (and a declared image's user,
`nixery.registry.runconfig`, whose home directory is writable like `/tmp`: tar
entries here are owned by root).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

from nixery.closure import Registration
from nixery.layers import nixdb
from nixery.layers.rootlinks import Linked, LinkedPackage, link_packages
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
#: Programs at fixed paths that scripts and libc expect (`#!/bin/sh`, `system()`,
#: `#!/usr/bin/env`), by the image's path: where a store path has them.
FIXED_PROGRAMS = {"bin/sh": ("bin/sh", "usr/bin/sh"), "usr/bin/env": ("bin/env", "usr/bin/env")}
SSL_CERT_FILE = "/etc/ssl/certs/ca-certificates.crt"
#: Where the CA bundle is linked, so that TLS works without SSL_CERT_FILE too (a program run with
#: `env -i`, `su -`, cron): the names Go, curl and most distributions read, and OpenSSL's default
#: file for its two usual directories: /etc/ssl (nixpkgs) and /usr/lib/ssl (Debian's libssl, which
#: Debian's Python, openssl and wget use).
CA_BUNDLE_LINKS = (
    "etc/ssl/cert.pem", "etc/ssl/certs/ca-bundle.crt", "etc/ssl/certs/ca-certificates.crt", "usr/lib/ssl/cert.pem",
)
CA_BUNDLE_DIRECTORIES = ("etc/ssl", "etc/ssl/certs", "usr/lib", "usr/lib/ssl")

#: For an image with Nix's programs and no configuration of its own: Nix's defaults build as the
#: `nixbld` group's users in a sandbox, and an image (root, in a container without the privileges
#: a sandbox needs) has neither: every build failed, "the group 'nixbld' ... does not exist".
NIX_CONF = "etc/nix/nix.conf"
_NIX_CONF = b"""# Written by the registry: no build users and no sandbox in a container.
# NIX_CONFIG adds to these; a requested package's own etc/nix replaces them.
build-users-group =
sandbox = false
"""

_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = b"root:x:0:\nnobody:x:65534:\n"
_NSSWITCH = b"passwd: files\ngroup: files\nhosts: files dns\n"
#: `localhost` for runtimes that do not mount their own /etc/hosts over it (`ctr run`, runc, chroot):
#: without it glibc asks DNS, which has no answer (or no server) there.
_HOSTS = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@dataclass(frozen=True, slots=True)
class EntryPoints:
    entries: tuple[Entry, ...]
    ca_bundle: str | None  # store path of the CA bundle linked at SSL_CERT_FILE
    linked: Linked  # how the packages were linked: conflicts, what was left out


@dataclass(frozen=True, slots=True)
class EntryLayer:
    """The entry-point layer as a worker wrote it: only what the server needs back."""

    key: str  # identifies the layer's bytes in the layer cache
    ca_bundle: str | None
    blob: LayerBlob
    linked: Linked  # without its entries: conflicts, what was left out


def find_ca_bundle(closure: Iterable[str], preferred: Sequence[str] = ()) -> str | None:
    """The CA bundle of the `preferred` store paths (in order: the requested packages', then the
    baseline's), else the first in the closure."""
    for store_path in [*preferred, *sorted(closure)]:
        for candidate in CA_BUNDLE_CANDIDATES:
            path = os.path.join(store_path, candidate)
            if os.path.isfile(path):
                return path
    return None


def find_program(candidates: Sequence[str], closure: Iterable[str], preferred: Sequence[str] = ()) -> str | None:
    """The first of `candidates` that one of the `preferred` store paths has, else the closure's (sorted)."""
    for store_path in [*preferred, *sorted(closure)]:
        for candidate in candidates:
            path = os.path.join(store_path, candidate)
            if os.path.isfile(path) and os.access(path, os.X_OK):  # follows links (busybox's applets)
                return path
    return None


def _own_entries(ca_bundle: str | None, config: RunConfig | None) -> list[Entry]:
    """What every image has at `/` whatever its packages (they win over the packages')."""
    own = [Entry(directory, "dir", 0o755) for directory in ("bin", "etc", "usr", "usr/bin", "root")]
    # /var/tmp too, as in Debian: scripts and tools write there (`mktemp -p /var/tmp`, large
    # temporary files kept off a tmpfs /tmp); a package's own var/ is never linked.
    own += [Entry("tmp", "dir", 0o1777), Entry("var", "dir", 0o755), Entry("var/tmp", "dir", 0o1777)]
    user = account(config)
    if user is not None:
        own += [Entry("home", "dir", 0o755), Entry(user.home, "dir", 0o1777)]
    own += [
        Entry("etc/passwd", "file", 0o644, content=_PASSWD + (user.passwd if user else b"")),
        Entry("etc/group", "file", 0o644, content=_GROUP + (user.group if user else b"")),
        Entry("etc/nsswitch.conf", "file", 0o644, content=_NSSWITCH),
        Entry("etc/hosts", "file", 0o644, content=_HOSTS),
    ]
    if ca_bundle is not None:
        own += [Entry(directory, "dir", 0o755) for directory in CA_BUNDLE_DIRECTORIES]
        own += [Entry(link, "symlink", target=ca_bundle) for link in CA_BUNDLE_LINKS]
    return own


def entry_points(
    packages: Sequence[LinkedPackage], closure: Iterable[str], config: RunConfig | None = None,
    registrations: Sequence[Registration] | None = None,
) -> EntryPoints:
    """The entries for the requested packages, in order: the first one wins a conflict. An
    image with Nix also gets a Nix database of `registrations`, its closure's (nixery.layers.nixdb).

    Reads the store (directory listings), so call it off the event loop.
    """
    closure = list(closure)
    outputs = [output for package in packages for output in package.outputs]
    ca_bundle = find_ca_bundle(closure, outputs)
    own = _own_entries(ca_bundle, config)
    linked = link_packages(packages, own)
    entries = {entry.name: entry for entry in [*own, *linked.entries]}
    env = entries.get("bin/env")
    if env is not None and env.kind == "symlink":  # a package's own usr/bin/env comes first
        entries.setdefault("usr/bin/env", Entry("usr/bin/env", "symlink", target=env.target))
    for path, candidates in FIXED_PROGRAMS.items():  # no requested package has it: the closure's
        if path not in entries and (program := find_program(candidates, closure, outputs)) is not None:
            entries[path] = Entry(path, "symlink", target=program)
    if nixdb.NIX_PROGRAM in entries and "etc/nix" not in entries:
        entries["etc/nix"] = Entry("etc/nix", "dir", 0o755)
        entries[NIX_CONF] = Entry(NIX_CONF, "file", 0o644, content=_NIX_CONF)
    if nixdb.NIX_PROGRAM in entries and registrations is not None:
        entries.update((e.name, e) for e in nixdb.database_entries(registrations, outputs))
    return EntryPoints(tuple(sorted(entries.values(), key=lambda e: e.name)), ca_bundle, linked)


def entry_layer_key(entries: Sequence[Entry], compression: Compression = Compression.GZIP) -> str:
    material = canonical_json(
        [[e.name, e.kind, e.mode, e.target, hashlib.sha256(e.content).hexdigest()] for e in entries]
    )
    return "entry-" + hashlib.sha256(material + cache_tag(compression).encode()).hexdigest()


def write_entry_points(
    packages: Sequence[LinkedPackage], closure: Iterable[str], dest: BinaryIO, *,
    compression: Compression = Compression.GZIP, config: RunConfig | None = None,
    registrations: Sequence[Registration] | None = None,
) -> EntryLayer:
    """Find the entry points and write their layer to `dest`, in one call.

    One trip to a worker instead of two: the entries themselves (hundreds of
    them for busybox) cost ~2 ms to pickle each way, more than writing them.
    """
    points = entry_points(packages, closure, config, registrations)
    blob = write_entry_layer(points.entries, dest, compression=compression)
    report = replace(points.linked, entries=[])  # the entries are in the layer: only the report goes back
    return EntryLayer(entry_layer_key(points.entries, compression), points.ca_bundle, blob, report)
