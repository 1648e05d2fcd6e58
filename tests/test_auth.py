"""Access control: password hashes, tokens, the users file, the /v2 middleware
(in process, a table of who may do what), and real clients logging in and
pulling from registries in basic and token mode."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from nixery import auth
from nixery.config import AuthSettings, ConfigError, Settings, load
from nixery.http import auth as http_auth
from nixery.http import routes
from nixery.http.errors import error_middleware
from nixery.platforms import host_arch
from tests import daemons
from tests.registry import PODMAN_RUN_FLAGS, REPOSITORY, RegistryProcess, have, run
from tests.terminal import nixery_in_pty

ALICE = ("alice", "alice-secret-1")  # pull,build
BOB = ("bob", "bob-secret-2")  # pull only
FAST = 10  # log2 N for test hashes: the format is the same, the cost lower


def users_text() -> str:
    return (
        "# test users\n"
        f"alice:{auth.hash_password(ALICE[1], log_n=FAST)}:pull,build\n"
        "\n"
        f"bob:{auth.hash_password(BOB[1], log_n=FAST)}:pull\n"
    )


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "users"
    path.write_text(users_text())
    return path


def basic(user: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- passwords ---------------------------------------------------------------


def test_password_hash_round_trip() -> None:
    encoded = auth.hash_password("correct horse", log_n=FAST)
    assert encoded.startswith(f"scrypt${FAST}$8$1$")
    assert auth.verify_password("correct horse", encoded)
    assert not auth.verify_password("correct horsE", encoded)
    assert not auth.verify_password("", encoded)


def test_password_hashes_are_salted() -> None:
    first, second = (auth.hash_password("same", log_n=FAST) for _ in range(2))
    assert first != second
    assert auth.verify_password("same", first) and auth.verify_password("same", second)


def test_default_cost_and_malformed_hashes() -> None:
    encoded = auth.hash_password("pw")
    assert encoded.startswith(f"scrypt${auth.SCRYPT_LOG_N}$8$1$")
    assert auth.verify_password("pw", encoded)
    for bad in ("", "pw", "bcrypt$2b$...", encoded.replace("scrypt$15$", "scrypt$30$"), encoded[:-12]):
        assert not auth.verify_password("pw", bad)


def test_hash_password_command_prints_a_users_file_line() -> None:
    out = io.StringIO()
    code = auth.hash_password_main(
        ["--user", "carol", "--permissions", "build", "--cost", "10"], stdin=io.StringIO("s3cret\n"), stdout=out
    )
    assert code == 0
    users = auth.parse_users(out.getvalue())
    assert users["carol"].permissions == {"pull", "build"}
    assert auth.verify_password("s3cret", users["carol"].password_hash)
    assert auth.hash_password_main(["--cost", "10"], stdin=io.StringIO("\n"), stdout=io.StringIO()) == 2


def test_hash_password_from_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nixery", "auth", "hash-password", "--cost", "10"],
        input="pw\n", capture_output=True, text=True, cwd=REPOSITORY, check=True,
    )
    assert auth.verify_password("pw", result.stdout.strip())


def _hash_password_typing_at_the_prompt(keys: bytes) -> tuple[int, bytes]:
    """`nixery auth hash-password` on a terminal, with `keys` typed at its first `Password:` prompt."""
    typed = []

    def at_the_prompt(shown: bytes) -> bytes | None:
        if typed or b"Password: " not in shown:
            return None
        typed.append(keys)
        return keys

    status, shown = nixery_in_pty(
        "auth", "hash-password", "--user", "alice", "--cost", "10", timeout=60, controlling=True, answer=at_the_prompt,
    )
    assert typed, shown  # the prompt was shown
    return status, shown


def test_hash_password_at_a_prompt_ended_with_ctrl_d_says_so() -> None:
    """Ctrl-D at the `Password:` prompt (the terminal's end of input) printed "nixery auth
    hash-password: " and nothing else (EOFError's empty message), status 2: now it says that the
    input ended with no password, on a line of its own."""
    status, shown = _hash_password_typing_at_the_prompt(b"\x04")
    lines = shown.decode(errors="replace").replace("\r", "").splitlines()
    assert status == 2, lines
    assert lines[-1] == "nixery auth hash-password: no password: the input ended at the prompt (Ctrl-D)", lines


def test_hash_password_interrupted_at_the_prompt_says_so_on_a_line_of_its_own() -> None:
    """Ctrl-C at the `Password:` prompt printed "Password: nixery auth hash-password: interrupted" on one line."""
    status, shown = _hash_password_typing_at_the_prompt(b"\x03")
    lines = shown.decode(errors="replace").replace("\r", "").splitlines()
    assert status == 130, lines
    assert lines[-2:] == ["Password: ", "nixery auth hash-password: interrupted"], lines


# --- users file --------------------------------------------------------------


def test_users_file() -> None:
    users = auth.parse_users(users_text())
    assert set(users) == {"alice", "bob"}
    assert users["alice"].may("build") and users["alice"].may("pull")
    assert users["bob"].may("pull") and not users["bob"].may("build")
    assert "scrypt" not in repr(users["alice"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice:pull", "line 1: expected name:hash:permissions"),
        ("alice:{hash}:pull:extra", "line 1: expected name:hash:permissions"),
        ("al ice:{hash}:pull", "line 1: invalid user name"),
        ("alice:{hash}:push", "line 1 (user alice): permissions must be"),
        ("alice:{hash}:", "line 1 (user alice): permissions must be"),
        ("alice:plaintext:pull", "line 1 (user alice): not an scrypt hash"),
        ("alice:{hash}:pull\nalice:{hash}:pull", "line 2: user alice is listed twice"),
        ("# nobody", "lists no users"),
    ],
)
def test_malformed_users_file(line: str, message: str) -> None:
    encoded = auth.hash_password("pw", log_n=FAST)
    with pytest.raises(auth.UsersFileError) as caught:
        auth.parse_users(line.replace("{hash}", encoded))
    assert str(caught.value).startswith(message)
    assert encoded not in str(caught.value)


def test_a_users_file_that_starts_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A BOM made the first user's name invalid, and the registry did not start."""
    path = tmp_path / "users"
    path.write_bytes("\ufeff".encode() + users_text().encode())
    assert auth.UserDirectory(path).get("alice") is not None


def test_users_file_is_reloaded_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(users_text())
    now = [0.0]
    directory = auth.UserDirectory(path, check_interval=2.0, clock=lambda: now[0])
    assert directory.get("bob") is not None
    path.write_text(users_text().replace("bob:", "dave:"))
    assert directory.get("bob") is not None  # not checked again yet
    now[0] = 3.0
    assert directory.get("bob") is None and directory.get("dave") is not None
    path.write_text("garbage\n")  # a broken edit keeps the last good users
    now[0] = 6.0
    assert directory.get("dave") is not None


def publish_secret(directory: Path, version: str, text: str) -> None:
    """The kubelet's layout of a mounted Secret: `users` -> `..data/users`, `..data` a link to a
    hidden directory that an update replaces (a new directory, then `..data` renamed over)."""
    (directory / f"..v{version}").mkdir()
    (directory / f"..v{version}" / "users").write_text(text)
    os.symlink(f"..v{version}", directory / "..data_tmp")
    os.rename(directory / "..data_tmp", directory / "..data")
    if not (directory / "users").is_symlink():
        os.symlink("..data/users", directory / "users")


def test_a_mounted_secrets_update_is_seen(tmp_path: Path) -> None:
    """The users file of a Kubernetes Secret: the settings resolved its link at start-up, so the
    registry kept reading the first version, and a user removed from the Secret could still pull."""
    publish_secret(tmp_path, "1", users_text())
    settings = load({"NIXERY_AUTH": "basic", "NIXERY_AUTH_USERS": str(tmp_path / "users"),
                            "NIXERY_BUNDLED_SET": "busybox"})
    now = [0.0]
    directory = auth.UserDirectory(settings.auth.users_file, check_interval=2.0, clock=lambda: now[0])
    assert directory.get("bob") is not None and directory.get("carol") is None
    publish_secret(tmp_path, "2", users_text().replace("bob:", "carol:"))
    now[0] = 3.0
    assert directory.get("bob") is None and directory.get("carol") is not None


async def test_authenticator_remembers_good_passwords_only(users_file: Path) -> None:
    checker = auth.Authenticator(auth.UserDirectory(users_file))
    assert (await checker.check(*ALICE)).name == "alice"
    assert await checker.check("alice", "wrong") is None
    assert await checker.check("nobody", ALICE[1]) is None
    started = time.monotonic()
    for _ in range(50):
        assert await checker.check(*ALICE) is not None
    assert time.monotonic() - started < 0.5


async def test_unknown_names_cost_what_the_listed_users_cost(tmp_path: Path, monkeypatch) -> None:
    """No probing for user names by timing: a name that is not listed is checked at the
    scrypt cost of the listed users (here cheaper than the default), as a wrong password is."""
    path = tmp_path / "users"
    path.write_text(users_text())  # every hash at log2 N = FAST
    costs: list[int] = []
    real_scrypt = auth._scrypt

    def recording_scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
        costs.append(log_n)
        return real_scrypt(password, salt, log_n, r, p)

    monkeypatch.setattr(auth, "_scrypt", recording_scrypt)
    checker = auth.Authenticator(auth.UserDirectory(path))
    assert await checker.check("alice", "wrong") is None
    assert await checker.check("nobody", "wrong") is None
    assert costs == [FAST, FAST]


# --- tokens ------------------------------------------------------------------

SECRET = b"0123456789abcdef0123456789abcdef"


def test_token_round_trip() -> None:
    signer = auth.TokenSigner(SECRET, ttl=300)
    token, claims = signer.issue("alice", {"shell/hello": frozenset({"pull", "build"})})
    verified = signer.verify(token)
    assert verified.subject == "alice"
    assert verified.access == {"shell/hello": {"pull", "build"}}
    assert verified.expires_at == claims.issued_at + 300
    header, payload, _ = token.split(".")
    assert json.loads(auth._b64decode(header)) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(auth._b64decode(payload))["aud"] == "nixery"
    assert signer.verify(signer.issue(None, {})[0]).subject is None


def test_token_expiry() -> None:
    now = [1_000_000.0]
    signer = auth.TokenSigner(SECRET, ttl=60, clock=lambda: now[0])
    token, _ = signer.issue("alice", {})
    now[0] += 59
    signer.verify(token)
    now[0] += 1
    with pytest.raises(auth.TokenError, match="expired"):
        signer.verify(token)


def test_forged_and_foreign_tokens_are_refused() -> None:
    signer = auth.TokenSigner(SECRET)
    token, _ = signer.issue("bob", {"shell": frozenset({"pull"})})
    header, payload, signature = token.split(".")
    claims = json.loads(auth._b64decode(payload))
    claims["access"][0]["actions"] = ["pull", "build"]
    forged = f"{header}.{auth._b64encode(json.dumps(claims).encode())}.{signature}"
    none_header = auth._b64encode(json.dumps({"alg": "none"}).encode())
    unsigned = f"{none_header}.{payload}."
    other = auth.TokenSigner(b"another secret, just as long....").issue("bob", {})[0]
    other_service = auth.TokenSigner(SECRET, service="elsewhere").issue("bob", {})[0]
    for bad in (forged, unsigned, other, other_service, "", "a.b", "a.b.c", token + "x", "ünïcode.a.b"):
        with pytest.raises(auth.TokenError):
            signer.verify(bad)


def test_token_signatures_are_decoded_strictly() -> None:
    """Only the one canonical unpadded base64url spelling of a signature verifies: not
    with padding, characters outside the alphabet, or the last character's unused bits set."""
    signer = auth.TokenSigner(SECRET)
    token, _ = signer.issue("alice", {"shell": frozenset({"pull"})})
    signing_input, _, signature = token.rpartition(".")
    assert len(signature) == 43  # 32 bytes: the last character carries 2 unused bits
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    same_bits = alphabet[alphabet.index(signature[-1]) ^ 1]  # differs only in an unused bit
    assert base64.urlsafe_b64decode(signature + "=") == base64.urlsafe_b64decode(signature[:-1] + same_bits + "=")
    signer.verify(token)
    for variant in ("!!", "=", "==", "?", " "):
        with pytest.raises(auth.TokenError, match="malformed"):
            signer.verify(f"{signing_input}.{signature}{variant}")
    for bad in (signature[:-1] + same_bits, signature[:20] + "!" + signature[20:], signature.replace("_", "/")):
        if bad != signature:
            with pytest.raises(auth.TokenError, match="malformed"):
                signer.verify(f"{signing_input}.{bad}")


def test_grants_follow_permissions() -> None:
    pull, build = frozenset({"pull"}), frozenset({"pull", "build"})
    scopes = ["repository:shell/hello:pull", "repository:fortune:push,pull", "repository:x:push", "registry:catalog:*"]
    assert auth.grant(pull, scopes) == {"shell/hello": {"pull"}, "fortune": {"pull"}}
    assert auth.grant(build, scopes) == {"shell/hello": {"pull", "build"}, "fortune": {"pull", "build"}}
    assert auth.grant(frozenset(), scopes) == {}
    assert auth.grant(pull, ['repository:a"b:pull', "repository::pull"]) == {}


# --- configuration -----------------------------------------------------------


def test_auth_is_off_by_default() -> None:
    assert load({}).auth == AuthSettings()
    assert not load({}).auth.enabled


def test_auth_settings(users_file: Path) -> None:
    env = {"NIXERY_AUTH": "token", "NIXERY_AUTH_USERS": str(users_file), "NIXERY_TOKEN_SECRET": "s" * 32,
           "NIXERY_TOKEN_TTL": "60", "NIXERY_AUTH_ANONYMOUS_PULL": "true"}
    settings = load(env).auth
    assert (settings.mode, settings.users_file, settings.token_ttl, settings.anonymous_pull) == (
        "token", users_file, 60, True,
    )
    assert "s" * 32 not in repr(settings) and not settings.token_secret_generated
    del env["NIXERY_TOKEN_SECRET"]
    generated = load(env).auth
    assert generated.token_secret_generated and len(generated.token_secret) == 64
    assert load(env).auth.token_secret != generated.token_secret


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NIXERY_AUTH": "basic"}, "NIXERY_AUTH_USERS (a users file) must be set"),
        ({"NIXERY_AUTH": "ldap"}, "NIXERY_AUTH='ldap' must be one of"),
        ({"NIXERY_AUTH_USERS": "USERS"}, "NIXERY_AUTH_USERS is set but NIXERY_AUTH=none"),
        ({"NIXERY_AUTH": "basic", "NIXERY_AUTH_USERS": "/nonexistent"}, "NIXERY_AUTH_USERS='/nonexistent' cannot be"),
        ({"NIXERY_AUTH": "token", "NIXERY_AUTH_USERS": "USERS", "NIXERY_TOKEN_SECRET": "short"}, "NIXERY_TOKEN_SECRET"),
        ({"NIXERY_AUTH": "token", "NIXERY_AUTH_USERS": "USERS", "NIXERY_TOKEN_TTL": "0"}, "NIXERY_TOKEN_TTL"),
        # Docker's token spec: never less than 60 s (docker keeps a token that long whatever it is told).
        ({"NIXERY_AUTH": "token", "NIXERY_AUTH_USERS": "USERS", "NIXERY_TOKEN_TTL": "30"}, "NIXERY_TOKEN_TTL"),
        ({"NIXERY_AUTH": "token", "NIXERY_AUTH_USERS": "USERS", "NIXERY_TOKEN_REALM": "x"}, "NIXERY_TOKEN_REALM"),
        ({"NIXERY_AUTH": "basic", "NIXERY_AUTH_USERS": "USERS", "NIXERY_AUTH_ANONYMOUS_PULL": "maybe"},
         "NIXERY_AUTH_ANONYMOUS_PULL"),
    ],
)
def test_auth_configuration_errors(users_file: Path, env: dict[str, str], message: str) -> None:
    env = {name: value.replace("USERS", str(users_file)) for name, value in env.items()}
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        load(env)


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nixery", "serve"], env={**os.environ, "NIXERY_BUNDLED_SET": "busybox", **env},
        capture_output=True, text=True, timeout=30, cwd=REPOSITORY,
    )


def test_start_up_fails_without_a_users_file() -> None:
    result = _serve({"NIXERY_AUTH": "basic"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "nixery: configuration error: NIXERY_AUTH_USERS (a users file) must be set when NIXERY_AUTH=basic"
    ]


def test_start_up_fails_on_a_malformed_users_file(tmp_path: Path) -> None:
    encoded = auth.hash_password("pw", log_n=FAST)
    path = tmp_path / "users"
    path.write_text(f"alice:{encoded}:pull,build\nbob:{encoded}:pull,push\n")
    result = _serve({"NIXERY_AUTH": "token", "NIXERY_AUTH_USERS": str(path)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NIXERY_AUTH_USERS=" in lines[0] and "line 2 (user bob)" in lines[0], lines
    assert encoded not in result.stderr


# --- the middleware, in process ----------------------------------------------

DIGEST = "sha256:" + "a" * 64
REFERRERS_TAG = "sha256-" + "a" * 64  # the referrers tag schema's tag of DIGEST


class FakeBuilder:
    """Only what the middleware asks: the platforms it builds, and is this image built?"""

    def __init__(self) -> None:
        self.built_images: set[tuple[str, str]] = set()
        self.platforms = (host_arch(),)  # one platform: plain names stay single images

    async def built(self, request, tag: str):
        return object() if (request.display_name, tag) in self.built_images else None


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"route": request.match_info.route.name or "ok"}, headers=routes.API_VERSION)


def make_app(users_file: Path, **auth_settings) -> tuple[web.Application, FakeBuilder]:
    """The real middlewares and path patterns, with stand-in handlers."""
    app = web.Application(middlewares=[error_middleware])
    builder = FakeBuilder()
    app[routes.BUILDER] = builder
    name = r"{name:[^{}]+?}"
    app.router.add_get("/", _ok)
    app.router.add_get("/v2/", _ok)
    for method in ("GET", "HEAD"):
        app.router.add_route(method, f"/v2/{name}/manifests/{{reference}}", _ok)
        app.router.add_route(method, f"/v2/{name}/blobs/{{digest}}", _ok)
    app.router.add_get(f"/v2/{name}/tags/list", _ok)
    app.router.add_get(f"/v2/{name}/referrers/{{digest}}", _ok)
    app.router.add_route("POST", "/v2/{tail:.*}", routes.unsupported)

    async def start_build(request: web.Request) -> web.Response:  # a route outside /v2 that builds
        await http_auth.require(request, request.query["image"])
        return web.json_response({"started": True})

    app.router.add_post("/builds", start_build)
    http_auth.install(app, Settings(auth=AuthSettings(users_file=users_file, **auth_settings)))
    return app, builder


def _code(body: bytes) -> str:
    """The registry's kind of error (docs/errors.md); the code is the spec's, checked in test_errors.py."""
    return json.loads(body)["errors"][0]["detail"]["kind"]


@pytest.mark.parametrize("anonymous_pull", [False, True])
async def test_basic_mode_decisions(aiohttp_client, users_file: Path, anonymous_pull: bool) -> None:
    app, builder = make_app(users_file, mode="basic", anonymous_pull=anonymous_pull)
    client = await aiohttp_client(app)
    new, built = "/v2/shell/hello/manifests/latest", "/v2/fortune/manifests/latest"
    builder.built_images.add(("fortune", "latest"))
    anonymous_pulls = 200 if anonymous_pull else 401
    table = [
        # method, path, headers, status, error kind
        ("GET", "/", {}, 200, None),
        ("GET", "/v2/", {}, 401, "UNAUTHORIZED"),
        ("GET", "/v2/", basic(ALICE), 200, None),
        ("GET", "/v2/", basic(BOB), 200, None),
        ("GET", "/v2/", basic(("alice", BOB[1])), 401, "UNAUTHORIZED"),
        ("GET", "/v2/", basic(("nobody", "x")), 401, "UNAUTHORIZED"),
        ("GET", "/v2/", {"Authorization": "Basic !!!"}, 401, "UNAUTHORIZED"),
        ("GET", "/v2/", basic(("", "")), 401, "UNAUTHORIZED"),  # podman's "no credentials"
        ("GET", "/v2/", basic(("", "x")), 401, "UNAUTHORIZED"),
        ("GET", built, basic(("", "")), anonymous_pulls, None if anonymous_pull else "UNAUTHORIZED"),
        ("GET", "/v2/", {"Authorization": "Bearer abc"}, 401, "UNAUTHORIZED"),
        ("GET", "/v2/nothing/here", {}, 401, "UNAUTHORIZED"),
        ("GET", new, basic(ALICE), 200, None),
        ("GET", new, basic(BOB), 403, "DENIED"),
        ("GET", new, {}, 401, "UNAUTHORIZED"),
        ("GET", built, basic(BOB), 200, None),
        ("GET", built, {}, anonymous_pulls, None if anonymous_pull else "UNAUTHORIZED"),
        ("GET", f"/v2/shell/hello/manifests/{DIGEST}", basic(BOB), 200, None),
        ("GET", f"/v2/shell/hello/manifests/{DIGEST}", {}, anonymous_pulls, None if anonymous_pull else "UNAUTHORIZED"),
        ("GET", f"/v2/shell/hello/blobs/{DIGEST}", basic(BOB), 200, None),
        ("GET", f"/v2/shell/hello/blobs/{DIGEST}", {}, anonymous_pulls, None if anonymous_pull else "UNAUTHORIZED"),
        ("GET", "/v2/shell/hello/tags/list", {}, anonymous_pulls, None if anonymous_pull else "UNAUTHORIZED"),
        # Documents about a manifest (SBOMs, signatures) need what the manifest by digest needs.
        ("GET", f"/v2/shell/hello/referrers/{DIGEST}", basic(BOB), 200, None),
        ("GET", f"/v2/shell/hello/referrers/{DIGEST}", {}, anonymous_pulls, None if anonymous_pull else "UNAUTHORIZED"),
        ("GET", f"/v2/shell/hello/manifests/{REFERRERS_TAG}", basic(BOB), 200, None),
        ("GET", f"/v2/shell/hello/manifests/{REFERRERS_TAG}.sig", basic(BOB), 200, None),
        # A malformed one builds nothing (the route answers 404): not "building needs the build permission".
        ("GET", f"/v2/shell/hello/manifests/{REFERRERS_TAG[:-1]}.sig", basic(BOB), 200, None),
        ("GET", f"/v2/shell/hello/manifests/{REFERRERS_TAG.upper()}", basic(BOB), 200, None),
        ("GET", f"/v2/shell/hello/manifests/{REFERRERS_TAG}", {}, anonymous_pulls,
         None if anonymous_pull else "UNAUTHORIZED"),
        ("GET", "/v2/shell/hello/manifests/bad..tag", basic(BOB), 400, "TAG_INVALID"),
        ("GET", "/v2/she%20ll/manifests/latest", basic(BOB), 400, "NAME_INVALID"),
        ("POST", "/v2/shell/blobs/uploads/", basic(ALICE), 405, "UNSUPPORTED"),
        ("POST", "/v2/shell/blobs/uploads/", {}, 401, "UNAUTHORIZED"),
        ("POST", "/builds?image=shell/hello", {}, 401, "UNAUTHORIZED"),
        ("POST", "/builds?image=shell/hello", basic(BOB), 403, "DENIED"),
        ("POST", "/builds?image=shell/hello", basic(ALICE), 200, None),
    ]
    for method, path, headers, status, code in table:
        response = await client.request(method, path, headers=headers)
        body = await response.read()
        assert response.status == status, (method, path, headers, status, body)
        if code is not None:
            assert _code(body) == code, (path, body)
        if status == 401:
            assert response.headers["WWW-Authenticate"] == 'Basic realm="nixery", charset="UTF-8"'
    denied = await client.head(new, headers=basic(BOB))
    assert denied.status == 403 and await denied.read() == b""
    assert (await client.get("/token")).status == 404  # no token endpoint in basic mode


async def _token(client, user: tuple[str, str] | None, *scopes: str, status: int = 200) -> str | None:
    headers = basic(user) if user else {}
    query = [("service", "nixery"), *(("scope", scope) for scope in scopes)]
    response = await client.get("/token", params=query, headers=headers)
    body = await response.json()
    assert response.status == status, body
    if status != 200:
        return None
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")
    return body["token"]


async def test_token_mode_decisions(aiohttp_client, users_file: Path) -> None:
    app, builder = make_app(users_file, mode="token", token_secret=SECRET.decode())
    client = await aiohttp_client(app)
    builder.built_images.add(("fortune", "latest"))
    hello, fortune = "repository:shell/hello:pull", "repository:fortune:pull"

    ping = await client.get("/v2/")
    assert ping.status == 401 and _code(await ping.read()) == "UNAUTHORIZED"
    realm = f'realm="http://{client.host}:{client.port}/token"'
    assert ping.headers["WWW-Authenticate"] == f'Bearer {realm},service="nixery"'

    # Login (no scope), then tokens per repository.
    login = await _token(client, ALICE)
    assert (await client.get("/v2/", headers=bearer(login))).status == 200
    await _token(client, ("alice", "wrong"), hello, status=401)
    await _token(client, None, hello, status=401)  # no anonymous pulls here
    alice = await _token(client, ALICE, hello)
    bob = await _token(client, BOB, hello, fortune)
    assert (await client.get("/v2/shell/hello/manifests/latest", headers=bearer(alice))).status == 200
    refused = await client.get("/v2/shell/hello/manifests/latest", headers=bearer(bob))
    assert refused.status == 403 and _code(await refused.read()) == "DENIED"
    assert (await client.get("/v2/fortune/manifests/latest", headers=bearer(bob))).status == 200
    assert (await client.get(f"/v2/fortune/blobs/{DIGEST}", headers=bearer(bob))).status == 200

    # A token for another repository: 401 with the scope to ask for.
    other = await client.get("/v2/fortune/manifests/latest", headers=bearer(alice))
    assert other.status == 401
    assert other.headers["WWW-Authenticate"] == (
        f'Bearer {realm},service="nixery",scope="repository:fortune:pull",error="insufficient_scope"'
    )
    missing = await client.get("/v2/fortune/manifests/latest")
    assert missing.headers["WWW-Authenticate"] == f'Bearer {realm},service="nixery",scope="repository:fortune:pull"'

    # Forged, expired and foreign tokens.
    header, payload, signature = alice.split(".")
    for bad in (f"{header}.{payload}.{signature[:-2]}AA", "nonsense"):
        response = await client.get("/v2/shell/hello/manifests/latest", headers=bearer(bad))
        assert response.status == 401 and 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    old = auth.TokenSigner(SECRET, clock=lambda: time.time() - 3600).issue("alice", {"shell/hello": {"pull"}})[0]
    expired = await client.get("/v2/shell/hello/manifests/latest", headers=bearer(old))
    assert expired.status == 401 and "expired" in (await expired.json())["errors"][0]["message"]

    # Basic credentials work on /v2 too; the OAuth2 password grant (containerd) as well.
    assert (await client.get("/v2/shell/hello/manifests/latest", headers=basic(ALICE))).status == 200
    form = {"grant_type": "password", "username": BOB[0], "password": BOB[1], "service": "nixery", "scope": fortune}
    posted = await client.post("/token", data=form)
    assert posted.status == 200
    token = (await posted.json())["access_token"]
    assert (await client.get("/v2/fortune/manifests/latest", headers=bearer(token))).status == 200
    assert (await client.post("/token", data={**form, "password": "wrong"})).status == 401
    assert (await client.get("/token", params={"service": "elsewhere"}, headers=basic(ALICE))).status == 403


async def test_token_endpoint_refusals_are_registry_errors(aiohttp_client, users_file: Path) -> None:
    """A body over the limit is 413 (not 405); a grant other than the password grant is
    401 with a challenge, as every 401 must carry one; a form that cannot be read is 400."""
    app, _ = make_app(users_file, mode="token", token_secret=SECRET.decode())
    client = await aiohttp_client(app)
    form = {"grant_type": "password", "username": ALICE[0], "password": ALICE[1], "service": "nixery"}
    large = await client.post("/token", data={**form, "padding": "x" * (2 << 20)})
    assert large.status == 413, await large.text()
    assert _code(await large.read()) == "REQUEST_TOO_LARGE"
    for grant_type in ("refresh_token", "client_credentials", ""):
        refused = await client.post("/token", data={**form, "grant_type": grant_type, "refresh_token": "x"})
        assert refused.status == 401 and _code(await refused.read()) == "UNAUTHORIZED", grant_type
        assert refused.headers["WWW-Authenticate"] == 'Basic realm="nixery", charset="UTF-8"'
    for content_type, body in [
        ("multipart/form-data", b"--x\r\n\r\npassword\r\n--x--\r\n"),  # no boundary
        ("multipart/form-data; boundary=x", b"--x\r\nnot a header\r\n\r\npassword\r\n--x--\r\n"),
        ("application/x-www-form-urlencoded; charset=no-such-charset", b"grant_type=password"),
    ]:
        unreadable = await client.post("/token", data=body, headers={"Content-Type": content_type})
        assert unreadable.status == 400 and _code(await unreadable.read()) == "REQUEST_INVALID", content_type
    # A password grant in JSON (or text): it was refused as "only the password grant is supported".
    for body in ({"json": form}, {"data": b"{bad", "headers": {"Content-Type": "application/json"}},
                 {"data": b"grant_type=password", "headers": {"Content-Type": "text/plain"}}):
        refused = await client.post("/token", **body)
        text = await refused.text()
        assert refused.status == 400 and _code(text.encode()) == "REQUEST_INVALID", (body, text)
        assert "takes the OAuth2 password grant as a form (application/x-www-form-urlencoded" in text, text
    # A password that is no text UTF-8 can hold (utf-7 gives a lone surrogate): 500, a traceback in the log.
    for user in (ALICE[0], "nobody"):
        odd = await client.post("/token", data=f"grant_type=password&username={user}&password=+2AA-".encode(),
                                headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-7"})
        assert odd.status == 401 and _code(await odd.read()) == "UNAUTHORIZED", user
    # A field sent as a file: its Python text (a memory address among it) was read, and answered back.
    with_file = aiohttp.FormData({field: value for field, value in form.items() if field != "service"})
    with_file.add_field("service", b"nixery", filename="service.txt")
    refused = await client.post("/token", data=with_file)
    text = await refused.text()
    assert refused.status == 400 and _code(text.encode()) == "REQUEST_INVALID" and "0x" not in text, text
    assert (await client.post("/token", data=form)).status == 200


async def test_token_mode_with_anonymous_pulls(aiohttp_client, users_file: Path) -> None:
    app, builder = make_app(
        users_file, mode="token", anonymous_pull=True, token_realm="https://auth.example.com/token"
    )
    client = await aiohttp_client(app)
    builder.built_images.add(("fortune", "latest"))
    ping = await client.get("/v2/")
    assert ping.headers["WWW-Authenticate"] == 'Bearer realm="https://auth.example.com/token",service="nixery"'
    anonymous = await _token(client, None, "repository:fortune:pull", "repository:shell/hello:pull")
    assert (await client.get("/v2/fortune/manifests/latest", headers=bearer(anonymous))).status == 200
    new = await client.get("/v2/shell/hello/manifests/latest", headers=bearer(anonymous))
    assert new.status == 401 and _code(await new.read()) == "UNAUTHORIZED"
    assert 'error="insufficient_scope"' in new.headers["WWW-Authenticate"]
    # Without any token, too.
    assert (await client.get("/v2/fortune/manifests/latest")).status == 200
    assert (await client.get("/v2/shell/hello/manifests/latest")).status == 401


# --- real registries and real clients ----------------------------------------


@pytest.fixture
def start_auth_registry(tmp_path: Path, users_file: Path) -> Iterator[Callable[..., RegistryProcess]]:
    started: list[RegistryProcess] = []

    def start(mode: str, **env: str) -> RegistryProcess:
        registry = RegistryProcess(
            storage=tmp_path / f"storage-{len(started)}",
            env={"NIXERY_BUNDLED_SET": "busybox", "NIXERY_AUTH": mode, "NIXERY_AUTH_USERS": str(users_file), **env},
            log_path=tmp_path / f"registry-{len(started)}.log",
        )
        started.append(registry)
        return registry.start()

    yield start
    for registry in started:
        registry.stop()
        log = registry.log()
        assert ALICE[1] not in log and BOB[1] not in log, "a password reached the log"
        assert "Bearer " not in log and "eyJ" not in log, "a token reached the log"


def test_tokens_work_across_workers(start_auth_registry) -> None:
    """NIXERY_WORKERS processes share the generated secret: any of them accepts
    a token that another issued."""
    registry = start_auth_registry("token", NIXERY_WORKERS="2")
    status, _, body = registry.request("/token?service=nixery", headers=basic(ALICE))
    assert status == 200, body
    token = json.loads(body)["token"]
    statuses = {registry.request("/v2/", headers=bearer(token))[0] for _ in range(40)}  # a new connection each
    assert statuses == {200}


class Podman:
    """podman with its own auth file: never the machine's credentials."""

    def __init__(self, base: Path, registry: RegistryProcess):
        base.mkdir(parents=True, exist_ok=True)
        self.authfile = base / "auth.json"
        self.authfile.write_text('{"auths": {}}')
        self.env = {**os.environ, "REGISTRY_AUTH_FILE": str(self.authfile), "DOCKER_CONFIG": str(base / "docker")}
        self.registry = registry
        self.pulled: list[str] = []

    def __call__(self, *args: str, check: bool = False, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        command, rest = args[0], args[1:]
        tls = [] if command == "logout" else ["--tls-verify=false"]
        argv = ["podman", command, "--authfile", str(self.authfile), *tls, *rest]
        return run(argv, check=check, input=stdin, env=self.env)

    def login(self, user: tuple[str, str]) -> subprocess.CompletedProcess[str]:
        return self("login", "-u", user[0], "--password-stdin", self.registry.host, stdin=user[1])

    def pull(self, image: str) -> subprocess.CompletedProcess[str]:
        self.pulled.append(f"{self.registry.host}/{image}")
        return self("pull", f"{self.registry.host}/{image}")

    def remove_images(self) -> None:
        for image in self.pulled:
            run(["podman", "rmi", "-f", image], check=False)


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Callable[[RegistryProcess], Podman]]:
    made: list[Podman] = []

    def make(registry: RegistryProcess) -> Podman:
        made.append(Podman(tmp_path / f"podman-{len(made)}", registry))
        return made[-1]

    yield make
    for client in made:
        client.remove_images()


def _refused(result: subprocess.CompletedProcess[str]) -> bool:
    text = (result.stdout + result.stderr).lower()
    return result.returncode != 0 and ("unauthorized" in text or "authentication required" in text)


@pytest.mark.clients
@pytest.mark.skipif(not have("podman"), reason="needs podman")
@pytest.mark.parametrize("mode", ["basic", "token"])
def test_podman_login_pull_and_run(start_auth_registry, podman, mode: str) -> None:
    registry = start_auth_registry(mode)
    client = podman(registry)
    assert _refused(client.pull("shell/hello"))  # before login
    wrong = client.login(("alice", "not-the-password"))
    assert wrong.returncode != 0 and registry.host not in json.loads(client.authfile.read_text())["auths"]
    assert registry.process.poll() is None, registry.process.returncode
    assert client.login(ALICE).returncode == 0
    assert registry.host in json.loads(client.authfile.read_text())["auths"]
    pulled = client.pull("shell/hello")
    assert pulled.returncode == 0, pulled.stderr
    result = client("run", "--rm", *PODMAN_RUN_FLAGS, f"{registry.host}/shell/hello", "sh", "-c", "hello && echo ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["Hello, world!", "ok"]
    assert client("logout", registry.host).returncode == 0
    assert _refused(client.pull("shell/hello"))


@pytest.mark.clients
@pytest.mark.skipif(not have("podman"), reason="needs podman")
@pytest.mark.parametrize("mode", ["basic", "token"])
def test_anonymous_pulls_of_built_images(start_auth_registry, podman, mode: str) -> None:
    registry = start_auth_registry(mode, NIXERY_AUTH_ANONYMOUS_PULL="true")
    anonymous, puller, builder = podman(registry), podman(registry), podman(registry)
    # Nobody may build anonymously, and a pull-only user may not either.
    status, headers, body = registry.request("/v2/shell/hello/manifests/latest")
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    status, _, body = registry.request("/v2/shell/hello/manifests/latest", headers=basic(BOB))
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    assert _refused(anonymous.pull("shell/hello"))
    assert puller.login(BOB).returncode == 0
    denied = puller.pull("shell/hello")
    assert denied.returncode != 0 and "denied" in denied.stderr.lower(), denied.stderr
    # A user who may build builds it; then everyone may pull it.
    assert builder.login(ALICE).returncode == 0
    assert builder.pull("shell/hello").returncode == 0
    for client in (anonymous, puller):
        result = client.pull("shell/hello")
        assert result.returncode == 0, result.stderr
    assert registry.request("/v2/shell/hello/manifests/latest")[0] == 200
    # Anything new is still refused to anonymous clients.
    assert _refused(anonymous.pull("shell/fortune"))
    assert registry.request("/v2/shell/fortune/manifests/latest")[0] == 401


@pytest.mark.clients
@pytest.mark.skipif(not have("dockerd"), reason="needs docker.io")
@pytest.mark.parametrize("mode", ["token", "basic"])
def test_docker_login_and_pull(start_auth_registry, tmp_path: Path, mode: str) -> None:
    registry = start_auth_registry(mode)
    image = f"{registry.host}/shell/hello"
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "docker-client")}
    # dockerd's containerd needs short socket paths (at most 104 bytes).
    base = Path(tempfile.mkdtemp(prefix="nixery-auth-docker-"))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, base, ignore_errors=True)
        socket = cleanup.enter_context(daemons.dockerd(base))
        docker = ["docker", "-H", f"unix://{socket}"]
        before = run([*docker, "pull", image], check=False, env=env)
        refusals = ("unauthorized", "no basic auth credentials")  # token mode, basic mode
        assert before.returncode != 0 and any(r in before.stderr.lower() for r in refusals), before.stderr
        wrong = run([*docker, "login", "-u", "alice", "--password-stdin", registry.host],
                    input="wrong", check=False, env=env)
        assert wrong.returncode != 0 and "unauthorized" in wrong.stderr.lower(), wrong.stderr
        login = run([*docker, "login", "-u", "alice", "--password-stdin", registry.host], input=ALICE[1], env=env)
        assert "Login Succeeded" in login.stdout
        run([*docker, "pull", image], env=env)
        result = run([*docker, "run", "--rm", "--network", "none", image, "sh", "-c", "hello && echo ok"], env=env)
    assert result.stdout.splitlines()[-2:] == ["Hello, world!", "ok"]


@pytest.mark.clients
@pytest.mark.skipif(not (have("containerd") and have("ctr")), reason="needs containerd and ctr")
@pytest.mark.parametrize("mode", ["basic", "token"])
def test_containerd_pull_with_credentials(start_auth_registry, tmp_path: Path, mode: str) -> None:
    registry = start_auth_registry(mode)
    image = f"{registry.host}/shell/hello:latest"
    with daemons.containerd(tmp_path / "containerd") as socket:
        ctr = ["ctr", "--address", str(socket)]
        before = run([*ctr, "image", "pull", "--plain-http", image], check=False)
        assert before.returncode != 0 and "401" in before.stderr + before.stdout
        wrong = run([*ctr, "image", "pull", "--plain-http", "--user", "alice:wrong", image], check=False)
        assert wrong.returncode != 0
        run([*ctr, "image", "pull", "--plain-http", "--user", f"{ALICE[0]}:{ALICE[1]}", image])
        result = run([*ctr, "run", "--rm", image, "auth-test", "sh", "-c", "hello && echo ok"])
    assert result.stdout.splitlines()[-2:] == ["Hello, world!", "ok"]


def test_web_build_form_and_image_pages_respect_access_control(start_auth_registry) -> None:
    registry = start_auth_registry("basic")
    json_body = {"Content-Type": "application/json"}

    refusals: dict[str, bytes] = {}

    def post_build(image: str, headers: dict[str, str]) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
        try:
            connection.request("POST", "/builds", body=json.dumps({"image": image}), headers={**json_body, **headers})
            response = connection.getresponse()
            refusals[image] = response.read()
            return response.status
        finally:
            connection.close()

    assert post_build("shell/hello", {}) == 401
    assert post_build("shell/hello", basic(BOB)) == 403  # pull-only users cannot build new images
    assert post_build("shell/hello", basic(ALICE)) == 202
    assert registry.request("/images/shell/hello.json", accept=None)[0] == 401
    deadline = time.monotonic() + 60
    while registry.request("/images/shell/hello.json", accept=None, headers=basic(BOB))[0] != 200:
        assert time.monotonic() < deadline, "the build started by alice did not finish"
        time.sleep(0.5)
    assert post_build("shell/hello", basic(BOB)) == 202  # already built: pull permission suffices
    # An anonymous client is not told which images are built.
    assert post_build("shell/hello", {}) == 401 and post_build("shell/hello/zlib", {}) == 401
    assert refusals["shell/hello"] == refusals["shell/hello/zlib"]


def test_build_progress_and_recent_images_are_shown_only_to_who_may_pull(start_auth_registry) -> None:
    """The landing page's recent builds and images, and a build's page, JSON and
    events, name the image: with access control on, anonymous clients see none of them."""
    registry = start_auth_registry("basic")
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
    try:
        connection.request("POST", "/builds", body=json.dumps({"image": "shell/hello"}),
                           headers={"Content-Type": "application/json", **basic(ALICE)})
        response = connection.getresponse()
        assert response.status == 202
        build = json.loads(response.read())["id"]
    finally:
        connection.close()
    deadline = time.monotonic() + 60
    while json.loads(registry.request(f"/builds/{build}.json", accept=None, headers=basic(BOB))[2])["stage"] != "done":
        assert time.monotonic() < deadline, "the build did not finish"
        time.sleep(0.5)

    for path in (f"/builds/{build}", f"/builds/{build}.json", f"/builds/{build}/events"):
        status, headers, body = registry.request(path, accept=None)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic "), (path, status, body[:300])
        assert b"shell/hello" not in body
        assert registry.request(path, accept=None, headers=basic(BOB))[0] in (200, 204), path
    anonymous = registry.request("/", accept="text/html")[2].decode()
    assert f"/builds/{build}" not in anonymous and 'href="/images/' not in anonymous
    pulling = registry.request("/", accept="text/html", headers=basic(BOB))[2].decode()
    assert f"/builds/{build}" in pulling and 'href="/images/shell/hello"' in pulling


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_pages_challenge_browsers_with_basic(start_auth_registry, mode: str) -> None:
    """A browser logs in only when a 401 page carries a Basic challenge: the error page
    keeps the challenge, and pages outside /v2 ask for basic credentials in token mode
    too (a browser cannot answer Bearer; the registry API keeps it)."""
    registry = start_auth_registry(mode)
    status, headers, _ = registry.request("/v2/shell/hello/manifests/latest")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer realm=" if mode == "token" else "Basic ")
    status, headers, _ = registry.request("/images/shell/hello", accept="text/html")
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="nixery", charset="UTF-8"', headers
    connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
    try:
        for credentials, expected in (({}, 401), (basic(ALICE), 303)):
            connection.request("POST", "/builds", body="image=shell%2Fhello",
                               headers={"Content-Type": "application/x-www-form-urlencoded", **credentials})
            response = connection.getresponse()
            response.read()
            assert response.status == expected
            if expected == 401:
                assert response.getheader("WWW-Authenticate", "").startswith("Basic "), response.getheaders()
    finally:
        connection.close()


def test_access_controls_refusals_name_the_api_version(start_auth_registry) -> None:
    """Every answer under /v2 names the API version, as distribution's do: access control's
    403 (a user who may pull but not build, asking for an image not built yet) had no
    `Docker-Distribution-API-Version`, nor its refusal of a cross-site pull with credentials."""
    registry = start_auth_registry("basic")
    refusals = [
        ("/v2/shell/hello/manifests/latest", {}, 401),
        ("/v2/shell/hello/manifests/latest", basic(BOB), 403),
        ("/v2/shell/hello/manifests/latest", {**basic(BOB), "Sec-Fetch-Site": "cross-site"}, 403),
        ("/v2/no/such/endpoint", basic(BOB), 404),
    ]
    for path, headers, expected in refusals:
        status, answer_headers, body = registry.request(path, headers=headers)
        assert status == expected, (path, headers.keys(), status, body[:300])
        assert answer_headers.get("Docker-Distribution-API-Version") == "registry/2.0", (path, status, body[:300])


def test_other_sites_pages_cannot_pull_with_a_browsers_credentials(start_auth_registry) -> None:
    """A browser sends the basic credentials it was given with every request to the registry,
    an <img> on another site's page too: such a request must not build (or read) an image."""
    registry = start_auth_registry("basic")
    for site in ("cross-site", "same-site"):
        status, _, body = registry.request(
            "/v2/shell/hello/manifests/latest", headers={**basic(ALICE), "Sec-Fetch-Site": site}
        )
        assert status == 403 and _code(body) == "DENIED", (site, status, body[:300])
        # Said of the registry API, not of the build form (which the same check guards).
        message = json.loads(body)["errors"][0]["message"]
        assert "registry API request with basic credentials" in message and "forms" not in message, message
    assert registry.request("/images/shell/hello.json", accept=None, headers=basic(ALICE))[0] == 404  # not built
    assert registry.log_events("build.queued") == []
    status, _, body = registry.request(
        "/v2/shell/hello/manifests/latest", headers={**basic(ALICE), "Sec-Fetch-Site": "same-origin"}
    )
    assert status == 200, body[:300]


def _token_registry_with_production_hashes(tmp_path: Path, log_n: int = auth.SCRYPT_LOG_N) -> RegistryProcess:
    """A token-mode registry whose users' hashes have the default scrypt cost, as in production
    (~0.1 s a check), or `log_n`'s: alice may build, bob pull."""
    users = tmp_path / "users"
    alice, bob = (auth.hash_password(password, log_n=log_n) for password in (ALICE[1], BOB[1]))
    users.write_text(f"alice:{alice}:pull,build\nbob:{bob}:pull\n")
    return RegistryProcess(
        storage=tmp_path / "storage", log_path=tmp_path / "registry.log",
        env={"NIXERY_BUNDLED_SET": "busybox", "NIXERY_AUTH": "token", "NIXERY_AUTH_USERS": str(users)},
    ).start()


def test_a_flood_of_wrong_passwords_does_not_hold_back_other_clients_logins(tmp_path: Path) -> None:
    """Password checks are costly, so few run at once; one client's flood of guesses
    (from 127.0.0.2) must not make another client's login wait for all of them. A
    latency a user sees: before, this login waited for the whole flood (over 5 s here)."""
    registry = _token_registry_with_production_hashes(tmp_path)

    def guess(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=300,
                                                source_address=("127.0.0.2", 0))
        try:
            connection.request("GET", "/token?service=nixery", headers=basic(("alice", f"guess-{number}")))
            assert connection.getresponse().status == 401
        finally:
            connection.close()

    try:
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            guesses = [pool.submit(guess, number) for number in range(100)]
            time.sleep(1.0)  # the guesses are queued
            started = time.monotonic()
            status, _, body = registry.request("/token?service=nixery", headers=basic(BOB), accept=None)
            waited = time.monotonic() - started
            assert status == 200, body
            assert waited < 3.0, f"a login waited {waited:.1f} s behind another client's guesses"
            assert not all(guess.done() for guess in guesses), "the flood was over before the login"
            for guess in guesses:
                guess.result()
    finally:
        registry.stop()


def test_guesses_whose_clients_hung_up_are_not_checked(tmp_path: Path) -> None:
    """Forty guesses sent at once, each connection closed right after: before, all forty ran
    scrypt after their clients had gone (about 2 s of both CPUs, and any number of them could be
    queued). Now a check still waiting for its turn when its client is seen gone is dropped."""
    # Twice the production cost (~0.2 s a check here): at most about 2 + 2 x 0.5 s / check time run
    # before the first look at the connections, half the guesses if a check took 0.05 s.
    registry = _token_registry_with_production_hashes(tmp_path, log_n=auth.SCRYPT_LOG_N + 1)
    try:
        guesses = 40
        for number in range(guesses):
            credentials = basic(("alice", f"guess-{number}"))["Authorization"]
            head = f"GET /token?service=nixery HTTP/1.1\r\nHost: x\r\nAuthorization: {credentials}\r\n\r\n"
            with socket.create_connection(("127.0.0.1", registry.port), timeout=60) as sock:
                sock.sendall(head.encode())

        def answered() -> list[dict]:
            return [e for e in registry.log_events("http.request") if e["path"] == "/token"]

        deadline = time.monotonic() + 60
        while len(answered()) < guesses and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(answered()) == guesses and {e["status"] for e in answered()} <= {401, 499}, answered()
        checked = len(registry.log_events("auth.bad_credentials"))
        assert checked <= guesses // 2, f"{checked} of {guesses} guesses were checked after their clients left"
        status, _, body = registry.request("/token?service=nixery", headers=basic(ALICE), accept=None)
        assert status == 200, body
    finally:
        registry.stop()


def test_anonymous_tokens_stop_working_when_anonymous_pulls_are_turned_off(start_auth_registry) -> None:
    """As a user's tokens stop working when the user is removed, anonymous tokens stop
    working when NIXERY_AUTH_ANONYMOUS_PULL is turned off (same secret, restarted)."""
    secret = {"NIXERY_TOKEN_SECRET": "t" * 32, "NIXERY_TOKEN_TTL": "3600"}
    before = start_auth_registry("token", NIXERY_AUTH_ANONYMOUS_PULL="true", **secret)
    status, _, body = before.request("/token?service=nixery&scope=repository:shell/hello:pull", accept=None)
    assert status == 200, body
    anonymous = json.loads(body)["token"]
    assert before.request("/v2/shell/hello/tags/list", headers=bearer(anonymous))[0] == 200
    before.stop()
    after = start_auth_registry("token", **secret)
    status, headers, body = after.request("/v2/shell/hello/tags/list", headers=bearer(anonymous))
    assert status == 401 and _code(body) == "UNAUTHORIZED", (status, body)
    assert "Bearer " in headers["WWW-Authenticate"]


def test_a_pull_only_users_tag_pull_resolves_the_image_once(start_auth_registry, tmp_path: Path) -> None:
    """The access check (is this image built?) and the route that serves the manifest read
    the image out of the request once between them: a declared image is looked up once
    (one `declarations.resolved` line) per pull."""
    images = tmp_path / "images"
    images.mkdir()
    declaration = {"apiVersion": "k8s.nixos.org/v1alpha", "kind": "NixImage", "metadata": {"name": "greeter"},
                   "data": {"tag": "v1", "contents": ["shell", "hello"]}}
    (images / "greeter.yaml").write_text(json.dumps(declaration))  # JSON is YAML
    registry = start_auth_registry("basic", NIXERY_IMAGES_PATH=str(images))

    def resolutions_of_one_pull(user: tuple[str, str]) -> int:
        before = len(registry.log_events("declarations.resolved"))
        status, _, body = registry.request("/v2/greeter/manifests/v1", headers=basic(user))
        assert status == 200, body[:2000]
        return len(registry.log_events("declarations.resolved")) - before

    assert resolutions_of_one_pull(ALICE) == 1  # may build: the access check asks nothing of the image
    assert resolutions_of_one_pull(BOB) == 1  # pull only: the access check asks whether it is built
