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
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web

from nixery import errors
from nixery.http.errors import Handler

#: A name or a bracketed IPv6 address, then perhaps a port; each checked further by `valid_host`.
_HOST = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?")
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
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return False
        return True
    return len(name) <= _MAX_HOST_NAME and _HOST_NAME.fullmatch(name) is not None


#: NIXERY_PUBLIC_HOST, when set: a host the registry's own pages are served under too.
PUBLIC_HOST = web.AppKey("public_host", str)

#: The host a trusted proxy says its client used (set by nixery.http.proxies.find_client).
FORWARDED_HOST = web.RequestKey("forwarded_host", str)


def client_host(request: web.BaseRequest) -> str:
    """The host (and port) the client used for this registry; `localhost` when it named none."""
    return named_host(request) or "localhost"


def named_host(request: web.BaseRequest) -> str:
    """`client_host`, but "" when the client named no host (an empty `Host`): the cross-site
    check must not take the pages' stand-in, `localhost`, for a host the client named."""
    forwarded = request.get(FORWARDED_HOST)
    if forwarded:
        return forwarded
    if not request.raw_path.startswith("/"):  # absolute-form: aiohttp made request.url of the target
        host = request.url.host_port_subcomponent or ""
    elif (header := request.headers.get("Host")) is not None:
        host = header
    else:
        host = _local_address(request)
    return host if host and valid_host(host) else ""


def _local_address(request: web.BaseRequest) -> str:
    """`address:port` of the socket the request came in on, or "" when it is not an IP socket."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return ""
    address, port = sockname[0], sockname[1]
    return f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"


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
