"""The table of declared images that every source feeds, and the builds it follows.

`DeclarationStore` is the registry's `ImageResolver`: it answers "is this
name:tag declared?" from a table that is replaced, never edited, when a source
changes, so a lookup never sees half a change. Sources are the files
(`DeclarationFiles`, scanned in a thread of their own) and, when `nixery.app`
starts one, the Kubernetes watch, which reports status back through the
`StatusReporter` protocol. A source that changes often and large (the watch)
calls `update_source`, which builds the new table in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from nixery.background import spawn
from nixery.declarations.files import DeclarationFiles, Problem
from nixery.declarations.parsing import FILES, Declaration, _describe
from nixery.errors import ManifestUnknown, RegistryError
from nixery.registry.names import ImageRequest
from nixery.registry.negotiation import pull_digests
from nixery.singleflight import WorkStopped

if TYPE_CHECKING:
    from nixery.builder import ImageBuilder
    from nixery.images import ImageRecord

log = structlog.get_logger(__name__)

MAX_LOGGED_PER_CHANGE = 50  # images declared, removed or in conflict logged one by one per change
#: Seconds a pull waits for the files to be scanned, at most; past it the pull is answered from the
#: table as it is, and the scan goes on. Scans take milliseconds, but whoever writes the files can
#: make them take seconds (files that are slow to parse, rewritten again and again), and every pull
#: by tag waited for one: even `hello:latest`, declared nowhere.
SCAN_WAIT = 1.0


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
    tags: dict[str, list[str]] = field(default_factory=dict)  # by name, sorted


def _build_table(declarations: Iterable[Declaration]) -> _Table:
    table = _Table()
    for declaration in sorted(declarations, key=lambda d: d.rank):
        reference = (declaration.name, declaration.tag)
        winner = table.by_reference.get(reference)
        if winner is None:
            table.by_reference[reference] = declaration
        else:
            table.losers.append((declaration, winner))
    for name, tag in sorted(table.by_reference):
        table.tags.setdefault(name, []).append(tag)
    return table


@dataclass
class _Change:
    """A new table and what it changes from the one served (`_change`)."""

    table: _Table
    declared: list[Declaration]  # new or changed: served from now on
    removed: list[Declaration]
    reports: dict[str, tuple[dict[str, Declaration], dict[str, Declaration]]]  # by source: `_report`


def _change(previous: _Table, sources: Mapping[str, list[Declaration]], reporting: Iterable[str]) -> _Change:
    """The table of `sources` and what it changes from `previous`, touching nothing else (`update_source`
    runs it in a thread)."""
    table = _build_table(d for decls in sources.values() for d in decls)
    declared = []
    for reference, declaration in table.by_reference.items():
        before = previous.by_reference.get(reference)
        if before is None or not declaration.same_image(before) or before.origin != declaration.origin:
            declared.append(declaration)
    removed = [before for reference, before in previous.by_reference.items() if reference not in table.by_reference]
    return _Change(table, declared, removed, {source: _report(table, source) for source in reporting})


def _report(table: _Table, source: str) -> tuple[dict[str, Declaration], dict[str, Declaration]]:
    """What `StatusReporter.table_changed` tells `source`: its winners by key, and the winner over each loser."""
    winners = {d.key: d for d in table.by_reference.values() if d.source == source and d.key is not None}
    losers = {loser.key: winner for loser, winner in table.losers if loser.source == source and loser.key is not None}
    return winners, losers


class DeclarationStore:
    """Declared images from every source; the registry's `ImageResolver`."""

    def __init__(
        self,
        *,
        builder: ImageBuilder | None = None,
        files: DeclarationFiles | None = None,
        prebuild: bool = False,
        poll_interval: float = 10.0,
        scan_wait: float | None = SCAN_WAIT,  # None: a pull waits for the whole scan
    ):
        self.builder = builder
        self.files = files
        self.prebuild = prebuild
        self.poll_interval = poll_interval
        self.scan_wait = scan_wait
        self._sources: dict[str, list[Declaration]] = {}
        self._table = _Table()
        #: The files' invalid declarations, by the name:tag each meant (`resolve` says so).
        self._invalid: dict[tuple[str, str], Problem] = {}
        self._reported_conflicts: set[tuple[str, str]] = set()
        self._reporters: dict[str, StatusReporter] = {}
        self._builds: dict[tuple[Any, ...], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # the file poll, the Kubernetes watch
        # File scans: one at a time, in a thread of their own (see refresh_files).
        self._scan_lock = asyncio.Lock()
        self._scans_started = 0
        self._scan_tasks: set[asyncio.Task[None]] = set()
        self._scan_thread: ThreadPoolExecutor | None = None
        self._scan_failure: str | None = None
        self._slow_scan_reported = False

    # ---- life cycle ------------------------------------------------

    async def start(self) -> None:
        """Read the files once (reporting problems) and keep watching them."""
        if self.files is not None:
            await self.refresh_files()
            self.run_in_background(self._poll_files(), failure_event="declarations.poll_failed")

    def run_in_background(self, work: Coroutine[Any, Any, None], *, failure_event: str) -> asyncio.Task[None]:
        """Run `work` (a source's loop) until `close`; a failure is logged as `failure_event`."""
        return spawn(work, failure_event=failure_event, keep=self._tasks)

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

    async def refresh_files(self, *, wait: float | None = None) -> None:
        """Bring the files' declarations up to date: returns after a scan that started after the call,
        or after `wait` seconds, when given, with the scan still running (`SCAN_WAIT`).

        Scans run one at a time, in a thread of their own, so the event loop never stats,
        reads or parses a file. Calls that arrive while a scan runs share the next one:
        however many pulls and polls come, one scan runs and at most one waits. A caller
        that is cancelled (a client gone) leaves its scan to finish, so no change is lost.
        A failed scan is logged (once, until scans succeed again) and the table stays."""
        if self.files is None:
            return
        scan = spawn(self._scan(self._scans_started), failure_event="declarations.scan_failed", keep=self._scan_tasks)
        if wait is None:
            await asyncio.shield(scan)
            return
        done, _ = await asyncio.wait({scan}, timeout=wait)  # on time-out the scan goes on, not cancelled
        if done:
            self._slow_scan_reported = False
        elif not self._slow_scan_reported:  # once, until a pull gets a scan in time again
            self._slow_scan_reported = True
            log.warning(
                "declarations.scan_slow", path=str(self.files.path), waited=wait,
                problem="the declaration files take long to scan: pulls are answered from the last scan",
            )

    async def _scan(self, started_before: int) -> None:
        async with self._scan_lock:
            if self._scans_started > started_before or self.files is None:
                return  # a scan that started after the call has just finished
            self._scans_started += 1
            if self._scan_thread is None:
                self._scan_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="declarations-scan")
            files = self.files

            def scan() -> tuple[list[Declaration], dict[tuple[str, str], Problem]] | None:
                """The files' declarations, and their invalid ones, when they may have changed:
                collected here, in the thread."""
                return (files.declarations, files.invalid) if files.scan() else None

            try:
                scanned = await asyncio.get_running_loop().run_in_executor(self._scan_thread, scan)
                if scanned is not None:
                    declarations, self._invalid = scanned
                    await self.update_source(FILES, declarations)
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
        """The declared contents of `name:tag`, or None to read the name as packages; ManifestUnknown
        when the only declaration of `name:tag` is an invalid one."""
        await self.refresh_files(wait=self.scan_wait)
        declaration = self.lookup(name, tag)
        if declaration is None:
            invalid = self._invalid.get((name, tag))
            if invalid is not None:  # not the name read as packages: "packages not found: NAME"
                raise ManifestUnknown(
                    f"{name}:{tag} is declared in {invalid.shown}, but that declaration cannot be served: "
                    f"{invalid.message}",
                    detail={"declaration": invalid.shown},
                )
            return None
        log.info(
            "declarations.resolved", image=declaration.reference, contents=declaration.contents,
            arch=declaration.arch, origin=declaration.origin,
        )
        reporter = self._reporters.get(declaration.source)
        if reporter is not None and reporter.wants_build_result(declaration):
            self._follow_build(declaration, start=False)
        return declaration.request

    def declared_as(self, name: str, architecture: str) -> tuple[str, str] | None:
        """The first declaration, in precedence order, of one platform (`architecture`) whose
        contents an image record names `name`: the reference that pulls that image on a registry of
        several platforms, where `name` itself names an image of each."""
        for declaration in self.declarations:
            request = declaration.request
            if not request.platforms and request.arch.oci_name == architecture and request.display_name == name:
                return declaration.name, declaration.tag
        return None

    async def tags(self, name: str) -> list[str]:
        """The tags `name` is declared under, sorted; none when the name is not declared."""
        await self.refresh_files(wait=self.scan_wait)
        return self._table.tags.get(name, [])

    # ---- changes ---------------------------------------------------

    def set_source(self, source: str, declarations: Iterable[Declaration]) -> None:
        """Replace one source's declarations and act on what changed."""
        sources = {**self._sources, source: list(declarations)}
        self._install(sources, _change(self._table, sources, list(self._reporters)))

    async def update_source(self, source: str, declarations: Iterable[Declaration]) -> None:
        """`set_source`, with the new table and what it changes worked out in a thread: a rebuild
        walks every declaration (3.6 ms at 2,000), which the event loop should not wait for."""
        declarations = list(declarations)
        for _ in range(3):
            installed = self._table
            sources = {**self._sources, source: declarations}
            change = await asyncio.to_thread(_change, installed, sources, list(self._reporters))
            if self._table is installed:  # no other source changed meanwhile: the change holds
                self._install(sources, change)
                return
        self.set_source(source, declarations)  # the other sources keep changing: work it out here

    def _install(self, sources: dict[str, list[Declaration]], change: _Change) -> None:
        """Serve `change.table` and act on what it changes: log lines, prebuilds, reports."""
        self._sources = sources
        self._table = table = change.table

        # A line per image, up to MAX_LOGGED_PER_CHANGE of each kind, then one line with the counts:
        # this runs on the event loop, and a file of 2,500 declarations edited, or eight at once,
        # was tens of thousands of lines, which held every request for hundreds of milliseconds.
        for declaration in change.declared[:MAX_LOGGED_PER_CHANGE]:
            log.info(
                "declarations.image_declared", image=declaration.reference, contents=declaration.contents,
                arch=declaration.arch, origin=declaration.origin,
            )
        if self.prebuild:
            for declaration in change.declared:
                self._follow_build(declaration, start=True)
        for before in change.removed[:MAX_LOGGED_PER_CHANGE]:
            log.info("declarations.image_removed", image=before.reference, origin=before.origin)

        conflicts = {(loser.origin, winner.origin) for loser, winner in table.losers}
        new_conflicts = [(loser, winner) for loser, winner in table.losers
                         if (loser.origin, winner.origin) not in self._reported_conflicts]
        for loser, winner in new_conflicts[:MAX_LOGGED_PER_CHANGE]:
            log.warning(
                "declarations.conflict", image=loser.reference, ignored=loser.origin, served=winner.origin,
                problem=f"{loser.reference} is already declared by {winner.origin}",
            )
        self._reported_conflicts = conflicts
        if max(len(change.declared), len(change.removed), len(new_conflicts)) > MAX_LOGGED_PER_CHANGE:
            log.info(
                "declarations.changed", declared=len(change.declared), removed=len(change.removed),
                new_conflicts=len(new_conflicts), served=len(table.by_reference),
                logged_each=MAX_LOGGED_PER_CHANGE,
            )

        for reporter_source, reporter in self._reporters.items():
            winners, losers = change.reports.get(reporter_source) or _report(table, reporter_source)
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
            # No client waits for a prebuild: a shutdown stops it at once (nixery.http.shutdown).
            record = await self.builder.image(declaration.request, declaration.tag, client_waits=False)
        except asyncio.CancelledError:
            raise
        except WorkStopped:  # the registry is shutting down: not a failure; the next start builds it
            log.info("declarations.build_stopped", image=declaration.reference, origin=declaration.origin)
            return
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
    return str(pull_digests(record.descriptors).default) if record is not None else None


async def open_declarations(settings: Any, builder: ImageBuilder | None) -> DeclarationStore:
    """The declaration store the settings ask for, started (files read, watch running).

    The Kubernetes source is started by the caller (`nixery.app`), which knows both."""
    files = DeclarationFiles(settings.images_path) if settings.images_path is not None else None
    store = DeclarationStore(
        builder=builder, files=files, prebuild=settings.prebuild, poll_interval=settings.images_poll
    )
    await store.start()
    return store
