"""Access control for the registry API (`/v2/...`) and the token endpoint.

Off unless `NIXERY_AUTH` is set (docs/auth.md):

    basic   every /v2 request carries `Authorization: Basic`; a 401 challenges
            with `Basic realm="nixery"`.
    token   clients get a token from `GET /token` (basic credentials, or none for
            an anonymous pull) or `POST /token` (OAuth2 password grant, as
            containerd does) and send `Authorization: Bearer`; a 401 challenges
            with `Bearer realm="http://HOST/token",service="nixery",scope=...`.
            Basic credentials are accepted on /v2 too (curl -u).

What a request needs:

    GET /v2/                         any valid credentials (how clients find the challenge)
    manifest by tag, image built     pull  (anonymous too, with NIXERY_AUTH_ANONYMOUS_PULL)
    manifest by tag, not built yet   build (403 DENIED for a user without it, 401 for anonymous)
    manifest by digest, blob, tags   pull  (anonymous too, when allowed)
    referrers, sha256-<hex> tags     pull  (documents about a manifest: SBOMs, signatures)
    anything else under /v2          any valid credentials, then the route answers (e.g. 405)

A token is scoped: it allows what its `access` claim lists for a repository, and
only while its user is still in the users file. Refusals are registry errors
(`Unauthorized` carrying the challenge, `Denied`) that the one error middleware
renders. Pages outside /v2 that show images (image pages, build progress, the
landing page's lists) call `require` or `pull_filter`. Passwords and tokens are
never logged.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
from aiohttp import web

from nixery import errors
from nixery.auth import (
    BUILD,
    PULL,
    Authenticator,
    Claims,
    TokenError,
    TokenSigner,
    User,
    UserDirectory,
    grant,
    rfc3339,
)
from nixery.config import AuthSettings, Settings
from nixery.http import csrf, hosts, routes
from nixery.http.bodies import holds_form, read_form
from nixery.http.departures import unless_client_leaves
from nixery.http.errors import Handler
from nixery.registry.names import check_tag, names_attachment

log = structlog.get_logger(__name__)

SERVICE = "nixery"
_SCOPE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/+-]{0,1023}")


@dataclass(frozen=True)
class Identity:
    """Who sent a request: a user (basic credentials, or a token naming one), an
    anonymous token, or nobody (no credentials at all)."""

    user: User | None = None
    claims: Claims | None = None

    @property
    def presented_credentials(self) -> bool:
        return self.user is not None or self.claims is not None

    @property
    def name(self) -> str:
        return self.user.name if self.user is not None else "anonymous"


def _basic_credentials(value: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    name, colon, password = decoded.partition(":")
    return (name, password) if colon and (name or not password) else None


def _scope(repository: str | None) -> str | None:
    if repository is None or not _SCOPE_NAME.fullmatch(repository):
        return None
    return f"repository:{repository}:pull"


class AccessControl:
    def __init__(self, settings: AuthSettings):
        assert settings.enabled and settings.users_file is not None
        self.settings = settings
        self.users = UserDirectory(settings.users_file)
        self.authenticator = Authenticator(self.users)
        self.signer: TokenSigner | None = None
        if settings.mode == "token":
            secret = settings.token_secret.encode() if settings.token_secret else secrets.token_bytes(32)
            self.signer = TokenSigner(secret, ttl=settings.token_ttl, service=SERVICE)

    # --- challenges ---

    def realm(self, request: web.Request) -> str:
        if self.settings.token_realm:
            return self.settings.token_realm
        return f"{hosts.origin(request)}/token"

    def challenge(self, request: web.Request, *, scope: str | None = None, error: str | None = None) -> str:
        if self.signer is None or not _under_v2(request):  # a browser on the pages can answer Basic only
            return _BASIC_CHALLENGE["WWW-Authenticate"]
        params = [f'realm="{self.realm(request)}"', f'service="{SERVICE}"']
        if scope:
            params.append(f'scope="{scope}"')
        if error:
            params.append(f'error="{error}"')
        return "Bearer " + ",".join(params)

    def unauthorized(
        self, request: web.Request, message: str, *, scope: str | None = None, error: str | None = None
    ) -> errors.Unauthorized:
        headers = {**routes.API_VERSION, "WWW-Authenticate": self.challenge(request, scope=scope, error=error)}
        return errors.Unauthorized(message, headers=headers)

    # --- who is asking ---

    async def authenticate(self, request: web.Request, name: str, password: str) -> User | None:
        """The user these credentials name, if the password is theirs. A client that hangs up
        while its check waits its turn is not checked: its queued guesses would run on for nobody."""
        user = self.authenticator.remembered(name, password)
        if user is not None:
            return user
        checking = self.authenticator.check(name, password, client=request.remote or "")
        user = await unless_client_leaves(request, checking, "its password waited to be checked")
        if user is None:
            log.info("auth.bad_credentials", user=name[:64])
        return user

    async def identify(self, request: web.Request, *, scope: str | None = None) -> Identity:
        header = request.headers.get("Authorization")
        if header is None:
            return Identity()
        scheme, _, value = header.strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "basic":
            credentials = _basic_credentials(value)
            if credentials is None:
                raise self.unauthorized(request, "malformed basic credentials", scope=scope)
            if credentials == ("", ""):  # what podman sends when it has no credentials
                return Identity()
            user = await self.authenticate(request, *credentials)
            if user is None:
                raise self.unauthorized(request, "invalid user name or password", scope=scope)
            return Identity(user=user)
        if scheme == "bearer" and self.signer is not None:
            try:
                claims = self.signer.verify(value)
            except TokenError as exc:
                raise self.unauthorized(request, f"invalid token: {exc}", scope=scope, error="invalid_token") from None
            user = None
            if claims.subject is not None:
                user = self.users.get(claims.subject)
                if user is None:  # removed from the users file since the token was issued
                    raise self.unauthorized(request, "invalid token: unknown user", scope=scope, error="invalid_token")
            elif not self.settings.anonymous_pull:  # turned off since the token was issued (a shared secret)
                raise self.unauthorized(
                    request, "invalid token: anonymous pulls are off", scope=scope, error="invalid_token"
                )
            return Identity(user=user, claims=claims)
        accepted = "Bearer or Basic" if self.signer is not None else "Basic"
        raise self.unauthorized(request, f"unsupported authorization scheme (use {accepted})", scope=scope)

    # --- what they may do ---

    def may(self, identity: Identity, repository: str, action: str) -> bool:
        if identity.claims is not None:
            allowed = action in identity.claims.access.get(repository, ())
            return allowed and (identity.user is None or identity.user.may(action))
        if identity.user is not None:
            return identity.user.may(action)
        return action == PULL and self.settings.anonymous_pull

    def refusal(
        self, request: web.Request, identity: Identity, repository: str, action: str, message: str
    ) -> errors.RegistryError:
        """Denied when the user lacks the permission; else a challenge to (re)authenticate."""
        log.info("auth.refused", user=identity.name, action=action, path=request.path[:300])
        if identity.user is not None and not identity.user.may(action):
            return errors.Denied(
                f"user {identity.user.name} may not {action} here: {message}",
                detail={"user": identity.user.name, "needs": action},
            )
        if identity.user is not None:  # a token for other repositories: the client asks for another
            message = f"the token does not grant {action} on {repository[:300]}"
        else:
            message = f"authentication required: {message}"
        error = "insufficient_scope" if identity.presented_credentials else None
        return self.unauthorized(request, message, scope=_scope(repository), error=error)


ACCESS = web.AppKey("access_control", AccessControl)


def _under_v2(request: web.Request) -> bool:
    path = request.path
    if path == "/v2" or path.startswith("/v2/"):
        return True
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical.startswith("/v2")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not _under_v2(request):
        return await handler(request)
    access = request.app[ACCESS]
    repository = request.match_info.get("name")
    identity = await access.identify(request, scope=_scope(repository))
    if identity.user is not None and identity.claims is None:
        # Basic credentials, which a browser also sends with another site's <img src=/v2/...>
        # (no preflight for a GET): a pull can build, so a browser must say it comes from here.
        csrf.refuse_cross_site(request, csrf.CREDENTIALS_REFUSED)
    if repository is None:  # /v2/ itself, or no such route
        if not identity.presented_credentials:
            raise access.unauthorized(request, "authentication required")
        return await handler(request)
    if not access.may(identity, repository, PULL):
        raise access.refusal(request, identity, repository, PULL, "pulling needs the pull permission")
    reference = request.match_info.get("reference")
    if (  # a manifest by tag builds, unless it is by digest or an attachment's tag (sha256-<hex>; a
        # malformed one builds nothing either: the route answers it 404, names.names_attachment)
        reference is not None and ":" not in reference
        and not names_attachment(reference)
        and not access.may(identity, repository, BUILD)
    ):
        tag = check_tag(reference)
        image = await routes.requested_image(request, tag)  # raises what the route would for a bad name
        if await request.app[routes.BUILDER].built(image, tag) is None:
            raise access.refusal(
                request,
                identity,
                repository,
                BUILD,
                f"{repository[:300]}:{tag} is not built yet, and building needs the build permission",
            )
    return await handler(request)


async def require(request: web.Request, repository: str, permission: str = BUILD) -> None:
    """For routes outside /v2 that act on images (e.g. a form that starts a
    build): raise Unauthorized/Denied unless the request's credentials allow
    `permission` on `repository`. Does nothing when access control is off."""
    access = request.app.get(ACCESS)
    if access is None:
        return
    identity = await access.identify(request, scope=_scope(repository))
    if not access.may(identity, repository, permission):
        raise access.refusal(request, identity, repository, permission, f"this needs the {permission} permission")


async def pull_filter(request: web.Request) -> Callable[[str], bool]:
    """For pages that list images (recent builds and images): whether this request
    may see a repository, i.e. pull it. Missing or bad credentials see what
    anonymous clients may: the page still renders, without the entries."""
    access = request.app.get(ACCESS)
    if access is None:
        return lambda repository: True
    try:
        identity = await access.identify(request)
    except errors.Unauthorized:
        identity = Identity()
    return lambda repository: access.may(identity, repository, PULL)


async def _token_request(request: web.Request) -> tuple[tuple[str, str] | None, str | None, list[str]]:
    """(credentials, service, scopes) from a GET (basic credentials, query) or a
    POST (OAuth2 password grant form)."""
    if request.method == "POST":
        if not holds_form(request):  # RFC 6749 4.3.2: url-encoded (multipart is read as well)
            # A JSON password grant was refused as "only the password grant is supported".
            raise errors.RequestInvalid(
                "POST /token takes the OAuth2 password grant as a form (application/x-www-form-urlencoded: "
                "grant_type=password&username=...&password=...), as docker and podman send it"
            )
        form = await read_form(request)
        if _form_text(form, "grant_type") != "password":  # e.g. refresh_token: this registry issues no refresh tokens
            raise errors.Unauthorized(
                "only the OAuth2 password grant is supported; or GET with basic credentials",
                headers=_BASIC_CHALLENGE,
            )
        name, password = _form_text(form, "username"), _form_text(form, "password")
        credentials = (name, password) if name else None
        return credentials, _form_text(form, "service") or None, _form_text(form, "scope").split()
    credentials = None
    header = request.headers.get("Authorization", "").strip()
    if header:
        scheme, _, value = header.partition(" ")
        credentials = _basic_credentials(value.strip()) if scheme.lower() == "basic" else None
        if credentials is None:
            raise errors.Unauthorized("the token endpoint takes basic credentials", headers=_BASIC_CHALLENGE)
        if credentials == ("", ""):
            credentials = None
    scopes = [word for scope in request.query.getall("scope", []) for word in scope.split()]
    return credentials, request.query.get("service"), scopes


def _form_text(form: Mapping[str, object], field: str) -> str:
    """A field of the token form: text. A file's was read as Python's text for it (its memory
    address included), and answered back in the error."""
    value = form.get(field, "")
    if not isinstance(value, str):
        raise errors.RequestInvalid(f"the form field `{field}` must be text, not a file", detail={"field": field})
    return value


_BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="nixery", charset="UTF-8"'}


async def token(request: web.Request) -> web.Response:
    """The token endpoint of the Docker token flow."""
    access = request.app[ACCESS]
    assert access.signer is not None
    credentials, service, scopes = await _token_request(request)
    if service is not None and service != SERVICE:
        raise errors.Denied(f"this registry's token service is {SERVICE!r}, not {service[:100]!r}")
    user = None
    if credentials is not None:
        user = await access.authenticate(request, *credentials)
        if user is None:
            raise errors.Unauthorized("invalid user name or password", headers=_BASIC_CHALLENGE)
        permissions = user.permissions
    elif access.settings.anonymous_pull:
        permissions = frozenset({PULL})
    else:
        raise errors.Unauthorized("authentication required: log in first", headers=_BASIC_CHALLENGE)
    signed, claims = access.signer.issue(user.name if user else None, grant(permissions, scopes))
    body = {
        "token": signed,
        "access_token": signed,
        "expires_in": access.signer.ttl,
        "issued_at": rfc3339(claims.issued_at),
    }
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def install(app: web.Application, settings: Settings) -> None:
    """Add access control to the app when NIXERY_AUTH asks for it."""
    auth = settings.auth
    if not auth.enabled:
        return
    app[ACCESS] = AccessControl(auth)
    app.middlewares.append(auth_middleware)
    if auth.mode == "token":
        app.router.add_get("/token", token)
        app.router.add_post("/token", token)
        if auth.token_secret_generated:
            log.warning(
                "auth.random_token_secret",
                hint="tokens die with this process; replicas on other hosts need a shared NIXERY_TOKEN_SECRET",
            )
    log.info("auth.enabled", mode=auth.mode, users_file=str(auth.users_file), anonymous_pull=auth.anonymous_pull)
