"""Reading Nix's own store database, to skip Nix processes on the common path.

Every image build asks Nix two questions after the evaluation: are the
outputs built (`nix-store --realise`), and what is their closure (`nix
path-info --json --recursive`)? Usually every output is built already, and
each of those processes costs ~40 ms just to start, a third of the build of a
small image. The answers are in Nix's SQLite database, `ValidPaths` (a row
per valid store path, with `narSize`) and `Refs` (its references, by row id);
see Nix's `src/libstore/schema.sql`, schema version 10 since Nix 2.0. One
query answers both (a closure is only found when every root is valid) in
about a millisecond, and a closure of 10,000 paths in ~0.3 s (`nix path-info`
takes ~1.3 s for it).

What keeps it safe:

* It only reads. The database is opened with `mode=ro`, and only when it is
  in WAL mode, where readers never block Nix's writers (nor the reverse), and
  each query sees one committed snapshot (a connection kept for the next
  query holds no transaction open between them). The busy timeout is short.
* Any doubt means "ask Nix instead": the functions here return None, with a
  debug log line saying why, and the caller runs the Nix command as before.
  That covers a store that is not the local one (`NIX_REMOTE` or the `store`
  setting naming a daemon or another store, a state directory Nix would not
  open itself), a store directory other than /nix/store, a missing,
  unreadable or non-WAL database, an unknown schema version, any SQLite error
  (a missing table or column among them), query input that is not a plain
  store path (or is a .drv, which `nix path-info` reads as "its outputs"),
  and a result that is not closed under references.

A path that Nix's garbage collector deletes after it was read here is no
different from one deleted after `nix path-info` printed it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import structlog

from nixery.closure import ClosureGraph, GraphError, Node, Registration, base16_nar_hash

log = structlog.get_logger(__name__)

STORE_DIR = "/nix/store"
DEFAULT_STATE_DIR = Path("/nix/var/nix")
SCHEMA_VERSIONS = frozenset({10})  # Nix 2.0 on; later changes are named migrations adding tables
BUSY_TIMEOUT = 0.2  # seconds; WAL readers only wait during recovery

# Nix's base-32 alphabet (no e, o, t, u) and the characters a store path name may use.
_STORE_PATH = re.compile(r"/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]{1,211}")
_LOCAL_STORES = frozenset({"", "auto", "local"})  # store URLs that can mean this machine's store

_NEEDED_COLUMNS = frozenset(
    [("ValidPaths", "id"), ("ValidPaths", "path"), ("ValidPaths", "narSize")]
    + [("Refs", "referrer"), ("Refs", "reference")]
)
_COLUMNS = """
SELECT m.name, c.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS c
WHERE m.type = 'table' AND m.name IN ('ValidPaths', 'Refs')
"""
_VALID_PATHS = "SELECT path FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))"

# The closure of the roots, then per path its size and its references' ids.
_CLOSURE = """
WITH RECURSIVE closure(id) AS (
    SELECT id FROM ValidPaths WHERE path IN (SELECT value FROM json_each(?))
    UNION
    SELECT Refs.reference FROM Refs JOIN closure ON Refs.referrer = closure.id
)
SELECT ValidPaths.id, ValidPaths.path, ValidPaths.narSize,
       (SELECT group_concat(Refs.reference) FROM Refs WHERE Refs.referrer = ValidPaths.id)
FROM closure JOIN ValidPaths ON ValidPaths.id = closure.id
"""


# Each path's record and its references (by path), for the Nix database of an image with Nix.
_REGISTRATIONS = """
SELECT v.path, v.hash, v.narSize,
       (SELECT json_group_array(r.path) FROM Refs JOIN ValidPaths AS r ON r.id = Refs.reference
        WHERE Refs.referrer = v.id)
FROM ValidPaths AS v WHERE v.path IN (SELECT value FROM json_each(?))
"""


class StoreDbUnavailable(Exception):
    """The store database cannot answer this question; ask Nix."""


async def valid_paths(paths: Sequence[str]) -> frozenset[str] | None:
    """Which of `paths` are valid (built or fetched) in the local store; None if unknown."""
    try:  # in a thread: reading Nix's configuration files is disk I/O too
        return await asyncio.to_thread(lambda: read_valid_paths(database_path(), paths))
    except Exception as exc:  # any failure at all means: run the Nix command
        _fall_back("valid_paths", exc, len(paths))
        return None


async def closure_graph(paths: Sequence[str]) -> ClosureGraph | None:
    """The closure of `paths`, as `nix path-info --json --recursive` gives it; None if
    the database cannot tell (some path is not valid, or see the module docstring)."""
    try:
        return await asyncio.to_thread(lambda: read_closure(database_path(), paths))
    except Exception as exc:  # any failure at all means: run the Nix command
        _fall_back("closure_graph", exc, len(paths))
        return None


async def registrations(paths: Sequence[str]) -> list[Registration] | None:
    """What the database records of each of `paths`; None if it cannot tell (see closure_graph)."""
    try:
        return await asyncio.to_thread(lambda: read_registrations(database_path(), paths))
    except Exception as exc:  # any failure at all means: run the Nix command
        _fall_back("registrations", exc, len(paths))
        return None


def _fall_back(question: str, exc: Exception, paths: int) -> None:
    reason = str(exc) if isinstance(exc, StoreDbUnavailable) else f"{type(exc).__name__}: {exc}"
    log.debug("nix.store_db.fallback", question=question, reason=reason[:300], paths=paths)


def database_path() -> Path:
    """Where the local store's database is, if the Nix commands would use that store."""
    for variable in ("NIX_STORE_DIR", "NIX_STORE"):
        value = os.environ.get(variable)
        if value is not None and os.path.normpath(value) != STORE_DIR:
            raise StoreDbUnavailable(f"{variable}={value!r} is not {STORE_DIR}")
    # NIX_REMOTE is the default of Nix's `store` setting; a configuration file overrides it.
    remote = os.environ.get("NIX_REMOTE")
    if remote not in (None, *_LOCAL_STORES):
        raise StoreDbUnavailable(f"NIX_REMOTE={remote!r} is not the local store")
    store = _store_setting()
    if store is not None and store not in _LOCAL_STORES:
        raise StoreDbUnavailable(f"the store setting {store!r} is not the local store")
    state_dir = Path(os.environ.get("NIX_STATE_DIR") or DEFAULT_STATE_DIR)
    if (store if store is not None else remote or "auto") in ("", "auto") and not os.access(
        state_dir, os.R_OK | os.W_OK
    ):
        # Nix's `auto` store then picks the daemon if it runs (or a store in $HOME).
        raise StoreDbUnavailable(f"{state_dir} is not writable, so Nix may use another store")
    return state_dir / "db" / "db.sqlite"


def _store_setting() -> str | None:
    """The `store` setting of Nix's configuration (the last one wins), None if unset.

    Reads the files Nix 2.8 reads, in its order, then NIX_CONFIG; `include`
    directives are not followed.
    """
    conf_dir = os.environ.get("NIX_CONF_DIR") or "/etc/nix"
    files = [Path(conf_dir) / "nix.conf"]
    if user_files := os.environ.get("NIX_USER_CONF_FILES"):
        files += [Path(name) for name in user_files.split(":") if name]
    else:
        home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        dirs = [home, *(os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")]
        files += [Path(directory) / "nix" / "nix.conf" for directory in dirs if directory]
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(errors="replace"))
        except OSError:
            continue
    texts.append(os.environ.get("NIX_CONFIG", ""))
    value = None
    for text in texts:
        for line in text.splitlines():
            key, equals, rest = line.split("#", 1)[0].partition("=")
            if equals and key.strip() == "store":
                value = rest.strip()
    return value


def read_valid_paths(database: Path, paths: Iterable[str]) -> frozenset[str]:
    """The valid ones among `paths` (blocking)."""
    wanted = _checked(paths)
    with _connect(database) as connection:
        return frozenset(path for (path,) in connection.execute(_VALID_PATHS, (json.dumps(wanted),)))


def read_closure(database: Path, paths: Iterable[str]) -> ClosureGraph:
    """The closure graph of `paths`: one query, however big the closure (blocking)."""
    roots = _checked(paths)
    if derivations := [path for path in roots if path.endswith(".drv")]:
        # `nix path-info x.drv` means the closure of x's outputs, not of the file.
        raise StoreDbUnavailable(f"a derivation, not an output: {derivations[0]}")
    with _connect(database) as connection:
        rows = connection.execute(_CLOSURE, (json.dumps(roots),)).fetchall()
    names: dict[int, str] = {}
    sizes: dict[str, int] = {}
    references: dict[str, str | None] = {}
    for row_id, path, nar_size, refs in rows:
        if not isinstance(path, str) or not path.startswith(STORE_DIR + "/"):
            raise StoreDbUnavailable(f"the database holds a path outside {STORE_DIR}: {path!r:.200}")
        if not isinstance(nar_size, int):
            raise StoreDbUnavailable(f"no narSize for {path}")
        names[row_id] = path
        sizes[path] = nar_size
        references[path] = refs
    if missing := set(roots) - sizes.keys():
        raise StoreDbUnavailable(f"not valid (not built): {sorted(missing)[:3]}")
    nodes = []
    try:
        for path, refs in references.items():
            targets = {names[int(ref)] for ref in refs.split(",")} if refs else set()
            targets.discard(path)  # a path may refer to itself; the graph leaves that out
            nodes.append(Node(path, sizes[path], tuple(sorted(targets))))
        return ClosureGraph(nodes)
    except (KeyError, ValueError, GraphError) as exc:  # GraphError is a ValueError, named for clarity
        raise StoreDbUnavailable(f"the closure is not closed under references: {exc}") from exc


def read_registrations(database: Path, paths: Iterable[str]) -> list[Registration]:
    """The records of `paths`, each valid (blocking)."""
    wanted = _checked(paths)
    with _connect(database) as connection:
        rows = connection.execute(_REGISTRATIONS, (json.dumps(wanted),)).fetchall()
    found = []
    try:
        for path, nar_hash, nar_size, references in rows:
            if not isinstance(nar_size, int):
                raise StoreDbUnavailable(f"no narSize for {path}")
            found.append(Registration(
                path, base16_nar_hash(nar_hash), nar_size, tuple(sorted(set(json.loads(references))))
            ))
    except (TypeError, ValueError) as exc:  # GraphError (a hash Nix would not write) is a ValueError
        raise StoreDbUnavailable(f"a record that cannot be read: {exc}") from exc
    if missing := set(wanted) - {registration.path for registration in found}:
        raise StoreDbUnavailable(f"not valid (not built): {sorted(missing)[:3]}")
    return found


def _checked(paths: Iterable[str]) -> list[str]:
    wanted = sorted(set(paths))
    if not wanted:
        raise StoreDbUnavailable("no paths to look up")
    for path in wanted:
        if not isinstance(path, str) or not _STORE_PATH.fullmatch(path):
            raise StoreDbUnavailable(f"not a store path: {path!r:.200}")
    return wanted


_connections = threading.local()  # per thread: a connection belongs to the thread that made it


@contextmanager
def _connect(database: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a WAL-mode store database of a known schema.

    Kept open for the thread's next query (opening and checking one costs
    ~0.8 ms, half a small closure query); a connection that fails is dropped.
    """
    version_file = database.with_name("schema")
    try:
        version = int(version_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise StoreDbUnavailable(f"cannot read the schema version in {version_file}: {exc}") from exc
    if version not in SCHEMA_VERSIONS:
        raise StoreDbUnavailable(f"unknown store schema version {version}")
    try:
        identity = (str(database), os.stat(database).st_ino)
    except OSError:
        raise StoreDbUnavailable(f"no database at {database}") from None
    kept: tuple[tuple[str, int], sqlite3.Connection] | None = getattr(_connections, "kept", None)
    _connections.kept = None
    if kept is not None and kept[0] != identity:  # another database, or this one replaced
        kept[1].close()
        kept = None
    connection = kept[1] if kept is not None else _open(database)
    try:
        yield connection
    except BaseException:
        connection.close()
        raise
    _connections.kept = (identity, connection)


def _open(database: Path) -> sqlite3.Connection:
    if not database.is_file():
        raise StoreDbUnavailable(f"no database at {database}")
    uri = f"{database.absolute().as_uri()}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":
            raise StoreDbUnavailable(f"the database is in {mode} mode, not WAL")
        columns = set(connection.execute(_COLUMNS))
        if missing := _NEEDED_COLUMNS - columns:
            raise StoreDbUnavailable(f"the database lacks {sorted(missing)}")
    except BaseException:
        connection.close()
        raise
    return connection
