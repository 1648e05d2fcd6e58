"""Reading Nix's store database instead of running `nix-store --realise` and
`nix path-info`: checked against the real /nix/store and the real commands.

The module builds every store path it reads (the `store` fixture): it must hold
on a machine whose store is empty, as CI's is, and not depend on what earlier
runs happened to build."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nixery.closure import ClosureGraph, registrations_from_path_info
from nixery.layers import nixdb
from nixery.nix import packages, store_db
from nixery.nix.errors import NixError
from nixery.nix.process import Deadline, run_nix
from tests.registry import REPOSITORY, busybox_set_with, run

DATABASE = Path("/nix/var/nix/db/db.sqlite")
#: A syntactically valid store path that nothing ever builds.
NOTHING = "/nix/store/" + "0" * 32 + "-nothing"
#: Packages of the generated dependency web, and most references each has to older ones.
WEB_SIZE, WEB_FAN_OUT = 120, 6

pytestmark = [pytest.mark.nix]


@dataclass(frozen=True)
class BuiltPaths:
    busybox: str  # the busybox set's tools: one path, no references
    hello: str  # refers to busybox
    web_tops: list[str]  # the generated web's three biggest closures, biggest first

    def roots(self, case: str) -> list[str]:
        return {
            "busybox": [self.busybox],
            "hello": [self.hello],
            "busybox+hello": [self.busybox, self.hello],
            "web-top": self.web_tops[:1],
            "web-tops": self.web_tops,
        }[case]


def dependency_web(directory: Path, seed: int = 11) -> Path:
    """A package set of WEB_SIZE tiny packages, each referring to up to WEB_FAN_OUT
    older ones (so closures have many paths and many edges, like nixpkgs')."""
    rng = random.Random(seed)
    lines = []
    for i in range(WEB_SIZE):
        # One of the few packages just before (so closures grow long), and some older ones.
        recent = {rng.randrange(max(0, i - 3), i)} if i else set()
        deps = sorted(recent | {rng.randrange(i) for _ in range(rng.randrange(WEB_FAN_OUT))} if i else recent)
        refs = " ".join(f"${{p{d}}}" for d in deps)
        lines.append(f'  p{i} = node "{i}" "{refs}";')
    directory.mkdir(parents=True, exist_ok=True)
    web = directory / "web.nix"
    web.write_text(
        f"""let
  base = import {REPOSITORY / "pkgs" / "busybox"} {{ }};
  bb = "${{base.busybox}}/bin";
  node = n: refs: derivation {{
    name = "storedb-web-${{n}}"; system = builtins.currentSystem; builder = "${{bb}}/sh";
    args = [ "-c" "${{bb}}/mkdir $out && ${{bb}}/echo ${{refs}} > $out/refs" ];
  }};
in rec {{
{chr(10).join(lines)}
}}
"""
    )
    return web


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory: pytest.TempPathFactory, built_store_paths: dict[str, str]) -> BuiltPaths:
    """Builds (or finds built) the paths this module reads; the store database exists after."""
    outputs = run(["nix-build", "--no-out-link", str(dependency_web(tmp_path_factory.mktemp("web")))]).stdout.split()
    sizes = {out: len(path_info_graph([out])) for out in outputs[-20:]}  # the newest have the biggest closures
    tops = sorted(sizes, key=lambda out: (-sizes[out], out))[:3]
    assert DATABASE.exists()
    return BuiltPaths(busybox=built_store_paths["busybox"], hello=built_store_paths["hello"], web_tops=tops)


def path_info_graph(paths: list[str], env: dict[str, str] | None = None) -> ClosureGraph:
    result = subprocess.run(["nix", "path-info", "--json", "--recursive", *paths], capture_output=True, env=env)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return ClosureGraph.from_path_info(result.stdout)


def is_valid(path: str) -> bool:
    return subprocess.run(["nix-store", "--check-validity", path], capture_output=True).returncode == 0


@pytest.fixture
def nix_argv(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records every Nix command `nixery.nix.packages` runs (and runs it)."""
    calls: list[list[str]] = []

    async def recording(argv, **kwargs):
        calls.append(list(argv))
        return await run_nix(argv, **kwargs)

    monkeypatch.setattr(packages, "run_nix", recording)
    return calls


def copy_database(directory: Path, *, journal_mode: str = "wal") -> Path:
    """A consistent copy of the store database (and its schema version file)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "db.sqlite"
    with sqlite3.connect(f"{DATABASE.as_uri()}?mode=ro", uri=True) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
        copy.execute(f"PRAGMA journal_mode={journal_mode}")
    shutil.copy(DATABASE.with_name("schema"), directory / "schema")
    return target


def use_database(monkeypatch: pytest.MonkeyPatch, database: Path) -> None:
    monkeypatch.setattr(store_db, "database_path", lambda: database)


# ---- the same answers as Nix -------------------------------------------------


@pytest.mark.parametrize("case", ["busybox", "hello", "busybox+hello", "web-top", "web-tops"])
async def test_graph_equals_nix_path_info(case: str, store: BuiltPaths, nix_argv: list[list[str]]) -> None:
    roots = store.roots(case)
    expected = path_info_graph(roots)
    graph = store_db.read_closure(DATABASE, roots)
    assert graph.nodes.keys() == expected.nodes.keys()
    for name, node in expected.nodes.items():
        assert graph.nodes[name] == node, name  # same size, same references, no self-reference
    assert all(name not in node.references for name, node in graph.nodes.items())
    # Through the functions the builder uses: no Nix process at all.
    assert (await packages.closure_graph(roots, deadline=Deadline.after(30))).nodes == expected.nodes
    assert nix_argv == []


async def test_registrations_equal_nix_path_info_and_make_the_same_database(store: BuiltPaths) -> None:
    """What an image with Nix lists in its own database (nixery.layers.nixdb): read from the
    database, or from `nix path-info` when it cannot be, it is the same, and so are the bytes."""
    closure = sorted(store_db.read_closure(DATABASE, store.web_tops).nodes)
    stdout = run(["nix", "path-info", "--json", *closure]).stdout
    expected = sorted(registrations_from_path_info(stdout), key=lambda r: r.path)
    found = store_db.read_registrations(DATABASE, closure)
    assert sorted(found, key=lambda r: r.path) == expected
    assert any(len(r.references) > 1 for r in expected), "no references to compare"
    assert all(r.nar_hash.startswith("sha256:") and len(r.nar_hash) == 71 for r in found)
    assert nixdb.database(found) == nixdb.database(list(reversed(expected)))
    listed = sqlite3.connect(":memory:")
    data = nixdb.database(found)
    assert data[96:100] == (3_040_001).to_bytes(4, "big")  # not this machine's SQLite: any registry's bytes
    listed.deserialize(data)
    assert listed.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert [row[0] for row in listed.execute("SELECT path FROM ValidPaths ORDER BY id")] == closure
    refs = listed.execute("SELECT count(*) FROM Refs").fetchone()[0]
    assert refs == sum(len(r.references) for r in expected)


def test_the_largest_closure_is_not_trivial(store: BuiltPaths) -> None:
    graph = store_db.read_closure(DATABASE, store.web_tops[:1])
    assert len(graph) > 50, "the generated web has no sizeable closure to compare"
    assert sum(len(node.references) for node in graph.nodes.values()) > len(graph)


async def test_validity(store: BuiltPaths) -> None:
    roots = store.web_tops[:2]
    assert await store_db.valid_paths([*roots, NOTHING]) == frozenset(roots)
    assert await store_db.valid_paths([NOTHING]) == frozenset()
    assert not is_valid(NOTHING)
    assert await store_db.closure_graph([roots[0], NOTHING]) is None  # not valid: ask Nix, which says why


@pytest.mark.parametrize(
    "path",
    [
        "/nix/store/short-name",
        "/nix/store/" + "e" * 32 + "-bad-alphabet",  # Nix's base 32 has no e, o, t or u
        "/nix/store/" + "0" * 32 + "-x/bin/sh",
        "/nix/store/" + "0" * 32 + "-x'); DROP TABLE Refs; --",
        "/other/store/" + "0" * 32 + "-x",
        "",
    ],
)
async def test_only_plain_store_paths_are_looked_up(path: str, store: BuiltPaths) -> None:
    with pytest.raises(store_db.StoreDbUnavailable, match="not a store path"):
        store_db.read_valid_paths(DATABASE, [store.busybox, path])
    assert await store_db.valid_paths([store.busybox, path]) is None
    assert await store_db.closure_graph([store.busybox, path]) is None


def test_derivations_are_left_to_nix(store: BuiltPaths) -> None:
    """`nix path-info x.drv` answers for x's outputs; the database would answer for the file."""
    with sqlite3.connect(f"{DATABASE.as_uri()}?mode=ro", uri=True) as connection:
        (drv,) = connection.execute("SELECT path FROM ValidPaths WHERE path LIKE '%.drv' LIMIT 1").fetchone()
    with pytest.raises(store_db.StoreDbUnavailable, match="a derivation"):
        store_db.read_closure(DATABASE, [drv])


# ---- falling back to the Nix commands ----------------------------------------


@pytest.fixture
def nix_daemon(tmp_path: Path) -> Iterator[str]:
    """A nix-daemon for this store on a private socket; yields the socket path."""
    socket = tmp_path / "daemon" / "socket"
    socket.parent.mkdir()
    daemon = subprocess.Popen(
        ["nix-daemon"], env={**os.environ, "NIX_DAEMON_SOCKET_PATH": str(socket)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert daemon.poll() is None and time.monotonic() < deadline, "nix-daemon did not start"
            time.sleep(0.05)
        yield str(socket)
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


async def test_daemon_store_uses_the_nix_commands(
    monkeypatch: pytest.MonkeyPatch, nix_daemon: str, nix_argv: list[list[str]], store: BuiltPaths
) -> None:
    roots = [store.hello, store.web_tops[0]]
    expected = path_info_graph(roots)
    monkeypatch.setenv("NIX_REMOTE", "daemon")
    monkeypatch.setenv("NIX_DAEMON_SOCKET_PATH", nix_daemon)
    with pytest.raises(store_db.StoreDbUnavailable, match="NIX_REMOTE"):
        store_db.database_path()
    # (Realising a valid output path checks it, as realising its derivation would.)
    graph = await packages.ensure_built_closure(roots, roots, deadline=Deadline.after(60))
    assert graph.nodes == expected.nodes
    assert [argv[:2] for argv in nix_argv] == [["nix-store", "--realise"], ["nix", "path-info"]]


@pytest.mark.parametrize(
    "env",
    [
        {"NIX_REMOTE": "daemon"},
        {"NIX_REMOTE": "ssh-ng://builder"},
        {"NIX_REMOTE": "local?root=/tmp/elsewhere"},
        {"NIX_STORE_DIR": "/opt/nix/store"},
        {"NIX_STORE": "/opt/nix/store"},
        {"NIX_CONFIG": "store = daemon"},
        {"NIX_CONFIG": "store = /tmp/chroot-store # a comment"},
    ],
)
async def test_another_store_is_not_read(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], store: BuiltPaths
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(store_db.StoreDbUnavailable):
        store_db.database_path()
    assert await store_db.valid_paths([store.busybox]) is None
    assert await store_db.closure_graph([store.busybox]) is None


async def test_the_local_store_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert store_db.database_path() == DATABASE
    for name, value in {"NIX_REMOTE": "local", "NIX_STORE_DIR": "/nix/store/", "NIX_CONFIG": "store = local"}.items():
        monkeypatch.setenv(name, value)
    assert store_db.database_path() == DATABASE
    monkeypatch.setenv("NIX_CONFIG", "store = auto")  # the default; NIX_REMOTE=local does not count then
    assert store_db.database_path() == DATABASE
    monkeypatch.setenv("NIX_STATE_DIR", str(tmp_path))  # honoured, as Nix does
    assert store_db.database_path() == tmp_path / "db" / "db.sqlite"
    monkeypatch.setenv("NIX_STATE_DIR", str(tmp_path / "absent"))  # `auto` would not pick the local store
    with pytest.raises(store_db.StoreDbUnavailable, match="not writable"):
        store_db.database_path()


def garbage(directory: Path) -> Path:
    copy_database(directory)
    (directory / "db.sqlite").write_bytes(b"this is not a database" * 100)
    return directory / "db.sqlite"


def a_directory(directory: Path) -> Path:
    copy_database(directory)
    (directory / "db.sqlite").unlink()
    (directory / "db.sqlite").mkdir()
    return directory / "db.sqlite"


def missing(directory: Path) -> Path:
    return directory / "db.sqlite"


def without_table(table: str):
    def damage(directory: Path) -> Path:
        database = copy_database(directory)
        with sqlite3.connect(database) as connection:
            connection.execute(f"DROP TABLE {table}")
        return database

    damage.__name__ = f"without_{table}"
    return damage


def without_nar_size(directory: Path) -> Path:
    database = copy_database(directory)
    with sqlite3.connect(database) as connection:
        connection.execute("ALTER TABLE ValidPaths DROP COLUMN narSize")
    return database


def not_wal(directory: Path) -> Path:
    return copy_database(directory, journal_mode="delete")


def newer_schema(directory: Path) -> Path:
    database = copy_database(directory)
    (directory / "schema").write_text("11")
    return database


@pytest.mark.parametrize(
    "damage",
    [missing, garbage, a_directory, without_table("Refs"), without_table("ValidPaths"), without_nar_size,
     not_wal, newer_schema],
    ids=lambda damage: damage.__name__,
)
async def test_unusable_database_falls_back_to_nix(
    damage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nix_argv: list[list[str]], store: BuiltPaths
) -> None:
    roots = [store.busybox, store.hello]
    expected = path_info_graph(roots)
    use_database(monkeypatch, damage(tmp_path / "db"))
    assert await store_db.valid_paths(roots) is None
    assert await store_db.closure_graph(roots) is None
    graph = await packages.ensure_built_closure(roots, roots, deadline=Deadline.after(60))
    assert graph.nodes == expected.nodes
    assert [argv[:2] for argv in nix_argv] == [["nix-store", "--realise"], ["nix", "path-info"]]


async def test_a_closure_that_is_not_closed_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nix_argv: list[list[str]], store: BuiltPaths
) -> None:
    """Busybox's row is gone but hello still refers to it (a broken database)."""
    busybox, hello = store.busybox, store.hello
    database = copy_database(tmp_path / "db")
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA foreign_keys = OFF")
        connection.execute("DROP TRIGGER DeleteSelfRefs")
        connection.execute("DELETE FROM ValidPaths WHERE path = ?", (busybox,))
    with pytest.raises(store_db.StoreDbUnavailable, match="not closed"):
        store_db.read_closure(database, [hello])
    use_database(monkeypatch, database)
    assert await store_db.valid_paths([hello]) == {hello}  # hello's own row is still there
    graph = await packages.closure_graph([hello], deadline=Deadline.after(60))
    assert graph.nodes == path_info_graph([hello]).nodes and busybox in graph
    assert [argv[:2] for argv in nix_argv] == [["nix", "path-info"]]


async def test_a_valid_copy_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nix_argv, store: BuiltPaths
) -> None:
    """The copies above fail because of their damage, not because they are copies."""
    roots = store.web_tops[:2]
    use_database(monkeypatch, copy_database(tmp_path / "db"))
    graph = await packages.ensure_built_closure([], roots, deadline=Deadline.after(60))
    assert graph.nodes == path_info_graph(roots).nodes
    assert nix_argv == []


# ---- realise: skipped only when every output is valid --------------------------


@pytest.fixture
def fake_nix(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []

    async def fake(argv, **kwargs):
        calls.append(list(argv))
        return b""

    monkeypatch.setattr(packages, "run_nix", fake)
    return calls


async def test_nothing_runs_when_every_output_is_valid(fake_nix: list[list[str]], store: BuiltPaths) -> None:
    drv = "/nix/store/" + "1" * 32 + "-thing.drv"
    graph = await packages.ensure_built_closure([drv], [store.hello], deadline=Deadline.after(30))
    assert fake_nix == []
    assert graph.nodes == path_info_graph([store.hello]).nodes
    # One output not valid: Nix realises the derivations, then is asked for the closure
    # (the fake prints nothing, which is no closure).
    with pytest.raises(NixError, match="cannot read the closure"):
        await packages.ensure_built_closure([drv], [store.hello, NOTHING], deadline=Deadline.after(30))
    assert [argv[:2] for argv in fake_nix] == [["nix-store", "--realise"], ["nix", "path-info"]]


async def test_realise_runs_when_the_database_cannot_tell(
    fake_nix: list[list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, store: BuiltPaths
) -> None:
    use_database(monkeypatch, tmp_path / "missing.sqlite")
    with pytest.raises(NixError):
        drv = "/nix/store/" + "1" * 32 + "-thing.drv"
        await packages.ensure_built_closure([drv], [store.busybox], deadline=Deadline.after(30))
    assert [argv[:2] for argv in fake_nix] == [["nix-store", "--realise"], ["nix", "path-info"]]


def unbuilt_package_set(directory: Path) -> tuple[Path, str]:
    """The busybox set plus a package nobody has built yet, which refers to busybox."""
    name = f"storedb-test-{random.getrandbits(64):016x}"
    script = "$bb/mkdir -p $out/bin; echo '#!$bb/sh' > $out/bin/fresh; echo $out >> $out/self"
    return busybox_set_with(directory, "fresh", name, script), name


async def test_ensure_built_closure_builds_what_is_missing(
    tmp_path: Path, nix_argv: list[list[str]], store: BuiltPaths
) -> None:
    pkgs, name = unbuilt_package_set(tmp_path / "pkgs")
    resolved = await packages.evaluate(
        pkgs, ["fresh", "hello"], packages.host_system(), source="test", deadline=Deadline.after(60)
    )
    drvs = [p.drv_path for p in resolved]
    outputs = [out for p in resolved for out in p.outputs]
    fresh = next(out for out in outputs if out.endswith(name))
    assert not is_valid(fresh)
    assert await store_db.valid_paths(outputs) == frozenset(outputs) - {fresh}
    nix_argv.clear()  # the evaluation

    lines: list[str] = []
    graph = await packages.ensure_built_closure(drvs, outputs, deadline=Deadline.after(120), on_line=lines.append)
    assert nix_argv == [["nix-store", "--realise", *sorted(drvs)]], "realise must run for the unbuilt output"
    assert any(name in line for line in lines), "the build's progress lines reach the callback"
    assert is_valid(fresh)
    assert graph.nodes == path_info_graph(outputs).nodes
    assert graph.nodes[fresh].references == (store.busybox,)  # its self-reference is dropped
    assert store.busybox in graph and graph.closure(outputs) == set(graph.nodes)

    nix_argv.clear()
    again = await packages.ensure_built_closure(drvs, outputs, deadline=Deadline.after(120))
    assert nix_argv == [], "now everything is built: no Nix process"
    assert again.nodes == graph.nodes


# ---- big closures --------------------------------------------------------------

_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"


def synthetic_store(directory: Path, paths: int, seed: int = 7) -> list[str]:
    """A database with Nix's schema and `paths` made-up paths, each referring to up
    to 20 older ones (and sometimes to itself), like a big nixpkgs closure."""
    (directory / "db").mkdir(parents=True)
    database = directory / "db" / "db.sqlite"
    with sqlite3.connect(f"{DATABASE.as_uri()}?mode=ro", uri=True) as real:
        schema = [sql for (sql,) in real.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")
                  if "sqlite_sequence" not in sql]
    rng = random.Random(seed)
    names = [
        "/nix/store/" + "".join(rng.choice(_ALPHABET) for _ in range(32)) + f"-synthetic-{i}" for i in range(paths)
    ]
    edges = {(i + 1, rng.randrange(i) + 1) for i in range(1, paths) for _ in range(rng.randrange(20))}
    edges |= {(i, i) for i in range(1, paths + 1, 10)}
    with sqlite3.connect(database) as connection:
        connection.execute("PRAGMA journal_mode=wal")
        for sql in schema:
            connection.execute(sql)
        connection.executemany(
            "INSERT INTO ValidPaths (id, path, hash, registrationTime, narSize) VALUES (?, ?, ?, 0, ?)",
            [(i + 1, name, "sha256:" + "0" * 52, rng.randrange(1, 1 << 30)) for i, name in enumerate(names)],
        )
        connection.executemany("INSERT INTO Refs VALUES (?, ?)", sorted(edges))
    (directory / "db" / "schema").write_text(DATABASE.with_name("schema").read_text())
    return names


def test_a_closure_of_ten_thousand_paths_is_one_quick_query(tmp_path: Path) -> None:
    state = tmp_path / "state"
    names = synthetic_store(state, 20_000)
    roots = names[-3:]
    started = time.monotonic()
    graph = store_db.read_closure(state / "db" / "db.sqlite", roots)
    seconds = time.monotonic() - started
    assert len(graph) > 10_000
    assert seconds < 3, f"{seconds:.2f} s for {len(graph)} paths"
    # The very same answer from Nix itself, pointed at this database.
    expected = path_info_graph(roots, env={**os.environ, "NIX_STATE_DIR": str(state)})
    assert graph.nodes == expected.nodes



def register(database: Path, path: str, references: list[str]) -> None:
    """Add a valid path as Nix does: one committed write, while readers stay connected."""
    with sqlite3.connect(database) as connection:
        (row,) = connection.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?, ?, 0, 1234) RETURNING id",
            (path, "sha256:" + "0" * 52),
        ).fetchone()
        connection.executemany(
            "INSERT INTO Refs SELECT ?, id FROM ValidPaths WHERE path = ?", [(row, ref) for ref in references]
        )


def test_the_kept_connection_sees_new_paths_and_a_replaced_database(tmp_path: Path, store: BuiltPaths) -> None:
    """Connections are kept between a thread's queries (here: this thread's): a path Nix
    registers later is still seen, and a database replaced by another file is read from the new one."""
    database = copy_database(tmp_path / "db")
    new = "/nix/store/" + "0" * 32 + "-registered-later"
    assert store_db.read_valid_paths(database, [store.busybox, new]) == frozenset([store.busybox])

    register(database, new, [store.busybox])
    assert store_db.read_valid_paths(database, [store.busybox, new]) == frozenset([store.busybox, new])
    busybox_closure = store_db.read_closure(database, [store.busybox]).nodes
    assert set(store_db.read_closure(database, [new]).nodes) == {new, *busybox_closure}

    replacement = copy_database(tmp_path / "other")  # without the new path
    os.replace(replacement, database)
    assert store_db.read_valid_paths(database, [store.busybox, new]) == frozenset([store.busybox])
