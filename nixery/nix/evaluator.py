"""How a registry process evaluates image names: in its long-running evaluators
(`nix repl`, `nixery.nix.repl`), one per system and package-set revision, or by
a one-shot `nix-instantiate` when no repl can take the image.

Evaluations are bounded by the request's `Deadline` and by the memory limit
(NIXERY_EVALUATOR_MEMORY_MB), in a repl as in `nix-instantiate`. A package
set that does not import is logged as an error when the registry starts
(`Evaluators.warm`), with Nix's message, which names the file and line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import structlog

from nixery.background import spawn
from nixery.lru import LRU
from nixery.nix.errors import MemoryLimitExceeded, NixError, NixTimeout
from nixery.nix.process import NIX_FEATURES, Deadline, run_nix
from nixery.nix.repl import (
    EVALUATOR_NIX,
    ErrorNotShown,
    EvaluatorEnded,
    EvaluatorUnusable,
    ReplEvaluator,
    moving_average,
)

log = structlog.get_logger(__name__)

_ENDS_BEFORE_GIVING_UP = 3
_NOT_IMPORTING_KEPT = 64  # revisions remembered as not importing in a repl

#: (system, package-set revision, its directory): a local path moved to a directory with the same
#: files is the same revision, but the evaluator of the old directory reads its files as it goes.
_Key = tuple[str, str, str]


class _WaitedTooLong(Exception):
    """The evaluator stayed busy past the patience of a queued request."""


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
        self._evaluators: LRU[_Key, ReplEvaluator] = LRU(capacity)
        self._idle_timers: dict[_Key, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._unusable = False  # the repl's output is not what this module reads: never again
        self._waiting: dict[_Key, int] = {}  # requests queued for each evaluator
        self._one_shot_seconds: float | None = None  # of recent nix-instantiate evaluations
        self._failures = 0  # repls in a row that ended or could not start
        self._not_importing: LRU[_Key, bool] = LRU(_NOT_IMPORTING_KEPT)  # oldest first

    async def evaluate(
        self, revision: str, pkgs_path: Path, request: Mapping[str, object], *, system: str, deadline: Deadline
    ) -> bytes | None:
        """eval.nix's JSON for `request`, or None when no evaluator can take it now."""
        key = (system, revision, str(pkgs_path))
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
        self._one_shot_seconds = moving_average(self._one_shot_seconds, seconds)

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
        key = (system, revision, str(pkgs_path))
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
        """The evaluator kept for `key`, also while it starts (a request then waits for it
        rather than starting a second one); None once it has ended."""
        evaluator = self._evaluators.peek(key)
        if evaluator is None or evaluator.ended:
            return None
        self._evaluators.get(key)  # now the most recently used
        return evaluator

    def _new(self, key: _Key, pkgs_path: Path) -> ReplEvaluator:
        evaluator = ReplEvaluator(pkgs_path, key[0], memory_limit=self.memory_limit)
        # The same revision in another directory (a local path moved): that one's is not asked again.
        moved = [kept for kept in self._evaluators if kept[:2] == key[:2] and kept != key]
        for replaced in filter(None, (self._evaluators.pop(one) for one in [key, *moved])):
            self._stop_when_free(replaced)
        for _, oldest in self._evaluators.put(key, evaluator):
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
            self._not_importing.put(key, True)
            self._forget(key, evaluator)
            await evaluator.close()
        return False

    def _forget(self, key: _Key, evaluator: ReplEvaluator) -> bool:
        """Drop `evaluator` if it is still the one kept for `key`; whether it was."""
        if self._evaluators.peek(key) is not evaluator:
            return False
        self._evaluators.pop(key)
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
                # Said in the log: nixery_nix_processes_running{command="nix-repl"} drops with it.
                log.info("nix.evaluator_stopped", reason="idle", seconds=self.idle_seconds, system=key[0],
                         note="the next name to evaluate starts another")
                self._stop_when_free(evaluator)

        self._idle_timers[key] = asyncio.get_running_loop().call_later(self.idle_seconds, stop_if_still_idle)

    def _stop_when_free(self, evaluator: ReplEvaluator) -> None:
        async def stop() -> None:
            async with evaluator.lock:
                await evaluator.close()

        spawn(stop(), failure_event="evaluator.stop_failed", keep=self._closing, system=evaluator.system)


async def check_import(pkgs_path: Path, system: str, *, deadline: Deadline, memory_limit: int | None) -> None:
    """Import the package set as a repl does, with nix-instantiate (which prints every
    error); raises NixError, with Nix's message, if it does not import."""
    try:
        await run_nix(
            [
                "nix-instantiate", "--eval", "--read-write-mode", *NIX_FEATURES, str(EVALUATOR_NIX), "-A", "warm",
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
