"""Image names: which packages, for which architecture.

`/v2/shell/git/arm64/...` is not a repository but a request: each path
component names a package (a top-level attribute, or a dotted path into
nested sets), and a leading `arm64` selects aarch64. Names are checked here,
against a strict alphabet, before anything else sees them; the Nix code
receives them as JSON data only.

An image is its set of names: order and repeats do not change it (`packages`,
sorted, is what identifies it). It is shown as first asked for (`order`):
`shell/jq` stays `shell/jq`. Once the names are resolved, `renamed` gives the
same image under the names the package set knows them by, so that `Curl/Shell`
and `curl/shell` are one image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from nixery.errors import ManifestUnknown, NameInvalid, TagInvalid
from nixery.registry.runconfig import RunConfig

MAX_COMPONENT_LENGTH = 128
MAX_PACKAGES = 100
MAX_TAG_LENGTH = 128

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_+-]*"
_COMPONENT = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
#: An OCI tag (the distribution spec's `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`): what a client can pull.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

#: Tags of documents attached to a manifest, not of images: the referrers tag schema (`sha256-<hex>`)
#: and cosign's signatures (`sha256-<hex>.sig`). Any tag of this prefix (in any case) is one of them,
#: well-formed or not; none names an image of the package set.
ATTACHMENT_TAG_PREFIX = "sha256-"
#: A well-formed attachment tag (the registry API's route for them, nixery.http.referrers).
ATTACHMENT_TAG_PATTERN = r"sha256-[0-9a-f]{64}(?:\.[A-Za-z0-9_-]{1,32})?"
_ATTACHMENT_TAG = re.compile(ATTACHMENT_TAG_PATTERN)


#: The leading component of a name that asks for the aarch64 image (`arm64/shell`).
ARM64_PREFIX = "arm64/"


#: Words that people put first to ask for a platform (Docker's and uname's names), of which only
#: `arm64` is one here: as a first component each is a package name like any other.
PLATFORM_WORDS = frozenset({
    "amd64", "x86_64", "x86-64", "aarch64", "arm64v8", "arm", "armhf", "armel", "armv6", "armv7", "arm32v7",
    "i386", "i686", "386", "riscv64", "ppc64le", "s390x", "mips64le", "loong64", "linux",
})


def platform_hint(missing: list[str]) -> str | None:
    """What to say when a package the set lacks is named like a platform (`riscv64/shell`), or is
    the arm64 prefix out of place (`shell/arm64`, `arm64/arm64/shell`, `ARM64/shell`)."""
    if misplaced := next((name for name in missing if name.lower() == "arm64"), None):
        # Only a first, lower-case `arm64` is the prefix: anywhere else it is read as a package.
        return (
            f"{misplaced} selects linux/arm64 only as a name's first component, once and in lower case "
            f"(arm64/shell); elsewhere it is read as a package name"
        )
    words = [name for name in missing if name.lower() in PLATFORM_WORDS]
    if not words:
        return None
    # Not "not a platform of this registry": amd64 may well be one (NIXERY_PLATFORMS), just not a prefix.
    return (
        f"{words[0]} is not a platform prefix of this registry: its only one is {ARM64_PREFIX} "
        "(linux/arm64, as in arm64/shell); a name without one is built for the registry's own platforms"
    )


def without_platform(name: str) -> str:
    """An image's name without its platform: `arm64/shell` is `shell`."""
    return name.removeprefix(ARM64_PREFIX)


class Arch(Enum):
    AMD64 = ("amd64", "x86_64-linux")
    ARM64 = ("arm64", "aarch64-linux")

    @property
    def oci_name(self) -> str:
        return self.value[0]

    @property
    def nix_system(self) -> str:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class ImageRequest:
    packages: tuple[str, ...]  # sorted and unique, so order and repeats don't matter
    arch: Arch
    #: The names in the order first given, each once (empty: as `packages`). Not part of
    #: the image's identity: requests that differ only here are equal.
    order: tuple[str, ...] = field(default=(), compare=False)
    #: Several platforms: one image for each, joined by an image index (`nixery.platforms`);
    #: `arch` is then the platform a client that takes no index gets. Empty: `arch` only.
    platforms: tuple[Arch, ...] = ()
    #: The image config a declared image sets (`nixery.registry.runconfig`); None for a name.
    config: RunConfig | None = None

    @property
    def display_name(self) -> str:
        """As a client pulls it: `arm64/` only for the arm64 image alone, not for an index whose
        default platform is arm64 (on an arm64 machine)."""
        prefix = ARM64_PREFIX if self.arch is Arch.ARM64 and not self.platforms else ""
        return prefix + "/".join(self.order or self.packages)

    def renamed(self, names: Mapping[str, str]) -> ImageRequest:
        """The same image with each name replaced by `names[name]` (when given), in the same order."""
        order = tuple(dict.fromkeys(names.get(name, name) for name in self.order or self.packages))
        return ImageRequest(tuple(sorted(order)), self.arch, order, self.platforms, self.config)


def parse_image_name(name: str) -> ImageRequest:
    components = name.split("/")
    arch = Arch.AMD64
    if components and components[0] == "arm64":
        arch = Arch.ARM64
        components = components[1:]
    if not components or components == [""]:
        raise NameInvalid("the image name lists no packages", detail={"name": name[:300]})
    if len(components) > MAX_PACKAGES:
        raise NameInvalid(
            f"an image may list at most {MAX_PACKAGES} packages, not {len(components)}",
            detail={"limit": MAX_PACKAGES},
        )
    for component in components:
        if not component:
            raise NameInvalid(
                "the image name has an empty package name: '/' twice in a row, or at its start or end",
                detail={"name": name[:300]},
            )
        if len(component) > MAX_COMPONENT_LENGTH:
            raise NameInvalid(
                f"package name longer than {MAX_COMPONENT_LENGTH} characters: {component[:40]}...",
                detail={"limit": MAX_COMPONENT_LENGTH},
            )
        if not _COMPONENT.fullmatch(component):
            raise NameInvalid(
                f"invalid package name {component!r}: use letters, digits, '_', '-', '+', "
                "and '.' between attribute names",
                detail={"component": component},
            )
    order = tuple(dict.fromkeys(components))
    return ImageRequest(tuple(sorted(order)), arch, order)


def check_tag(tag: str) -> str:
    """An OCI tag, which also names a git ref: never '..', nor ending in '.' or '.lock'. A git
    branch with '/' in its name cannot be one: no client could pull an image tagged so."""
    shown = tag[:MAX_TAG_LENGTH]
    if "/" in tag:
        raise TagInvalid(
            f"invalid tag {shown!r}: a tag cannot contain '/' (no client could pull it), "
            "so a git branch whose name has one cannot be a tag",
            detail={"tag": shown},
        )
    if len(tag) > MAX_TAG_LENGTH or not _TAG.fullmatch(tag) or ".." in tag or tag.endswith((".", ".lock")):
        raise TagInvalid(
            f"invalid tag {shown!r}: a tag is 1 to {MAX_TAG_LENGTH} letters, digits, '_', '.' and '-', "
            "starting with a letter, digit or '_', without '..', not ending in '.' or '.lock'",
            detail={"tag": shown},
        )
    return tag


def names_attachment(tag: str) -> bool:
    """A tag of the attachments' prefix (`sha256-`), well-formed or not: it never names an image."""
    return tag.lower().startswith(ATTACHMENT_TAG_PREFIX)


def attachment_tag_error(tag: str) -> ManifestUnknown:
    """What the registry answers for a tag of the attachments' prefix that names no image (404),
    said alike by the registry API, the image page and `nixery inspect`."""
    shown = tag[:80]
    if _ATTACHMENT_TAG.fullmatch(tag):  # well-formed: the API answers the documents, never an image
        subject = "sha256:" + tag[len(ATTACHMENT_TAG_PREFIX) :][:64]
        return ManifestUnknown(
            f"no image is tagged {shown!r}: the tag names the documents attached to the manifest {subject} "
            "(its SBOMs, provenance and signature), which the registry API serves, not an image",
            detail={"tag": shown},
        )
    return ManifestUnknown(
        f"no manifest tagged {shown!r}: a referrers tag is sha256- and the 64 lower-case hex digits "
        "of a manifest's digest (a signature's: that and .sig), and this tag is not one",
        detail={"tag": shown},
    )


def check_image_tag(tag: str) -> str:
    """A tag that may name an image: `check_tag`'s rules, and not an attachment's tag (404, as the
    registry API answers for it, rather than the image as if the tag were one of the package set)."""
    if names_attachment(tag):  # first, as the registry API's route: a long one is 404 too, not 400
        raise attachment_tag_error(tag)
    return check_tag(tag)


def check_build_tag(tag: str) -> str:
    """A tag to build (or declare) an image under: `check_tag`'s rules, and not an attachment's tag,
    under which the image could never be pulled nor shown (`check_image_tag`: 404)."""
    check_tag(tag)
    if names_attachment(tag):
        shown = tag[:80]
        raise TagInvalid(
            f"cannot build under the tag {shown!r}: a tag that starts with sha256- names the documents "
            "attached to a manifest (SBOMs, signatures), never an image; choose another tag",
            detail={"tag": shown},
        )
    return tag
