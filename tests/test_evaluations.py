"""Evaluations kept per name: a new image of names seen before, all built, runs no
Nix process, and gives the same image as a registry that evaluates it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from nixery import evaluations, maintenance
from nixery.evaluations import EvaluationCache
from nixery.images import ImageRecord, ManifestRef
from nixery.nix import store_db
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import ManifestFormat
from nixery.resolver import ResolvedPackage, Revision
from nixery.storage.filesystem import FilesystemStorage
from tests.registry import RegistryProcess, busybox_set_with, nix_call_count

REVISION = Revision("path /pkgs", "tree-abc", None)
SYSTEM = "x86_64-linux"


def nix_calls_since(calls: Path, before: int) -> list[str]:
    return calls.read_text().splitlines()[before:]


def test_a_new_image_of_known_names_runs_no_nix_and_is_the_same_image(start_registry, nix_calls) -> None:
    path, calls = nix_calls
    # Bytes only: the price of a layer packs small pieces by what the history holds, and
    # the fresh registry below has another history.
    registry: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", PATH=path, NIXERY_LAYER_COST_MB="0")
    registry.manifest("shell/hello")
    registry.manifest("cowsay")
    before = nix_call_count(calls)
    digest, manifest = registry.manifest("cowsay/hello/shell")  # never pulled, every name known
    assert nix_calls_since(calls, before) == []
    assert registry.log_events("build.realising")[-1]["evaluated"] is False

    # The same image from a registry that evaluates the names (empty storage: another layering
    # history, which may split a closure differently, but not these small ones).
    fresh: RegistryProcess = start_registry(NIXERY_BUNDLED_SET="busybox", PATH=path, NIXERY_LAYER_COST_MB="0")
    before = nix_call_count(calls)
    assert fresh.manifest("cowsay/hello/shell") == (digest, manifest)
    assert any(call.startswith("nix-instantiate --eval") for call in nix_calls_since(calls, before))
    assert fresh.log_events("build.realising")[-1]["evaluated"] is True

    # Kept in storage: a restarted registry knows them too.
    registry.stop()
    warmed = len(registry.log_events("nix.evaluator_ready"))
    registry.start()
    # Its start-up warms an evaluator (a nix repl) in the background while /v2/ already
    # answers: that is start-up work, not the pull's.
    deadline = time.monotonic() + 30
    while len(registry.log_events("nix.evaluator_ready")) == warmed:
        assert time.monotonic() < deadline, "the evaluator was not warmed up"
        time.sleep(0.1)
    before = nix_call_count(calls)
    registry.manifest("hello/shell")
    assert nix_calls_since(calls, before) == []


def test_an_edited_package_set_is_evaluated_again(start_registry, nix_calls, tmp_path: Path) -> None:
    path, calls = nix_calls
    pkgs = busybox_set_with(tmp_path / "pkgs", "greeting", "greeting-1", "$bb/mkdir -p $out; echo hi > $out/hi")
    registry: RegistryProcess = start_registry(NIXERY_PKGS_PATH=str(pkgs), PATH=path)
    registry.manifest("greeting")
    registry.manifest("hello")
    (pkgs / "default.nix").write_text((pkgs / "default.nix").read_text() + "\n# edited\n")
    before = nix_call_count(calls)
    registry.manifest("greeting/hello")  # known names, but of another revision
    assert any(call.startswith("nix-instantiate --eval") for call in nix_calls_since(calls, before))


def package(name: str, attr: str, out: str) -> ResolvedPackage:
    return ResolvedPackage(name, attr, attr.lower(), f"/nix/store/{'d' * 32}-{attr}.drv", (out,), None)


SHELL = [
    package("shell", "bash", f"/nix/store/{'a' * 32}-bash"),
    package("shell", "coreutils", f"/nix/store/{'b' * 32}-cu"),
]
HELLO = [package("hello", "hello", f"/nix/store/{'c' * 32}-hello")]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The store paths the store database reports as valid (all of these by default)."""
    valid = {out for p in SHELL + HELLO for out in p.outputs}

    async def valid_paths(paths):
        return frozenset(set(paths) & valid)

    monkeypatch.setattr(store_db, "valid_paths", valid_paths)
    return valid


async def remembered(cache: EvaluationCache, revision: Revision, system: str, resolved: list) -> None:
    """`remember`, and its writes to storage finished."""
    cache.remember(revision, system, resolved)
    await cache.flush()


def test_every_name_must_be_known_and_every_output_built(tmp_path: Path, built: set[str]) -> None:
    async def scenario() -> None:
        cache = EvaluationCache(FilesystemStorage(tmp_path))
        assert await cache.lookup(REVISION, SYSTEM, ["hello", "shell"]) is None
        await remembered(cache, REVISION, SYSTEM, HELLO + SHELL)
        # In evaluation order: name by name, a name's packages (shell: two) in their order.
        assert await cache.lookup(REVISION, SYSTEM, ["hello", "shell"]) == HELLO + SHELL
        assert await cache.lookup(REVISION, SYSTEM, ["hello", "shell", "curl"]) is None
        assert await cache.lookup(Revision("path /pkgs", "tree-other", None), SYSTEM, ["hello"]) is None
        assert await cache.lookup(REVISION, "aarch64-linux", ["hello"]) is None
        built.discard(SHELL[1].outputs[0])  # collected by Nix's garbage collector
        assert await cache.lookup(REVISION, SYSTEM, ["hello", "shell"]) is None
        assert await cache.lookup(REVISION, SYSTEM, ["hello"]) == HELLO

    asyncio.run(scenario())


def test_answers_come_back_from_storage_and_a_damaged_one_is_evaluated_again(
    tmp_path: Path, built: set[str]
) -> None:
    async def scenario() -> None:
        storage = FilesystemStorage(tmp_path)
        await remembered(EvaluationCache(storage), REVISION, SYSTEM, HELLO + SHELL)
        restarted = EvaluationCache(storage)
        assert await restarted.lookup(REVISION, SYSTEM, ["shell"]) == SHELL
        key = evaluations.PREFIX + evaluations.evaluation_key(REVISION, SYSTEM, "hello")
        await storage.put_meta(key, b'{"packages": [{"name": "hello"}]}')
        assert await EvaluationCache(storage).lookup(REVISION, SYSTEM, ["hello"]) is None

    asyncio.run(scenario())


def test_without_the_store_database_names_are_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def unknown(paths):
        return None

    monkeypatch.setattr(store_db, "valid_paths", unknown)

    async def scenario() -> None:
        cache = EvaluationCache(FilesystemStorage(tmp_path))
        await remembered(cache, REVISION, SYSTEM, HELLO)
        assert await cache.lookup(REVISION, SYSTEM, ["hello"]) is None

    asyncio.run(scenario())


def test_gc_drops_evaluations_of_revisions_no_kept_image_uses(tmp_path: Path, built: set[str]) -> None:
    live, gone = Revision("path /pkgs", "tree-live", None), Revision("path /pkgs", "tree-gone", None)

    async def scenario() -> None:
        storage = FilesystemStorage(tmp_path)
        config = Digest.of(b"{}")
        record = ImageRecord(
            key="k" * 64, name="hello/shell", source=live.source, revision=live.id, packages=("hello", "shell"),
            architecture="amd64", config=config, manifests={ManifestFormat.DOCKER: ManifestRef(config, 2)},
            layers=(), built_at=time.time(),
        )
        await storage.put_meta(f"images/{record.key}", record.to_json())  # young: kept
        for revision in (live, gone):
            await remembered(EvaluationCache(storage), revision, SYSTEM, HELLO + SHELL)
        await storage.put_meta(evaluations.PREFIX + "0" * 64, b"not json")  # unreadable: goes

        dry = await maintenance.collect_garbage(storage, older_than=30 * 86400, dry_run=True)
        assert dry.evaluations_removed == 3 and len(await storage.list_meta(evaluations.PREFIX)) == 5
        report = await maintenance.collect_garbage(storage, older_than=30 * 86400)
        assert (report.images_kept, report.evaluations_removed) == (1, 3)
        assert await EvaluationCache(storage).lookup(live, SYSTEM, ["hello", "shell"]) == HELLO + SHELL
        assert await EvaluationCache(storage).lookup(gone, SYSTEM, ["hello"]) is None

    asyncio.run(scenario())
