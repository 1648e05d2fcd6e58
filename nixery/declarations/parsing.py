"""NixImage documents: what a valid one looks like, and the `Declaration` it becomes.

`parse_declaration` checks one document (from a file or a Kubernetes object)
and raises `InvalidDeclaration` with a short message that quotes at most a few
dozen characters of any value (`_short`), so a hostile document costs one
short log line. The rules are in the package docstring (`nixery.declarations`).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nixery.declarations.problems import InvalidDeclaration, _cut, _field_names, _short
from nixery.declarations.run_config import FIELDS as CONFIG_FIELDS
from nixery.declarations.run_config import parse_run_config
from nixery.errors import RegistryError
from nixery.platforms import for_platforms
from nixery.registry.names import MAX_PACKAGES, Arch, ImageRequest, check_build_tag, parse_image_name

GROUP = "k8s.nixos.org"
VERSION = "v1alpha"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "NixImage"
LIST_KINDS = ("List", "NixImageList")

FILES = "files"
KUBERNETES = "kubernetes"
_SOURCE_RANK = {FILES: 0, KUBERNETES: 1}

FILE_SUFFIXES = (".yaml", ".yml", ".json")
MAX_NAME_LENGTH = 128
MAX_LOGGED_PER_FILE = 10  # problems (or image names) logged per file and change: not 10,000 lines for 10,000

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_ARCHES = {arch.oci_name: arch for arch in Arch}
_TOP_LEVEL = {"apiVersion", "kind", "metadata", "data", "status"}
_DATA_FIELDS = {"tag", "contents", "arch", *CONFIG_FIELDS}


@dataclass(frozen=True, slots=True)
class Declaration:
    name: str
    tag: str
    request: ImageRequest
    origin: str  # for people: "file /etc/nixery/images.yaml#2", "niximage/curl-and-jq"
    source: str = FILES  # FILES or KUBERNETES
    rank: tuple[Any, ...] = ()  # lower wins when two claim the same name:tag
    key: str | None = None  # the source's own id (an object's namespace/name)

    @property
    def reference(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def contents(self) -> list[str]:
        return list(self.request.packages)

    @property
    def arch(self) -> str:
        """Its platforms, for log lines: `amd64`, or `amd64,arm64` for an index."""
        return ",".join(arch.oci_name for arch in self.request.platforms or (self.request.arch,))

    def same_image(self, other: Declaration | None) -> bool:
        return other is not None and (other.name, other.tag, other.request) == (self.name, self.tag, self.request)


# ---- parsing -----------------------------------------------------------


def _check_name(name: Any) -> str:
    if name is None or name == "":
        raise InvalidDeclaration("metadata.name is missing")
    if not isinstance(name, str):
        hint = f' (quote it: "{_cut(str(name))}")' if isinstance(name, int | float) else ""
        raise InvalidDeclaration(f"metadata.name must be a string, not {type(name).__name__}{hint}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidDeclaration(f"metadata.name is longer than {MAX_NAME_LENGTH} characters")
    if not _DNS_SUBDOMAIN.fullmatch(name):
        raise InvalidDeclaration(
            f"metadata.name {_short(name)} is not a valid object name (lower case letters, digits, '-' and '.')"
        )
    if name == "arm64":
        raise InvalidDeclaration("metadata.name 'arm64' is reserved: it selects the architecture in image paths")
    try:
        parse_image_name(name)
    except RegistryError as exc:
        raise InvalidDeclaration(f"metadata.name {_short(name)} is not a valid image name: {exc.message}") from None
    return name


def _check_contents(contents: Any) -> list[str]:
    if contents is None:
        raise InvalidDeclaration("data.contents is missing: list the packages of the image")
    if not isinstance(contents, list):
        raise InvalidDeclaration("data.contents must be a list of package names")
    if not contents:
        raise InvalidDeclaration("data.contents is empty: list at least one package")
    packages: list[str] = []
    for index, entry in enumerate(contents):
        where = f"data.contents[{index}]"
        if not isinstance(entry, str):
            raise InvalidDeclaration(f"{where} must be a package name, not {type(entry).__name__}")
        if "/" in entry:
            raise InvalidDeclaration(f"{where} {_short(entry)}: list each package as its own entry, without '/'")
        if entry == "arm64":
            raise InvalidDeclaration(f"{where} 'arm64' is not a package: set data.arch: arm64 instead")
        try:
            packages.extend(parse_image_name(entry).packages)
        except RegistryError as exc:
            raise InvalidDeclaration(f"{where}: {exc.message}") from None
    unique = sorted(set(packages))
    if len(unique) > MAX_PACKAGES:
        raise InvalidDeclaration(f"data.contents lists {len(unique)} packages; at most {MAX_PACKAGES} are allowed")
    return unique


def _check_arch(value: Any) -> set[Arch]:
    """The platforms `data.arch` names: one (a string, or a list of one), or several (the image
    is then an index over one image per platform, as a name on a registry with several
    NIXERY_PLATFORMS: `nixery.platforms`)."""
    names = value if isinstance(value, list) else [value]
    if not names:
        raise InvalidDeclaration(f"data.arch is empty: list one or more of {', '.join(_ARCHES)}")
    found = set()
    for index, arch_name in enumerate(names):
        arch = _ARCHES.get(arch_name) if isinstance(arch_name, str) else None
        if arch is None:
            where = f"data.arch[{index}]" if isinstance(value, list) else "data.arch"
            raise InvalidDeclaration(f"{where} {_short(arch_name)} is not one of {', '.join(_ARCHES)}")
        found.add(arch)
    return found


def parse_declaration(
    document: Any, *, origin: str, source: str = FILES, rank: tuple[Any, ...] = (), key: str | None = None
) -> Declaration:
    """A NixImage document as a declaration; `InvalidDeclaration` says what is wrong."""
    if not isinstance(document, Mapping):
        raise InvalidDeclaration(f"expected a NixImage object, found {type(document).__name__}")
    kind = document.get("kind")
    if kind != KIND:
        raise InvalidDeclaration(f"{_said('kind', kind)}, expected {KIND!r}")
    api_version = document.get("apiVersion")
    if api_version != API_VERSION:
        raise InvalidDeclaration(f"{_said('apiVersion', api_version)}, expected {API_VERSION!r}")
    unknown = [k for k in document if k not in _TOP_LEVEL]
    if unknown:
        hint = " (the image is described under data, not spec)" if "spec" in unknown else ""
        raise InvalidDeclaration(f"unknown field(s) {_field_names(unknown)}{hint}")
    metadata = document.get("metadata")
    if metadata is None:
        raise InvalidDeclaration("metadata is missing")
    if not isinstance(metadata, Mapping):
        raise InvalidDeclaration(f"metadata must be a mapping with a name, not {type(metadata).__name__}")
    name = _check_name(metadata.get("name"))
    data = document.get("data")
    if data is None:
        raise InvalidDeclaration("data is missing: it needs tag and contents")
    if not isinstance(data, Mapping):
        raise InvalidDeclaration(f"data must be a mapping of tag, contents, ..., not {type(data).__name__}")
    unknown = [k for k in data if k not in _DATA_FIELDS]
    if unknown:
        known = f" (known: {', '.join(sorted(_DATA_FIELDS))})" if len(unknown) <= 3 else ""  # a short line
        raise InvalidDeclaration(f"unknown field(s) in data: {_field_names(unknown)}{known}")
    tag = data.get("tag")
    if tag is None:
        raise InvalidDeclaration("data.tag is missing")
    if not isinstance(tag, str):
        hint = f' (quote it: "{_cut(str(tag))}")' if isinstance(tag, int | float | datetime.date) else ""
        raise InvalidDeclaration(f"data.tag must be a string, not {type(tag).__name__}{hint}")
    try:
        check_build_tag(tag)  # an attachment's tag (sha256-...) would serve the documents, not the image
    except RegistryError as exc:
        raise InvalidDeclaration(f"data.tag: {exc.message}") from None
    platforms = _check_arch(data.get("arch", "amd64"))
    packages = _check_contents(data.get("contents"))
    request = ImageRequest(tuple(packages), next(iter(platforms)), config=parse_run_config(data))
    return Declaration(
        name=name,
        tag=tag,
        request=for_platforms(request, platforms) if len(platforms) > 1 else request,
        origin=origin,
        source=source,
        rank=rank,
        key=key,
    )


def _documents(loaded: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """(label, document) for each document, with `List` items flattened."""
    for index, document in enumerate(loaded):
        if document is None:
            continue
        if isinstance(document, Mapping) and document.get("kind") in LIST_KINDS and "items" in document:
            items = document.get("items")
            if not isinstance(items, list):
                yield str(index), items
                continue
            for position, item in enumerate(items):
                yield f"{index}.items[{position}]", item
        else:
            yield str(index), document




def _describe(exc: Exception) -> str:
    return _cut(f"{type(exc).__name__}: {exc}", 200)


def _said(field: str, value: object) -> str:
    """`kind is 'Pod'`, or `kind is missing` (it said `kind is None`)."""
    return f"{field} is missing" if value is None else f"{field} is {_short(value)}"
