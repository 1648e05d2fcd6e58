"""Errors of the Nix layer (mapped to registry errors by the HTTP layer)."""

from __future__ import annotations


class NixError(Exception):
    """Nix failed; `log_tail` holds the last lines it printed."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail


class NixTimeout(NixError):
    """The Nix process tree ran past NIX_TIMEOUT and was killed."""


class MemoryLimitExceeded(NixError):
    """An evaluation grew past NIXERY_EVALUATOR_MEMORY_MB and was killed."""


class PackagesNotFound(NixError):
    """Names the package set does not have; `suggestions` holds the nearest names it has;
    `platform` (`linux/arm64`) the platform it lacks them on, when that is not the host's;
    `elsewhere` the platform (`linux/amd64`) whose package set has a missing name, when only
    `platform`'s lacks it (the Debian set's libcpuid16 has no arm64 package); `sets` the
    missing names that are a set of packages (`debian`) or a name under one (`debian.curll`),
    each with the set's name."""

    def __init__(
        self, missing: list[str], source: str, suggestions: dict[str, list[str]] | None = None,
        platform: str | None = None, elsewhere: dict[str, str] | None = None, sets: dict[str, str] | None = None,
    ):
        self.missing = missing
        self.source = source
        self.suggestions = suggestions or {}
        self.platform = platform
        self.elsewhere = elsewhere or {}
        self.sets = sets or {}
        where = f"{source} for {platform}" if platform else source
        super().__init__(f"packages not found in {where}: " + ", ".join(map(self._described, missing)))

    def _described(self, name: str) -> str:
        if name in self.elsewhere:
            return f"{name} (which it has for {self.elsewhere[name]} only)"
        if (of := self.sets.get(name)) is not None:
            if of == name:
                return f"{name} (a set of packages, not a package: name one of them, as {name}.NAME)"
            return f"{name} (the set {of} has no {name[len(of) + 1:]})"
        nearest = self.suggestions.get(name)
        return f"{name} (did you mean {' or '.join(nearest)}?)" if nearest else name


class UnsupportedSystem(NixError):
    """Nix could not build for the architecture the image asks for (no binary cache,
    remote builder or emulation of it); `log_tail` holds what Nix said."""


class SourceUnavailable(NixError):
    """A package source (repository, channel) could not be fetched."""


class RefNotFound(NixError):
    """A git ref named by an image tag does not exist."""


class RefInvalid(NixError):
    """An image tag that cannot name a git ref (`git check-ref-format`'s rules); `ref` is the tag, cut short."""

    def __init__(self, message: str, ref: str):
        super().__init__(message)
        self.ref = ref
