"""Declarations from YAML files under a path, read again only when a file changes.

Whatever is wrong with a file stays with it: every failure (unreadable,
not YAML, past a limit of `nixery.yaml_files`, an invalid document) becomes a
`Problem` of that file, logged once per change of the file, and the other
files are served as usual.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from nixery.declarations.parsing import (
    _SOURCE_RANK,
    FILE_SUFFIXES,
    FILES,
    MAX_LOGGED_PER_FILE,
    Declaration,
    _describe,
    _documents,
    parse_declaration,
)
from nixery.declarations.problems import InvalidDeclaration, _cut
from nixery.yaml_files import (
    FileRefused,
    describe_error,
    find_first_files,
    load_documents,
    read_regular_file,
)

log = structlog.get_logger(__name__)

#: Declaration files read under NIXERY_IMAGES_PATH, at most: the first ones by path; the others
#: are refused as a whole (`declarations.too_many_files`). Each file read is a `stat` per scan and
#: its declarations held, and scans come with every pull by tag: 100,000 small files took a
#: first scan of 27 s and every later one of 1.7 s, and 220 MB (now 0.3 s, 0.1 s and 36 MB).
MAX_DECLARATION_FILES = 1_000


@dataclass(frozen=True, slots=True)
class Problem:
    origin: str
    message: str
    #: The origin as a client may be told it: the file relative to NIXERY_IMAGES_PATH.
    shown: str = ""
    #: The name:tag the invalid document meant to declare, when it says (string name and tag):
    #: a pull of it is told that its declaration is invalid, not that no package has its name.
    reference: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class _LoadedFile:
    stamp: tuple[int, ...]
    declarations: tuple[Declaration, ...]
    problems: tuple[Problem, ...]


class DeclarationFiles:
    """NixImage documents in the YAML files under a path (a directory or one file).

    `scan()` is cheap when nothing changed: one `stat` per file, and a file is
    read again only when its inode, size, or modification or change time did.
    It blocks (it reads and parses): `DeclarationStore` runs it in a thread.
    """

    def __init__(self, path: Path, *, max_files: int = MAX_DECLARATION_FILES):
        self.path = path
        self.max_files = max_files
        self._files: dict[Path, _LoadedFile] = {}
        self._missing_reported = False
        self._too_many: Problem | None = None  # the files past `max_files`, while there are any

    def scan(self) -> bool:
        """Re-read changed files; True when the set of declarations may have changed."""
        if not self.path.exists():
            if not self._missing_reported:
                log.warning("declarations.path_missing", path=str(self.path))
                self._missing_reported = True
        else:
            self._missing_reported = False
        current: dict[Path, _LoadedFile] = {}
        found = find_first_files(self.path, FILE_SUFFIXES, limit=self.max_files)
        self._check_count(found.total)  # the table changes only with the files read
        changed = False
        for path in found.paths:
            try:
                st = path.stat()
            except OSError:
                try:  # a symlink to nothing (or to itself) is reported as any file that cannot be read
                    st = path.lstat()
                except OSError:
                    continue  # gone since it was found
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            loaded = self._files.get(path)
            if loaded is None or loaded.stamp != stamp:
                loaded = self._load(path, stamp)
                changed = True
            current[path] = loaded
        for gone in sorted(self._files.keys() - current.keys()):
            if self._too_many is not None and gone.exists():  # still there, but pushed past the limit
                log.warning("declarations.file_ignored", file=str(gone), problem=self._too_many.message)
            else:
                log.info("declarations.file_removed", file=str(gone))
            changed = True
        self._files = current
        return changed

    def _check_count(self, total: int) -> None:
        """Note the files past `max_files` as a problem of the directory, logged once per count."""
        if total <= self.max_files:
            too_many = None
        else:
            too_many = Problem(
                f"directory {self.path}",
                f"{total} declaration files, more than the limit of {self.max_files} "
                f"(MAX_DECLARATION_FILES): only the first {self.max_files} by path are read, "
                f"the other {total - self.max_files} are ignored",
            )
        if too_many == self._too_many:
            return
        if too_many is not None:
            log.error(
                "declarations.too_many_files", path=str(self.path), files=total, limit=self.max_files,
                ignored=total - self.max_files, problem=too_many.message,
            )
        else:
            log.info("declarations.file_count_within_limit", path=str(self.path), files=total, limit=self.max_files)
        self._too_many = too_many

    def _load(self, path: Path, stamp: tuple[int, ...]) -> _LoadedFile:
        """The file's declarations and problems. Whatever is wrong with it stays with it:
        every failure becomes a problem of this file, logged now, once per change."""
        declarations: list[Declaration] = []
        problems: list[Problem] = []

        def report(
            document: str | None, message: str, name: str | None = None, reference: tuple[str, str] | None = None
        ) -> None:
            at = f"#{document}" if document is not None else ""
            problems.append(Problem(f"file {path}{at}", message, f"file {self._shown(path)}{at}", reference))
            if len(problems) <= MAX_LOGGED_PER_FILE:
                log.warning("declarations.invalid", file=str(path), document=document, name=name, problem=message)

        try:
            documents = _read_documents(path)
        except InvalidDeclaration as exc:
            report(None, str(exc))
            return _LoadedFile(stamp, (), tuple(problems))
        except Exception as exc:  # a value PyYAML cannot construct that yaml_files does not refuse itself
            report(None, f"cannot be loaded: {_describe(exc)}")
            return _LoadedFile(stamp, (), tuple(problems))
        for label, document in documents:
            origin = f"file {path}#{label}"
            try:
                declaration = parse_declaration(
                    document, origin=origin, source=FILES, rank=(_SOURCE_RANK[FILES], str(path), _label_key(label))
                )
            except Exception as exc:
                message = str(exc) if isinstance(exc, InvalidDeclaration) else f"cannot be checked: {_describe(exc)}"
                name = None
                reference = None
                if isinstance(document, Mapping) and isinstance(document.get("metadata"), Mapping):
                    raw = document["metadata"].get("name")
                    name = _cut(raw) if isinstance(raw, str) else None
                    data = document.get("data")
                    tag = data.get("tag") if isinstance(data, Mapping) else None
                    if isinstance(raw, str) and isinstance(tag, str):
                        reference = (raw, tag)
                report(label, message, name, reference)
                continue
            declarations.append(declaration)
        log.info(
            "declarations.file_loaded",
            file=str(path),
            images=[d.reference for d in declarations[:MAX_LOGGED_PER_FILE]],
            declared=len(declarations),
            invalid=len(problems),
        )
        return _LoadedFile(stamp, tuple(declarations), tuple(problems))

    @property
    def declarations(self) -> list[Declaration]:
        return [d for path in sorted(self._files) for d in self._files[path].declarations]

    def _shown(self, path: Path) -> str:
        """`path` without the directories above NIXERY_IMAGES_PATH (the server's layout is its own)."""
        try:
            relative = path.relative_to(self.path)
        except ValueError:
            return path.name
        return path.name if relative == Path(".") else str(relative)

    @property
    def invalid(self) -> dict[tuple[str, str], Problem]:
        """The name:tag of each invalid document that says one, with its problem (the first, in
        path and document order, when several say the same)."""
        found: dict[tuple[str, str], Problem] = {}
        for path in sorted(self._files):
            for problem in self._files[path].problems:
                if problem.reference is not None:
                    found.setdefault(problem.reference, problem)
        return found

    @property
    def problems(self) -> list[Problem]:
        per_file = [p for path in sorted(self._files) for p in self._files[path].problems]
        return [self._too_many, *per_file] if self._too_many is not None else per_file


def _read_documents(path: Path) -> list[tuple[str, Any]]:
    """The documents of a declaration file; `InvalidDeclaration` says why there are none."""
    try:
        text = read_regular_file(path).decode("utf-8")
        return list(_documents(load_documents(text)))
    except FileRefused as exc:
        raise InvalidDeclaration(str(exc)) from None
    except OSError as exc:
        raise InvalidDeclaration(f"cannot read the file: {exc.strerror or exc}{_symlink_target(path)}") from None
    except UnicodeDecodeError as exc:
        raise InvalidDeclaration(f"cannot read the file: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise InvalidDeclaration(f"not valid YAML: {_cut(describe_error(exc), 200)}") from None


def _symlink_target(path: Path) -> str:
    """` (a symlink to TARGET)` when `path` is one: the file a user sees in the directory is not the one missing."""
    try:
        return f" (a symlink to {_cut(os.readlink(path), 200)})"
    except OSError:
        return ""


def _label_key(label: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", label))


