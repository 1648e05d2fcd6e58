"""The worker processes of `nixery serve` with NIXERY_WORKERS above 1, as an operator sees them:
one that dies is replaced, workers that keep dying stop the registry, and a stop during start-up
leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import daemons
from tests.registry import REPOSITORY, RegistryProcess, free_port
from tests.test_metrics import scrape, total
from tests.test_shared_builds import answered_everywhere, events_until, post_build

pytestmark = pytest.mark.nix


def workers_of(registry: RegistryProcess) -> set[int]:
    pid = registry.process.pid
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def eventually(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def build_owner(temporary: Path, build_id: str) -> int:
    (journal,) = temporary.glob(f"nixery-run-*/nixery-builds-*/{build_id}.jsonl")
    return json.loads(journal.read_text().splitlines()[0])["pid"]


def builds_by_worker(
    registry: RegistryProcess, temporary: Path, workers: int, tries: int = 40,
) -> tuple[dict[int, str], int]:
    """A build started on each of `workers` workers (each POST on a fresh connection, which the
    kernel hands to any worker listening): the first build of each worker that answered, by pid;
    and how many were posted."""
    owners: dict[int, str] = {}
    posted = 0
    while len(owners) < workers and posted < tries:
        build_id = post_build(registry, "hello")["id"]
        posted += 1
        owners.setdefault(build_owner(temporary, build_id), build_id)
    return owners, posted


def test_a_worker_that_dies_is_replaced(start_registry, tmp_path: Path, temporary: Path) -> None:
    """A worker killed while serving (`kill -9`, as the OOM killer does) used to be gone for good:
    the registry served on with one worker fewer (none left: the registry ended). Now the parent
    logs how it ended and starts another on the same port, which answers as the others do; the
    dead worker's builds are still answered for, and SIGTERM stops everything (status 0)."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2", TMPDIR=str(temporary))
    eventually(lambda: len(registry.log_events("registry.listening")) == 2, "both workers listen")
    # Each line says which process wrote it: the two workers' own lines were alike.
    assert len({event["process"] for event in registry.log_events("registry.listening")}) == 2
    before, posted_before = builds_by_worker(registry, temporary, 2)
    assert len(before) == 2, "every build went to one worker"
    assert workers_of(registry) == set(before)
    dead, survivor = sorted(before)
    for build_id in before.values():
        assert events_until(registry, build_id, lambda events: False)[-1]["stage"] == "done"

    os.kill(dead, signal.SIGKILL)
    eventually(lambda: registry.log_events("worker.started"), "the dead worker is replaced")
    [ended] = registry.log_events("worker.ended")
    assert (ended["pid"], ended["ended"]) == (dead, "killed by SIGKILL")
    [started] = registry.log_events("worker.started")
    replacement = started["pid"]
    assert started["replaces"] == dead and replacement not in before
    assert workers_of(registry) == {survivor, replacement}
    eventually(lambda: len(registry.log_events("registry.listening")) == 3, "the replacement listens")
    # The dead worker's temporary files went with it (they stayed in TMPDIR, one set per kill):
    # only the two live workers' layer writers have a directory there.
    eventually(lambda: len(registry.log_events("layers.writers_ready")) == 3, "the replacement has layer writers")
    assert len(list(temporary.rglob("pymp-*"))) == 2

    after, posted_after = builds_by_worker(registry, temporary, 2)
    assert set(after) == {survivor, replacement}  # both answer; no connection goes to the dead one
    assert answered_everywhere(registry, before[dead])["stage"] == "done"  # its build, on fresh connections
    # The dead worker's counts stay in the sums: every POST is counted, the dead worker's too.
    assert total(scrape(registry), "nixery_http_requests_total", method="POST", route="/builds") == (
        posted_before + posted_after)

    # multiprocessing's resource trackers write to the log too, and the dead worker's tracker
    # warned in plain text about the semaphores it had left, as it ended after the stop.
    trackers = [pid for pid in daemons.process_tree(registry.process.pid) if b"resource_tracker" in _cmdline(pid)]
    assert trackers, "no resource tracker found: the check below would check nothing"
    registry.process.send_signal(signal.SIGTERM)
    assert registry.process.wait(30) == 0
    assert list(temporary.iterdir()) == []
    eventually(lambda: all(daemons.gone(pid) for pid in trackers), "the resource trackers end")
    assert registry.plain_text_lines() == []


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_stop_leaves_no_temporary_directory_of_the_workers(start_registry, tmp_path: Path, temporary: Path) -> None:
    """Each stop of a registry with several workers left one `pymp-*` directory per worker in
    TMPDIR (multiprocessing's, for the layer writers: the workers end by os._exit, which runs no
    exit handler); a registry restarted daily filled /tmp. Now a stop leaves TMPDIR as it was."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2", TMPDIR=str(temporary))
    eventually(lambda: len(registry.log_events("layers.writers_ready")) == 2, "both workers have layer writers")
    assert len(list(temporary.rglob("pymp-*"))) == 2
    registry.process.send_signal(signal.SIGTERM)
    assert registry.process.wait(30) == 0
    assert list(temporary.iterdir()) == []


def test_a_registry_whose_workers_all_died_serves_again(start_registry) -> None:
    """Every worker killed at once (the OOM killer on a busy machine): the registry used to end,
    status 0 as if stopped. Now each is replaced and the registry answers again."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2")
    eventually(lambda: len(registry.log_events("registry.listening")) == 2, "both workers listen")
    dead = workers_of(registry)
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    eventually(lambda: len(registry.log_events("registry.listening")) == 4, "both workers are replaced")
    assert {started["replaces"] for started in registry.log_events("worker.started")} == dead
    assert registry.process.poll() is None
    assert registry.request("/v2/")[0] == 200


def test_workers_that_keep_dying_stop_the_registry(start_registry, tmp_path: Path) -> None:
    """Workers that end within seconds of their start, again and again, are not restarted for
    ever: each replacement comes later than the last, and the third quick end stops the registry
    with one line and status 1 (before, nothing replaced them: the registry went on without)."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2")
    eventually(lambda: len(registry.log_events("registry.listening")) == 2, "both workers listen")
    victim = min(workers_of(registry))
    for replaced in range(3):
        os.kill(victim, signal.SIGKILL)
        if replaced == 2:
            break
        eventually(lambda count=replaced + 3: len(registry.log_events("registry.listening")) == count,
                   "the worker is replaced")
        victim = registry.log_events("worker.started")[-1]["pid"]
    assert registry.process.wait(60) == 1
    delays = [ended.get("replaced_in") for ended in registry.log_events("worker.ended")]
    assert delays == [1.0, 2.0, None]
    [problem] = [line for line in registry.log().splitlines() if line.startswith("nixery:")]
    assert problem == (f"nixery: 3 workers ended within 10 s of starting (the last, pid {victim}: killed by "
                       "SIGKILL): stopping the registry")


def test_a_stop_while_the_workers_start_leaves_nothing_behind(tmp_path: Path, temporary: Path) -> None:
    """SIGTERM that comes while `nixery serve` starts its workers (a deployment rolled back at
    once): the parent used to die of it before it could forward it, leaving its temporary
    directories (and any worker already started) behind. Now the workers started are stopped,
    the directories removed, and the registry ends with status 0, as for any stop."""
    env = {
        **os.environ, "PORT": str(free_port()), "NIXERY_WORKERS": "2", "STORAGE_PATH": str(tmp_path / "storage"),
        "NIXERY_BUNDLED_SET": "busybox", "LOG_FORMAT": "json", "TMPDIR": str(temporary),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "nixery", "serve"], env=env, cwd=REPOSITORY, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        eventually(lambda: list(temporary.glob("nixery-run-*/nixery-metrics-*")), "the registry makes its directories")
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, process.stdout.read() if process.stdout else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(temporary.iterdir()) == []


def test_sighup_stops_the_registry_and_its_workers(start_registry, tmp_path: Path, temporary: Path) -> None:
    """SIGHUP (a closed terminal, an init system's reload) killed the parent by its default action:
    its workers served on, orphaned, and its temporary directories stayed. Now it stops the registry
    as SIGTERM does: every worker ends, status 0, nothing left in TMPDIR or STORAGE_PATH/tmp."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2", TMPDIR=str(temporary))
    eventually(lambda: len(registry.log_events("registry.listening")) == 2, "both workers listen")
    workers = workers_of(registry)
    registry.process.send_signal(signal.SIGHUP)
    assert registry.process.wait(30) == 0
    assert [stopping["signal"] for stopping in registry.log_events("registry.stopping")] == ["SIGHUP", "SIGHUP"]
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "workers left running"
    assert list(temporary.iterdir()) == []
    assert list((registry.storage / "tmp").iterdir()) == []


def running(pid: int) -> bool:
    """Whether `pid` runs (not ended; a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_stop_when_their_parent_is_killed(start_registry, temporary: Path) -> None:
    """The parent killed by `kill -9` (the OOM killer, a crash) forwards no signal: its workers
    served on without a supervisor for good, and a registry started again on the same port shared
    it with them (SO_REUSEPORT), part of its connections answered by the old processes with the old
    code and settings. Now each worker sees its parent end and stops as on SIGHUP: nothing is left
    listening on the port, and their staging directories go."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_WORKERS="2", TMPDIR=str(temporary))
    eventually(lambda: len(registry.log_events("registry.listening")) == 2, "both workers listen")
    workers = workers_of(registry)
    assert len(workers) == 2
    registry.process.send_signal(signal.SIGKILL)
    registry.process.wait()
    eventually(lambda: not any(running(pid) for pid in workers), "the workers serve on without their parent", 30)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", registry.port), timeout=5):
        pass
    assert sorted(event["signal"] for event in registry.log_events("registry.stopping")) == ["SIGHUP", "SIGHUP"]
    assert list((registry.storage / "tmp").iterdir()) == []
