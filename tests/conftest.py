from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.registry import RegistryProcess, nix_counting_path


@pytest.fixture
def start_registry(tmp_path: Path) -> Iterator[Callable[..., RegistryProcess]]:
    """Start `nixery serve` processes; each gets fresh storage unless given one."""
    started: list[RegistryProcess] = []

    def start(storage: Path | None = None, **env: str) -> RegistryProcess:
        storage = storage or tmp_path / f"storage-{len(started)}"
        registry = RegistryProcess(storage=storage, env=env, log_path=tmp_path / f"registry-{len(started)}.log")
        started.append(registry)
        return registry.start()

    yield start
    for registry in started:
        registry.stop()


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
    yield registry
    registry.stop()
