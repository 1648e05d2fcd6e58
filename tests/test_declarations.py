"""Declared images from NixImage YAML files (NIXERY_IMAGES_PATH): parsing rules, the
name/package rule, change detection, and pulls from a real registry process."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

import nixery.declarations
from nixery import config
from nixery.declarations import (
    FILES,
    KUBERNETES,
    MAX_DECLARATION_FILES,
    DeclarationFiles,
    DeclarationStore,
    InvalidDeclaration,
    Problem,
    parse_declaration,
)
from nixery.declarations.store import MAX_LOGGED_PER_CHANGE
from nixery.registry.names import Arch
from tests.registry import RegistryProcess, have, run, skopeo_to_oci, unpack_oci

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


def nix_image(name: str, tag: Any = "v1", contents: Any = ("hello",), **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"tag": tag, "contents": list(contents) if isinstance(contents, tuple) else contents}
    if tag is None:
        del body["tag"]
    return {"apiVersion": "k8s.nixos.org/v1alpha", "kind": "NixImage", "metadata": {"name": name},
            "data": {**body, **data}}


def write_images(path: Path, *documents: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(documents))
    return path


# ---- parsing -------------------------------------------------------------


def test_valid_declaration() -> None:
    declaration = parse_declaration(nix_image("curl-and-jq", contents=["jq", "shell", "curl", "jq"]), origin="t")
    assert declaration.reference == "curl-and-jq:v1"
    assert declaration.request.packages == ("curl", "jq", "shell")  # sorted, unique: as image paths
    assert declaration.request.arch is Arch.AMD64
    document = nix_image("x.y", tag="release-2024.01", contents=["tools.jqlite"], arch="arm64")
    arm = parse_declaration(document, origin="t")
    assert arm.request.arch is Arch.ARM64 and arm.request.packages == ("tools.jqlite",)


def test_declarations_know_nothing_of_kubernetes() -> None:
    """`nixery.k8s` feeds the declarations; they import nothing of it (not even for types), so the
    two cannot import each other: `nixery.app` wires them together."""
    package = Path(nixery.declarations.__file__).parent
    imports = [
        (path.name, name)
        for path in sorted(package.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        for name in (
            [alias.name for alias in node.names] if isinstance(node, ast.Import)
            else [f"{node.module}.{alias.name}" for alias in node.names] if isinstance(node, ast.ImportFrom)
            else []
        )  # `from nixery.k8s.x import y` is nixery.k8s.x.y, `from nixery import k8s` nixery.k8s
        if name == "nixery.k8s" or name.startswith("nixery.k8s.")
    ]
    assert imports == []


def test_the_deploy_examples_are_valid() -> None:
    loaded = DeclarationFiles(EXAMPLES)
    assert loaded.scan()
    assert {d.reference for d in loaded.declarations} >= {"curl-and-jq:v1", "shell-tools:2024.1"}
    assert loaded.problems == []


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("just a string", "expected a NixImage object"),
        ({**nix_image("a"), "kind": "ConfigMap"}, "kind is 'ConfigMap'"),
        ({**nix_image("a"), "apiVersion": "k8s.nixos.org/v1"}, "apiVersion"),
        ({k: v for k, v in nix_image("a").items() if k != "apiVersion"}, "apiVersion is missing, expected"),
        ({k: v for k, v in nix_image("a").items() if k != "kind"}, "kind is missing, expected 'NixImage'"),
        ({k: v for k, v in nix_image("a").items() if k != "metadata"}, "metadata is missing"),
        (nix_image(""), "metadata.name is missing"),
        (nix_image("Upper"), "not a valid object name"),
        (nix_image("a/b"), "not a valid object name"),
        (nix_image("arm64"), "reserved"),
        (nix_image("x" * 129), "longer than 128"),
        (nix_image("a", tag=None), "data.tag is missing"),
        (nix_image("a", tag=1.0), "data.tag must be a string"),
        (nix_image("a", tag="../x"), "data.tag"),
        (nix_image("a", tag="-x"), "data.tag"),
        # An attachment's tag serves a manifest's documents, never the image: it could not be pulled.
        (nix_image("a", tag="sha256-v1"), "data.tag: cannot build under the tag 'sha256-v1'"),
        (nix_image("a", contents=[]), "data.contents is empty"),
        (nix_image("a", contents="hello"), "must be a list"),
        (nix_image("a", contents=["hello world"]), "invalid package name 'hello world'"),
        (nix_image("a", contents=["../etc"]), "data.contents[0]"),
        (nix_image("a", contents=["shell", "a/b"]), "data.contents[1]"),
        (nix_image("a", contents=["hello", 3]), "data.contents[1] must be a package name"),
        (nix_image("a", contents=["arm64", "hello"]), "data.arch"),
        (nix_image("a", contents=[f"p{n}" for n in range(101)]), "at most 100"),
        (nix_image("a", arch="x86_64"), "data.arch"),
        (nix_image("a", content=["hello"]), "unknown field(s) in data: content"),
        ({**nix_image("a"), "spec": {}}, "not spec"),
        ({k: v for k, v in nix_image("a").items() if k != "data"}, "data is missing"),
        # The wrong type is named as such, not as a missing field (`name: 2048` in YAML is a number,
        # `data:` followed by `- tag: v1` a list).
        ({**nix_image("a"), "metadata": {"name": 2048}}, 'metadata.name must be a string, not int (quote it: "2048")'),
        ({**nix_image("a"), "metadata": "tools"}, "metadata must be a mapping with a name, not str"),
        ({**nix_image("a"), "data": [{"tag": "v1", "contents": ["hello"]}]}, "data must be a mapping of tag"),
    ],
)
def test_invalid_declarations(document: Any, problem: str) -> None:
    with pytest.raises(InvalidDeclaration) as caught:
        parse_declaration(document, origin="t")
    assert problem in str(caught.value)


# ---- files and the table -------------------------------------------------


def test_files_are_scanned_cheaply_and_reread_on_change(tmp_path: Path) -> None:
    write_images(tmp_path / "b.yaml", nix_image("two", contents=["figlet"]), nix_image("three", tag="x"))
    write_images(tmp_path / "a.yml", nix_image("one"))
    (tmp_path / "sub").mkdir()
    write_images(tmp_path / "sub" / "c.json", nix_image("four"))
    (tmp_path / ".hidden.yaml").write_text("not: [valid")  # skipped, as a mounted ConfigMap's ..data
    (tmp_path / "notes.txt").write_text("not: [valid")  # other suffixes are skipped
    (tmp_path / "list.yaml").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List",
                                                        "items": [nix_image("five"), nix_image("six")]}))
    files = DeclarationFiles(tmp_path)
    assert files.scan()
    assert [d.reference for d in files.declarations] == ["one:v1", "two:v1", "three:x", "five:v1", "six:v1", "four:v1"]
    assert files.problems == []
    assert not files.scan()  # nothing changed: nothing read
    write_images(tmp_path / "b.yaml", nix_image("two", contents=["cowsay"]))
    assert files.scan()
    assert {d.reference: d.contents for d in files.declarations}["two:v1"] == ["cowsay"]
    (tmp_path / "a.yml").unlink()
    assert files.scan()
    assert "one:v1" not in [d.reference for d in files.declarations]


def test_files_past_the_limit_are_refused_and_the_first_by_path_served(tmp_path: Path) -> None:
    """The number of declaration files had no limit: 100,000 small files under NIXERY_IMAGES_PATH
    took a first scan of 27 s and every later one (one per pull by tag) of 1.7 s, all of them held
    in memory (220 MB). Past `max_files` (MAX_DECLARATION_FILES) the others are now ignored, with
    one error naming the limit and the count, also among the files' problems; the first files by
    path are served, whatever order the directory lists them in."""
    names = [f"{n:02d}.yaml" for n in range(12)] + ["a/b.yaml", "a-b.yaml", "a/a/z.yaml"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_images(tmp_path / name, nix_image("img-" + name.replace("/", "-").removesuffix(".yaml")))
    first = sorted(tmp_path / name for name in names)[:10]  # a/a/z.yaml and a/b.yaml before a-b.yaml
    with structlog.testing.capture_logs() as logs:
        files = DeclarationFiles(tmp_path, max_files=10)
        assert files.scan()
        assert not files.scan()  # nothing changed: nothing read, and not logged again
    assert [d.origin.split()[1].split("#")[0] for d in files.declarations] == [str(path) for path in first]
    [too_many] = [e for e in logs if e["event"] == "declarations.too_many_files"]
    assert too_many["log_level"] == "error"
    assert (too_many["files"], too_many["limit"], too_many["ignored"]) == (15, 10, 5)
    assert "15 declaration files, more than the limit of 10" in too_many["problem"]
    assert files.problems == [Problem(f"directory {tmp_path}", too_many["problem"])]
    assert len([e for e in logs if e["event"] == "declarations.file_loaded"]) == 10  # the others are not read

    # A file that comes first pushes the last one read past the limit: it is said so, not "removed".
    write_images(tmp_path / "0.yaml", nix_image("img-0"))
    with structlog.testing.capture_logs() as logs:
        assert files.scan()
    assert files.declarations[0].reference == "img-0:v1" and len(files.declarations) == 10
    assert [(e["event"], e["file"]) for e in logs if e["event"].startswith("declarations.file_")] == [
        ("declarations.file_loaded", str(tmp_path / "0.yaml")), ("declarations.file_ignored", str(first[-1]))
    ]
    (tmp_path / "0.yaml").unlink()
    files.scan()

    for name in names[:5]:
        (tmp_path / name).unlink()
    with structlog.testing.capture_logs() as logs:
        assert files.scan()
    assert len(files.declarations) == 10 and files.problems == []
    assert [e["event"] for e in logs if "too_many" in e["event"] or "within" in e["event"]] == [
        "declarations.file_count_within_limit"
    ]


def test_the_default_file_limit_holds(tmp_path: Path) -> None:
    for n in range(MAX_DECLARATION_FILES + 3):
        (tmp_path / f"{n:05d}.yaml").write_text("")
    with structlog.testing.capture_logs() as logs:
        files = DeclarationFiles(tmp_path)
        files.scan()
    [too_many] = [e for e in logs if e["event"] == "declarations.too_many_files"]
    assert (too_many["files"], too_many["limit"]) == (MAX_DECLARATION_FILES + 3, MAX_DECLARATION_FILES)
    assert len([e for e in logs if e["event"] == "declarations.file_loaded"]) == MAX_DECLARATION_FILES


def test_a_single_file_can_be_the_path(tmp_path: Path) -> None:
    files = DeclarationFiles(write_images(tmp_path / "images.yaml", nix_image("one"), nix_image("two")))
    files.scan()
    assert [d.reference for d in files.declarations] == ["one:v1", "two:v1"]


def test_invalid_documents_are_logged_and_skipped(tmp_path: Path) -> None:
    write_images(tmp_path / "mixed.yaml", nix_image("good"), nix_image("notag", tag=None),
                 {**nix_image("kind"), "kind": "Pod"}, nix_image("pkg", contents=["no such"]))
    (tmp_path / "broken.yaml").write_text("apiVersion: k8s.nixos.org/v1alpha\nkind: NixImage\nmetadata: [\n")
    with structlog.testing.capture_logs() as logs:
        files = DeclarationFiles(tmp_path)
        files.scan()
    assert [d.reference for d in files.declarations] == ["good:v1"]
    invalid = [(e["file"], e["document"], e["problem"]) for e in logs if e["event"] == "declarations.invalid"]
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "declarations.invalid")
    broken, mixed = str(tmp_path / "broken.yaml"), str(tmp_path / "mixed.yaml")
    assert invalid[0][:2] == (broken, None) and "not valid YAML" in invalid[0][2]
    assert [(f, d) for f, d, _ in invalid[1:]] == [(mixed, "1"), (mixed, "2"), (mixed, "3")]
    assert "data.tag is missing" in invalid[1][2] and "'Pod'" in invalid[2][2] and "'no such'" in invalid[3][2]


def test_a_key_given_twice_is_reported_not_half_read(tmp_path: Path) -> None:
    """`contents` written twice in one declaration (a merge gone wrong): YAML calls two equal keys
    an error and kubectl refuses the file, but PyYAML kept the last one silently, so the image
    was served with only the second list's packages. The file is now reported, naming the key
    and its line, and nothing of it is served."""
    (tmp_path / "images.yaml").write_text(
        "apiVersion: k8s.nixos.org/v1alpha\nkind: NixImage\nmetadata:\n  name: tools\n"
        "data:\n  tag: v1\n  contents: [curl, jq]\n  arch: amd64\n  contents: [bash]\n"
    )
    write_images(tmp_path / "other.yaml", nix_image("other"))
    with structlog.testing.capture_logs() as logs:
        files = DeclarationFiles(tmp_path)
        files.scan()
    assert [d.reference for d in files.declarations] == ["other:v1"]
    [problem] = [e["problem"] for e in logs if e["event"] == "declarations.invalid"]
    assert "'contents' is given twice" in problem and "line 9" in problem, problem
    assert files.problems[0].origin == f"file {tmp_path / 'images.yaml'}"


def test_base_60_numbers_are_reported_not_read_as_other_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads `22:22` as a base-60 number: a Compose-style `exposedPorts: [22:22]` was
    served as port 1342 without a word, and `user: 1000:1000` was told to quote "3601000".
    They are strings now, as Kubernetes reads them, and each is reported as what it is."""
    image = "apiVersion: k8s.nixos.org/v1alpha\nkind: NixImage\nmetadata: {{name: {name}}}\ndata:\n  tag: v1\n" \
            "  contents: [hello]\n  {field}\n"
    (tmp_path / "ports.yaml").write_text(image.format(name="ports", field="exposedPorts: [22:22, 8080]"))
    (tmp_path / "user.yaml").write_text(image.format(name="user", field="user: 1000:1000"))
    (tmp_path / "good.yaml").write_text(image.format(name="good", field="exposedPorts: [80, 0x50, 1_000]"))
    files = DeclarationFiles(tmp_path)
    files.scan()
    [good] = files.declarations
    assert good.reference == "good:v1" and good.request.config.exposed_ports == ("80/tcp", "1000/tcp")
    problems = {Path(p.origin.split()[1].split("#")[0]).name: p.message for p in files.problems}
    assert "'22:22' is not a port" in problems["ports.yaml"], problems
    assert "'1000:1000' is not a user name" in problems["user.yaml"], problems


async def test_name_and_package_rule_and_duplicates(tmp_path: Path) -> None:
    """A declaration claims its name:tag only; the first file (in path order) wins a duplicate."""
    write_images(tmp_path / "10-first.yaml", nix_image("hello", tag="v1", contents=["figlet"]))
    write_images(tmp_path / "20-second.yaml", nix_image("hello", tag="v1", contents=["cowsay"]),
                 nix_image("hello", tag="v2", contents=["cowsay"]))
    store = DeclarationStore(files=DeclarationFiles(tmp_path))
    with structlog.testing.capture_logs() as logs:
        await store.start()
    try:
        assert (await store.resolve("hello", "v1")).packages == ("figlet",)
        assert (await store.resolve("hello", "v2")).packages == ("cowsay",)
        assert await store.resolve("hello", "latest") is None  # the hello package, as any path
        assert await store.resolve("shell/hello", "v1") is None
        conflicts = [e for e in logs if e["event"] == "declarations.conflict"]
        assert len(conflicts) == 1
        assert conflicts[0]["served"].startswith(f"file {tmp_path / '10-first.yaml'}#0")
        assert conflicts[0]["ignored"].startswith(f"file {tmp_path / '20-second.yaml'}#0")
        # Files win over Kubernetes objects for the same name:tag.
        k8s = parse_declaration(nix_image("hello", tag="v2", contents=["greet"]), origin="niximage/hello",
                                source=KUBERNETES, rank=(1, "", "hello"), key="hello")
        store.set_source(KUBERNETES, [k8s])
        assert (await store.resolve("hello", "v2")).packages == ("cowsay",)
        store.set_source(FILES, [])
        store.files = None
        assert (await store.resolve("hello", "v2")).packages == ("greet",)
    finally:
        await store.close()


async def test_an_edit_is_seen_by_the_next_resolve(tmp_path: Path) -> None:
    path = write_images(tmp_path / "images.yaml", nix_image("app", contents=["hello"]))
    store = DeclarationStore(files=DeclarationFiles(tmp_path), poll_interval=3600)
    await store.start()
    try:
        assert (await store.resolve("app", "v1")).packages == ("hello",)
        write_images(path, nix_image("app", contents=["figlet"]))
        assert (await store.resolve("app", "v1")).packages == ("figlet",)
    finally:
        await store.close()


async def test_editing_thousands_of_declarations_logs_a_summary_not_a_line_each(tmp_path: Path) -> None:
    """A file of 2,000 declarations whose tags are all changed, and a second file claiming them:
    the registry logged a line per image declared, removed and in conflict (6,000 lines here, tens
    of thousands for a few such files), on the event loop, which held every request for hundreds
    of milliseconds. Now at most MAX_LOGGED_PER_CHANGE of each, and one line with the counts."""
    count = 2000
    path = write_images(tmp_path / "10-images.yaml", *(nix_image(f"app{n}") for n in range(count)))
    # A pull waits for the whole scan: on a busy machine two files of 2,000 take longer than SCAN_WAIT.
    store = DeclarationStore(files=DeclarationFiles(tmp_path), poll_interval=3600, scan_wait=None)
    await store.start()
    try:
        with structlog.testing.capture_logs() as logs:
            write_images(path, *(nix_image(f"app{n}", tag="v2") for n in range(count)))
            write_images(tmp_path / "20-again.yaml", *(nix_image(f"app{n}", tag="v2") for n in range(count)))
            assert (await store.resolve(f"app{count - 1}", "v2")) is not None
    finally:
        await store.close()
    per_image = [e for e in logs if e["event"] in
                 ("declarations.image_declared", "declarations.image_removed", "declarations.conflict")]
    assert len(per_image) <= 3 * MAX_LOGGED_PER_CHANGE, len(per_image)
    [summary] = [e for e in logs if e["event"] == "declarations.changed"]
    assert (summary["declared"], summary["removed"], summary["new_conflicts"]) == (count, count, count), summary


async def test_files_slow_to_scan_delay_a_pull_by_at_most_the_scan_wait(tmp_path: Path) -> None:
    """Ten files just under the size limit and the slowest kind to parse, rewritten before each
    pull: every pull by tag waited for a scan of all of them (2-6 s against a real registry, for
    `hello:latest` too, declared nowhere). A pull now waits at most `scan_wait`, is answered from
    the last scan, and the slow scan is logged once; once it ends, its result is served."""
    write_images(tmp_path / "good.yaml", nix_image("good"))
    slow_text = "[" + "1," * 400_000 + "1]\n"
    slow_files = [tmp_path / f"slow-{n}.yaml" for n in range(10)]
    for path in slow_files:
        path.write_text(slow_text)
    store = DeclarationStore(files=DeclarationFiles(tmp_path), poll_interval=3600, scan_wait=0.5)
    await store.start()
    try:
        with structlog.testing.capture_logs() as logs:
            for round_ in range(3):
                for path in slow_files:
                    path.write_text(slow_text + f"# {round_}\n")
                started = time.monotonic()
                assert (await store.resolve("good", "v1")).packages == ("hello",)
                assert await store.resolve("hello", "latest") is None
                assert time.monotonic() - started < 2.5, f"the pulls waited {time.monotonic() - started:.1f} s"
            write_images(tmp_path / "good.yaml", nix_image("good", contents=["figlet"]))
            await store.refresh_files()  # as the background poll does: to the end of a scan
            assert (await store.resolve("good", "v1")).packages == ("figlet",)
    finally:
        await store.close()
    assert len([e for e in logs if e["event"] == "declarations.scan_slow"]) == 1


class ThreadRecordingFiles(DeclarationFiles):
    """Declaration files that note the thread of each step of reading them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: list[tuple[str, int]] = []

    def scan(self) -> bool:
        self.threads.append(("scan", threading.get_ident()))
        return super().scan()

    def _load(self, path: Path, stamp: tuple[int, ...]) -> Any:
        self.threads.append(("parse", threading.get_ident()))
        return super()._load(path, stamp)

    @property
    def declarations(self) -> list[Any]:
        self.threads.append(("collect", threading.get_ident()))
        return super().declarations


async def test_a_tag_pull_reads_no_declaration_on_the_event_loop(tmp_path: Path) -> None:
    """Every step of bringing the files' declarations up to date for a pull (stat, read, parse,
    collect the declarations of every file) runs in the scan thread, none on the event loop."""
    for n in range(20):
        write_images(tmp_path / f"images-{n:02d}.yaml", nix_image(f"app{n}", contents=["hello"]))
    files = ThreadRecordingFiles(tmp_path)
    store = DeclarationStore(files=files, poll_interval=3600)
    await store.start()
    try:
        files.threads.clear()
        touch_later(tmp_path / "images-07.yaml", yaml.safe_dump(nix_image("app7", contents=["figlet"])))
        assert (await store.resolve("app7", "v1")).packages == ("figlet",)
        steps = {step for step, _ in files.threads}
        assert steps == {"scan", "parse", "collect"}
        loop_thread = threading.get_ident()
        assert [step for step, thread in files.threads if thread == loop_thread] == []
    finally:
        await store.close()


class RecordingBuilder:
    def __init__(self) -> None:
        self.started: list[tuple[tuple[str, ...], str]] = []

    async def start(self, request, tag):
        self.started.append((request.packages, tag))
        return type("Build", (), {"id": "b"})()

    async def image(self, request, tag, **_):
        from tests.test_k8s_watch import fake_record

        return fake_record(request)


async def test_prebuild_builds_what_appears_or_changes(tmp_path: Path) -> None:
    path = write_images(tmp_path / "images.yaml", nix_image("app", contents=["hello"]))
    builder = RecordingBuilder()
    store = DeclarationStore(builder=builder, files=DeclarationFiles(tmp_path), prebuild=True, poll_interval=0.05)
    await store.start()
    try:
        await asyncio.sleep(0.1)
        assert builder.started == [(("hello",), "v1")]
        write_images(path, nix_image("app", contents=["hello"]), nix_image("other", contents=["figlet"]))
        for _ in range(100):  # the background poll notices without any pull
            if len(builder.started) == 2:
                break
            await asyncio.sleep(0.02)
        assert builder.started == [(("hello",), "v1"), (("figlet",), "v1")]  # unchanged ones are not rebuilt
    finally:
        await store.close()


class SlowCountingFiles(DeclarationFiles):
    """Declaration files whose scans take a while, counted (how many, how many at once)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.scans = self.running = self.most_at_once = 0
        self._lock = threading.Lock()

    def scan(self) -> bool:
        with self._lock:
            self.scans += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(0.05)
            return super().scan()
        finally:
            with self._lock:
                self.running -= 1


async def test_concurrent_pulls_share_scans_one_at_a_time(tmp_path: Path) -> None:
    path = write_images(tmp_path / "images.yaml", nix_image("app", contents=["hello"]))
    files = SlowCountingFiles(tmp_path)
    store = DeclarationStore(files=files, poll_interval=3600)
    await store.start()
    try:
        files.scans = 0
        touch_later(path, yaml.safe_dump(nix_image("app", contents=["figlet"])))
        results = await asyncio.gather(*(store.resolve("app", "v1") for _ in range(50)))
        assert {r.packages for r in results} == {("figlet",)}  # every pull sees the edit made before it
        assert files.scans <= 2 and files.most_at_once == 1
    finally:
        await store.close()


async def test_a_cancelled_pull_leaves_its_scan_to_finish(tmp_path: Path) -> None:
    path = write_images(tmp_path / "images.yaml", nix_image("app", contents=["hello"]))
    store = DeclarationStore(files=SlowCountingFiles(tmp_path), poll_interval=3600)
    await store.start()
    try:
        touch_later(path, yaml.safe_dump(nix_image("app", contents=["figlet"])))
        pull = asyncio.ensure_future(store.resolve("app", "v1"))
        await asyncio.sleep(0.01)  # the scan is running in its thread
        pull.cancel()
        for _ in range(200):
            if store.lookup("app", "v1").contents == ["figlet"]:
                break
            await asyncio.sleep(0.01)
        assert store.lookup("app", "v1").contents == ["figlet"]  # applied, though nobody waited
    finally:
        await store.close()


# ---- hostile files (issue 19) ---------------------------------------------


def alias_bomb() -> str:
    """~600 bytes whose `kind` stands for 10^8 strings: eight levels of lists of ten aliases."""
    lines = ["apiVersion: k8s.nixos.org/v1alpha", "x0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"x{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]" for level in range(1, 9)]
    return "\n".join([*lines, "kind: *a8", "metadata: {name: bomb}", "data: {tag: v1, contents: [hello]}", ""])


def deep_nesting(levels: int = 3000) -> str:
    return "kind: " + "[" * levels + "]" * levels + "\n"


# A NixImage whose tag reads as a date that does not exist: PyYAML raises ValueError, not a YAMLError.
IMPOSSIBLE_DATE = "apiVersion: k8s.nixos.org/v1alpha\nkind: NixImage\nmetadata: {name: dated}\n" \
                  "data: {tag: 2024-02-30, contents: [hello]}\n"


def sparse_file(path: Path, size: int = 1 << 30) -> Path:
    """A file that claims `size` bytes and takes no disk space."""
    with path.open("wb") as out:
        out.truncate(size)
    return path


def add_symlink_loops(directory: Path) -> None:
    """Two links to the directory itself and one to its parent."""
    os.symlink(".", directory / "loop-a")
    os.symlink(".", directory / "loop-b")
    os.symlink("..", directory / "up")


def finishes(function: Any, seconds: float = 30) -> Any:
    """`function()` run in a thread (its result, or its exception raised here); fails when
    it is still running after `seconds`: it blocked, and a daemon thread cannot hold pytest."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def unblock_fifo(path: Path) -> None:
    """Let a reader blocked on the FIFO go (open for writing and close: it reads end of file)."""
    with contextlib.suppress(OSError):  # ENXIO: nobody is reading, nothing to unblock
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize(
    "document",
    [
        {**nix_image("a"), "kind": "K" * 100_000},
        {**nix_image("a"), "apiVersion": ["v" * 1000] * 1000},
        nix_image("a", tag={"t" * 1000: ["x" * 1000] * 1000}),
        nix_image("a", tag=10**4000),
        nix_image("a", arch="a" * 100_000),
        nix_image("a" * 100_000),
        nix_image("a", contents=["x" * 100_000 + "/y"]),
        {**nix_image("a"), **{f"field{n}" * 100: n for n in range(1000)}},
        nix_image("a", **{f"field{n}" * 100: n for n in range(1000)}),
    ],
    ids=["kind", "apiVersion", "tag", "tag-number", "arch", "name", "contents", "fields", "data-fields"],
)
def test_problems_quote_values_briefly(document: Any) -> None:
    with pytest.raises(InvalidDeclaration) as caught:
        parse_declaration(document, origin="t")
    assert len(str(caught.value)) < 200, str(caught.value)[:500]


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (lambda path: path.write_text(alias_bomb()), "not valid YAML: more than 50000 values"),
        (lambda path: path.write_text(deep_nesting()), "not valid YAML: nested more than 64 levels deep"),
        (lambda path: path.write_text(IMPOSSIBLE_DATE),  # it said ValueError, without the line
         "not valid YAML: '2024-02-30' reads as a date or time that does not exist ("),
        (sparse_file, "the file is larger than 1048576 bytes"),
    ],
    ids=["alias-bomb", "deep-nesting", "impossible-date", "huge"],
)
async def test_a_hostile_file_is_skipped_alone_and_reported_once(tmp_path: Path, write: Any, problem: str) -> None:
    """Beside a valid declaration, while the store polls and pulls resolve: the valid one is
    served, the hostile file gets one short log line, and no scan fails."""
    write_images(tmp_path / "good.yaml", nix_image("good"))
    write(tmp_path / "hostile.yaml")
    store = DeclarationStore(files=DeclarationFiles(tmp_path), poll_interval=0.01)
    with structlog.testing.capture_logs() as logs:
        await store.start()
        try:
            for _ in range(10):
                assert (await store.resolve("good", "v1")).packages == ("hello",)
                await asyncio.sleep(0.02)
        finally:
            await store.close()
    invalid = [e for e in logs if e["event"] == "declarations.invalid"]
    assert [(e["file"], e["document"]) for e in invalid] == [(str(tmp_path / "hostile.yaml"), None)]
    assert invalid[0]["problem"].startswith(problem) and len(invalid[0]["problem"]) <= 200, invalid[0]["problem"][:500]
    assert not [e for e in logs if e["event"] == "declarations.scan_failed"]
    assert len(repr(logs)) < 10_000


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    write_images(tmp_path / "good.yaml", nix_image("good"))
    os.mkfifo(tmp_path / "x.yaml")
    files = DeclarationFiles(tmp_path)
    try:
        assert finishes(files.scan)
    finally:
        unblock_fifo(tmp_path / "x.yaml")
    assert [d.reference for d in files.declarations] == ["good:v1"]
    assert [(p.origin, p.message) for p in files.problems] == [
        (f"file {tmp_path / 'x.yaml'}", "not a regular file but a FIFO")
    ]
    (tmp_path / "x.yaml").unlink()  # and once it is gone, so is its problem
    assert files.scan() and files.problems == []


def test_directory_symlinks_are_not_followed_around_or_out_of_the_tree(tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "team").mkdir(parents=True)
    write_images(images / "good.yaml", nix_image("good"))
    write_images(images / "team" / "team.yaml", nix_image("team"))
    write_images(tmp_path / "outside.yaml", nix_image("outside"))
    add_symlink_loops(images)
    add_symlink_loops(images / "team")
    os.symlink("team", images / "team-link")  # inside the tree, but a second way to the same directory
    files = DeclarationFiles(images)
    assert finishes(files.scan)
    assert [d.reference for d in files.declarations] == ["good:v1", "team:v1"]
    assert files.problems == []


def test_a_mounted_configmap_works_and_its_updates_are_seen(tmp_path: Path) -> None:
    """The kubelet's layout: files are symlinks into `..data`, a symlink to a hidden,
    timestamped directory that an update replaces (a new directory, then `..data` renamed over)."""

    def publish(version: str, contents: list[str]) -> None:
        directory = tmp_path / f"..2024_01_01_00_00_0{version}.1"
        directory.mkdir()
        write_images(directory / "images.yaml", nix_image("app", contents=contents))
        os.symlink(directory.name, tmp_path / "..data_tmp")
        os.rename(tmp_path / "..data_tmp", tmp_path / "..data")
        if not (tmp_path / "images.yaml").is_symlink():
            os.symlink("..data/images.yaml", tmp_path / "images.yaml")

    publish("1", ["hello"])
    files = DeclarationFiles(tmp_path)
    assert files.scan()
    assert [(d.reference, d.contents) for d in files.declarations] == [("app:v1", ["hello"])]
    # NIXERY_IMAGES_PATH naming the one file, a link into `..data`: the settings resolved it at
    # start-up, and the registry kept reading the first version.
    one_file = DeclarationFiles(config.load({"NIXERY_IMAGES_PATH": str(tmp_path / "images.yaml"),
                                             "NIXERY_BUNDLED_SET": "busybox"}).images_path)
    assert one_file.scan()
    publish("2", ["figlet"])
    assert files.scan()
    assert [(d.reference, d.contents) for d in files.declarations] == [("app:v1", ["figlet"])]
    assert files.problems == []
    assert one_file.scan()
    assert [(d.reference, d.contents) for d in one_file.declarations] == [("app:v1", ["figlet"])]


# ---- a real registry -----------------------------------------------------


def digest_of(registry: RegistryProcess, name: str, tag: str) -> str:
    return registry.manifest(name, tag)[0]


def touch_later(path: Path, text: str) -> None:
    """Rewrite a file so its modification time surely differs (coarse file system clocks)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
def test_declared_images_are_pulled_with_their_contents(start_registry, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    write_images(images / "team.yaml", nix_image("greeter", contents=["shell", "hello"]),
                 nix_image("cow", tag="2024.1", contents=["cowsay", "fortune"]))
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images))

    skopeo_to_oci(f"{registry.host}/greeter:v1", tmp_path / "layout")
    rootfs = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    assert (rootfs / "bin" / "hello").exists() and (rootfs / "bin" / "sh").exists()
    assert not (rootfs / "bin" / "cowsay").exists()
    assert run(["chroot", str(rootfs), "/bin/sh", "-c", "hello"]).stdout == "Hello, world!\n"

    # The declared contents are exactly the image the same packages in a path give.
    assert digest_of(registry, "cow", "2024.1") == digest_of(registry, "fortune/cowsay", "2024.1")
    _, manifest = registry.manifest("cow", "2024.1")
    status, _, body = registry.request(f"/v2/cow/blobs/{manifest['config']['digest']}", accept=None)
    assert status == 200
    assert json.loads(body)["config"]["Labels"]["org.nixos.nixery.packages"] == "cowsay fortune"
    assert [e["image"] for e in registry.log_events("declarations.resolved")][:1] == ["greeter:v1"]


@pytest.mark.skipif(not (have("skopeo") and have("umoci")), reason="needs skopeo and umoci")
def test_editing_a_file_changes_the_next_pull(start_registry, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    path = write_images(images / "app.yaml", nix_image("app", contents=["shell", "hello"]))
    # a long poll interval: only the pull itself can notice the edit
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images), NIXERY_IMAGES_POLL="3600")
    first = digest_of(registry, "app", "v1")

    touch_later(path, yaml.safe_dump(nix_image("app", contents=["shell", "figlet"])))
    second = digest_of(registry, "app", "v1")
    assert second != first
    assert second == digest_of(registry, "shell/figlet", "v1")
    skopeo_to_oci(f"{registry.host}/app:v1", tmp_path / "layout")
    rootfs = unpack_oci(tmp_path / "layout", tmp_path / "bundle")
    assert (rootfs / "bin" / "figlet").exists() and not (rootfs / "bin" / "hello").exists()

    # Moving the declaration to another tag frees the old one: app:v1 is a package name again.
    touch_later(path, yaml.safe_dump(nix_image("app", tag="v2", contents=["shell", "figlet"])))
    assert digest_of(registry, "app", "v2") == second
    status, _, body = registry.request("/v2/app/manifests/v1")
    assert status == 404 and b"app" in body

    # A new file is picked up too, and removing it takes the image away.
    extra = write_images(images / "extra.yaml", nix_image("extra", contents=["greet"]))
    assert digest_of(registry, "extra", "v1") == digest_of(registry, "greet", "v1")
    extra.unlink()
    assert registry.request("/v2/extra/manifests/v1")[0] == 404


def test_invalid_files_are_reported_and_skipped(start_registry, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    write_images(images / "good.yaml", nix_image("good", contents=["hello"]))
    (images / "bad-yaml.yaml").write_text("kind: NixImage\ndata: {tag: v1, contents: [hello\n")
    write_images(images / "wrong-kind.yaml", {**nix_image("kind"), "kind": "Deployment"})
    write_images(images / "no-tag.yaml", nix_image("notag", tag=None))
    write_images(images / "bad-package.yaml", nix_image("badpkg", contents=["hello", "rm -rf"]))
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images))

    assert digest_of(registry, "good", "v1") == digest_of(registry, "hello", "v1")
    problems = {Path(e["file"]).name: e["problem"] for e in registry.log_events("declarations.invalid")}
    assert set(problems) == {"bad-yaml.yaml", "wrong-kind.yaml", "no-tag.yaml", "bad-package.yaml"}
    assert "not valid YAML" in problems["bad-yaml.yaml"]
    assert "'Deployment'" in problems["wrong-kind.yaml"]
    assert "data.tag is missing" in problems["no-tag.yaml"]
    assert "'rm -rf'" in problems["bad-package.yaml"]
    assert registry.request("/v2/badpkg/manifests/v1")[0] == 404

    # Breaking a file while the registry runs: reported, skipped, the rest keeps working.
    touch_later(images / "good.yaml", "this: is: not: yaml")
    write_images(images / "other.yaml", nix_image("other", contents=["figlet"]))
    assert digest_of(registry, "other", "v1") == digest_of(registry, "figlet", "v1")
    assert registry.request("/v2/good/manifests/v1")[0] == 404
    assert any(Path(e["file"]).name == "good.yaml" for e in registry.log_events("declarations.invalid"))
    assert registry.process.poll() is None


@pytest.mark.skipif(not have("podman"), reason="needs podman")
def test_a_pull_of_an_invalid_declaration_says_what_is_wrong_with_it(start_registry, tmp_path: Path) -> None:
    """A declaration with a field the registry does not know (buildLayeredImage's `Volumes`, a
    typo for `workingDir`) is skipped, with a line in the log. Its pull read the name as
    packages: "manifest unknown: packages not found in bundled busybox: app", which sent the
    user looking for a package. It now names the declaration and its problem."""
    images = tmp_path / "images"
    images.mkdir()
    write_images(images / "app.yaml", nix_image("app", contents=["shell", "hello"], volumes=["/data"]))
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images))

    pulled = run(["podman", "pull", "--tls-verify=false", f"{registry.host}/app:v1"], check=False)
    assert pulled.returncode != 0
    # Named within NIXERY_IMAGES_PATH: the server's directories are not the client's business.
    assert "app:v1 is declared in file app.yaml#0, but that declaration cannot be served" in pulled.stderr, (
        pulled.stderr
    )
    assert str(tmp_path) not in pulled.stderr
    assert "unknown field(s) in data: volumes" in pulled.stderr and "packages not found" not in pulled.stderr
    status, _, body = registry.request("/v2/app/manifests/v1")
    error = json.loads(body)["errors"][0]
    assert (status, error["code"]) == (404, "MANIFEST_UNKNOWN") and error["detail"]["declaration"] == "file app.yaml#0"
    # Another tag of the name is not declared: the name is read as packages, as always.
    assert b"packages not found" in registry.request("/v2/app/manifests/v2")[2]
    # Also where the pair would otherwise name a package: the declaration was meant to replace it.
    write_images(images / "hello.yaml", nix_image("hello", contents=["hello"], volumes=["/data"]))
    status, _, body = registry.request("/v2/hello/manifests/v1")
    error = json.loads(body)["errors"][0]
    assert (status, error["detail"]["declaration"]) == (404, "file hello.yaml#0"), error

    # Fixed, it is served.
    touch_later(images / "app.yaml", yaml.safe_dump(nix_image("app", contents=["shell", "hello"])))
    assert digest_of(registry, "app", "v1") == digest_of(registry, "shell/hello", "v1")


def test_a_symlink_to_nothing_is_reported_not_skipped_in_silence(tmp_path: Path) -> None:
    """`images.yaml` a symlink to a file that is not there (a typo, a volume not mounted) or to
    itself: the file was skipped without a word, so its images were simply not there. It is
    now reported, once, naming where it leads; when the target appears, it is served."""
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    images.mkdir()
    write_images(images / "good.yaml", nix_image("good"))
    os.symlink(elsewhere / "images.yaml", images / "images.yaml")
    os.symlink("loop.yaml", images / "loop.yaml")
    files = DeclarationFiles(images)
    with structlog.testing.capture_logs() as logs:
        files.scan()
        assert not files.scan()  # reported once, not on every scan
    assert [d.reference for d in files.declarations] == ["good:v1"]
    problems = {Path(e["file"]).name: e["problem"] for e in logs if e["event"] == "declarations.invalid"}
    assert set(problems) == {"images.yaml", "loop.yaml"}, problems
    assert f"No such file or directory (a symlink to {elsewhere / 'images.yaml'})" in problems["images.yaml"]
    assert "symbolic links (a symlink to loop.yaml)" in problems["loop.yaml"]
    elsewhere.mkdir()
    write_images(elsewhere / "images.yaml", nix_image("linked"))
    assert files.scan()
    assert [d.reference for d in files.declarations] == ["good:v1", "linked:v1"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_hostile_files_do_not_hold_the_registry(start_registry, tmp_path: Path) -> None:
    """Issue 19: with an alias bomb, deep nesting, a FIFO, symlink loops, a huge file and a slow
    one appearing beside a valid declaration while the registry polls, /v2/ keeps answering
    within 100 ms, the valid declaration is served, and memory and the log stay small."""
    images = tmp_path / "images"
    images.mkdir()
    write_images(images / "good.yaml", nix_image("good", contents=["hello"]))
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images), NIXERY_IMAGES_POLL="1")
    assert digest_of(registry, "hello", "v1")  # built before measuring: the build is not what is tested
    rss_at_start = rss_bytes(registry.process.pid)

    (images / "bomb.yaml").write_text(alias_bomb())
    (images / "deep.yaml").write_text(deep_nesting())
    (images / "dated.yaml").write_text(IMPOSSIBLE_DATE)
    os.mkfifo(images / "x.yaml")
    add_symlink_loops(images)
    sparse_file(images / "huge.yaml")
    # Just under the size limit and the slowest kind of file to parse (a flat list: the parser
    # works until the value limit, ~0.5 s): rewritten every second, so that the polls keep
    # parsing while /v2/ is asked.
    slow = images / "slow.yaml"
    slow_text = "[" + "1," * 400_000 + "1]\n"
    slow.write_text(slow_text)

    latencies: list[float] = []
    peak_rss = rss_at_start
    started = time.monotonic()
    rewritten = started
    try:
        while time.monotonic() - started < 8:
            before = time.monotonic()
            status, _, body = registry.request("/v2/", accept=None, timeout=10)
            latencies.append(time.monotonic() - before)
            assert status == 200, body[:500]
            peak_rss = max(peak_rss, rss_bytes(registry.process.pid))
            if time.monotonic() - rewritten > 1:
                touch_later(slow, slow_text)
                rewritten = time.monotonic()
            time.sleep(0.02)
        assert digest_of(registry, "good", "v1") == digest_of(registry, "hello", "v1")
    finally:
        unblock_fifo(images / "x.yaml")
    assert registry.process.poll() is None

    # 100 ms is the requirement; a busy shared machine may delay a rare answer (its scheduler, not
    # the registry), so one in a hundred may be late, but by no more than a few scheduling slices.
    latencies.sort()
    late = [round(seconds, 3) for seconds in latencies if seconds >= 0.1]
    assert len(latencies) > 100 and len(late) <= len(latencies) // 100 and latencies[-1] < 0.3, (
        f"{len(latencies)} answers, slowest {latencies[-5:]}"
    )
    assert peak_rss - rss_at_start < 100 << 20, f"RSS grew from {rss_at_start >> 20} to {peak_rss >> 20} MiB"
    assert registry.log_path.stat().st_size < 200_000  # most of it: one access line per /v2/ asked
    not_access = [line for line in registry.log().splitlines() if '"http.request"' not in line]
    assert sum(map(len, not_access)) < 20_000
    problems = {Path(e["file"]).name: e["problem"] for e in registry.log_events("declarations.invalid")}
    assert set(problems) == {"bomb.yaml", "deep.yaml", "dated.yaml", "x.yaml", "huge.yaml", "slow.yaml"}
    assert all(len(problem) <= 200 for problem in problems.values())
    reported = [Path(e["file"]).name for e in registry.log_events("declarations.invalid")]
    assert all(reported.count(name) == 1 for name in problems if name != "slow.yaml")  # once, not every poll
    assert not registry.log_events("declarations.scan_failed")


def test_declaration_and_package_with_the_same_name(start_registry, tmp_path: Path) -> None:
    """A NixImage called `hello` with tag v1 serves hello:v1; hello:latest is still the hello package."""
    images = tmp_path / "images"
    images.mkdir()
    write_images(images / "hello.yaml", nix_image("hello", tag="v1", contents=["figlet"]))
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images))
    declared = digest_of(registry, "hello", "v1")
    package = digest_of(registry, "hello", "latest")
    assert declared == digest_of(registry, "figlet", "v1")
    assert package != declared
    assert package == digest_of(registry, "hello", "other-tag")


def test_the_tag_list_of_a_declared_image_has_its_declared_tags(start_registry, tmp_path: Path) -> None:
    """`skopeo list-tags` of a declared image listed only `latest`: its declared tags were missing.
    Paged by `n`, each page links the next (RFC 5988 `rel="next"`) until none are left. `latest`,
    which reads the name as packages, is listed only when the package set has them: `app:latest`
    was listed, and its pull answered 404."""
    images = tmp_path / "images"
    images.mkdir()
    write_images(images / "app.yaml", nix_image("app", tag="v2", contents=["shell"]),
                 nix_image("app", tag="v1", contents=["hello"]), nix_image("other", tag="v9", contents=["hello"]))
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_IMAGES_PATH=str(images))
    status, _, body = registry.request("/v2/app/tags/list")
    assert status == 200 and json.loads(body) == {"name": "app", "tags": ["v1", "v2"]}, body
    assert json.loads(registry.request("/v2/shell/tags/list")[2])["tags"] == ["latest"]
    assert json.loads(registry.request("/v2/hello/tags/list")[2])["tags"] == ["latest"]  # a package, not declared
    pages, path = [], "/v2/app/tags/list?n=1"
    while path:
        status, headers, body = registry.request(path)
        assert status == 200, body
        pages.append(json.loads(body)["tags"])
        link = headers.get("Link")
        path = link.split(">")[0].removeprefix("<") if link else ""
        assert not link or link.endswith('; rel="next"'), link
    assert pages == [["v1"], ["v2"]]
    status, headers, body = registry.request("/v2/app/tags/list?n=0")
    assert json.loads(body)["tags"] == [] and "Link" not in headers
    if have("skopeo"):
        listed = run(["skopeo", "list-tags", "--tls-verify=false", f"docker://{registry.host}/app"])
        assert json.loads(listed.stdout)["Tags"] == ["v1", "v2"]


def test_missing_path_is_a_configuration_error(tmp_path: Path) -> None:
    from nixery.config import ConfigError, load

    with pytest.raises(ConfigError, match="NIXERY_IMAGES_PATH"):
        load({"NIXERY_IMAGES_PATH": str(tmp_path / "nope")})
    settings = load({"NIXERY_IMAGES_PATH": str(tmp_path), "NIXERY_PREBUILD": "true", "NIXERY_IMAGES_POLL": "2"})
    assert settings.images_path == tmp_path and settings.prebuild and settings.images_poll == 2.0
