"""Untrusted YAML files (nixery.yaml_files): the parser's limits, reading regular files
only, and finding files without following directory symlinks around or out of the tree."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import yaml

from nixery.yaml_files import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    FileRefused,
    LimitedLoader,
    PythonLimitedLoader,
    YAMLLimitError,
    describe_error,
    find_files,
    find_first_files,
    load_documents,
    read_regular_file,
)
from tests.test_declarations import EXAMPLES, alias_bomb, deep_nesting, finishes, sparse_file, unblock_fifo

LOADERS = pytest.mark.parametrize("loader", [LimitedLoader, PythonLimitedLoader], ids=["libyaml", "python"])


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def refusal(text: str, loader: type) -> str:
    with pytest.raises(YAMLLimitError) as caught:
        load_documents(text, loader)
    assert isinstance(caught.value, yaml.YAMLError)  # handled as any invalid YAML
    return describe_error(caught.value)


# ---- parsing -------------------------------------------------------------


@LOADERS
def test_plain_yaml_loads_as_with_pyyaml(loader: type) -> None:
    text = """
base: &base {user: app, labels: [a, b]}
first: {<<: *base, name: one}
second: {<<: *base, name: two, labels: [c]}
when: 2024-01-02
numbers: [1, 0x1f, 1_000, 2.5, .inf]
---
[&x {k: v}, *x, *x]
--- {"json": [1, 2, {"nested": null}]}
"""
    assert load_documents(text, loader) == list(yaml.safe_load_all(text))
    # but YAML 1.1's base-60 numbers are strings, as in YAML 1.2 and Kubernetes (`22:22` is no port 1342)
    assert load_documents("[1:30, 22:22, 1:30.5, !!int 2:00]", loader) == [["1:30", "22:22", "1:30.5", "2:00"]]
    for example in EXAMPLES.glob("*.yaml"):
        assert load_documents(example.read_text(), loader) == list(yaml.safe_load_all(example.read_text()))


@LOADERS
def test_an_alias_bomb_is_refused(loader: type) -> None:
    assert refusal(alias_bomb(), loader).startswith(f"more than {MAX_NODES} values")
    # Aliases count as what they stand for, however they are used: merge keys too.
    merges = ["a0: &a0 {" + ", ".join(f"k{n}: v" for n in range(10)) + "}"]
    merges += [f"a{level}: &a{level} {{<<: [" + ", ".join([f"*a{level - 1}"] * 10) + "]}" for level in range(1, 8)]
    assert refusal("\n".join(merges), loader).startswith(f"more than {MAX_NODES} values")
    # Within the limit, aliases are fine.
    documents = load_documents("a: &a [1, 2]\nb: [*a, *a]\n", loader)
    assert documents == [{"a": [1, 2], "b": [[1, 2], [1, 2]]}]


@LOADERS
def test_nesting_is_limited(loader: type) -> None:
    assert load_documents(nested(MAX_DEPTH), loader)
    assert refusal(nested(MAX_DEPTH + 1), loader).startswith(f"nested more than {MAX_DEPTH} levels deep")
    assert refusal(deep_nesting(), loader).startswith(f"nested more than {MAX_DEPTH} levels deep (line 1,")
    assert refusal("a: " + "{b: " * 3000 + "c" + "}" * 3000, loader).startswith("nested more than")


@LOADERS
def test_a_value_that_contains_itself_is_refused(loader: type) -> None:
    assert "alias *a is inside the node it names" in refusal("a: &a [1, *a]", loader)
    assert "alias *m is inside the node it names" in refusal("&m {self: *m}", loader)


@LOADERS
def test_long_integers_are_refused(loader: type) -> None:
    """A base-60 integer is converted in quadratic time; decimal ones past 4300 digits raise ValueError."""
    assert refusal("x: " + ":".join(["1"] * 500_000), loader).startswith("an integer longer than 100 characters")
    assert refusal("x: " + "1" * 5000, loader).startswith("an integer longer than 100 characters")
    assert load_documents("x: " + "9" * 100, loader) == [{"x": int("9" * 100)}]
    assert load_documents('x: "' + "1" * 5000 + '"', loader) == [{"x": "1" * 5000}]  # a string is a string


@LOADERS
def test_a_date_that_does_not_exist_is_refused_naming_its_line(loader: type) -> None:
    """PyYAML raised Python's ValueError for it (`tag: 2024-02-30`), without the line."""
    said = refusal("a: 1\ntag: 2024-02-30\n", loader)
    assert said.startswith("'2024-02-30' reads as a date or time that does not exist (") and "(line 2, " in said
    assert refusal("x: !!timestamp soon\n", loader).startswith("'soon' is not a date or time (line 1, ")
    assert load_documents("tag: 2024-01-30\n", loader) == [{"tag": datetime.date(2024, 1, 30)}]


@LOADERS
def test_errors_are_described_on_one_line(loader: type) -> None:
    with pytest.raises(yaml.YAMLError) as caught:
        load_documents("a: [1\nb: 2\n", loader)
    described = describe_error(caught.value)
    assert "\n" not in described and "<unicode string>" not in described and "(line " in described


# ---- reading -------------------------------------------------------------


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    fifo = tmp_path / "x.yaml"
    os.mkfifo(fifo)
    try:
        with pytest.raises(FileRefused, match="not a regular file but a FIFO"):
            finishes(lambda: read_regular_file(fifo))
    finally:
        unblock_fifo(fifo)
    os.symlink("/dev/zero", tmp_path / "zero.yaml")  # endless, and claims to be empty
    with pytest.raises(FileRefused, match="not a regular file but a character device"):
        read_regular_file(tmp_path / "zero.yaml")
    with pytest.raises(FileRefused, match="not a regular file but a directory"):
        read_regular_file(tmp_path)


def test_files_past_the_size_limit_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileRefused, match=f"larger than {MAX_FILE_BYTES} bytes"):
        read_regular_file(sparse_file(tmp_path / "huge.yaml", 8 << 30))
    exact = tmp_path / "exact.yaml"
    exact.write_bytes(b"#" * MAX_FILE_BYTES)
    assert len(read_regular_file(exact)) == MAX_FILE_BYTES
    exact.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(FileRefused):
        read_regular_file(exact)
    # The limit holds for what is read, not for the size the file claims.
    assert len(read_regular_file(Path("/proc/self/status"), max_bytes=1 << 20)) > 0
    with pytest.raises(FileRefused):
        read_regular_file(Path("/proc/self/status"), max_bytes=100)


# ---- finding -------------------------------------------------------------


def test_find_files_skips_hidden_entries_and_other_suffixes(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yml", "c.json", "notes.txt", ".hidden.yaml", "sub/d.yaml", ".git/e.yaml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}")
    found = find_files(tmp_path, (".yaml", ".yml", ".json"))
    assert found == [tmp_path / "a.yaml", tmp_path / "b.yml", tmp_path / "c.json", tmp_path / "sub" / "d.yaml"]
    assert find_files(tmp_path / "a.yaml", (".yaml",)) == [tmp_path / "a.yaml"]  # one file: itself
    assert find_files(tmp_path / "missing", (".yaml",)) == []


def test_find_first_files_keeps_the_first_by_path_and_counts_the_others(tmp_path: Path) -> None:
    names = ["a-b.yaml", "a/b.yaml", "a/a/z.yaml", "b.yaml", "c/d.yml", "e.txt", ".f.yaml"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    everything = find_files(tmp_path, (".yaml", ".yml"))
    assert everything == sorted(everything) and len(everything) == 5
    assert everything[:2] == [tmp_path / "a" / "a" / "z.yaml", tmp_path / "a" / "b.yaml"]  # as paths sort
    for limit in range(7):
        found = find_first_files(tmp_path, (".yaml", ".yml"), limit=limit)
        assert (found.paths, found.total) == (everything[:limit], 5)
    assert find_first_files(tmp_path / "b.yaml", (".yaml",), limit=0).total == 1  # one file: itself
    assert find_first_files(tmp_path / "missing", (".yaml",), limit=3).total == 0


def test_directory_symlinks_stay_inside_the_tree_and_visit_each_directory_once(tmp_path: Path) -> None:
    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    for directory in (tree / "real" / "deeper", elsewhere):
        directory.mkdir(parents=True)
    for path in (tree / "top.yaml", tree / "real" / "r.yaml", tree / "real" / "deeper" / "d.yaml"):
        path.write_text("{}")
    (elsewhere / "x.yaml").write_text("{}")
    os.symlink(".", tree / "self-a")
    os.symlink(".", tree / "self-b")
    os.symlink("..", tree / "real" / "parent")
    os.symlink(tree, tree / "real" / "deeper" / "absolute-root")
    os.symlink(elsewhere, tree / "out")
    os.symlink("../..", tree / "real" / "grandparent")  # out of the tree
    os.symlink("loop-2", tree / "loop-1")
    os.symlink("loop-1", tree / "loop-2")
    os.symlink("real/deeper", tree / "a-shortcut")  # inside, not yet visited: followed (and `real/deeper` is then not)
    found = finishes(lambda: find_files(tree, (".yaml",)))
    assert sorted(path.name for path in found) == ["d.yaml", "r.yaml", "top.yaml"]
    assert tree / "a-shortcut" / "d.yaml" in found
