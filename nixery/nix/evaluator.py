"""Long-running Nix evaluators: image names resolved without starting Nix each time.

Any Nix command takes about 40 ms here just to start, and importing a package
set as big as nixpkgs takes far longer. A `nix repl` kept for one package-set
revision and one system imports the set once (evaluator.nix) and then answers
each image's names in a few milliseconds, reusing what earlier images evaluated.

The protocol is the repl's own text. Each exchange is one expression line
followed by `:p builtins.trace "<marker>" "<marker>"`; the marker's value on
stdout and its trace line on stderr say where that expression's output ends
on both streams. User input never becomes Nix code: a request is a JSON file
in a private directory, which the expression names and evaluator.nix reads
with `builtins.readFile`. Output that does not fit this protocol (another Nix
version's repl, a crash) ends the process with `EvaluatorUnusable`, and the
caller evaluates with `nix-instantiate` instead.

One error the repl does not print: a file of the package set that ends too
soon ("syntax error, unexpected end of file", e.g. a `default.nix` cut off
mid-file). The repl takes it for an unfinished line of its own and waits for
the rest, echoing our marker line as a continuation. That echo is recognised
(`ErrorNotShown`), and the marker line, which starts with `:`, cannot continue
any expression, so the repl drops the input and is in step again after one
more marker. `nix-instantiate` then says what the error is.

Evaluations are bounded by the request's `Deadline` and by the memory limit
(`MemoryWatch`, while the repl evaluates).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from nixery.metrics import NIX_PROCESSES
from nixery.nix.errors import MemoryLimitExceeded, NixError, NixTimeout
from nixery.nix.process import (
    Deadline,
    MemoryWatch,
    kill_process_tree,
    memory_limit_error,
    resident_bytes,
    run_nix,
    start_nix,
)

log = structlog.get_logger(__name__)

EVALUATOR_NIX = Path(__file__).with_name("evaluator.nix")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NIX_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_NIX_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}
# Only these characters may appear in a path written into the repl's input.
_SAFE_PATH = re.compile(r"[A-Za-z0-9/._-]+")
_LINE_LIMIT = 64 << 20  # one answer is one line: the JSON of every resolved package
_TAIL_LINES = 25
_ENDS_BEFORE_GIVING_UP = 3
_DEFINITION_TIMEOUT = 30.0  # for the set-up lines, which evaluate nothing yet
_NOT_IMPORTING_KEPT = 64  # revisions remembered as not importing in a repl
_REQUEST_MARK = "__nixeryRequest"  # the start of every evaluation line (tests count them)


_Key = tuple[str, str]  # (system, package-set revision)


class EvaluatorUnusable(Exception):
    """The repl did not behave as this module expects; use a one-shot Nix process."""


class _WaitedTooLong(Exception):
    """The evaluator stayed busy past the patience of a queued request."""


class EvaluatorEnded(EvaluatorUnusable):
    """The repl exited or closed its pipes (a crash, the OOM killer), not a protocol mismatch."""


class ErrorNotShown(Exception):
    """The expression met a file that ends too soon, which the repl does not report
    (see the module's docstring); the repl is in step again."""


class _Continued(Exception):
    """The repl took our marker line for the rest of an unfinished expression."""


def decode_nix_string(printed: str) -> str:
    """The value of a string as the repl prints it: quoted, with backslash escapes."""
    if len(printed) < 2 or printed[0] != '"' or printed[-1] != '"':
        raise EvaluatorUnusable(f"not a printed string: {printed[:80]!r}")
    return _NIX_ESCAPE.sub(lambda m: _NIX_ESCAPES.get(m[1], m[1]), printed[1:-1])


@dataclass(frozen=True, slots=True)
class _Reply:
    values: list[str]  # what the repl printed on stdout, echoes of our input left out
    stderr: list[str]


class ReplEvaluator:
    """One `nix repl` holding one package set for one system; one request at a time."""

    def __init__(self, pkgs_path: Path, system: str, *, memory_limit: int | None = None):
        self.pkgs_path = pkgs_path
        self.system = system
        self.memory_limit = memory_limit  # bytes of resident memory while evaluating
        self.lock = asyncio.Lock()
        self.started = False
        self.serving_since: float | None = None  # when the request being answered was sent
        self.typical_seconds: float | None = None  # of recent answers (a moving average)
        self.start_seconds: float | None = None  # starting and importing the set: a one-shot's cost, about
        self._process: asyncio.subprocess.Process | None = None
        self._directory: Path | None = None
        self._markers = itertools.count()
        self._alive = False

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def serving(self) -> bool:
        """Answering an image's request (not starting up)."""
        return self.serving_since is not None

    async def start(self, *, deadline: Deadline) -> None:
        """Start the repl, import the package set's top level and evaluate `shell`.

        Raises NixError when the set does not import, and ErrorNotShown when the
        import met a file that ends too soon (see `check_import` for the message).
        """
        self.started = True
        started = time.monotonic()
        self._directory = directory = Path(tempfile.mkdtemp(prefix="nixery-eval-"))
        setup = directory / "setup.json"
        if not _SAFE_PATH.fullmatch(str(setup)):
            raise EvaluatorUnusable(f"the temporary directory {directory} has characters kept out of Nix code")
        setup.write_text(
            json.dumps({"pkgsPath": str(self.pkgs_path), "system": self.system, "evaluator": str(EVALUATOR_NIX)})
        )
        self._process = await start_nix(
            ["nix", "repl", "--extra-experimental-features", "nix-command"],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
            env={**os.environ, "XDG_DATA_HOME": str(directory)},  # the repl's history file goes there
        )
        self._alive = True
        NIX_PROCESSES.labels("nix-repl").inc()
        settings = f'builtins.fromJSON (builtins.readFile "{setup}")'
        # Definitions print nothing: a repl that prints something else is not one we understand.
        load = f"__nixery = import (/. + ({settings}).evaluator) ({settings})"
        await self._exchange(load, deadline=deadline, quiet=True)
        await self._exchange(f"{_REQUEST_MARK} = __nixery.request", deadline=deadline, quiet=True)
        reply = await self._exchange("__nixery.warm", deadline=deadline)
        if reply.values != ["true"]:
            raise NixError("the package set does not import", _tail(reply.stderr))
        try:
            reply = await self._exchange("__nixery.warmShell", deadline=deadline)
        except ErrorNotShown:
            reply = _Reply([], ["a file that `shell` needs ends too soon"])
        if reply.values != ["true"]:  # its own images will report why
            log.info("nix.evaluator_shell_not_evaluated", error=_tail(reply.stderr)[-300:])
        self.start_seconds = time.monotonic() - started
        log.info("nix.evaluator_ready", system=self.system, pkgs=str(self.pkgs_path), pid=self._process.pid,
                 seconds=round(self.start_seconds, 3))

    async def evaluate(self, request: dict[str, object], *, deadline: Deadline) -> bytes:
        """The JSON eval.nix would print for `request`."""
        assert self._directory is not None
        path = self._directory / f"request-{next(self._markers)}.json"
        path.write_text(json.dumps(request))
        self.serving_since = sent = time.monotonic()
        try:
            reply = await self._exchange(f'{_REQUEST_MARK} "{path}"', deadline=deadline)
        finally:
            self.serving_since = None
            path.unlink(missing_ok=True)
        self.typical_seconds = _moving_average(self.typical_seconds, time.monotonic() - sent)
        if not reply.values:
            if any(line.startswith("error") for line in reply.stderr):
                raise NixError("the evaluation failed", _tail(reply.stderr))
            raise EvaluatorUnusable(f"no answer and no error: {reply.stderr[-3:]}")
        if len(reply.values) != 1:
            raise EvaluatorUnusable(f"{len(reply.values)} answers to one request")
        answer = decode_nix_string(reply.values[0])
        try:
            json.loads(answer)
        except ValueError as exc:
            raise EvaluatorUnusable(f"the answer is not JSON: {exc}") from exc
        return answer.encode()

    def resident_bytes(self) -> int:
        """The repl's resident memory (0 when it cannot be read)."""
        return 0 if self._process is None else resident_bytes(self._process.pid)

    async def close(self) -> None:
        """Stop the repl and remove its directory (safe to call more than once)."""
        if self._alive and self._process is not None:
            self._alive = False
            NIX_PROCESSES.labels("nix-repl").dec()
            kill_process_tree(self._process.pid)
            await self._process.wait()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    async def _exchange(self, expression: str, *, deadline: Deadline, quiet: bool = False) -> _Reply:
        """Send one expression and read what it printed, within `deadline` and the memory
        limit; the repl is stopped on any failure but ErrorNotShown.

        `quiet`: the expression prints no value, and anything printed is a protocol error
        (as is taking more than _DEFINITION_TIMEOUT).
        """
        if self._process is None or not self._alive:
            raise EvaluatorUnusable("the evaluator is not running")
        wait = min(deadline.remaining(), _DEFINITION_TIMEOUT) if quiet else deadline.remaining()
        with MemoryWatch(self._process.pid, self.memory_limit) as memory:
            try:
                return await asyncio.wait_for(self._send_and_read(self._process, expression, quiet), wait)
            except ErrorNotShown:
                raise
            except TimeoutError:
                await self.close()
                if deadline.remaining() > 0:  # only a definition's own patience ran out
                    raise EvaluatorUnusable(f"no end of output within {wait:g} s") from None
                raise deadline.passed("the evaluation") from None
            except BaseException:
                await self.close()
                if memory.exceeded:
                    assert self.memory_limit is not None
                    raise memory_limit_error("the evaluation", self.memory_limit) from None
                raise

    async def _send_and_read(self, process: asyncio.subprocess.Process, expression: str, quiet: bool) -> _Reply:
        try:
            marker = await self._send(process, expression)
            try:
                return await _read_reply(process, marker, quiet)
            except _Continued:
                # The repl has now dropped the input (a line starting with ':' continues no
                # expression); the next marker ends its complaint about that.
                await _read_reply(process, await self._send(process), quiet=False)
                raise ErrorNotShown from None
        except ConnectionError as exc:
            raise EvaluatorEnded(f"the repl stopped reading: {exc}") from exc
        except ValueError as exc:  # a line past the limit
            raise EvaluatorUnusable(f"unreadable output: {exc}") from exc

    async def _send(self, process: asyncio.subprocess.Process, *lines: str) -> str:
        """Write `lines` and a marker line; returns the marker."""
        assert process.stdin is not None
        marker = f"nixery-sync-{next(self._markers)}"
        process.stdin.write("".join(f"{line}\n" for line in (*lines, _marker_line(marker))).encode())
        await process.stdin.drain()
        return marker


def _marker_line(marker: str) -> str:
    return f':p builtins.trace "{marker}" "{marker}"'


async def _read_reply(process: asyncio.subprocess.Process, marker: str, quiet: bool) -> _Reply:
    """What the repl printed up to `marker`'s value on stdout and its trace on stderr."""
    stderr = asyncio.ensure_future(_read_until(process.stderr, {f"trace: {marker}"}, values_only=False))
    try:
        # Printed quoted, or bare as newer Nix's `:p` prints strings.
        values = await _read_until(
            process.stdout, {f'"{marker}"', marker}, values_only=True, quiet=quiet, continued=_marker_line(marker)
        )
        return _Reply(values, await stderr)
    finally:
        if not stderr.done():
            stderr.cancel()  # a stream's readline can be cancelled without losing data
        elif not stderr.cancelled():
            stderr.exception()  # stdout's error, if any, is the one reported


async def _read_until(
    stream: asyncio.StreamReader | None, ends: set[str], *, values_only: bool, quiet: bool = False,
    continued: str | None = None,
) -> list[str]:
    """Lines up to one of `ends`; `continued`: our marker line, which the repl echoes on its
    own (without its prompt) only as the continuation of an unfinished expression."""
    assert stream is not None
    lines = []
    while True:
        raw = await stream.readline()
        if not raw:
            raise EvaluatorEnded(f"the repl ended (waiting for {min(ends)!r})")
        line = _ANSI.sub("", raw.decode(errors="replace")).strip()
        if line in ends:
            return lines
        if line == continued:
            raise _Continued
        if values_only and (not line or line.startswith("nix-repl>")):
            continue  # the prompt, with the repl's echo of our own input
        if quiet:
            raise EvaluatorUnusable(f"unexpected output {line[:80]!r}")
        lines.append(line)


def _moving_average(average: float | None, sample: float, weight: float = 0.3) -> float:
    return sample if average is None else (1 - weight) * average + weight * sample


def _tail(lines: Sequence[str]) -> str:
    return "\n".join(lines[-_TAIL_LINES:])


class Evaluators:
    """How one registry process evaluates image names: its long-running evaluators,
    by system and package-set revision, and the limit on an evaluation's memory.

    At most `capacity` are kept: a request for a new revision starts one and,
    past that, stops the one used least recently (the usual case is one, for
    the latest revision, with a second for an older tag now and then). A
    request that finds its evaluator answering another image waits only if
    that should take less time than a one-shot Nix process; otherwise it gets
    None and the caller starts one, as it does when the evaluator cannot start
    or breaks (see `_worth_waiting`). An evaluator idle for
    `idle_seconds`, or grown past `memory_limit` bytes (after an answer; while
    evaluating, it is killed), is stopped; the next request starts a new one.
    A revision whose package set does not import in a repl is remembered, and
    evaluated by one-shot processes only.

    With `repl=False` (NIXERY_NIX_EVALUATOR=process) no repl is started:
    `evaluate` always answers None.
    """

    def __init__(self, *, memory_limit: int, idle_seconds: float = 300.0, capacity: int = 2, repl: bool = True):
        self.memory_limit = memory_limit
        self.idle_seconds = idle_seconds
        self.capacity = capacity
        self.repl = repl
        self._evaluators: OrderedDict[_Key, ReplEvaluator] = OrderedDict()  # least recently used first
        self._idle_timers: dict[_Key, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._unusable = False  # the repl's output is not what this module reads: never again
        self._waiting: dict[_Key, int] = {}  # requests queued for each evaluator
        self._one_shot_seconds: float | None = None  # of recent nix-instantiate evaluations
        self._failures = 0  # repls in a row that ended or could not start
        self._not_importing: OrderedDict[_Key, None] = OrderedDict()  # oldest first

    async def evaluate(
        self, revision: str, pkgs_path: Path, request: dict[str, object], *, system: str, deadline: Deadline
    ) -> bytes | None:
        """eval.nix's JSON for `request`, or None when no evaluator can take it now."""
        key = (system, revision)
        if not self.repl or self._unusable or key in self._not_importing:
            return None
        evaluator = self._current(key)
        if evaluator is not None and not self._worth_waiting(key, evaluator):
            return None
        if evaluator is None:
            evaluator = self._new(key, pkgs_path)
        try:
            async with self._turn(key, evaluator, deadline):
                if not evaluator.alive and not await self._start(key, evaluator, deadline):
                    return None
                try:
                    answer = await evaluator.evaluate(request, deadline=deadline)
                except EvaluatorUnusable as exc:
                    await self._failed(key, evaluator, exc)
                    return None
                except ErrorNotShown:  # nix-instantiate will say what it is
                    return None
                except MemoryLimitExceeded:  # the repl held earlier images too: a new process starts afresh
                    self._forget(key, evaluator)
                    return None
                except BaseException:
                    if not evaluator.alive:  # stopped by a timeout or a cancellation
                        self._forget(key, evaluator)
                    raise  # an evaluation error leaves the repl as it was
        except _WaitedTooLong:
            return None
        self._failures = 0
        self._after_request(key, evaluator)
        return answer

    def note_one_shot(self, seconds: float) -> None:
        """How long an evaluation by `nix-instantiate` took (what waiting is weighed against)."""
        self._one_shot_seconds = _moving_average(self._one_shot_seconds, seconds)

    def _worth_waiting(self, key: _Key, evaluator: ReplEvaluator) -> bool:
        """Whether the evaluator should be free sooner than a one-shot process would answer.

        Waiting for a start-up is always worth it. Otherwise the request being
        answered is expected to take as long again as it has run so far (or
        the typical answer, if longer), and each request queued before this
        one a typical answer.
        """
        if evaluator.serving_since is None:
            return True
        typical = evaluator.typical_seconds or 0.0
        queued = self._waiting.get(key, 0)
        expected = max(typical, time.monotonic() - evaluator.serving_since) + queued * typical
        one_shot = self._one_shot_estimate(evaluator)
        return one_shot is not None and expected < one_shot

    def _one_shot_estimate(self, evaluator: ReplEvaluator) -> float | None:
        """Seconds a nix-instantiate takes: recent ones, else this repl's start (about the same work)."""
        return self._one_shot_seconds or evaluator.start_seconds

    @contextlib.asynccontextmanager
    async def _turn(self, key: _Key, evaluator: ReplEvaluator, deadline: Deadline) -> AsyncIterator[None]:
        """The evaluator's lock, counted in `_waiting` while queued for it.

        Behind another image's answer, the wait is bounded by twice what a
        one-shot process takes (the estimate may be wrong); then `_WaitedTooLong`.
        Any wait ends at the request's deadline.
        """
        one_shot = self._one_shot_estimate(evaluator)
        patience = None if evaluator.serving_since is None or one_shot is None else max(2 * one_shot, 0.1)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        wait = deadline.remaining() if patience is None else min(patience, deadline.remaining())
        try:
            await asyncio.wait_for(evaluator.lock.acquire(), wait)
        except TimeoutError:
            if deadline.remaining() <= 0:
                raise deadline.passed("the evaluation (waiting for the evaluator)") from None
            raise _WaitedTooLong from None
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
        try:
            yield
        finally:
            evaluator.lock.release()

    async def warm(self, revision: str, pkgs_path: Path, *, system: str, deadline: Deadline) -> None:
        """Import the package set of `revision` now: start its evaluator, so that the first
        image does not wait for it, and log an error if the set does not import.

        Without repls, `nix-instantiate` imports it once, for the error alone.
        """
        key = (system, revision)
        try:
            if not self.repl or self._unusable:
                await check_import(pkgs_path, system, deadline=deadline, memory_limit=self.memory_limit)
            elif key not in self._not_importing and self._current(key) is None:  # else known already
                evaluator = self._new(key, pkgs_path)
                async with evaluator.lock:
                    if await self._start(key, evaluator, deadline):
                        self._schedule_idle_stop(key, evaluator)
        except NixError as exc:  # a timeout, or check_import's error (_start logs its others)
            _log_not_importing(pkgs_path, system, exc)

    async def close(self) -> None:
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        evaluators = list(self._evaluators.values())
        self._evaluators.clear()
        await asyncio.gather(*(evaluator.close() for evaluator in evaluators), *self._closing)

    def running(self) -> list[ReplEvaluator]:
        return [evaluator for evaluator in self._evaluators.values() if evaluator.alive]

    def _current(self, key: _Key) -> ReplEvaluator | None:
        evaluator = self._evaluators.get(key)
        if evaluator is None or (evaluator.started and not evaluator.alive):
            return None
        self._evaluators.move_to_end(key)
        return evaluator

    def _new(self, key: _Key, pkgs_path: Path) -> ReplEvaluator:
        evaluator = ReplEvaluator(pkgs_path, key[0], memory_limit=self.memory_limit)
        replaced = self._evaluators.pop(key, None)
        if replaced is not None:
            self._stop_when_free(replaced)
        self._evaluators[key] = evaluator
        while len(self._evaluators) > self.capacity:
            _, oldest = self._evaluators.popitem(last=False)
            self._stop_when_free(oldest)
        return evaluator

    async def _start(self, key: _Key, evaluator: ReplEvaluator, deadline: Deadline) -> bool:
        """Start `evaluator` (under its lock); False when it could not be.

        Raises NixTimeout when the deadline passes: no one-shot process would have time left.
        """
        if evaluator.started:
            return evaluator.alive
        try:
            try:
                await evaluator.start(deadline=deadline)
            except ErrorNotShown:
                await evaluator.close()
                await check_import(evaluator.pkgs_path, key[0], deadline=deadline, memory_limit=self.memory_limit)
                raise NixError("the package set does not import in nix repl, but does in nix-instantiate") from None
            return True
        except EvaluatorUnusable as exc:
            await self._failed(key, evaluator, exc)
        except OSError as exc:  # no `nix` to run: it will not appear later either
            await self._failed(key, evaluator, EvaluatorUnusable(f"cannot start nix repl: {exc}"))
        except NixTimeout:
            self._forget(key, evaluator)
            await evaluator.close()
            raise
        except NixError as exc:  # the set does not import (an error, its memory): builds report it
            _log_not_importing(evaluator.pkgs_path, key[0], exc)
            self._not_importing[key] = None
            while len(self._not_importing) > _NOT_IMPORTING_KEPT:
                self._not_importing.popitem(last=False)
            self._forget(key, evaluator)
            await evaluator.close()
        return False

    def _forget(self, key: _Key, evaluator: ReplEvaluator) -> bool:
        """Drop `evaluator` if it is still the one kept for `key`; whether it was."""
        if self._evaluators.get(key) is not evaluator:
            return False
        del self._evaluators[key]
        return True

    async def _failed(self, key: _Key, evaluator: ReplEvaluator, error: EvaluatorUnusable) -> None:
        """Stop `evaluator`; after a protocol mismatch, or repeated ends, use one-shot processes only."""
        self._forget(key, evaluator)
        await evaluator.close()
        self._failures += 1
        if isinstance(error, EvaluatorEnded) and self._failures < _ENDS_BEFORE_GIVING_UP:
            log.warning("nix.evaluator_ended", reason=str(error)[:300], note="the next image starts another")
            return
        log.warning("nix.evaluator_unusable", reason=str(error)[:300], note="nix-instantiate from now on")
        self._unusable = True

    def _after_request(self, key: _Key, evaluator: ReplEvaluator) -> None:
        resident = evaluator.resident_bytes()
        if resident > self.memory_limit:
            log.info("nix.evaluator_stopped", reason="memory", resident=resident, limit=self.memory_limit)
            self._forget(key, evaluator)
            self._stop_when_free(evaluator)
        else:
            self._schedule_idle_stop(key, evaluator)

    def _schedule_idle_stop(self, key: _Key, evaluator: ReplEvaluator) -> None:
        timer = self._idle_timers.pop(key, None)
        if timer is not None:
            timer.cancel()

        def stop_if_still_idle() -> None:
            self._idle_timers.pop(key, None)
            if self._forget(key, evaluator):
                self._stop_when_free(evaluator)

        self._idle_timers[key] = asyncio.get_running_loop().call_later(self.idle_seconds, stop_if_still_idle)

    def _stop_when_free(self, evaluator: ReplEvaluator) -> None:
        async def stop() -> None:
            async with evaluator.lock:
                await evaluator.close()

        task = asyncio.ensure_future(stop())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def check_import(pkgs_path: Path, system: str, *, deadline: Deadline, memory_limit: int | None) -> None:
    """Import the package set as a repl does, with nix-instantiate (which prints every
    error); raises NixError, with Nix's message, if it does not import."""
    try:
        await run_nix(
            [
                "nix-instantiate", "--eval", "--read-write-mode", str(EVALUATOR_NIX), "-A", "warm",
                "--argstr", "pkgsPath", str(pkgs_path), "--argstr", "system", system,
            ],
            deadline=deadline,
            memory_limit=memory_limit,
        )
    except (NixTimeout, MemoryLimitExceeded):
        raise
    except NixError as exc:
        raise NixError("the package set does not import", exc.log_tail) from exc


def _log_not_importing(pkgs_path: Path, system: str, error: NixError) -> None:
    """An error in the log: Nix's message names the file and line."""
    log.error(
        "nix.package_set_does_not_import", pkgs=str(pkgs_path), system=system, error=error.message,
        nix=error.log_tail[-2000:],
        note="the next image tries again" if isinstance(error, NixTimeout) else "its images fail with this error",
    )
