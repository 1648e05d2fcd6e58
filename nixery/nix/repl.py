"""One long-running `nix repl`: image names resolved without starting Nix each time.

Any Nix command takes about 40 ms here just to start, and importing a package
set as big as nixpkgs takes far longer. A `nix repl` kept for one package-set
revision and one system imports the set once (evaluator.nix) and then answers
each image's names in a few milliseconds, reusing what earlier images evaluated.
Which repls run, and when an image goes to `nix-instantiate` instead, is
`nixery.nix.evaluator`'s business.

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
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from nixery.metrics import NIX_PROCESSES
from nixery.nix.errors import NixError
from nixery.nix.process import (
    NIX_FEATURES,
    Deadline,
    MemoryWatch,
    kill_process_tree,
    memory_limit_error,
    resident_bytes,
    start_child,
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
_DEFINITION_TIMEOUT = 30.0  # for the set-up lines, which evaluate nothing yet
_REQUEST_MARK = "__nixeryRequest"  # the start of every evaluation line (tests count them)


class EvaluatorUnusable(Exception):
    """The repl did not behave as this module expects; use a one-shot Nix process."""


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
        self.ended = False  # closed (stopped, or never to be started): another takes its place

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
        A start that does not finish (an error, a cancellation: a build stopped while
        its evaluator started) leaves no process and no directory, and the evaluator
        ended: the next request starts another, rather than finding this one started
        but dead (and evaluating with `nix-instantiate` from then on).
        """
        self.started = True
        try:
            await self._start_and_import(deadline)
        except BaseException:
            await self.close()
            raise

    async def _start_and_import(self, deadline: Deadline) -> None:
        started = time.monotonic()
        self._directory = directory = Path(tempfile.mkdtemp(prefix="nixery-eval-"))
        setup = directory / "setup.json"
        if not _SAFE_PATH.fullmatch(str(setup)):
            raise EvaluatorUnusable(f"the temporary directory {directory} has characters kept out of Nix code")
        setup.write_text(
            json.dumps({"pkgsPath": str(self.pkgs_path), "system": self.system, "evaluator": str(EVALUATOR_NIX)})
        )
        self._process = await start_child(
            ["nix", "repl", *NIX_FEATURES],
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

    async def evaluate(self, request: Mapping[str, object], *, deadline: Deadline) -> bytes:
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
        self.typical_seconds = moving_average(self.typical_seconds, time.monotonic() - sent)
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
        self.ended = True
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
                async with asyncio.timeout(wait):  # not wait_for: see nixery.nix.process.run_nix
                    return await self._send_and_read(self._process, expression, quiet)
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
    lines: list[str] = []
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


def moving_average(average: float | None, sample: float, weight: float = 0.3) -> float:
    return sample if average is None else (1 - weight) * average + weight * sample


def _tail(lines: Sequence[str]) -> str:
    return "\n".join(lines[-_TAIL_LINES:])
