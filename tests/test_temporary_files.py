"""What a registry killed outright leaves in TMPDIR (nixery.scratch)."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.registry import RegistryProcess
from tests.test_workers import eventually


def _started(start_registry, temporary: Path) -> tuple[RegistryProcess, Path]:
    """A registry on the busybox set whose evaluator and layer writers are running; its directory."""
    before = set(temporary.glob("nixery-run-*"))
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", TMPDIR=str(temporary))
    eventually(lambda: registry.log_events("nix.evaluator_ready"), "the evaluator starts")
    eventually(lambda: registry.log_events("layers.writers_ready"), "the layer writers start")
    assert not registry.log_events("layers.writers_in_threads")  # their socket's path is short enough
    (own,) = set(temporary.glob("nixery-run-*")) - before
    return registry, own


def test_a_registry_removes_what_a_killed_one_left_and_nothing_a_live_one_uses(start_registry, temporary: Path) -> None:
    """A registry ended by `kill -9` or the OOM killer left its evaluator's directory
    (`nixery-eval-*`) and multiprocessing's (`pymp-*`) in TMPDIR, a set per crash for as long as
    the machine ran. Now the next registry to start removes them, and leaves alone those of a
    registry that still runs beside it."""
    killed, killed_directory = _started(start_registry, temporary)
    live, live_directory = _started(start_registry, temporary)
    assert killed_directory.exists(), "a starting registry removed a live one's directory"
    assert [path.name[:12] for path in killed_directory.glob("nixery-eval-*")] == ["nixery-eval-"]
    assert list(killed_directory.glob("pymp-*"))

    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(30)
    assert killed_directory.exists()  # nothing removes it as the registry dies

    restarted, restarted_directory = _started(start_registry, temporary)
    assert not killed_directory.exists()
    assert live_directory.exists() and list(live_directory.glob("nixery-eval-*"))
    eventually(lambda: restarted.log_events("registry.temporary_files_removed"), "the leftovers are removed")
    (removed,) = restarted.log_events("registry.temporary_files_removed")
    assert removed["directories"] == [killed_directory.name]
    for registry in (live, restarted):  # each builds with its evaluator and layer writers
        assert registry.request("/v2/hello/manifests/latest")[0] == 200

    live.stop()
    restarted.stop()
    assert list(temporary.iterdir()) == []
