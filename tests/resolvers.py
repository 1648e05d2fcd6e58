"""A stand-in for the Nix resolver, for tests of what the builder does with a closure.

A stand-in by design, not for want of Nix: tests that use it are about the
builder's own work (layering, storing and publishing layers, the image
store), which does not depend on how names were resolved. What it hands the
builder is real: store paths that Nix writes into the store for the test by
evaluation alone (`builtins.path`, `builtins.toFile`: no derivation is
built), and their closure graph as Nix reports it (`nix path-info`), with
the references Nix recorded.

Each package NAME is one output, a file `NAME` that names two other store
paths: its own data (`NAME-data`, a directory) and a `base` directory every
package shares, so images of different packages share a layer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from nixery.closure import ClosureGraph
from nixery.nix.errors import PackagesNotFound
from nixery.resolver import ResolvedPackage, Revision

_PACKAGES = """
{ dir, names }:
let
  base = builtins.path { path = dir + "/base"; name = "base"; };
  package = name: builtins.toFile name ''
    base: ${base}
    data: ${builtins.path { path = dir + "/${name}"; name = "${name}-data"; }}
  '';
in builtins.listToAttrs (map (name: { inherit name; value = package name; }) (builtins.fromJSON names))
"""


def add_packages(directory: Path, names: Sequence[str]) -> dict[str, str]:
    """Write the packages into the Nix store (evaluation only); each name's output path."""
    (directory / "base" / "lib").mkdir(parents=True, exist_ok=True)
    (directory / "base" / "lib" / "base.txt").write_text("shared by every package\n")
    for name in names:
        (directory / name / "share").mkdir(parents=True, exist_ok=True)
        (directory / name / "share" / f"{name}.txt").write_text(f"the data of {name}\n" * 100)
    expression = directory / "packages.nix"
    expression.write_text(_PACKAGES)
    result = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(expression),
         "--arg", "dir", str(directory), "--argstr", "names", json.dumps(list(names))],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return dict(json.loads(result.stdout))


class StorePathsResolver:
    """A `nixery.resolver.PackageResolver` over packages made by `add_packages`."""

    description = "test packages (stand-in resolver)"
    timeout = 120.0

    def __init__(self, outputs: dict[str, str], revision: str = "stand-in-1"):
        self.outputs = outputs
        self.revision = revision
        #: The names of every evaluation asked for, and the packages of every realisation.
        self.evaluated: list[tuple[str, ...]] = []
        self.realised: list[tuple[str, ...]] = []

    async def resolve(self, tag: str) -> Revision:
        return Revision(self.description, self.revision, None)

    async def evaluate(
        self, revision: Revision, names: Sequence[str], system: str, *, until: float
    ) -> list[ResolvedPackage]:
        self.evaluated.append(tuple(names))
        found = {name: attr for name in names if (attr := self._attr(name)) is not None}
        if missing := sorted(set(names) - set(found)):
            raise PackagesNotFound(missing, revision.source)
        return [
            ResolvedPackage(
                name, found[name], found[name].removeprefix("_") if found[name][1:2].isdigit() else found[name],
                drv_path="", outputs=(self.outputs[found[name]],), main_program=None,
            )
            for name in names
        ]

    def _attr(self, name: str) -> str | None:
        """The package `name` finds: itself, or `_7zz` for `7zz`, as resolve.nix finds them."""
        for attr in (name, f"_{name}" if name[:1].isdigit() else None):
            if attr in self.outputs:
                return attr
        return None

    async def realise(
        self, packages: Sequence[ResolvedPackage], system: str, *, until: float,
        on_line: Callable[[str], None] | None = None,
    ) -> ClosureGraph:
        self.realised.append(tuple(package.name for package in packages))
        outputs = sorted({out for package in packages for out in package.outputs})
        process = await asyncio.create_subprocess_exec(
            "nix", "path-info", "--json", "--recursive", *outputs,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
        return ClosureGraph.from_path_info(stdout)

    async def warm_up(self) -> None:
        pass

    async def close(self) -> None:
        pass
