"""Cross-site posts to the registry's own forms (`POST /builds`) are refused, and so
are cross-site requests to `/v2` that carry basic credentials (nixery.http.auth).

A browser sends a user's basic credentials with every request to this host,
so any web page could make a logged-in browser start builds with a plain
`<form method=post action=http://registry/builds>`. Browsers say where a
request comes from, and that is checked (as Go's net/http
CrossOriginProtection does), with no token to keep:

* `Sec-Fetch-Site` (every current browser): `same-origin`, or `none` (the user
  acted, e.g. a bookmark), passes; `same-site` (another port or subdomain) and
  `cross-site` are refused.
* Without it, `Origin` (sent with every POST by older browsers too) must name
  this registry: its `Host`, the host the client used (`hosts.named_host`:
  a trusted proxy's `X-Forwarded-Host` counts, another peer's does not), or
  NIXERY_PUBLIC_HOST. `Origin: null` (sandboxed pages) is refused. An empty
  `Host` names no host: the `localhost` the pages then show does not count.
* A request with neither header does not come from a web page (`nixery build`,
  curl, scripts) and passes: it carries only the credentials its sender chose.

A page cannot forge these headers: browsers set them, and a cross-origin
`fetch` that sets its own headers is preflighted, which this registry never
allows. A refusal is 403 DENIED (an error page for a browser's form post).
"""

from __future__ import annotations

import structlog
from aiohttp import web

from nixery import errors
from nixery.http import hosts

log = structlog.get_logger(__name__)

_ALLOWED_FETCH_SITES = ("same-origin", "none")
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}

#: What `refuse_cross_site` says, for each of its uses.
FORM_POST_REFUSED = (
    "refused a request from another site's page: this registry's forms only take posts from its own pages"
)
CREDENTIALS_REFUSED = (
    "refused a registry API request with basic credentials from another site's page: a browser sends "
    "them with any page's requests, so the registry API takes them only from its own pages and from "
    "clients that are not browsers (docker, podman, curl)"
)


def refuse_cross_site(request: web.Request, refusal: str) -> None:
    """Raise Denied, saying `refusal`, when a browser says this request comes from another site's page."""
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site is not None:
        if site.strip().lower() in _ALLOWED_FETCH_SITES:
            return
        reason = f"Sec-Fetch-Site: {_shown(site, 50)}"
    elif origin is not None:
        if _names_this_registry(request, origin):
            return
        reason = f"Origin: {_shown(origin, 200)}"
    else:
        return
    log.info("http.cross_site_refused", path=request.path[:300], reason=reason)
    raise errors.Denied(refusal, detail={"reason": reason})


def _shown(value: str, limit: int) -> str:
    """A header's value, cut, in ASCII: bytes that are not UTF-8 (surrogates here) escaped, not sent back."""
    return value[:limit].encode("ascii", "backslashreplace").decode("ascii")


def _names_this_registry(request: web.Request, origin: str) -> bool:
    scheme, separator, authority = origin.strip().lower().partition("://")
    if not separator or scheme not in _DEFAULT_PORTS or not authority or "/" in authority:
        return False  # "null", or not an origin at all
    ours = (request.headers.get("Host", ""), hosts.named_host(request), request.app.get(hosts.PUBLIC_HOST, ""))
    names = {_without_default_port(host.strip().lower(), scheme) for host in ours}
    return _without_default_port(authority, scheme) in names - {""}


def _without_default_port(authority: str, scheme: str) -> str:
    return authority.removesuffix(_DEFAULT_PORTS[scheme])
