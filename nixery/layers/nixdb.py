"""A Nix database of the image's own store paths, in images that have Nix.

Nix in a container trusts only the paths its database lists. Without one, the
image's paths were invalid to it: `nix-store -q --references` of any of them
failed ("is not valid"), a build could not use them as inputs, and
`nix-collect-garbage`, which deletes what the database does not protect,
deleted the whole image under the running container. nixpkgs'
`buildImageWithNixDb` and nix2container's `initializeNixDatabase` give their
images a database for the same reason.

So an image one of whose requested packages has `bin/nix-build` (the same test
that gives it /etc/nix/nix.conf) gets, in its entry-point layer:

* `/nix/var/nix/db/db.sqlite`: every store path of the image, with the NAR
  hash, size and references that the registry's own Nix store records, in the
  tables of Nix's schema 10 (Nix 2.0 on; `schema` says so);
* `/nix/var/nix/gcroots/nixery/`: a root for each output of the requested and
  baseline packages, so that garbage collection in the container keeps what
  the image was asked to contain (and so its whole closure), and removes only
  what was built or fetched in it.

The file is the same for the same paths, on any registry: rows go in path
order, every path is registered at time 1 (as the image is created at
1970-01-01T00:00:01Z), no deriver is named (the .drv files are not in the
image), and no content address (a store records one for a path it built, not
for one it fetched: replicas would differ); the header's record of the SQLite
library that wrote the file (bytes 96-99) is a fixed number, as SQLite only
notes it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Sequence

from nixery.closure import Registration
from nixery.layers.rootlinks import LinkedPackage
from nixery.layers.tarball import Entry

#: The program whose presence in a requested package means the image has Nix.
NIX_PROGRAM = "bin/nix-build"
DATABASE = "nix/var/nix/db/db.sqlite"
SCHEMA = "nix/var/nix/db/schema"
ROOTS = "nix/var/nix/gcroots/nixery"
SCHEMA_VERSION = 10
REGISTRATION_TIME = 1
#: Written where SQLite puts the number of the library version that last wrote the file (3.40.1).
_SQLITE_VERSION_NUMBER = 3_040_001
_SQLITE_VERSION_OFFSET = 96

#: Nix's tables (its src/libstore/schema.sql, schema version 10), which Nix checks by name and column.
_TABLES = """
CREATE TABLE ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer,
    sigs             text,
    ca               text
);
CREATE TABLE Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
CREATE INDEX IndexReferrer on Refs(referrer);
CREATE INDEX IndexReference on Refs(reference);
CREATE TRIGGER DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
CREATE TABLE DerivationOutputs (
    drv  integer not null,
    id   text not null,
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
CREATE INDEX IndexDerivationOutputs on DerivationOutputs(path);
"""


def has_nix(packages: Iterable[LinkedPackage]) -> bool:
    """Whether a requested package has Nix's programs (reads the store: call it off the event loop)."""
    return any(os.path.lexists(os.path.join(out, NIX_PROGRAM)) for p in packages for out in p.outputs)


def database(registrations: Sequence[Registration]) -> bytes:
    """The bytes of a Nix database that lists `registrations` (closed under references)."""
    ordered = sorted(registrations, key=lambda r: r.path)
    ids = {registration.path: number for number, registration in enumerate(ordered, 1)}
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(_TABLES)
        connection.executemany(
            "INSERT INTO ValidPaths (id, path, hash, registrationTime, narSize) VALUES (?, ?, ?, ?, ?)",
            [(ids[r.path], r.path, r.nar_hash, REGISTRATION_TIME, r.nar_size) for r in ordered],
        )
        try:
            references = [(ids[r.path], ids[ref]) for r in ordered for ref in r.references]
        except KeyError as exc:
            raise ValueError(f"a reference outside the image's paths: {exc.args[0]}") from None
        connection.executemany("INSERT INTO Refs (referrer, reference) VALUES (?, ?)", references)
        connection.commit()
        data = bytearray(connection.serialize())
    finally:
        connection.close()
    data[_SQLITE_VERSION_OFFSET : _SQLITE_VERSION_OFFSET + 4] = _SQLITE_VERSION_NUMBER.to_bytes(4, "big")
    return bytes(data)


def database_entries(registrations: Sequence[Registration], roots: Iterable[str]) -> list[Entry]:
    """The entries of /nix/var/nix: the database of `registrations`, and a root for each of `roots`."""
    directories = ["nix/var", "nix/var/nix", "nix/var/nix/db", "nix/var/nix/gcroots", ROOTS]
    return [
        *(Entry(directory, "dir", 0o755) for directory in directories),
        Entry(DATABASE, "file", 0o644, content=database(registrations)),
        Entry(SCHEMA, "file", 0o644, content=str(SCHEMA_VERSION).encode()),
        *(
            Entry(f"{ROOTS}/{os.path.basename(root)}", "symlink", target=root)
            for root in sorted(set(roots))
        ),
    ]
