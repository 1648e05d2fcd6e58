"""Image packages through Nix: evaluate names, build derivations, read closures."""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from nixery.closure import ClosureGraph, GraphError, Registration, registrations_from_path_info
from nixery.nix import store_db
from nixery.nix.errors import NixError, NixTimeout, PackagesNotFound, UnsupportedSystem
from nixery.nix.evaluator import Evaluators
from nixery.nix.process import NIX_FEATURES, Deadline, run_nix
from nixery.resolver import ResolvedPackage

log = structlog.get_logger(__name__)

EVAL_NIX = Path(__file__).with_name("eval.nix")
_HOST_SYSTEMS = {
    "x86_64": "x86_64-linux",
    "amd64": "x86_64-linux",
    "aarch64": "aarch64-linux",
    "arm64": "aarch64-linux",
}


def host_system() -> str:
    return _HOST_SYSTEMS.get(platform.machine(), f"{platform.machine()}-linux")


#: What Nix says when it cannot build a derivation for another system: no
#: machine (this one or a remote builder) of that system with the features it
#: needs, or a builder this machine cannot execute (no emulation).
_CANNOT_BUILD = ("is required to build", "Exec format error")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f]+")


def _platform_options(system: str | None) -> list[str]:
    """Nix options that let this machine build derivations of `system` (None: its own) itself.

    `extra-extra-platforms` adds `system` to nix.conf's `extra-platforms`
    (`extra-platforms` itself would replace the list). Nix still substitutes,
    or hands a derivation to a remote builder of that system, where it can.
    """
    return [] if system in (None, host_system()) else ["--option", "extra-extra-platforms", system]


def _cannot_build(system: str | None, error: NixError) -> UnsupportedSystem | None:
    """The UnsupportedSystem that `error` of a build for `system` is, if it is one:
    what Nix said, and what would make it work."""
    if isinstance(error, NixTimeout) or not _platform_options(system):  # a failure of the build itself
        return None
    # Nix 2.8 prints a builder's exec failure amid NUL bytes of its serialised error: keep the
    # printable run that says it.
    runs = (run.strip() for line in error.log_tail.splitlines() for run in _CONTROL_CHARACTERS.split(line))
    said = next((run for run in runs if any(marker in run for marker in _CANNOT_BUILD)), None)
    if said is None:
        return None
    return UnsupportedSystem(
        f"this registry runs on {host_system()} and Nix could not build for {system}: {said} "
        f"(a remote builder for {system} in nix.conf's `builders`, or `extra-platforms` with "
        f"emulation of {system} through binfmt_misc, e.g. qemu-user-static, would make it work)",
        error.log_tail,
    )


async def evaluate(
    pkgs_path: Path,
    names: Sequence[str],
    system: str,
    *,
    source: str,
    deadline: Deadline,
    evaluators: Evaluators | None = None,
    revision: str = "",
) -> list[ResolvedPackage]:
    """Resolve image names in the package set at `pkgs_path` (of `revision`).

    With `evaluators`, a long-running repl answers when it can; otherwise, or
    when it cannot take the request, one `nix-instantiate` does, with what is
    left of `deadline` and the evaluators' memory limit.
    """
    request = {"packages": list(names), "system": system}
    stdout = None
    if evaluators is not None:
        stdout = await evaluators.evaluate(revision, pkgs_path, request, system=system, deadline=deadline)
    if stdout is None:
        started = time.monotonic()
        stdout = await run_nix(
            [
                "nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", *NIX_FEATURES, str(EVAL_NIX),
                "--argstr", "pkgsPath", str(pkgs_path), "--argstr", "request", json.dumps(request),
            ],
            deadline=deadline,
            memory_limit=None if evaluators is None else evaluators.memory_limit,
        )
        if evaluators is not None:
            evaluators.note_one_shot(time.monotonic() - started)
    try:
        result = json.loads(stdout)
        missing = [str(name) for name in result["missing"]]
        packages = [ResolvedPackage.from_json(p) for p in result["packages"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise NixError(f"unexpected output from the evaluation: {exc}") from exc
    if missing:
        raise PackagesNotFound(sorted(set(missing)), source)
    return packages


async def ensure_built_closure(
    drv_paths: Sequence[str],
    out_paths: Sequence[str],
    *,
    system: str | None = None,
    deadline: Deadline,
    on_line: Callable[[str], None] | None = None,
) -> ClosureGraph:
    """Build what is not built yet, then return the closure of `out_paths`, by `deadline`.

    When every output is built already (the common case), this reads Nix's store
    database instead of starting any Nix process; see `nixery.nix.store_db`.
    """
    # One read answers both questions: the closure is only found when every output is valid.
    graph = await store_db.closure_graph(out_paths)
    if graph is not None:
        log.debug("nix.realise_skipped", outputs=len(set(out_paths)))
        return graph
    await realise(drv_paths, system=system, deadline=deadline, on_line=on_line)
    return await closure_graph(out_paths, deadline=deadline)


async def realise(
    drv_paths: Sequence[str],
    *,
    system: str | None = None,
    deadline: Deadline,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Build (or find already built) every derivation, for `system` (None: this machine's),
    with `nix-store --realise`.

    Not bounded in memory: the builders are the package set's own programs.
    Whether another system can be built is Nix's to say (a binary cache, a
    remote builder, emulation); when it cannot, this raises UnsupportedSystem
    with what Nix said.
    """
    try:
        await run_nix(
            ["nix-store", "--realise", *_platform_options(system), *sorted(set(drv_paths))],
            deadline=deadline, on_line=on_line, builds=True,
        )
    except NixError as exc:
        if (unsupported := _cannot_build(system, exc)) is not None:
            raise unsupported from exc
        raise


async def registrations(paths: Sequence[str], *, deadline: Deadline) -> list[Registration]:
    """What Nix records of each of `paths`, from the store database or else `nix path-info`."""
    found = await store_db.registrations(paths)
    if found is not None:
        return found
    stdout = await run_nix(["nix", "path-info", "--json", *sorted(set(paths))], deadline=deadline)
    try:
        return registrations_from_path_info(stdout)
    except GraphError as exc:
        raise NixError(f"cannot read the store paths' records: {exc}") from exc


async def closure_graph(out_paths: Sequence[str], *, deadline: Deadline) -> ClosureGraph:
    """The closure of `out_paths`, from the store database or else `nix path-info`."""
    graph = await store_db.closure_graph(out_paths)
    if graph is not None:
        return graph
    stdout = await run_nix(
        ["nix", "path-info", "--json", "--recursive", *sorted(set(out_paths))], deadline=deadline
    )
    try:
        return ClosureGraph.from_path_info(stdout)
    except GraphError as exc:
        raise NixError(f"cannot read the closure: {exc}") from exc
