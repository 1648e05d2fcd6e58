from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.registry import RegistryProcess


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
