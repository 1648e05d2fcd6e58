"""An image's SBOM, made from its Nix closure: an SPDX 2.3 JSON document, and the same
facts as a CycloneDX 1.5 JSON document.

Nix knows exactly what is in an image, so nothing is guessed: the document has
one package per store path of the closure (the path is its `packageFileName`),
named and versioned as Nix splits a store path's name (`builtins.parseDrvName`: the version starts at the first
`-` not followed by a letter), with a `DEPENDS_ON` relationship for each store
reference, and the image as the package the document describes, which
`CONTAINS` every store path. Paths the image's layers hold outside its closure (a
stored layer reused whole) are listed too, marked so, with no references claimed.

Store paths of the Debian-derived set carry what they were made from:
`nix-support/debian-packages` names the Debian packages, and each package's
`usr/share/doc/<name>/` holds Debian's `copyright` (machine-readable, DEP-5, for
most) and changelog, and `nix-support/debian-versions` each package's version
and architecture as its control file gives them. A store path holding one Debian
package is named by it, its version is its control file's (with the epoch and
`~` that store names cannot hold; a set built before it recorded them gives the
changelog's first line, checked against the store name), its declared license
is the `Files: *` license of its copyright file in SPDX terms (Debian's short
name in a comment when it has no SPDX identifier), and it gets a `pkg:deb`
package URL with its own architecture (`all` for architecture-independent
packages).

The CycloneDX document says the same: the image as the BOM's `metadata.component`
(type `container`), one component per store path (its `bom-ref`), with the
same names, versions, licenses and package URLs, and the store references as
its `dependencies`.

Guarantees: the same closure, package set revision and image name give the same
bytes (canonical JSON; `created` is the image config's fixed creation time, not
the build's, so replicas agree); reading the store is bounded (small files only,
the first line of a changelog) and happens in a worker thread (the caller's job:
`nixery.attachments` runs it off the event loop).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from license_expression import ExpressionError, Licensing, get_spdx_licensing

from nixery import __version__
from nixery.closure import ClosureGraph
from nixery.registry.image import CREATED, canonical_json

MEDIA_TYPE = "application/spdx+json"
CYCLONEDX_MEDIA_TYPE = "application/vnd.cyclonedx+json"
#: The largest Debian file read (a copyright file is ~20 KB; the largest in Debian ~1 MB).
_MAX_READ = 1 << 20
_STORE_NAME = re.compile(r"^[0-9a-df-np-sv-z]{32}-(.+)$")  # Nix's base-32 hash, then the name


def parse_drv_name(name: str) -> tuple[str, str]:
    """(name, version) as `builtins.parseDrvName` splits a derivation or store name."""
    for i, char in enumerate(name[:-1]):
        if char == "-" and not ("a" <= name[i + 1].lower() <= "z"):
            return name[:i], name[i + 1 :]
    return name, ""


def store_name(path: str) -> str:
    """The name part of a store path (`/nix/store/<hash>-curl-7.88.1` → `curl-7.88.1`)."""
    base = path.rsplit("/", 1)[-1]
    match = _STORE_NAME.match(base)
    return match[1] if match else base


@dataclass(frozen=True, slots=True)
class DebianPackage:
    name: str
    version: str
    license: str | None  # the `Files: *` license as Debian names it (DEP-5 short name), if stated
    architecture: str | None = None  # its control file's: `all`, or the set's (amd64); None: not recorded

    def purl(self, image_architecture: str) -> str:
        """Its package URL, canonical as the purl spec writes one (the epoch in the version, its
        `:` unencoded: `pkg:deb/debian/libbpf1@1:1.1.2-0%2Bdeb12u1?arch=amd64`); a package whose
        architecture the set did not record takes the image's."""
        arch = self.architecture or image_architecture
        return f"pkg:deb/debian/{self.name}@{quote(self.version, safe=':')}?arch={quote(arch, safe='')}"


def debian_packages(path: Path) -> tuple[DebianPackage, ...]:
    """The Debian packages a store path of the Debian set was made from (none for other paths).
    Its store name is "<packages joined by +>-<the first's version>" (scripts/debian-set/generate.py);
    `nix-support/debian-versions` has each package's version and architecture from its control
    file. A set built before it recorded them gets the version from the changelog (which may lack
    the epoch: libbpf1's) and no architecture."""
    names = (_read_text(path / "nix-support" / "debian-packages") or "").split()
    joined = "+".join(names)
    if not names or not store_name(str(path)).startswith(joined + "-"):
        return ()
    store_version = store_name(str(path))[len(joined) + 1 :]
    recorded = {
        fields[0]: (fields[1], fields[2])
        for line in (_read_text(path / "nix-support" / "debian-versions") or "").splitlines()
        if len(fields := line.split()) == 3
    }
    packages = []
    for i, name in enumerate(names):
        version, architecture = recorded.get(name, (None, None))
        if version is None:
            version = _debian_version(path / "usr/share/doc" / name, store_version if i == 0 else None) or store_version
        packages.append(DebianPackage(name, version, _debian_license(path, name), architecture))
    return tuple(packages)


def _read_text(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            return handle.read(_MAX_READ).decode("utf-8", "replace")
    except OSError:
        return None


def _debian_version(doc: Path, store_version: str | None) -> str | None:
    """The version of the changelog's first entry (a binary rebuild's, `+bN`, first; a native
    package's changelog.gz last), with the epoch and `~` that store names lack. With
    `store_version`, only if that is it as the set's generator writes it (no epoch, `~` as `_`):
    a package's doc directory may be another package's."""
    candidates = [*sorted(doc.glob("changelog.Debian.*.gz")), doc / "changelog.Debian.gz", doc / "changelog.gz"]
    for changelog in candidates:
        try:
            with gzip.open(changelog, "rt", encoding="utf-8", errors="replace") as handle:
                first = handle.readline(512)
        except (OSError, EOFError):
            continue
        match = re.match(r"[a-z0-9][a-z0-9+.-]* \(([^()\s]+)\) ", first)
        if match is None:
            continue
        written = re.sub(r"[^A-Za-z0-9+._?=-]", "_", match[1].split(":", 1)[-1])
        if store_version is None or written == store_version:
            return match[1]
    return None


def _debian_license(path: Path, name: str) -> str | None:
    """The license of the `Files: *` paragraph of a DEP-5 copyright file."""
    text = _read_text(path / "usr/share/doc" / name / "copyright")
    if text is None or not text.startswith("Format:"):
        return None
    for paragraph in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", paragraph, re.MULTILINE))
        if fields.get("Files", "").split() == ["*"] and fields.get("License"):
            return fields["License"].strip()
    return None


#: Debian's short license names (DEP-5) that are not SPDX identifiers, as SPDX identifiers
#: (`GPL-2` is version 2 only, `GPL-2+` any later too); other names are SPDX's, in any case.
_SPDX_IDS = {
    "artistic": "Artistic-1.0-Perl", "expat": "MIT", "psf-2": "PSF-2.0",
    "gpl-1+": "GPL-1.0-or-later", "gpl-2": "GPL-2.0-only", "gpl-2+": "GPL-2.0-or-later",
    "gpl-3": "GPL-3.0-only", "gpl-3+": "GPL-3.0-or-later", "lgpl-2": "LGPL-2.0-only",
    "lgpl-2+": "LGPL-2.0-or-later", "lgpl-2.1": "LGPL-2.1-only", "lgpl-2.1+": "LGPL-2.1-or-later",
    "lgpl-3": "LGPL-3.0-only", "lgpl-3+": "LGPL-3.0-or-later",
    # GFDL without invariant sections
    "gfdl-niv-1.2": "GFDL-1.2-no-invariants-only", "gfdl-niv-1.2+": "GFDL-1.2-no-invariants-or-later",
    "gfdl-niv-1.3": "GFDL-1.3-no-invariants-only", "gfdl-niv-1.3+": "GFDL-1.3-no-invariants-or-later",
}


#: Longer `License:` values are not parsed (a real one is a few names).
_MAX_LICENSE = 400


@functools.cache
def _spdx_licensing() -> Licensing:
    """Every SPDX license identifier, deprecated ones (`GPL-2.0+`) mapped to their current form."""
    return get_spdx_licensing()


def spdx_license(debian: str | None) -> str | None:
    """A DEP-5 license expression (`GPL-2+ or Artistic`) in SPDX terms, or None when a part
    has no SPDX identifier (then NOASSERTION is declared and the Debian name kept).
    Debian's own short names are translated; any other name is kept when SPDX has it
    (`Sleepycat`, `BSL-1.0`), and the expression keeps its parentheses."""
    if not debian or len(debian) > _MAX_LICENSE:
        return None
    words = re.findall(r"[()]|[^\s()]+", debian)
    translated = " ".join(_SPDX_IDS.get(word.lower(), word) for word in words)
    try:
        parsed = _spdx_licensing().parse(translated, validate=True, strict=True)
    except ExpressionError:  # a name SPDX does not have, DEP-5's `, and`, `with ... exception`
        return None
    except (IndexError, AssertionError, AttributeError):  # how the parser fails on some bad input (`( )`)
        return None
    if parsed is None:
        return None
    # The parser also knows ScanCode's LicenseRef-scancode-* keys (and maps `Net-SNMP` to one): a
    # LicenseRef needs a definition the document does not carry.
    if any(key.startswith(("LicenseRef-", "DocumentRef-")) for key in _spdx_licensing().license_keys(parsed)):
        return None
    return str(parsed)


@dataclass(frozen=True, slots=True)
class StorePathInfo:
    """One store path of the image as the SBOM describes it (read from the store)."""

    path: str
    debian: tuple[DebianPackage, ...] = ()
    outside: bool = False  # not in the closure: a stored layer the image reuses whole brings it


#: What the SBOM says of a path that is in the image but not in its closure.
OUTSIDE_NOTE = "in the image but not in its closure: a layer it shares with other images holds it"


def read_store_paths(paths: Iterable[str], outside: Iterable[str] = ()) -> list[StorePathInfo]:
    """What the SBOM says of each store path of the closure, read from the store (blocking: run
    in a thread), and of the `outside` paths that the image's layers hold besides
    (`nixery.layers.cost.CostModel.takes_stored_layer`): their store names alone, since this
    machine's store may lack them, and every registry must make the same document. Each once:
    two reused layers may bring the same outside path."""
    return [
        *(StorePathInfo(path, debian_packages(Path(path))) for path in sorted(paths)),
        *(StorePathInfo(path, outside=True) for path in sorted(set(outside))),
    ]


def _references(graph: ClosureGraph, info: StorePathInfo) -> Sequence[str]:
    """What the path refers to; unknown (none said) for a path outside the closure."""
    return () if info.outside else graph.nodes[info.path].references


def _spdx_id(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return "SPDXRef-Path-" + re.sub(r"[^A-Za-z0-9.-]", "-", base)


def _package(info: StorePathInfo, arch: str) -> dict[str, Any]:
    """A store path as an SPDX package: named by its Debian package when it holds one."""
    name, version = parse_drv_name(store_name(info.path))
    license_declared = "NOASSERTION"
    notes: dict[str, Any] = {}
    if len(info.debian) == 1:
        deb = info.debian[0]
        name, version = deb.name, deb.version
        license_declared = spdx_license(deb.license) or "NOASSERTION"
        if deb.license and license_declared == "NOASSERTION":
            notes["licenseComments"] = f"Debian copyright file: License: {deb.license}"
    elif info.debian:  # a dependency cycle merged into one store path (libc6+libgcc-s1)
        notes["comment"] = "Debian packages: " + ", ".join(
            f"{deb.name} {deb.version} (license: {deb.license or 'not stated'})" for deb in info.debian
        )
    if info.outside:
        notes["comment"] = "; ".join(filter(None, [OUTSIDE_NOTE, notes.get("comment")]))
    if info.debian:
        notes["externalRefs"] = [
            {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
             "referenceLocator": deb.purl(arch)}
            for deb in info.debian
        ]
    if version:
        notes["versionInfo"] = version
    return {
        "SPDXID": _spdx_id(info.path),
        "name": name,
        "packageFileName": info.path,  # SPDX: "or path of the directory being treated as a package"
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": license_declared,
        "copyrightText": "NOASSERTION",
        **notes,
    }


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What the SBOM says of the image itself."""

    name: str  # as shown, e.g. "shell/curl"
    architecture: str  # OCI name: amd64, arm64
    source: str  # the package set, e.g. "path /srv/pkgs"
    revision: str
    config: str  # the image config's digest: the same for every manifest format
    packages: Sequence[str]  # the attribute paths the image's names resolved to


def _namespace(image: ImageFacts) -> str:
    """A URI unique to the document's content: named by what decides it."""
    material = canonical_json([image.name, image.architecture, image.source, image.revision, image.config])
    return f"https://nixery-py.invalid/spdx/{image.architecture}/{hashlib.sha256(material).hexdigest()}"


def _relationship(element: str, kind: str, related: str) -> dict[str, str]:
    return {"spdxElementId": element, "relationshipType": kind, "relatedSpdxElement": related}


def spdx_document(image: ImageFacts, graph: ClosureGraph, store: Sequence[StorePathInfo]) -> bytes:
    """The SPDX 2.3 JSON document of an image whose closure is `graph` (`store`: every path of it)."""
    root: dict[str, Any] = {
        "SPDXID": "SPDXRef-Image",
        "name": image.name,
        "versionInfo": image.revision,
        "primaryPackagePurpose": "CONTAINER",
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "comment": f"image config {image.config}; packages: {' '.join(image.packages)}",
    }
    relationships = [_relationship("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Image")]
    for info in store:
        relationships.append(_relationship("SPDXRef-Image", "CONTAINS", _spdx_id(info.path)))
        for reference in _references(graph, info):
            relationships.append(_relationship(_spdx_id(info.path), "DEPENDS_ON", _spdx_id(reference)))
    document = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image.name} ({image.architecture})",
        "documentNamespace": _namespace(image),
        "creationInfo": {
            "created": CREATED,
            "creators": [f"Tool: nixery-py-{__version__}"],
            "comment": f"package set: {image.source}; revision: {image.revision}; "
            "created: the image config's creation time (fixed, so every registry makes the same document)",
        },
        "comment": f"Made from the image's Nix closure: package set {image.source}, revision {image.revision}",
        "packages": [root, *(_package(info, image.architecture) for info in store)],
        "relationships": relationships,
    }
    return canonical_json(document)


def cyclonedx_document(image: ImageFacts, graph: ClosureGraph, store: Sequence[StorePathInfo]) -> bytes:
    """The CycloneDX 1.5 JSON document of the same image (see the module docstring)."""
    components = []
    for info in store:
        spdx = _package(info, image.architecture)
        component: dict[str, Any] = {"type": "library", "bom-ref": info.path, "name": spdx["name"]}
        if "versionInfo" in spdx:
            component["version"] = spdx["versionInfo"]
        if spdx["licenseDeclared"] != "NOASSERTION":
            component["licenses"] = [{"expression": spdx["licenseDeclared"]}]
        elif len(info.debian) == 1 and info.debian[0].license:
            component["licenses"] = [{"license": {"name": info.debian[0].license}}]
        if len(info.debian) == 1:
            component["purl"] = spdx["externalRefs"][0]["referenceLocator"]
        properties = [{"name": "nix:store-path", "value": info.path}]
        if info.outside:
            properties.append({"name": "nixery:outside-closure", "value": OUTSIDE_NOTE})
        properties += [{"name": "debian:package", "value": f"{deb.name} {deb.version}"} for deb in info.debian]
        component["properties"] = properties
        components.append(component)
    return canonical_json({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": uuid.uuid5(uuid.NAMESPACE_URL, _namespace(image)).urn,
        "version": 1,
        "metadata": {
            "timestamp": CREATED,
            "tools": {"components": [{"type": "application", "name": "nixery-py", "version": __version__}]},
            "component": {
                "type": "container", "bom-ref": "image", "name": image.name, "version": image.revision,
                "description": f"image config {image.config}; packages: {' '.join(image.packages)}",
            },
            "properties": [
                {"name": "nixery:package-set:source", "value": image.source},
                {"name": "nixery:package-set:revision", "value": image.revision},
                {"name": "nixery:architecture", "value": image.architecture},
            ],
        },
        "components": components,
        "dependencies": [
            {"ref": "image", "dependsOn": [info.path for info in store]},
            *({"ref": info.path, "dependsOn": list(_references(graph, info))} for info in store),
        ],
    })
