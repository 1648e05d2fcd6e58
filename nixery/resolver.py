"""What the builder needs from a package source: the `PackageResolver` protocol.

The builder never runs Nix itself. It is handed a resolver (`nixery.app`
wires one from the configured package source, `nixery.nix.sources`), and asks
it, for one image:

1. `resolve(tag)`: the package set's revision a tag selects (cheap: the
   revision's id keys the image cache);
2. `evaluate(revision, names, system)`: what each image name resolves to
   (the builder keeps those answers per name, `nixery.evaluations`);
3. `realise(packages, system)`: build what is not built yet, and return the
   closure graph of the packages' outputs, which the builder cuts into layers.
   Whether another system than the machine's can be built is found out here,
   by trying (a binary cache, a remote builder or emulation may do it).

`until` is a `time.monotonic()` instant by which steps 2 and 3 of one image
must be done together (the resolver's `timeout` after the build started).

Tests may hand the builder a stand-in resolver: the builder's own work
(layering, storing, publishing) does not depend on where a closure came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nixery.closure import ClosureGraph, Registration


@dataclass(frozen=True, slots=True)
class Revision:
    source: str  # human description, e.g. "path /srv/pkgs"
    id: str  # changes whenever the package set's content does
    path: Path | None  # directory with default.nix; None until `checkout` makes it
    fetched: float | None = None  # when a fetched source's content was downloaded (time.time()), if it says


@dataclass(frozen=True, slots=True)
class ResolvedPackage:
    name: str  # as the image name said it
    attr: str  # the attribute path it resolved to
    pull_name: str  # how to name it in an image: lower case when that finds the same attribute (resolve.nix)
    drv_path: str
    outputs: tuple[str, ...]  # store paths that go into the image
    main_program: str | None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ResolvedPackage:
        """From one of eval.nix's `packages` (raises KeyError, TypeError on other shapes)."""
        outputs = doc["outputs"]
        if not isinstance(outputs, list) or not all(isinstance(out, str) for out in outputs):
            raise TypeError("outputs must be a list of store paths")
        main_program = doc.get("mainProgram")
        return cls(
            name=str(doc["name"]), attr=str(doc["attr"]), pull_name=str(doc["pullName"]),
            drv_path=str(doc["drvPath"]), outputs=tuple(outputs),
            main_program=None if main_program is None else str(main_program),
        )

    def to_json(self) -> dict[str, Any]:
        """As eval.nix prints it."""
        return {
            "name": self.name, "attr": self.attr, "pullName": self.pull_name, "drvPath": self.drv_path,
            "outputs": list(self.outputs), "mainProgram": self.main_program,
        }


class PackageResolver(Protocol):
    """A package source as the builder uses it (see the module docstring)."""

    #: Shown on the landing page and in build events, e.g. "path /srv/pkgs".
    description: str
    #: Seconds that evaluating and realising one image's packages may take together.
    timeout: float

    async def resolve(self, tag: str) -> Revision:
        """The package set to build `tag` from."""
        ...

    async def evaluate(
        self, revision: Revision, names: Sequence[str], system: str, *, until: float
    ) -> list[ResolvedPackage]:
        """What each name resolves to at `revision` (raises PackagesNotFound for unknown names)."""
        ...

    async def realise(
        self, packages: Sequence[ResolvedPackage], system: str, *, until: float,
        on_line: Callable[[str], None] | None = None,
    ) -> ClosureGraph:
        """Build the packages (evaluated for `system`) if need be; the closure graph of
        their outputs. `on_line` hears the build's log lines (for progress). Raises
        UnsupportedSystem when `system` cannot be built, saying what would make it work."""
        ...

    async def registrations(self, paths: Sequence[str], *, until: float) -> list[Registration]:
        """What Nix records of each of `paths` (valid store paths), for a Nix database in an image."""
        ...

    async def warm_up(self) -> None:
        """Prepare for the first image (never raises: the first build reports problems)."""
        ...

    async def close(self) -> None: ...
