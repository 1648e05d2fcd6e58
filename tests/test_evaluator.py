"""The long-running evaluator (`nix repl`): the same answers as one
`nix-instantiate` per image, and a process that stops, restarts or steps aside
whenever it should. Real Nix throughout; one test puts a fake `nix` on PATH to
stand for a repl whose output this registry does not understand (a future Nix)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog
from prometheus_client import REGISTRY

from nixery.nix import packages, repl
from nixery.nix.errors import MemoryLimitExceeded, NixError, NixTimeout, PackagesNotFound
from nixery.nix.evaluator import Evaluators
from nixery.nix.process import Deadline
from nixery.nix.repl import ReplEvaluator, decode_nix_string
from tests.daemons import gone
from tests.registry import BASELINE_EVALUATIONS, nix_calls_of, nix_counting_path
from tests.test_protocol import error_of

pytestmark = pytest.mark.nix

PKGS = (Path(__file__).parent / "data" / "evaluator").resolve()
SYSTEM = packages.host_system()
# An evaluation that runs for hours in a flat ~450 MB (a sum of 10^10 numbers, 10^5 at a time).
SPIN = "(builtins.foldl' (acc: i: builtins.foldl' (a: j: a + j) acc (builtins.genList (x: x) 100000)) 0 " \
       "(builtins.genList (x: x) 100000))"


@pytest.fixture
async def evaluators() -> AsyncIterator[Evaluators]:
    pool = Evaluators(memory_limit=1 << 30)
    yield pool
    await pool.close()


async def resolve(pool: Evaluators | None, names: list[str], *, revision: str = "r1", pkgs: Path = PKGS,
                  timeout: float = 60) -> list[packages.ResolvedPackage]:
    return await packages.evaluate(pkgs, names, SYSTEM, source="test", deadline=Deadline.after(timeout),
                                   evaluators=pool, revision=revision)


def pids(pool: Evaluators) -> set[int]:
    return {evaluator._process.pid for evaluator in pool.running() if evaluator._process is not None}


def the_pid(pool: Evaluators) -> int:
    [pid] = pids(pool)
    return pid


@pytest.mark.parametrize("names", [
    ["shell", "hello"],
    ["HELLO", "figlet"],  # case-insensitive match
    ["nested.deeper.tool"],  # attribute path
    ["bash", "coreutils", "cowsay", "fortune", "greet", "libwords"],
])
async def test_answers_are_those_of_nix_instantiate(evaluators: Evaluators, names: list[str]) -> None:
    assert await resolve(evaluators, names) == await resolve(None, names)
    assert evaluators.running(), "the repl answered, not a fallback"


async def test_one_process_answers_every_image(evaluators: Evaluators) -> None:
    await resolve(evaluators, ["hello"])
    pid = the_pid(evaluators)
    for names in (["figlet"], ["shell", "cowsay"], ["hello"]):
        await resolve(evaluators, names)
    assert the_pid(evaluators) == pid


@pytest.mark.parametrize("name", [
    'x" + builtins.abort "injected',
    "${builtins.abort \"injected\"}",
    "a\\\nb",
    "__nixery.warm",
    "nixery-sync-1",
])
async def test_names_are_data_never_code(evaluators: Evaluators, name: str) -> None:
    with pytest.raises(PackagesNotFound) as caught:
        await resolve(evaluators, ["hello", name])
    assert caught.value.missing == [name]
    assert [p.attr for p in await resolve(evaluators, ["hello"])] == ["hello"], "the repl is still in step"


async def test_an_evaluation_error_is_reported_and_the_repl_goes_on(evaluators: Evaluators) -> None:
    await resolve(evaluators, ["hello"])
    pid = the_pid(evaluators)
    with pytest.raises(NixError) as caught:
        await resolve(evaluators, ["hello", "evalError"])
    assert "this package does not evaluate" in caught.value.log_tail
    assert [p.attr for p in await resolve(evaluators, ["figlet"])] == ["figlet"]
    assert the_pid(evaluators) == pid


async def test_a_busy_repl_is_not_waited_for(evaluators: Evaluators) -> None:
    await resolve(evaluators, ["hello"])
    slow = asyncio.ensure_future(resolve(evaluators, ["slowEval"]))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    quick = await resolve(evaluators, ["figlet"])  # a one-shot nix-instantiate, alongside
    quick_seconds = time.monotonic() - started
    assert [p.attr for p in quick] == ["figlet"]
    assert not slow.done(), f"the other image went on while slowEval was evaluated ({quick_seconds:.2f} s)"
    assert [p.attr for p in await slow] == ["slowEval"]


async def test_quick_requests_queue_for_the_repl_rather_than_start_nix(
    evaluators: Evaluators, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_shots = []
    real_run_nix = packages.run_nix

    async def counting_run_nix(argv, **kwargs):
        one_shots.append(argv)
        return await real_run_nix(argv, **kwargs)

    monkeypatch.setattr(packages, "run_nix", counting_run_nix)
    await resolve(evaluators, ["hello"])  # the typical answer: milliseconds
    names = ["figlet", "cowsay", "fortune", "greet", "bash", "coreutils"]
    answers = await asyncio.gather(*(resolve(evaluators, [name]) for name in names))
    assert [answer[0].attr for answer in answers] == names
    assert one_shots == [], "queued behind answers of a few ms rather than starting Nix"


async def test_a_queued_request_stops_waiting_behind_an_answer_that_runs_long(evaluators: Evaluators) -> None:
    await resolve(evaluators, ["hello"])  # answers take milliseconds, so the next one will queue
    slow = asyncio.ensure_future(resolve(evaluators, ["slowEval"]))
    await asyncio.sleep(0.01)
    quick = await resolve(evaluators, ["figlet"])  # queues, gives up after twice a one-shot's time
    assert [p.attr for p in quick] == ["figlet"]
    assert not slow.done(), "figlet did not wait for slowEval (about 1 s)"
    await slow


async def test_a_timeout_kills_the_repl_and_the_next_image_gets_a_new_one(evaluators: Evaluators) -> None:
    await resolve(evaluators, ["hello"])
    pid = the_pid(evaluators)
    with pytest.raises(NixTimeout):
        await resolve(evaluators, ["endlessEval"], timeout=1)
    assert gone(pid)
    assert [p.attr for p in await resolve(evaluators, ["hello"])] == ["hello"]
    assert the_pid(evaluators) != pid


async def test_a_cancelled_evaluation_kills_the_repl(evaluators: Evaluators) -> None:
    await resolve(evaluators, ["hello"])
    pid = the_pid(evaluators)
    task = asyncio.ensure_future(resolve(evaluators, ["endlessEval"]))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(pid)
    assert [p.attr for p in await resolve(evaluators, ["figlet"])] == ["figlet"]


@pytest.mark.parametrize("moment", ["process-starting", "set-importing"])
async def test_a_start_cancelled_midway_leaves_no_dead_evaluator(
    evaluators: Evaluators, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moment: str
) -> None:
    """A build cancelled (a registry shutting down) while its evaluator's `nix repl` was being
    started left that evaluator kept as started, though no repl ran: every later image of the
    revision went to the slower `nix-instantiate`, for as long as the registry ran, and the
    evaluator's directory stayed. Now a start cancelled anywhere leaves nothing behind, and the
    next image starts a new repl."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the evaluator's directory goes
    reached, release = asyncio.Event(), asyncio.Event()
    real_start = repl.start_child

    async def held_start(*args, **kwargs):  # type: ignore[no-untyped-def]
        if moment == "process-starting":
            reached.set()
            await release.wait()  # the cancellation comes here, before the process is there
        started = await real_start(*args, **kwargs)
        reached.set()  # the cancellation comes while the repl imports the set
        return started

    monkeypatch.setattr(repl, "start_child", held_start)
    first = asyncio.ensure_future(resolve(evaluators, ["hello"]))
    await asyncio.wait_for(reached.wait(), 30)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert not evaluators.running()
    assert list(tmp_path.glob("nixery-eval-*")) == [], "the cancelled start left its directory"
    release.set()
    assert [p.attr for p in await resolve(evaluators, ["hello"])] == ["hello"]
    assert evaluators.running(), "answered by nix-instantiate, not by a new repl"


async def test_a_repl_killed_from_outside_is_replaced(evaluators: Evaluators) -> None:
    await resolve(evaluators, ["hello"])
    pid = the_pid(evaluators)
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    assert await resolve(evaluators, ["figlet"]) == await resolve(None, ["figlet"])
    assert [p.attr for p in await resolve(evaluators, ["hello"])] == ["hello"]
    assert the_pid(evaluators) != pid, "a new repl, not given up for good"


async def test_revisions_get_their_own_repl_and_the_least_recent_stops(
    evaluators: Evaluators, tmp_path: Path
) -> None:
    edited = tmp_path / "pkgs"
    edited.mkdir()
    (edited / "default.nix").write_text(f"args: (import {PKGS} args) // {{ hello = (import {PKGS} args).figlet; }}\n")
    assert await resolve(evaluators, ["hello"]) == await resolve(None, ["hello"])
    [first] = pids(evaluators)
    [renamed] = await resolve(evaluators, ["hello"], revision="r2", pkgs=edited)
    assert renamed.drv_path == (await resolve(None, ["figlet"]))[0].drv_path
    assert await resolve(evaluators, ["hello"]) == await resolve(None, ["hello"]), "r1 is still its own"
    assert len(pids(evaluators)) == 2 and first in pids(evaluators)
    second = (pids(evaluators) - {first}).pop()
    await resolve(evaluators, ["hello"])  # r1 used last: r2 is the least recent
    await resolve(evaluators, ["figlet"], revision="r3")
    await asyncio.sleep(0.2)
    assert gone(second)
    assert first in pids(evaluators) and len(pids(evaluators)) == 2


async def test_a_revision_in_another_directory_replaces_the_repl_of_the_first(
    evaluators: Evaluators, tmp_path: Path
) -> None:
    """A local path moved to a directory with the same files is the same revision; its repl reads
    the directory it started in, so the next image gets one of the new directory. The old one
    stayed for its idle time, in one of the two places, and pushed out another revision's."""
    moved = tmp_path / "pkgs"  # what the registry takes for the same files ("r1", as PKGS)
    moved.mkdir()
    (moved / "default.nix").write_text(f"args: import {PKGS} args\n")
    await resolve(evaluators, ["figlet"], revision="other")
    await resolve(evaluators, ["hello"])
    other, first = the_pids_in_order(evaluators)
    assert await resolve(evaluators, ["hello"], pkgs=moved) == await resolve(None, ["hello"], pkgs=moved)
    await asyncio.sleep(0.2)
    assert gone(first) and other in pids(evaluators) and len(pids(evaluators)) == 2
    assert [evaluator.pkgs_path for evaluator in evaluators.running()][-1] == moved


def the_pids_in_order(pool: Evaluators) -> list[int]:
    """The running repls' process ids, least recently used first."""
    return [evaluator._process.pid for evaluator in pool.running() if evaluator._process is not None]


async def test_an_idle_repl_stops() -> None:
    pool = Evaluators(memory_limit=1 << 30, idle_seconds=0.5)
    try:
        await resolve(pool, ["hello"])
        pid = the_pid(pool)
        await asyncio.sleep(1.5)
        assert gone(pid)
        assert not pool.running()
        assert [p.attr for p in await resolve(pool, ["figlet"])] == ["figlet"]
    finally:
        await pool.close()


def repl_gauge() -> float:
    return REGISTRY.get_sample_value("nixery_nix_processes_running", {"command": "nix-repl"}) or 0.0


def repl_children() -> int:
    listing = subprocess.run(["ps", "-o", "args=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    return sum(line.startswith("nix repl") for line in listing.stdout.splitlines())


async def test_the_repl_gauge_follows_the_repls_one_per_revision_through_warm_up_and_idle_stops() -> None:
    """nixery_nix_processes_running{command="nix-repl"} is this process's repls, as they run.
    Requests that come while the warm-up starts the repl wait for it (they started a second
    one), and the stop after the idle time is logged (the gauge went to 0 without a word)."""
    before = repl_gauge()
    pool = Evaluators(memory_limit=1 << 30, idle_seconds=1)
    try:
        with structlog.testing.capture_logs() as logs:
            warm = asyncio.ensure_future(pool.warm("r1", PKGS, system=SYSTEM, deadline=Deadline.after(60)))
            await asyncio.sleep(0)  # the warm-up is starting its repl
            await asyncio.gather(warm, resolve(pool, ["hello"]), resolve(pool, ["figlet"]))
            assert [entry["event"] for entry in logs].count("nix.evaluator_ready") == 1
            assert repl_gauge() - before == 1 == repl_children()

            deadline = time.monotonic() + 10
            while repl_children() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert repl_gauge() - before == 0 == repl_children()
            [stopped] = [entry for entry in logs if entry["event"] == "nix.evaluator_stopped"]
            assert stopped["reason"] == "idle"

        await resolve(pool, ["hello"])
        assert repl_gauge() - before == 1 == repl_children()
    finally:
        await pool.close()
    assert repl_gauge() - before == 0 == repl_children()


async def test_a_repl_past_its_memory_limit_after_an_answer_is_replaced() -> None:
    pool = Evaluators(memory_limit=1 << 30)
    try:
        await resolve(pool, ["hello"])
        pid = the_pid(pool)
        # Lowered for the pool's check after each answer, not for the running repl's
        # own watch (which keeps the limit it was started with).
        pool.memory_limit = 1
        assert [p.attr for p in await resolve(pool, ["figlet"])] == ["figlet"]
        await asyncio.sleep(0.2)
        assert gone(pid) and not pool.running()
    finally:
        await pool.close()


MEMORY_LIMIT = 64 << 20  # the least NIXERY_EVALUATOR_MEMORY_MB; a repl of this set holds ~26 MB


async def test_an_evaluation_past_the_memory_limit_is_stopped_and_says_so() -> None:
    pool = Evaluators(memory_limit=MEMORY_LIMIT)
    try:
        await resolve(pool, ["hello"])
        pid = the_pid(pool)
        with pytest.raises(MemoryLimitExceeded) as caught:  # in the repl, then in nix-instantiate
            await resolve(pool, ["memoryHog"])
        assert "NIXERY_EVALUATOR_MEMORY_MB=64 MB" in caught.value.message
        assert gone(pid)
        assert [p.attr for p in await resolve(pool, ["hello"])] == ["hello"], "a new repl serves"
    finally:
        await pool.close()


async def test_an_evaluation_by_process_is_bounded_too() -> None:
    pool = Evaluators(memory_limit=MEMORY_LIMIT, repl=False)
    with pytest.raises(MemoryLimitExceeded):
        await resolve(pool, ["memoryHog"])
    assert [p.attr for p in await resolve(pool, ["hello"])] == ["hello"]


async def test_a_warm_up_past_the_memory_limit_is_logged_naming_it(tmp_path: Path) -> None:
    (tmp_path / "default.nix").write_text(
        f"args: builtins.seq (builtins.length (builtins.genList (x: x) 10000000)) (import {PKGS} args)\n"
    )
    pool = Evaluators(memory_limit=MEMORY_LIMIT)
    try:
        with structlog.testing.capture_logs() as logs:
            await pool.warm("hog", tmp_path, system=SYSTEM, deadline=Deadline.after(60))
        [event] = [e for e in logs if e["event"] == "nix.package_set_does_not_import"]
        assert event["log_level"] == "error"
        assert "NIXERY_EVALUATOR_MEMORY_MB=64 MB" in event["error"]
        assert not pool.running()
    finally:
        await pool.close()


async def test_warm_up_imports_the_set_before_the_first_image(evaluators: Evaluators) -> None:
    await evaluators.warm("r1", PKGS, system=SYSTEM, deadline=Deadline.after(60))
    pid = the_pid(evaluators)
    await resolve(evaluators, ["hello"])
    assert the_pid(evaluators) == pid


async def test_a_set_that_does_not_import_falls_back_to_nix_instantiate(evaluators: Evaluators, tmp_path: Path) -> None:
    (tmp_path / "default.nix").write_text('args: throw "this set is broken"\n')
    with pytest.raises(NixError) as by_process:
        await resolve(None, ["hello"], pkgs=tmp_path)
    with pytest.raises(type(by_process.value)) as caught:
        await resolve(evaluators, ["hello"], pkgs=tmp_path)
    assert str(caught.value) == str(by_process.value)
    assert not evaluators.running()


async def test_a_file_cut_short_is_reported_at_once_and_the_repl_goes_on(evaluators: Evaluators) -> None:
    await resolve(evaluators, ["hello"])
    pid = the_pid(evaluators)
    # nix repl does not print this error: it waits for the rest of the "line" (here, until the timeout).
    with pytest.raises(NixError) as caught:
        await resolve(evaluators, ["cutShort"], timeout=20)
    assert not isinstance(caught.value, NixTimeout)
    assert "unexpected end of file" in caught.value.log_tail
    assert "cut-short.nix:2" in caught.value.log_tail
    assert [p.attr for p in await resolve(evaluators, ["figlet"])] == ["figlet"]
    assert the_pid(evaluators) == pid, "the repl is in step again"


def cut_short_set(directory: Path) -> tuple[Path, str]:
    """A package set whose default.nix is cut off mid-file; returns it and where Nix says it ends."""
    directory.mkdir()
    (directory / "default.nix").write_text(f"args: (import {PKGS} args) // {{\n  extra = \n")
    return directory, f"{directory}/default.nix:2:"


async def test_a_set_cut_short_is_logged_at_warm_up_and_not_started_again(
    evaluators: Evaluators, tmp_path: Path
) -> None:
    pkgs, where = cut_short_set(tmp_path / "cut")
    with structlog.testing.capture_logs() as logs:
        await evaluators.warm("cut", pkgs, system=SYSTEM, deadline=Deadline.after(20))
    [event] = [e for e in logs if e["event"] == "nix.package_set_does_not_import"]
    assert event["log_level"] == "error"
    assert "unexpected end of file" in event["nix"] and where in event["nix"]
    assert not evaluators.running()
    with pytest.raises(NixError) as caught:
        await resolve(evaluators, ["hello"], revision="cut", pkgs=pkgs)
    assert where in caught.value.log_tail
    assert not evaluators.running(), "this revision is evaluated by nix-instantiate"


async def test_one_deadline_covers_the_repl_and_nix_instantiate(evaluators: Evaluators, tmp_path: Path) -> None:
    (tmp_path / "default.nix").write_text(f"args: builtins.seq {SPIN} (import {PKGS} args)\n")
    started = time.monotonic()
    with pytest.raises(NixTimeout):  # the repl's import runs out of time: no nix-instantiate after it
        await resolve(evaluators, ["hello"], revision="spin", pkgs=tmp_path, timeout=4)
    seconds = time.monotonic() - started
    assert seconds < 4 + 3, f"answered after {seconds:.1f} s"


async def test_a_repl_it_cannot_understand_is_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands for another Nix version's repl: it answers every line with something else.
    fake = tmp_path / "bin" / "nix"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nwhile read -r line; do echo "surprise"; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    pool = Evaluators(memory_limit=1 << 30)
    try:
        assert [p.attr for p in await resolve(pool, ["hello"], timeout=3)] == ["hello"]
        assert pool._unusable, "given up for good"
    finally:
        await pool.close()


async def test_without_a_nix_command_it_is_given_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    only_instantiate = tmp_path / "bin"
    only_instantiate.mkdir()
    (only_instantiate / "nix-instantiate").symlink_to(shutil.which("nix-instantiate"))
    monkeypatch.setenv("PATH", str(only_instantiate))
    pool = Evaluators(memory_limit=1 << 30)
    try:
        for _ in range(2):
            assert [p.attr for p in await resolve(pool, ["hello"])] == ["hello"]
        assert pool._unusable and not pool.running()
    finally:
        await pool.close()


def test_printed_strings_decode() -> None:
    assert decode_nix_string(r'"a\"b\\c\${d}\ne\tf"') == 'a"b\\c${d}\ne\tf'


async def test_a_request_for_another_system_is_refused() -> None:
    evaluator = ReplEvaluator(PKGS, SYSTEM)
    try:
        await evaluator.start(deadline=Deadline.after(60))
        with pytest.raises(NixError) as caught:
            await evaluator.evaluate({"packages": ["hello"], "system": "riscv64-linux"}, deadline=Deadline.after(60))
        assert "serves" in caught.value.log_tail
    finally:
        await evaluator.close()


def test_the_registry_evaluates_new_images_in_its_repl(start_registry, tmp_path: Path) -> None:
    (tmp_path / "wrappers").mkdir()
    path, calls = nix_counting_path(tmp_path / "wrappers")
    registry = start_registry(PATH=path, NIXERY_PKGS_PATH=str(PKGS))
    for image in ("hello", "figlet", "shell/cowsay"):
        status, _, _ = registry.request(f"/v2/{image}/manifests/latest")
        assert status == 200
    assert len(nix_calls_of(calls, "nix repl")) == 1, "one repl, started at start-up"
    assert len(nix_calls_of(calls, "nix-instantiate --eval (sent to nix repl)")) == 3 + BASELINE_EVALUATIONS
    assert nix_calls_of(calls, "nix-instantiate --eval --strict") == []
    status, _, body = registry.request("/v2/evalError/manifests/latest")
    assert status == 500 and "this package does not evaluate" in error_of(body)["message"]


def test_concurrent_new_images_all_build_in_the_repl_or_beside_it(start_registry, tmp_path: Path) -> None:
    (tmp_path / "wrappers").mkdir()
    path, calls = nix_counting_path(tmp_path / "wrappers")
    registry = start_registry(PATH=path, NIXERY_PKGS_PATH=str(PKGS), NIXERY_MAX_BUILDS="8")
    images = ["slowEval", "hello", "figlet", "cowsay", "fortune", "greet", "shell/hello", "bash/figlet"]

    def pull(image: str) -> int:
        return registry.request(f"/v2/{image}/manifests/latest")[0]

    with ThreadPoolExecutor(len(images)) as pool:
        slow = pool.submit(pull, images[0])
        time.sleep(0.3)  # slowEval is in the repl (about 1 s)
        others = pool.map(pull, images[1:])  # submitted now, while slowEval holds the repl
        statuses = [slow.result(), *others]
    assert statuses == [200] * len(images)
    by_repl = len(nix_calls_of(calls, "nix-instantiate --eval (sent to nix repl)"))
    by_process = len(nix_calls_of(calls, "nix-instantiate --eval --strict"))
    assert by_repl + by_process == len(images) + BASELINE_EVALUATIONS
    assert by_repl >= 1 and by_process >= 1, "slowEval held the repl: others went beside it"
    assert len(nix_calls_of(calls, "nix repl")) == 1


def test_evaluating_by_process_is_still_offered(start_registry, tmp_path: Path) -> None:
    (tmp_path / "wrappers").mkdir()
    path, calls = nix_counting_path(tmp_path / "wrappers")
    registry = start_registry(PATH=path, NIXERY_PKGS_PATH=str(PKGS), NIXERY_NIX_EVALUATOR="process")
    status, _, _ = registry.request("/v2/hello/manifests/latest")
    assert status == 200
    assert nix_calls_of(calls, "nix repl") == []
    assert len(nix_calls_of(calls, "nix-instantiate --eval --strict")) == 1 + BASELINE_EVALUATIONS

