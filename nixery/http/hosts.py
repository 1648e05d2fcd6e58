"""The host a client names this registry by.

Pages show pull commands with it, progress links in the log and the token realm
name it, and without NIXERY_PUBLIC_HOST images are signed for it. It is, in turn:

1. the `X-Forwarded-Host` of a trusted proxy (NIXERY_TRUSTED_PROXIES, nixery.http.proxies);
2. the host and port of an absolute-form request target (`GET http://host:port/v2/`),
   which RFC 9112 3.2.2 puts before `Host` (aiohttp's `request.host` drops its port);
3. the `Host` header;
4. without one (HTTP/1.0), the address and port the connection came in on.

A `Host` that is not `host[:port]` (`x:abc`, a port past 65535, bytes that are
not UTF-8, markup) is refused up front with 400 REQUEST_INVALID, as Go's net/http
(and so distribution) and nginx refuse it: before, yarl raised wherever a URL was
made of it (a 500, and a pull whose build never started). An empty `Host` is
taken as none (RFC 9112 3.2 lets a client send one), and the pages then say
`localhost`.

A link-local IPv6 address is reached through one interface, which its zone names
(`fe80::1%eth0`). Links keep the zone, written as RFC 6874 writes it in URLs
(`http://[fe80::1%25eth0]:8080/...`); it was refused as no host (400, and pages
naming `localhost`). Image references (pull commands, the identity images are
signed for) cannot carry a zone, and drop it (`[fe80::1]:8080/shell/curl`:
`pull_host`): a client pulls such a registry by a routable address or a name.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any
from urllib.parse import quote

from aiohttp import web

from nixery import errors
from nixery.http.errors import Handler
from nixery.registry.references import reference_host

#: A name or a bracketed IPv6 address, then perhaps a port; each checked further by `valid_host`. The
#: address may have a zone: `%25eth0` as URLs write it (RFC 6874), or `%eth0` as some clients send it
#: (Python's http.client); its characters are unreserved ones or percent-encoded (so never markup).
_HOST = re.compile(
    r"(?P<name>\[(?P<address>[0-9A-Fa-f:.]+)(?:%(?P<zone>(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})+))?\]|[A-Za-z0-9._-]+)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
_HOST_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?")
_MAX_HOST_NAME = 253
_MAX_PORT = 65535


def valid_host(host: str) -> bool:
    """Whether `host` is a host name, an IPv4 address or a bracketed IPv6 address, with an optional port."""
    match = _HOST.fullmatch(host)
    if match is None or (match["port"] is not None and int(match["port"]) > _MAX_PORT):
        return False
    name = match["name"]
    if name.startswith("["):
        try:
            ipaddress.IPv6Address(match["address"])
        except ValueError:
            return False
        return True
    return len(name) <= _MAX_HOST_NAME and _HOST_NAME.fullmatch(name) is not None


def _as_in_urls(host: str) -> str:
    """A valid `host` with the zone of its IPv6 address written as in URLs: `[fe80::1%25eth0]:8080`."""
    match = _HOST.fullmatch(host)
    if match is None or match["zone"] is None:
        return host
    zone = match["zone"]
    # `%25eth0` is the URL form of the zone `eth0`; `%eth0`, the zone as it is.
    zone = zone[2:] if zone.startswith("25") and len(zone) > 2 else zone
    port = f":{match['port']}" if match["port"] is not None else ""
    return f"[{match['address']}%25{zone}]{port}"


def socket_host(address: tuple[Any, ...]) -> str:
    """`host:port` of a socket address as URLs write it. Of a link-local IPv6 address, with the
    interface of this machine it is on (`[fe80::1%25eth0]:8080`): without one it cannot be reached."""
    host, port = address[0], address[1]
    if ":" not in str(host):
        return f"{host}:{port}"
    scope = address[3] if len(address) > 3 else 0
    return f"[{host}%25{_interface(scope)}]:{port}" if scope else f"[{host}]:{port}"


def _interface(scope: int) -> str:
    try:
        return quote(socket.if_indextoname(scope), safe="")
    except OSError:  # gone since: its number is a zone too
        return str(scope)


#: NIXERY_PUBLIC_HOST, when set: a host the registry's own pages are served under too.
PUBLIC_HOST = web.AppKey("public_host", str)

#: The host a trusted proxy says its client used (set by nixery.http.proxies.find_client).
FORWARDED_HOST = web.RequestKey("forwarded_host", str)


def client_host(request: web.BaseRequest) -> str:
    """The host (and port) the client used for this registry, as URLs write it; `localhost` when it named none."""
    return named_host(request) or "localhost"


def pull_host(request: web.BaseRequest) -> str:
    """`client_host` as image references write it: without an IPv6 zone (`reference_host`)."""
    return reference_host(client_host(request))


def named_host(request: web.BaseRequest) -> str:
    """`client_host`, but "" when the client named no host (an empty `Host`): the cross-site
    check must not take the pages' stand-in, `localhost`, for a host the client named."""
    forwarded = request.get(FORWARDED_HOST)
    if forwarded:  # valid (nixery.http.proxies.forwarded_host)
        host = forwarded
    elif not request.raw_path.startswith("/"):  # absolute-form: aiohttp made request.url of the target
        host = request.url.host_port_subcomponent or ""
    elif (header := request.headers.get("Host")) is not None:
        host = header
    else:
        host = _local_address(request)
    return _as_in_urls(host) if host and valid_host(host) else ""


def _local_address(request: web.BaseRequest) -> str:
    """`address:port` of the socket the request came in on, or "" when it is not an IP socket."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return ""
    return socket_host(sockname)


def origin(request: web.BaseRequest) -> str:
    """`scheme://host[:port]` of this registry as the client reached it, for links in logs and pages."""
    return f"{request.scheme}://{client_host(request)}"


@web.middleware
async def refuse_malformed_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    host = request.headers.get("Host", "")
    if host and not valid_host(host):  # never echoed: it may be markup, or bytes that are not UTF-8
        raise errors.RequestInvalid(
            "the Host header is not a host name or address with an optional port (host[:port], port 0-65535)",
            detail={"header": "Host"},
        )
    return await handler(request)
