"""The client behind a reverse proxy (NIXERY_TRUSTED_PROXIES, nixery/http/proxies.py).

The registry serves build slots and password checks in turn by client, and logs
the client of each request. Behind a proxy it must see the client the proxy
names, and only when a trusted proxy names it: anyone else's `X-Forwarded-For`
is a client choosing its own address.
"""

from __future__ import annotations

import ipaddress

import pytest
from aiohttp import web

from nixery import fair
from nixery.config import ConfigError, load
from nixery.http import proxies
from nixery.http.access import access_log

LOCAL = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # An untrusted peer is the client, whatever it says.
        ("198.51.100.4", ["203.0.113.7"], "198.51.100.4"),
        # A trusted proxy names the address it was reached from.
        ("127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", [], "127.0.0.1"),  # the proxy's own request (a health check)
        # Two trusted hops: the first untrusted address from the right.
        ("127.0.0.1", ["203.0.113.7, 10.1.2.3"], "203.0.113.7"),
        # Addresses left of the first untrusted one were written by the client.
        ("127.0.0.1", ["127.0.0.1, 10.9.9.9, 203.0.113.7"], "203.0.113.7"),
        ("127.0.0.1", ["1.1.1.1", "203.0.113.7"], "203.0.113.7"),  # several header lines, in order
        # Garbage ends the walk at the hop that passed it on.
        ("127.0.0.1", ["unknown, 10.1.2.3"], "10.1.2.3"),
        ("127.0.0.1", ["<script>"], "127.0.0.1"),
        # Ports written after the address; IPv6; IPv4 peers of a dual-stack listener.
        ("127.0.0.1", ["203.0.113.7:5123"], "203.0.113.7"),
        ("127.0.0.1", ["[2001:db8::7]:5123"], "2001:db8::7"),
        ("::ffff:127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
        # Every hop trusted: the leftmost.
        ("127.0.0.1", ["10.0.0.5, 10.0.0.6"], "10.0.0.5"),
    ],
)
def test_the_client_is_the_first_untrusted_address_from_the_right(
    peer: str, forwarded_for: list[str], client: str
) -> None:
    assert proxies.client_address(peer, forwarded_for, LOCAL) == client


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert proxies.client_address("127.0.0.1", ["203.0.113.7"], ()) == "127.0.0.1"


def test_the_setting_takes_addresses_and_networks_and_refuses_anything_else() -> None:
    assert load({}).trusted_proxies == ()
    settings = load({"NIXERY_TRUSTED_PROXIES": " 127.0.0.1, 10.1.2.3/8,::1 ,"})
    assert [str(n) for n in settings.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    with pytest.raises(ConfigError, match=r"^NIXERY_TRUSTED_PROXIES: 'nginx' is not an IP address or network"):
        load({"NIXERY_TRUSTED_PROXIES": "127.0.0.1,nginx"})


def _app(trusted: str) -> web.Application:
    """The registry's first two middlewares, around a handler that says whom it served."""

    async def whom(request: web.Request) -> web.Response:
        return web.json_response({"remote": request.remote, "turn": fair.requester.get()})

    app = web.Application(middlewares=[proxies.find_client, access_log])
    app[proxies.TRUSTED_PROXIES] = load({"NIXERY_TRUSTED_PROXIES": trusted}).trusted_proxies
    app.router.add_get("/", whom)
    return app


@pytest.mark.parametrize(("trusted", "seen"), [("127.0.0.1", "203.0.113.7"), ("", "127.0.0.1")])
async def test_builds_and_password_checks_wait_in_turn_for_the_named_client(aiohttp_client, trusted, seen) -> None:
    client = await aiohttp_client(_app(trusted))
    response = await client.get("/", headers={"X-Forwarded-For": "203.0.113.7"})
    assert await response.json() == {"remote": seen, "turn": seen}


def _scheme_app(trusted: str) -> web.Application:
    async def scheme(request: web.Request) -> web.Response:
        return web.Response(text=request.scheme)

    app = web.Application(middlewares=[proxies.find_client])
    app[proxies.TRUSTED_PROXIES] = load({"NIXERY_TRUSTED_PROXIES": trusted}).trusted_proxies
    app.router.add_get("/", scheme)
    return app


@pytest.mark.parametrize(
    ("trusted", "forwarded_proto", "scheme"),
    [
        ("127.0.0.1", "https", "https"),  # a proxy that terminates TLS: links and the realm say https
        ("127.0.0.1", "http, https", "https"),  # the value the trusted peer wrote last
        ("127.0.0.1", "gopher", "http"),  # neither http nor https: not believed
        ("", "https", "http"),  # from a peer that is not trusted, not believed
        ("10.0.0.0/8", "https", "http"),
    ],
)
async def test_the_scheme_is_the_one_a_trusted_proxy_names(aiohttp_client, trusted, forwarded_proto, scheme) -> None:
    client = await aiohttp_client(_scheme_app(trusted))
    response = await client.get("/", headers={"X-Forwarded-Proto": forwarded_proto})
    assert await response.text() == scheme
