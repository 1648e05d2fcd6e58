"""Declared images: NixImage documents that give an image a name, a tag and
its contents, as the original design's Kubernetes integration describes.

    apiVersion: k8s.nixos.org/v1alpha
    kind: NixImage
    metadata:
      name: curl-and-jq
    data:
      tag: v1
      contents: [curl, jq, bash]
      arch: amd64            # optional: amd64 (default) or arm64

A pull of `HOST/curl-and-jq:v1` then builds the image `HOST/bash/curl/jq`
would. Declarations come from YAML files in a directory (NIXERY_IMAGES_PATH)
and, when configured, from NixImage objects in a Kubernetes cluster
(`nixery.k8s`); this module holds the table both feed and answers the HTTP
layer's question "is this name:tag declared?" (`routes.ImageResolver`).

Rules
-----
* `contents` entries follow the rules of image path components
  (`nixery.registry.names`): letters, digits, `_ - +`, `.` between attribute
  names; `shell` and other meta-packages work as in paths; order and repeats
  do not matter; at most `MAX_PACKAGES`. The architecture is `data.arch`, not
  an `arm64` entry. `metadata.name` must be a Kubernetes object name (lower
  case DNS subdomain) that is also a valid image path, so it is at most 128
  characters and not `arm64`. `data.tag` follows the rules of image tags.
* The tag is passed on to the package source as for any pull: with a git
  package source (NIXERY_PKGS_REPO) it also selects the git ref.
* **Names and packages.** A declaration claims one `name:tag` pair, not the
  whole name. A pull of exactly that pair builds the declared contents; every
  other pull reads the name as a list of packages as usual. So a NixImage
  `hello` with tag `v1` serves `hello:v1`, while `hello:latest` is still the
  `hello` package, and `curl-and-jq:v2` (not declared) is a request for a
  package called `curl-and-jq`, which fails as an unknown package would.
* **Duplicates.** When several declarations claim the same `name:tag`, files
  win over Kubernetes objects; among files the first in path order (then
  document order) wins; among objects the oldest (creation time, then name).
  The others are reported as conflicts and ignored until the winner goes.
* **Invalid documents** (unreadable or malformed YAML, another kind or
  apiVersion, a missing or invalid name, tag or contents, unknown fields) are
  reported with a `declarations.invalid` log line naming the file and
  document (or the object) and the problem, and skipped; everything else
  keeps working. Values quoted in problems are cut to a few dozen characters
  (`_short`), and a file's problems are logged once per change of the file,
  at most `MAX_LOGGED_PER_FILE` of them. A file that cannot be read or parsed
  (not valid YAML, past a limit below, or any other failure) is skipped as a
  whole, alone.
* **Limits** (`nixery.yaml_files`): only regular files of at most 1 MiB are
  read; YAML is parsed with limits on aliases, nesting and numbers; directory
  symlinks are followed only to directories inside the tree not visited yet.
* **Changes.** Files are checked on every pull by tag (one `stat` per file;
  only changed files are read again) and every NIXERY_IMAGES_POLL seconds in
  the background, so an edited file affects the next pull. Files are
  `*.yaml`, `*.yml` and `*.json` under the path (searched recursively, hidden
  entries skipped: a mounted ConfigMap works). Scans run in a thread of their
  own, one at a time: a pull that arrives during a scan waits for the next
  one, which every pull waiting then shares, so scans never pile up and the
  event loop never reads or parses a file.
* **Pre-building** (NIXERY_PREBUILD=true): a declaration that appears or
  changes is built in the background at once, so the first pod start does not
  wait for Nix.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import reprlib
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import yaml

from nixery.errors import RegistryError
from nixery.registry.names import MAX_PACKAGES, Arch, ImageRequest, check_tag, parse_image_name
from nixery.yaml_files import (
    FileRefused,
    describe_error,
    find_files,
    load_documents,
    read_regular_file,
)

if TYPE_CHECKING:
    from nixery.builder import ImageBuilder
    from nixery.images import ImageRecord

log = structlog.get_logger(__name__)

GROUP = "k8s.nixos.org"
VERSION = "v1alpha"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "NixImage"
LIST_KINDS = ("List", "NixImageList")

FILES = "files"
KUBERNETES = "kubernetes"
_SOURCE_RANK = {FILES: 0, KUBERNETES: 1}

FILE_SUFFIXES = (".yaml", ".yml", ".json")
MAX_NAME_LENGTH = 128
MAX_LOGGED_PER_FILE = 10  # problems (or image names) logged per file and change: not 10,000 lines for 10,000
SHORT_VALUE = 40  # characters of a value quoted in a problem

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_ARCHES = {arch.oci_name: arch for arch in Arch}
_TOP_LEVEL = {"apiVersion", "kind", "metadata", "data", "status"}
_DATA_FIELDS = {"tag", "contents", "arch"}


class InvalidDeclaration(ValueError):
    """A NixImage document that cannot be served; the message says why."""


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxstring = _SHORT_REPR.maxlong = _SHORT_REPR.maxother = SHORT_VALUE
_SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxdict = _SHORT_REPR.maxset = 4


def _cut(text: str, limit: int = SHORT_VALUE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    """`repr(value)` cut to a few dozen characters, for problems and log lines that quote a
    value from a file or object. reprlib looks at a few items and levels only, so even a value
    that stands for millions of others costs nothing to show."""
    return _cut(_SHORT_REPR.repr(value))


def _field_names(keys: Iterable[Any]) -> str:
    names = sorted(_cut(str(k)) for k in keys)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


@dataclass(frozen=True, slots=True)
class Declaration:
    name: str
    tag: str
    request: ImageRequest
    origin: str  # for people: "file /etc/nixery/images.yaml#2", "niximage/curl-and-jq"
    source: str = FILES  # FILES or KUBERNETES
    rank: tuple[Any, ...] = ()  # lower wins when two claim the same name:tag
    key: str | None = None  # the source's own id (an object's namespace/name)

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def contents(self) -> list[str]:
        return list(self.request.packages)

    def same_image(self, other: Declaration | None) -> bool:
        return other is not None and (other.name, other.tag, other.request) == (self.name, self.tag, self.request)


# ---- parsing -----------------------------------------------------------


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidDeclaration("metadata.name is missing")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidDeclaration(f"metadata.name is longer than {MAX_NAME_LENGTH} characters")
    if not _DNS_SUBDOMAIN.fullmatch(name):
        raise InvalidDeclaration(
            f"metadata.name {_short(name)} is not a valid object name (lower case letters, digits, '-' and '.')"
        )
    if name == "arm64":
        raise InvalidDeclaration("metadata.name 'arm64' is reserved: it selects the architecture in image paths")
    try:
        parse_image_name(name)
    except RegistryError as exc:
        raise InvalidDeclaration(f"metadata.name {_short(name)} is not a valid image name: {exc.message}") from None
    return name


def _check_contents(contents: Any) -> list[str]:
    if contents is None:
        raise InvalidDeclaration("data.contents is missing: list the packages of the image")
    if not isinstance(contents, list):
        raise InvalidDeclaration("data.contents must be a list of package names")
    if not contents:
        raise InvalidDeclaration("data.contents is empty: list at least one package")
    packages: list[str] = []
    for index, entry in enumerate(contents):
        where = f"data.contents[{index}]"
        if not isinstance(entry, str):
            raise InvalidDeclaration(f"{where} must be a package name, not {type(entry).__name__}")
        if "/" in entry:
            raise InvalidDeclaration(f"{where} {_short(entry)}: list each package as its own entry, without '/'")
        if entry == "arm64":
            raise InvalidDeclaration(f"{where} 'arm64' is not a package: set data.arch: arm64 instead")
        try:
            packages.extend(parse_image_name(entry).packages)
        except RegistryError as exc:
            raise InvalidDeclaration(f"{where}: {exc.message}") from None
    unique = sorted(set(packages))
    if len(unique) > MAX_PACKAGES:
        raise InvalidDeclaration(f"data.contents lists {len(unique)} packages; at most {MAX_PACKAGES} are allowed")
    return unique


def parse_declaration(
    document: Any, *, origin: str, source: str = FILES, rank: tuple[Any, ...] = (), key: str | None = None
) -> Declaration:
    """A NixImage document as a declaration; `InvalidDeclaration` says what is wrong."""
    if not isinstance(document, Mapping):
        raise InvalidDeclaration(f"expected a NixImage object, found {type(document).__name__}")
    kind = document.get("kind")
    if kind != KIND:
        raise InvalidDeclaration(f"kind is {_short(kind)}, expected {KIND!r}")
    api_version = document.get("apiVersion")
    if api_version != API_VERSION:
        raise InvalidDeclaration(f"apiVersion is {_short(api_version)}, expected {API_VERSION!r}")
    unknown = [k for k in document if k not in _TOP_LEVEL]
    if unknown:
        hint = " (the image is described under data, not spec)" if "spec" in unknown else ""
        raise InvalidDeclaration(f"unknown field(s) {_field_names(unknown)}{hint}")
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        raise InvalidDeclaration("metadata is missing")
    name = _check_name(metadata.get("name"))
    data = document.get("data")
    if not isinstance(data, Mapping):
        raise InvalidDeclaration("data is missing: it needs tag and contents")
    unknown = [k for k in data if k not in _DATA_FIELDS]
    if unknown:
        raise InvalidDeclaration(f"unknown field(s) in data: {_field_names(unknown)} (known: arch, contents, tag)")
    tag = data.get("tag")
    if tag is None:
        raise InvalidDeclaration("data.tag is missing")
    if not isinstance(tag, str):
        hint = f' (quote it: "{_cut(str(tag))}")' if isinstance(tag, int | float | datetime.date) else ""
        raise InvalidDeclaration(f"data.tag must be a string, not {type(tag).__name__}{hint}")
    try:
        check_tag(tag)
    except RegistryError as exc:
        raise InvalidDeclaration(f"data.tag: {exc.message}") from None
    arch_name = data.get("arch", "amd64")
    arch = _ARCHES.get(arch_name) if isinstance(arch_name, str) else None
    if arch is None:
        raise InvalidDeclaration(f"data.arch {_short(arch_name)} is not one of {', '.join(_ARCHES)}")
    packages = _check_contents(data.get("contents"))
    return Declaration(
        name=name,
        tag=tag,
        request=ImageRequest(tuple(packages), arch),
        origin=origin,
        source=source,
        rank=rank,
        key=key,
    )


def _documents(loaded: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """(label, document) for each document, with `List` items flattened."""
    for index, document in enumerate(loaded):
        if document is None:
            continue
        if isinstance(document, Mapping) and document.get("kind") in LIST_KINDS and "items" in document:
            items = document.get("items")
            if not isinstance(items, list):
                yield str(index), items
                continue
            for position, item in enumerate(items):
                yield f"{index}.items[{position}]", item
        else:
            yield str(index), document


# ---- files -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    origin: str
    message: str


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

    def __init__(self, path: Path):
        self.path = path
        self._files: dict[Path, _LoadedFile] = {}
        self._missing_reported = False

    def scan(self) -> bool:
        """Re-read changed files; True when the set of declarations may have changed."""
        if not self.path.exists():
            if not self._missing_reported:
                log.warning("declarations.path_missing", path=str(self.path))
                self._missing_reported = True
        else:
            self._missing_reported = False
        current: dict[Path, _LoadedFile] = {}
        changed = False
        for path in find_files(self.path, FILE_SUFFIXES):
            try:
                st = path.stat()
            except OSError:
                continue
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            loaded = self._files.get(path)
            if loaded is None or loaded.stamp != stamp:
                loaded = self._load(path, stamp)
                changed = True
            current[path] = loaded
        for gone in self._files.keys() - current.keys():
            log.info("declarations.file_removed", file=str(gone))
            changed = True
        self._files = current
        return changed

    def _load(self, path: Path, stamp: tuple[int, ...]) -> _LoadedFile:
        """The file's declarations and problems. Whatever is wrong with it stays with it:
        every failure becomes a problem of this file, logged now, once per change."""
        declarations: list[Declaration] = []
        problems: list[Problem] = []

        def report(document: str | None, message: str, name: str | None = None) -> None:
            origin = f"file {path}" + (f"#{document}" if document is not None else "")
            problems.append(Problem(origin, message))
            if len(problems) <= MAX_LOGGED_PER_FILE:
                log.warning("declarations.invalid", file=str(path), document=document, name=name, problem=message)

        try:
            documents = _read_documents(path)
        except InvalidDeclaration as exc:
            report(None, str(exc))
            return _LoadedFile(stamp, (), tuple(problems))
        except Exception as exc:  # e.g. a value PyYAML cannot construct (tag: 2024-02-30)
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
                if isinstance(document, Mapping) and isinstance(document.get("metadata"), Mapping):
                    raw = document["metadata"].get("name")
                    name = _cut(raw) if isinstance(raw, str) else None
                report(label, message, name)
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

    @property
    def problems(self) -> list[Problem]:
        return [p for path in sorted(self._files) for p in self._files[path].problems]


def _read_documents(path: Path) -> list[tuple[str, Any]]:
    """The documents of a declaration file; `InvalidDeclaration` says why there are none."""
    try:
        text = read_regular_file(path).decode("utf-8")
        return list(_documents(load_documents(text)))
    except FileRefused as exc:
        raise InvalidDeclaration(str(exc)) from None
    except OSError as exc:
        raise InvalidDeclaration(f"cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidDeclaration(f"cannot read the file: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise InvalidDeclaration(f"not valid YAML: {_cut(describe_error(exc), 200)}") from None


def _describe(exc: Exception) -> str:
    return _cut(f"{type(exc).__name__}: {exc}", 200)


def _label_key(label: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", label))


# ---- the table ---------------------------------------------------------


class StatusReporter(Protocol):
    """A source that reports back what became of its declarations (Kubernetes status)."""

    def table_changed(self, winners: Mapping[str, Declaration], losers: Mapping[str, Declaration]) -> None:
        """`winners`: its declarations being served, by key; `losers`: by key, the declaration that beat each."""

    def wants_build_result(self, declaration: Declaration) -> bool:
        """Whether a pull of `declaration` should be followed to report its result."""

    def build_finished(self, declaration: Declaration, record: ImageRecord | None, error: str | None) -> None:
        """The image of `declaration` was built (`record`) or failed (`error`)."""


@dataclass
class _Table:
    by_reference: dict[tuple[str, str], Declaration] = field(default_factory=dict)
    losers: list[tuple[Declaration, Declaration]] = field(default_factory=list)  # (loser, winner)


def _build_table(declarations: Iterable[Declaration]) -> _Table:
    table = _Table()
    for declaration in sorted(declarations, key=lambda d: d.rank):
        reference = (declaration.name, declaration.tag)
        winner = table.by_reference.get(reference)
        if winner is None:
            table.by_reference[reference] = declaration
        else:
            table.losers.append((declaration, winner))
    return table


class DeclarationStore:
    """Declared images from every source; the registry's `ImageResolver`."""

    def __init__(
        self,
        *,
        builder: ImageBuilder | None = None,
        files: DeclarationFiles | None = None,
        prebuild: bool = False,
        poll_interval: float = 10.0,
    ):
        self.builder = builder
        self.files = files
        self.prebuild = prebuild
        self.poll_interval = poll_interval
        self._sources: dict[str, list[Declaration]] = {}
        self._table = _Table()
        self._reported_conflicts: set[tuple[str, str]] = set()
        self._reporters: dict[str, StatusReporter] = {}
        self._builds: dict[tuple[Any, ...], asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # File scans: one at a time, in a thread of their own (see refresh_files).
        self._scan_lock = asyncio.Lock()
        self._scans_started = 0
        self._scan_tasks: set[asyncio.Task[None]] = set()
        self._scan_thread: ThreadPoolExecutor | None = None
        self._scan_failure: str | None = None

    # ---- life cycle ------------------------------------------------

    async def start(self) -> None:
        """Read the files once (reporting problems) and keep watching them."""
        if self.files is not None:
            await self.refresh_files()
            self._tasks.append(asyncio.get_running_loop().create_task(self._poll_files()))

    def add_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.append(task)

    async def close(self) -> None:
        tasks = [*self._tasks, *self._builds.values(), *self._scan_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._builds.clear()
        if self._scan_thread is not None:
            self._scan_thread.shutdown(wait=False, cancel_futures=True)
            self._scan_thread = None

    async def _poll_files(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.refresh_files()  # returns when the scan is done: polls never pile up

    async def refresh_files(self) -> None:
        """Bring the files' declarations up to date: returns after a scan that started after the call.

        Scans run one at a time, in a thread of their own, so the event loop never stats,
        reads or parses a file. Calls that arrive while a scan runs share the next one:
        however many pulls and polls come, one scan runs and at most one waits. A caller
        that is cancelled (a client gone) leaves its scan to finish, so no change is lost.
        A failed scan is logged (once, until scans succeed again) and the table stays."""
        if self.files is None:
            return
        task = asyncio.ensure_future(self._scan(self._scans_started))
        self._scan_tasks.add(task)
        task.add_done_callback(self._scan_tasks.discard)
        await asyncio.shield(task)

    async def _scan(self, started_before: int) -> None:
        async with self._scan_lock:
            if self._scans_started > started_before or self.files is None:
                return  # a scan that started after the call has just finished
            self._scans_started += 1
            if self._scan_thread is None:
                self._scan_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="declarations-scan")
            files = self.files
            try:
                if await asyncio.get_running_loop().run_in_executor(self._scan_thread, files.scan):
                    self.set_source(FILES, files.declarations)
            except Exception as exc:  # the table stays as it was; the next scan tries again
                failure = _describe(exc)
                if failure != self._scan_failure:
                    log.error("declarations.scan_failed", path=str(files.path), error=failure)
                self._scan_failure = failure
                return
            self._scan_failure = None

    def add_reporter(self, source: str, reporter: StatusReporter) -> None:
        self._reporters[source] = reporter

    # ---- lookups ---------------------------------------------------

    def lookup(self, name: str, tag: str) -> Declaration | None:
        return self._table.by_reference.get((name, tag))

    @property
    def declarations(self) -> list[Declaration]:
        """The declarations being served, in precedence order."""
        return sorted(self._table.by_reference.values(), key=lambda d: d.rank)

    async def resolve(self, name: str, tag: str) -> ImageRequest | None:
        """The declared contents of `name:tag`, or None to read the name as packages."""
        await self.refresh_files()
        declaration = self.lookup(name, tag)
        if declaration is None:
            return None
        log.info(
            "declarations.resolved", image=declaration.reference, contents=declaration.contents,
            arch=declaration.request.arch.oci_name, origin=declaration.origin,
        )
        reporter = self._reporters.get(declaration.source)
        if reporter is not None and reporter.wants_build_result(declaration):
            self._follow_build(declaration, start=False)
        return declaration.request

    # ---- changes ---------------------------------------------------

    def set_source(self, source: str, declarations: Iterable[Declaration]) -> None:
        """Replace one source's declarations and act on what changed."""
        self._sources[source] = list(declarations)
        previous = self._table
        self._table = table = _build_table(d for decls in self._sources.values() for d in decls)

        for reference, declaration in table.by_reference.items():
            before = previous.by_reference.get(reference)
            if before is None or not declaration.same_image(before) or before.origin != declaration.origin:
                log.info(
                    "declarations.image_declared", image=declaration.reference, contents=declaration.contents,
                    arch=declaration.request.arch.oci_name, origin=declaration.origin,
                )
                if self.prebuild:
                    self._follow_build(declaration, start=True)
        for reference, before in previous.by_reference.items():
            if reference not in table.by_reference:
                log.info("declarations.image_removed", image=before.reference, origin=before.origin)

        conflicts = set()
        for loser, winner in table.losers:
            conflicts.add((loser.origin, winner.origin))
            if (loser.origin, winner.origin) not in self._reported_conflicts:
                log.warning(
                    "declarations.conflict", image=loser.reference, ignored=loser.origin, served=winner.origin,
                    problem=f"{loser.reference} is already declared by {winner.origin}",
                )
        self._reported_conflicts = conflicts

        for reporter_source, reporter in self._reporters.items():
            winners = {
                d.key: d for d in table.by_reference.values() if d.source == reporter_source and d.key is not None
            }
            losers = {
                loser.key: winner
                for loser, winner in table.losers
                if loser.source == reporter_source and loser.key is not None
            }
            reporter.table_changed(winners, losers)

    # ---- builds ----------------------------------------------------

    def _follow_build(self, declaration: Declaration, *, start: bool) -> None:
        """Build (or wait for the build of) a declared image in the background, and report the result."""
        if self.builder is None:
            return
        key = (declaration.origin, declaration.name, declaration.tag, declaration.request)
        if key in self._builds:
            return
        task = asyncio.get_running_loop().create_task(self._build(declaration, start=start))
        self._builds[key] = task
        task.add_done_callback(lambda _: self._builds.pop(key, None))

    async def _build(self, declaration: Declaration, *, start: bool) -> None:
        assert self.builder is not None
        record = None
        error = None
        try:
            if start:
                build = await self.builder.start(declaration.request, declaration.tag)
                log.info(
                    "declarations.prebuild", image=declaration.reference, build=build.id,
                    contents=declaration.contents, origin=declaration.origin,
                )
            record = await self.builder.image(declaration.request, declaration.tag)
        except asyncio.CancelledError:
            raise
        except RegistryError as exc:
            error = exc.message
        except Exception as exc:  # reported like any build failure; the registry goes on
            error = str(exc) or type(exc).__name__
        if error is not None:
            log.warning(
                "declarations.build_failed", image=declaration.reference, origin=declaration.origin, error=error
            )
        elif start:
            log.info("declarations.prebuilt", image=declaration.reference, digest=_digest(record))
        reporter = self._reporters.get(declaration.source)
        if reporter is not None:
            reporter.build_finished(declaration, record, error)


def _digest(record: ImageRecord | None) -> str | None:
    """The digest of the manifest clients get by default (OCI for zstd images)."""
    return str(record.default_manifest.digest) if record is not None else None


async def open_declarations(settings: Any, builder: ImageBuilder | None) -> DeclarationStore:
    """The declaration store the settings ask for, started (files read, watch running)."""
    files = DeclarationFiles(settings.images_path) if settings.images_path is not None else None
    store = DeclarationStore(
        builder=builder, files=files, prebuild=settings.prebuild, poll_interval=settings.images_poll
    )
    await store.start()
    if settings.k8s_watch:
        from nixery import k8s

        await k8s.start_watch(settings, store)
    return store
