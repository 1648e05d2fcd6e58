"""Which client a request is from, behind reverse proxies (NIXERY_TRUSTED_PROXIES).

Behind nginx or an ingress, every connection comes from the proxy. Build slots
are served in turn by client, password checks wait in turn by client, and the
access log names the client: with the proxy's address for all of them, one
client's twenty queued builds held everyone back, and a client guessing
passwords slowed every login. A proxy names the client in `X-Forwarded-For`,
appending the address it was reached from to what it was sent.

That header is believed only from a trusted peer, and only as far as the chain
of trusted hops goes: from the right, every address that is a trusted proxy is
passed over, and the first that is not is the client. An address to its left
was written by that client and could be anything. Without the setting, the
header is ignored, so a client cannot pick its own address.

From a trusted peer `X-Forwarded-Proto` and `X-Forwarded-Host` are believed too
(the value it wrote last): behind a proxy that terminates TLS, links and the
token realm then say `https` without NIXERY_TOKEN_REALM, and behind one that
sends its upstream's name as `Host`, they name the host the client used. From
any other peer both are ignored: the cross-site check of the web forms compares
a browser's `Origin` with the host, so a host that any client could name would
let any `Origin` pass.

aiohttp-remotes was looked at: its strict mode needs every request to have come
through the same number of proxies (a health probe sent to the pod directly is
refused) and its filtered mode believes the header from any peer.
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web

from nixery.http import hosts
from nixery.http.errors import Handler

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

TRUSTED_PROXIES = web.AppKey("trusted_proxies", tuple[Network, ...])

#: Some proxies (Azure's, IIS) write a port after the address: `198.51.100.7:5123`, `[2001:db8::7]:5123`.
_WITH_PORT = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::[0-9]{1,5})?|(?P<v4>[0-9.]+):[0-9]{1,5}")


def _address(text: str) -> Address | None:
    text = text.strip()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        match = _WITH_PORT.fullmatch(text)
        if match is None:
            return None
        try:
            address = ipaddress.ip_address(match["v6"] or match["v4"])
        except ValueError:
            return None
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d; trusted networks are written as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address | None, trusted: tuple[Network, ...]) -> bool:
    return address is not None and any(address in network for network in trusted)


def client_address(peer: str | None, forwarded_for: list[str], trusted: tuple[Network, ...]) -> str | None:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the last
    address in `X-Forwarded-For` (all its header lines, in order) that is not one.

    An entry that is no address (`unknown`, garbage a client sent) ends the walk: the
    hop that passed it on is the client as far as anyone trusted can tell.
    """
    current = None if peer is None else _address(peer)
    if current is None or not _trusted(current, trusted):
        return peer
    entries = [entry for line in forwarded_for for entry in line.split(",")]
    for entry in reversed(entries):
        address = _address(entry)
        if address is None:
            break
        current = address
        if not _trusted(address, trusted):
            break
    return str(current)


def _written_last(peer: str | None, lines: list[str], trusted: tuple[Network, ...]) -> str | None:
    """The value a trusted peer wrote last in a comma-separated header (all its lines, in order);
    None from any other peer, or when there is none."""
    if peer is None or not _trusted(_address(peer), trusted):
        return None
    values = [value.strip() for line in lines for value in line.split(",")]
    return values[-1] if values else None


def forwarded_scheme(peer: str | None, forwarded_proto: list[str], trusted: tuple[Network, ...]) -> str | None:
    """`http` or `https` as the trusted peer says the client reached it (`X-Forwarded-Proto`, the
    value it wrote last); None from any other peer, or for anything else."""
    scheme = (_written_last(peer, forwarded_proto, trusted) or "").lower()
    return scheme if scheme in ("http", "https") else None


def forwarded_host(peer: str | None, forwarded_host: list[str], trusted: tuple[Network, ...]) -> str | None:
    """The host the client used, as the trusted peer says (`X-Forwarded-Host`, the value it wrote
    last); None from any other peer, or for a value that is not `host[:port]`."""
    host = _written_last(peer, forwarded_host, trusted)
    return host if host is not None and hosts.valid_host(host) else None


@web.middleware
async def find_client(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Make `request.remote` the client's address, `request.scheme` the one it used, and
    `hosts.client_host` the host it named, for everything after it (the outermost middleware):
    links, the token realm, the cross-site check, the turns it waits in."""
    trusted = request.app[TRUSTED_PROXIES]
    if trusted:
        headers, peer = request.headers, request.remote
        client = client_address(peer, headers.getall("X-Forwarded-For", []), trusted)
        scheme = forwarded_scheme(peer, headers.getall("X-Forwarded-Proto", []), trusted)
        host = forwarded_host(peer, headers.getall("X-Forwarded-Host", []), trusted)
        if (client is not None and client != peer) or (scheme is not None and scheme != request.scheme):
            request = request.clone(remote=client or peer or "", scheme=scheme or request.scheme)
        if host is not None:
            request[hosts.FORWARDED_HOST] = host
    return await handler(request)
