from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nixery.config import debian_set
from tests.registry import REPOSITORY, RegistryProcess, nix_counting_path, run

# The processes tests stop with Ctrl-C (SIGINT) inherit this process's blocked and ignored signals:
# a run started where SIGINT is blocked or ignored (as some shells and supervisors start background
# jobs) saw them run on to the end. They start with SIGINT as a terminal's job has it.
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def start_registry(tmp_path: Path) -> Iterator[Callable[..., RegistryProcess]]:
    """Start `nixery serve` processes; each gets fresh storage unless given one."""
    started: list[RegistryProcess] = []

    def start(storage: Path | None = None, *, open_files: int | None = None, **env: str) -> RegistryProcess:
        storage = storage or tmp_path / f"storage-{len(started)}"
        registry = RegistryProcess(storage=storage, env=env, log_path=tmp_path / f"registry-{len(started)}.log",
                                   open_files=open_files)
        started.append(registry)
        return registry.start()

    yield start
    for registry in started:
        registry.stop()


@pytest.fixture
def temporary() -> Iterator[Path]:
    """An empty directory for TMPDIR, removed afterwards, with a short path: the registry's layer
    writers talk over a Unix socket that it holds some levels down (nixery.scratch), whose path
    may not pass 107 bytes; under pytest's `tmp_path` they ran in threads instead."""
    path = Path(tempfile.mkdtemp(prefix="nixery-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def registry(start_registry: Callable[..., RegistryProcess]) -> RegistryProcess:
    """A registry on the busybox package set with empty storage."""
    return start_registry(NIXERY_BUNDLED_SET="busybox")


@pytest.fixture(scope="session")
def nix_calls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A PATH whose nix commands log each call to a file before running Nix."""
    directory = tmp_path_factory.mktemp("nix-wrappers")
    return nix_counting_path(directory)


@pytest.fixture(scope="session")
def shared_registry(tmp_path_factory: pytest.TempPathFactory, nix_calls: tuple[str, Path]) -> Iterator[RegistryProcess]:
    """One registry for the whole session (busybox set, the failing test set's
    packages included), with Nix calls counted."""
    base = tmp_path_factory.mktemp("shared-registry")
    path, _ = nix_calls
    registry = RegistryProcess(
        storage=base / "storage",
        env={"PATH": path, "NIXERY_PKGS_PATH": str(Path(__file__).parent / "data" / "failing"), "NIX_TIMEOUT": "20"},
        log_path=base / "registry.log",
    )
    registry.start()
    # Its warm-up starts a Nix evaluator in the background: tests that count Nix calls must not
    # count that one, whichever test comes first.
    deadline = time.monotonic() + 120
    while not registry.log_events("nix.evaluator_ready"):
        assert time.monotonic() < deadline, f"the registry's evaluator did not start: {registry.log()[-2000:]}"
        time.sleep(0.05)
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def built_store_paths() -> dict[str, str]:
    """Store paths that tests read directly, built here (CI starts with an empty store):
    the busybox set's `busybox` (no references) and `hello`, and with the Debian-derived
    set generated, its `python3` and `git` (thousands of files, as real packages have)."""
    def build(expression: Path, *attrs: str) -> list[str]:
        argv = ["nix-build", "--no-out-link", str(expression), *(a for attr in attrs for a in ("-A", attr))]
        return run(argv, timeout=900).stdout.split()

    paths = dict(zip(["busybox", "hello"], build(REPOSITORY / "pkgs" / "busybox", "busybox", "hello"), strict=True))
    if (debian_set().path / "default.nix").is_file():
        outputs = build(debian_set().path, "python3", "git")
        paths |= {"python3": outputs[0], "git": outputs[-1]}
    return paths
