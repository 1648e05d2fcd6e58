"""Image references as clients pull them: `HOST/shell/curl:TAG`, and the image name in it.

`nixery build` and `nixery inspect` take an image name (`shell/curl:TAG`); people paste the
reference they pull (`127.0.0.1:8080/shell/curl:TAG`, `docker://...` as skopeo writes it). The
registry's own host in front is dropped, as the web form does; any other host is named in the
error, rather than its port being read as a tag ("invalid tag '8080/shell/curl'"). A scheme in
front (`docker://`, or the registry's URL `http://HOST/`) is dropped too.

A first component is read as a host only when it has a port (`host:5000`) or is the registry's
own host: a dotted first component is a package path here (`debian.curl/shell`), not a host as
Docker's clients read it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

#: `host:port` (or `[v6]:port`) as the first component of a reference: a name has no ':' before its first '/'.
_HOST_WITH_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[^/:@\[\]]+):[0-9]+")

_DEFAULT_PORTS = {"http": 80, "https": 443}

#: The zone of an IPv6 address (`%25eth0` as URLs write it, `%eth0` as some clients send it), up to its `]`.
_ZONE = re.compile(r"%[^\]]*(?=\])")


class UnusableReference(ValueError):
    """A reference that names no image of this registry, saying why in one line; `host` is the
    other registry it names, if it names one."""

    def __init__(self, message: str, host: str | None = None):
        super().__init__(message)
        self.host = host


def registry_host(url: str) -> str:
    """The `host:port` clients put before an image name to pull from the registry at `url`."""
    return reference_host(urlsplit(url).netloc.rpartition("@")[2])


def reference_host(host: str) -> str:
    """`host` as an image reference can name it: without the zone of a link-local IPv6 address
    (`[fe80::1%25eth0]:8080` is `[fe80::1]:8080`). A reference has no room for a zone (Docker
    refuses `%`), and a zone names an interface of one machine, which another's need not share."""
    return _ZONE.sub("", host)


def _without_zone(hostname: str | None) -> str:
    return (hostname or "").partition("%")[0]


def _same_host(given: str, registry_url: str) -> bool:
    registry = urlsplit(registry_url)
    try:
        named = urlsplit(f"{registry.scheme}://{given}")
        default = _DEFAULT_PORTS.get(registry.scheme)
        # A reference names a link-local registry without the zone its URL needs (reference_host).
        return _without_zone(named.hostname) == _without_zone(registry.hostname) and (named.port or default) == (
            registry.port or default
        )
    except ValueError:  # a port beyond 65535
        return False


def image_of(reference: str, registry_url: str | None) -> str:
    """The image name and tag (`shell/curl:TAG`) of `reference`, without the `docker://` scheme
    and the host of the registry at `registry_url` in front. A reference to another registry
    (`other:5000/shell`), of any registry when `registry_url` is None (a local build), or by
    digest raises UnusableReference."""
    text = reference.strip()
    for scheme in ("docker://", "http://", "https://"):  # as skopeo writes it, or a registry URL in front
        text = text.removeprefix(scheme)
    first, slash, rest = text.partition("/")
    if slash and registry_url is not None and _same_host(first, registry_url):
        text = rest
    elif slash and _HOST_WITH_PORT.fullmatch(first):
        name = rest.partition("@")[0]
        if registry_url is None:
            raise UnusableReference(
                f"{reference!r} names the registry {first}: a local build takes the image name alone ({name})"
            )
        raise UnusableReference(
            f"{reference!r} names the registry {first}, not this one ({registry_host(registry_url)}): "
            f"give the image name alone ({name})",
            host=first,
        )
    if "@" in text:
        name, _, digest = text.partition("@")
        raise UnusableReference(
            f"{reference!r} names an image by digest ({digest}): give its name and tag ({name.partition(':')[0]}:TAG)"
        )
    return text
