"""YAML files that other people write, found, read and parsed with limits.

The declaration files (`NIXERY_IMAGES_PATH`, `nixery.declarations`) are written
by whoever may edit that directory, not by the registry. This module makes sure
no such file can take the registry's time or memory without bound. Its
functions block (they read and parse), so callers run them in a thread.

Finding (`find_files`)
    Hidden entries are skipped (a mounted ConfigMap's `..data` and its
    timestamped directories). File symlinks are followed: a ConfigMap's files
    are symlinks into `..data`. A directory symlink is followed only when it
    leads to a directory inside the tree that the walk has not visited yet, so
    a link to `.`, to a parent or out of the tree adds nothing and a loop ends.

Reading (`read_regular_file`)
    The file is opened without blocking (a FIFO or a device cannot hold the
    thread), refused unless it is a regular file, and read only up to the
    limit: a file larger than `MAX_FILE_BYTES` is refused whatever size it
    claims to have.

Parsing (`load_documents`)
    PyYAML's safe loader builds only plain data, but it sets no limits, and
    three kinds of small file cost without bound:

    * aliases: `&a [x, x, ... 10]`, then `&b [*a, *a, ... 10]`, eight levels
      deep, is 500 bytes that stand for 10^8 values. PyYAML shares the nodes,
      so loading is quick, but everything that walks the value (a check, the
      `repr` in an error message) walks all of them.
    * nesting: composing is recursive, so 3,000 `[` raise RecursionError.
    * numbers: a YAML 1.1 base-60 integer (`1:2:3:...`) is converted in
      quadratic time: 1 MiB of it is minutes of CPU.

    So the composer counts every node with aliases expanded (an alias counts
    as all the nodes it stands for, which also bounds what merge keys `<<`
    copy) up to `MAX_NODES` per file, and refuses nesting deeper than
    `MAX_DEPTH` and an alias inside the node it names (a value that contains
    itself); integers longer than `MAX_NUMBER_LENGTH` characters are refused.
    A key given twice in one mapping is refused too (PyYAML would keep the
    last one silently; YAML calls it an error, and kubectl refuses it).
    YAML 1.1's base-60 numbers (`22:22`, `1:30.5`) are read as strings, as
    YAML 1.2 and Kubernetes read them: else `exposedPorts: [22:22]` (a
    Compose-style mapping) was port 1342, and `user: 1000:1000` was the
    number 3601000, without a word.
    Each limit raises `YAMLLimitError`, a `yaml.YAMLError`, so callers handle
    it as any invalid YAML. libyaml (C) produces the parse events when PyYAML
    has it, and the counting composer is the only part in Python: parsing
    stays about as fast as PyYAML's C loader. The slowest file the limits let
    through takes about half a second on a 2-core machine (2,500 declarations:
    0.4-0.6 s; a flat list up to the value limit: ~0.6 s), and the parser
    hands the GIL over as it goes (`_SharesTheGIL`), so the event loop's
    thread keeps answering meanwhile.
"""

from __future__ import annotations

import heapq
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.events import AliasEvent, Event, NodeEvent
from yaml.nodes import MappingNode, ScalarNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

_LIBYAML_PARSER: type[Any] | None  # libyaml's (C) parser, when PyYAML was built with it
try:
    from yaml.cyaml import CParser as _LIBYAML_PARSER  # type: ignore[attr-defined]  # the stub omits the re-export
except ImportError:
    _LIBYAML_PARSER = None

MAX_FILE_BYTES = 1 << 20  # as much as a Kubernetes ConfigMap holds
MAX_NODES = 50_000  # a declaration is ~18 (keys count): ~2,500 per file
MAX_DEPTH = 64
MAX_NUMBER_LENGTH = 100
YIELD_EVERY = 100  # nodes composed or constructed between two hand-overs of the GIL
_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<`, which may come more than once


class FileRefused(ValueError):
    """A file that is not read: not a regular file, or too large. The message says which."""


class YAMLLimitError(yaml.MarkedYAMLError):
    """A YAML stream this module refuses: past one of its limits, or with a key given twice."""


def _error_mark(mark: object) -> Mark | None:
    """An event's mark as errors take it: libyaml's marks are another class with the same
    fields (name, line, column) and string form, which PyYAML's stub does not accept."""
    return cast(Mark | None, mark)


# ---- finding -------------------------------------------------------------


def find_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files under `root` whose names end with one of `suffixes`, sorted;
    `[root]` when `root` is not a directory; `[]` when it does not exist."""
    return find_first_files(root, suffixes, limit=None).paths


@dataclass(frozen=True, slots=True)
class FoundFiles:
    paths: list[Path]  # sorted; the first `limit` of them when there are more
    total: int  # how many there are


def find_first_files(root: Path, suffixes: tuple[str, ...], *, limit: int | None) -> FoundFiles:
    """`find_files`, keeping only the first `limit` paths (in sorted order) and counting the others:
    a directory of 100,000 files costs a walk over their names, not 100,000 paths held."""
    try:
        real_root = root.resolve(strict=True)
        root_stat = real_root.stat()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return FoundFiles([], 0)
    if not stat.S_ISDIR(root_stat.st_mode):
        return FoundFiles([root], 1)
    total = 0

    def counted() -> Iterator[str]:
        nonlocal total
        for path in _walk(root, real_root, root_stat, suffixes):
            total += 1
            yield path

    # Sorted as paths are (part by part), without making a Path of each: `/` sorts before `-`
    # in a string, not in a path. The walk's paths are joined with `/` and never end with one.
    paths = counted()
    if limit is None:
        first = sorted(paths, key=_path_parts)
    else:
        first = heapq.nsmallest(limit, paths, key=_path_parts)  # holds `limit` paths at most
        for _ in paths:  # counted to the end (nsmallest stops at once when `limit` is 0)
            pass
    return FoundFiles([Path(path) for path in first], total)


def _path_parts(path: str) -> list[str]:
    return path.split(os.sep)


def _walk(root: Path, real_root: Path, root_stat: os.stat_result, suffixes: tuple[str, ...]) -> Iterator[str]:
    """The paths of the files under the directory `root` whose names end with one of `suffixes`,
    in no particular order; directories are visited in name order (the first way to one wins)."""
    visited = {(root_stat.st_dev, root_stat.st_ino)}
    pending = [root]
    while pending:
        directory = pending.pop()
        directories: list[os.DirEntry[str]] = []
        try:
            with os.scandir(directory) as scan:
                for entry in scan:  # files are not sorted here: the caller sorts the few it keeps
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_directory = entry.is_dir()
                    except OSError:  # a symlink to itself: a file that cannot be read, for the reader to report
                        is_directory = False
                    if is_directory:
                        directories.append(entry)
                    elif entry.name.endswith(suffixes):
                        yield entry.path
        except OSError:
            continue
        subdirectories: list[Path] = []
        for entry in sorted(directories, key=lambda entry: entry.name):
            try:
                if entry.is_symlink() and not Path(entry.path).resolve(strict=True).is_relative_to(real_root):
                    continue  # out of the tree
                target = entry.stat()
            except (OSError, RuntimeError):
                continue
            if (target.st_dev, target.st_ino) not in visited:  # else a loop, or a second way to one place
                visited.add((target.st_dev, target.st_ino))
                subdirectories.append(Path(entry.path))
        pending.extend(reversed(subdirectories))


# ---- reading -------------------------------------------------------------


def read_regular_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of `path`; `FileRefused` unless it is a regular file of at most `max_bytes`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(f"not a regular file but a {_file_kind(mode)}")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:  # up to one byte past the limit, whatever size fstat says
            chunk = os.read(fd, min(1 << 16, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise FileRefused(f"the file is larger than {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "directory", stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket",
        stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
    }
    return next((name for is_kind, name in kinds.items() if is_kind(mode)), "special file")


# ---- parsing -------------------------------------------------------------


class _PythonParser(Reader, Scanner, Parser):
    """PyYAML's parser in Python, for a PyYAML built without libyaml."""

    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)


class _SharesTheGIL:
    """Parsing is Python code in a thread: a thread that runs Python without pause makes every
    other thread wait up to the interpreter's switch interval (5 ms) each time it wants the GIL
    back, and the event loop's thread wants it back after every system call. So the parser hands
    it over every few hundred microseconds instead."""

    _steps = 0

    def _step(self) -> None:
        self._steps += 1
        if self._steps % YIELD_EVERY == 0:
            time.sleep(0)


class _LimitedComposer(Composer, _SharesTheGIL):
    """PyYAML's composer, counting nodes (aliases expanded) and nesting as it goes."""

    peek_event: Callable[[], Event]  # the parser's, a loader's next base class

    def __init__(self) -> None:
        super().__init__()
        self._nodes = 0  # in the whole stream, aliases expanded
        self._depth = 0
        self._anchored_sizes: dict[int, int] = {}  # id(anchored node): the nodes it stands for

    def compose_document(self) -> Any:
        self._anchored_sizes = {}  # anchors are per document, as the nodes they name
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None:  # else PyYAML reports the undefined alias
                size = self._anchored_sizes.get(id(node))
                if size is None:
                    raise YAMLLimitError(
                        None, None, f"alias *{(event.anchor or '')[:40]} is inside the node it names",
                        _error_mark(event.start_mark),
                    )
                self._count(size, event)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise YAMLLimitError(None, None, f"nested more than {MAX_DEPTH} levels deep", _error_mark(event.start_mark))
        self._count(1, event)
        before = self._nodes
        self._depth += 1
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(event, NodeEvent) and event.anchor is not None:  # node events are all NodeEvents
            self._anchored_sizes[id(node)] = self._nodes - before + 1
        return node

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        """A mapping whose keys are each given once: PyYAML keeps the last of two equal keys
        without a word, so a declaration with `contents` twice would be served with half its
        packages (YAML calls two equal keys an error, and kubectl refuses them)."""
        node = super().compose_mapping_node(anchor)
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
                continue
            if (key.tag, key.value) in seen:
                raise YAMLLimitError(
                    "in a mapping", node.start_mark, f"the key {key.value[:40]!r} is given twice", key.start_mark
                )
            seen.add((key.tag, key.value))
        return node

    def _count(self, nodes: int, event: Event) -> None:
        self._step()
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise YAMLLimitError(
                None, None, f"more than {MAX_NODES} values (an alias counts as the values it stands for)",
                _error_mark(event.start_mark),
            )


class _LimitedConstructor(SafeConstructor, _SharesTheGIL):
    def construct_object(self, node: Any, deep: bool = False) -> Any:
        self._step()
        return super().construct_object(node, deep)

    def construct_yaml_int(self, node: Any) -> Any:  # an int, or a base-60 string
        if len(node.value) > MAX_NUMBER_LENGTH:
            raise YAMLLimitError(
                None, None, f"an integer longer than {MAX_NUMBER_LENGTH} characters", node.start_mark
            )
        if ":" in node.value:
            return self.construct_scalar(node)  # base 60: a string, as Kubernetes reads it (module docstring)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: Any) -> Any:  # a float, or a base-60 string
        if ":" in node.value:
            return self.construct_scalar(node)
        return super().construct_yaml_float(node)

    def construct_yaml_timestamp(self, node: Any) -> Any:
        """A date or time; one that does not exist (`2024-02-30`) is said so with its line, not
        as Python's ValueError without one."""
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise YAMLLimitError(
                None, None, f"{node.value[:40]!r} reads as a date or time that does not exist ({exc})",
                node.start_mark,
            ) from None
        except AttributeError:  # `!!timestamp foo`: PyYAML's pattern found no date in it
            raise YAMLLimitError(None, None, f"{node.value[:40]!r} is not a date or time", node.start_mark) from None

    # The loader looks constructors up by tag in this table (a copy of the safe loader's, as
    # add_constructor would make), so the overrides above need their entries here.
    yaml_constructors = {
        **SafeConstructor.yaml_constructors,
        "tag:yaml.org,2002:int": construct_yaml_int,
        "tag:yaml.org,2002:float": construct_yaml_float,
        "tag:yaml.org,2002:timestamp": construct_yaml_timestamp,
    }


def _limited_loader(parser: type[Any]) -> type:
    class LimitedLoader(_LimitedComposer, parser, _LimitedConstructor, Resolver):
        """PyYAML's safe loader with this module's limits."""

        def __init__(self, stream: str) -> None:
            parser.__init__(self, stream)
            _LimitedComposer.__init__(self)
            _LimitedConstructor.__init__(self)
            Resolver.__init__(self)

    return LimitedLoader


LimitedLoader = _limited_loader(_LIBYAML_PARSER or _PythonParser)
PythonLimitedLoader = _limited_loader(_PythonParser)  # the same in Python only, as without libyaml


def describe_error(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (line, column), without the parser's stream name."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    what = ": ".join(" ".join(part.split()) for part in (exc.context, exc.problem) if part)
    mark = exc.problem_mark or exc.context_mark
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else what


def load_documents(text: str, loader: type = LimitedLoader) -> list[Any]:
    """Every document of a YAML (or JSON) stream; `yaml.YAMLError` (`YAMLLimitError`
    past a limit) when it is not valid YAML."""
    parser = loader(text)
    try:
        documents = []
        while parser.check_data():
            documents.append(parser.get_data())
        return documents
    finally:
        parser.dispose()
