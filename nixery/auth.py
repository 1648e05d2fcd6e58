"""Users, password hashes and registry tokens: access control without HTTP.

`nixery.http.auth` applies these to requests; this module knows nothing of
aiohttp.

Users file (`NIXERY_AUTH_USERS`), one user per line, `#` starts a comment:

    # name:password hash:permissions
    alice:scrypt$15$8$1$<salt>$<key>:pull,build
    ci:scrypt$15$8$1$<salt>$<key>:pull

`pull` may pull images that are already built; `build` may also make the
registry build new ones (and implies `pull`). Hashes come from
`nixery auth hash-password`: scrypt with a random 16-byte salt per user, the
cost parameters stored in the hash so that they can be raised later.

Tokens (`NIXERY_AUTH=token`) are HS256 JSON Web Tokens signed with
`NIXERY_TOKEN_SECRET`: a statement of who asked (`sub`, empty for anonymous)
and which actions they may take on which repositories (`access`, as in the
Docker token specification). Besides Docker's `pull`, a grant carries
`build` for users who may build: pulling a new image is building it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import structlog

from nixery.background import retrieve
from nixery.fair import FairSlots
from nixery.lru import LRU

log = structlog.get_logger(__name__)

PULL = "pull"
BUILD = "build"
PERMISSIONS = (PULL, BUILD)

_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
#: A repository name as it may appear in a scope (image names are stricter; see registry.names).
_REPOSITORY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/+-]{0,1023}")


# --- passwords ---------------------------------------------------------------

#: scrypt cost: N = 2**15, r = 8, p = 1 takes ~0.1 s and 32 MiB here.
SCRYPT_LOG_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAX_MEMORY = 256 << 20
_HASH = re.compile(r"scrypt\$(\d{1,2})\$(\d{1,2})\$(\d{1,2})\$([A-Za-z0-9+/]+=*)\$([A-Za-z0-9+/]+=*)")


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    memory = 128 * r * (n + 2) + 128 * r * p  # what OpenSSL allocates
    # surrogatepass: a form in another charset (utf-7) can give a lone surrogate, which is no
    # password anyone has but must not fail the check (a 500 where a 401 is due).
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, maxmem=memory + (1 << 20), dklen=_KEY_BYTES
    )


def hash_password(password: str, *, log_n: int = SCRYPT_LOG_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """`scrypt$LOG_N$R$P$SALT$KEY` (salt and key in base64)."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password, salt, log_n, r, p)
    return f"scrypt${log_n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    match = _HASH.fullmatch(encoded)
    if match is None:
        raise ValueError("not an scrypt hash made by `nixery auth hash-password`")
    log_n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    # Bounds keep a careless file from asking for gigabytes of memory per login.
    if not (10 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16) or 128 * r << log_n > _MAX_MEMORY:
        raise ValueError(f"scrypt parameters out of range (log2 N={log_n}, r={r}, p={p}; at most 256 MiB)")
    salt = base64.b64decode(match.group(4))
    key = base64.b64decode(match.group(5))
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("scrypt salt or key too short")
    return log_n, r, p, salt, key


def _decoy_hash(users: Iterable[User]) -> str:
    """A hash that no password matches, at the scrypt cost most of `users` have: what a
    name that is not listed is checked against, so that it takes as long as a listed one."""
    costs = Counter(_parse_hash(user.password_hash)[:3] for user in users)
    log_n, r, p = costs.most_common(1)[0][0]
    salt, key = (base64.b64encode(secrets.token_bytes(size)).decode() for size in (_SALT_BYTES, _KEY_BYTES))
    return f"scrypt${log_n}${r}${p}${salt}${key}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether `password` matches the hash (constant-time comparison)."""
    try:
        log_n, r, p, salt, key = _parse_hash(encoded)
    except ValueError:
        return False
    return hmac.compare_digest(_scrypt(password, salt, log_n, r, p), key)


# --- users -------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str = field(repr=False)
    permissions: frozenset[str]

    def may(self, permission: str) -> bool:
        return permission in self.permissions


class UsersFileError(ValueError):
    """The users file cannot be read or has a malformed line (one-line message,
    never containing a password hash)."""


def parse_permissions(text: str) -> frozenset[str]:
    given = {word.strip().lower() for word in text.split(",") if word.strip()}
    unknown = given - set(PERMISSIONS)
    if unknown or not given:
        raise ValueError(f"permissions must be `pull` or `pull,build`, not {text.strip()!r}")
    return frozenset(given | {PULL})  # build implies pull


def parse_users(text: str) -> dict[str, User]:
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise UsersFileError(f"line {number}: expected name:hash:permissions")
        name, password_hash, permissions = (part.strip() for part in parts)
        if not _USER_NAME.fullmatch(name):
            raise UsersFileError(f"line {number}: invalid user name (letters, digits, '.', '_', '@', '-')")
        if name in users:
            raise UsersFileError(f"line {number}: user {name} is listed twice")
        try:
            _parse_hash(password_hash)
            users[name] = User(name, password_hash, parse_permissions(permissions))
        except ValueError as exc:
            raise UsersFileError(f"line {number} (user {name}): {exc}") from None
    if not users:
        raise UsersFileError("lists no users")
    return users


def load_users(path: Path) -> dict[str, User]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors write one) is no part of a name
    except UnicodeDecodeError:
        raise UsersFileError("is not UTF-8 text") from None
    except OSError as exc:
        raise UsersFileError(f"cannot be read: {exc.strerror or exc}") from None
    return parse_users(text)


class UserDirectory:
    """The users of a file, re-read when the file changes (checked at most every
    `check_interval` seconds), so users can be added or removed without a
    restart. A file that became malformed is ignored (logged) until fixed."""

    def __init__(self, path: Path, *, check_interval: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._check_interval = check_interval
        self._clock = clock
        self._users = load_users(path)
        self.decoy_hash = _decoy_hash(self._users.values())
        self._stamp = self._file_stamp()
        self._checked = clock()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < self._check_interval:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            users = load_users(self.path)
        except UsersFileError as exc:
            log.error("auth.users_file_invalid", path=str(self.path), error=str(exc), keeping=len(self._users))
        else:
            self._users, self.decoy_hash = users, _decoy_hash(users.values())
            log.info("auth.users_reloaded", path=str(self.path), users=len(self._users))

    def get(self, name: str) -> User | None:
        self._refresh()
        return self._users.get(name)


class Authenticator:
    """Checks names and passwords. scrypt runs in a thread, at most `parallel`
    at once, the waiting checks served in turn by client (so that one client's
    flood of guesses does not hold back others' logins). A successful check is
    remembered (as an HMAC under a per-process key, never the password) so that
    the many requests of one pull cost one scrypt, not one each."""

    def __init__(self, users: UserDirectory, *, parallel: int = 2, remember: int = 1024):
        self.users = users
        self._slots = FairSlots(parallel)
        self._key = secrets.token_bytes(32)
        self._verified: LRU[bytes, bool] = LRU(remember)

    def _fingerprint(self, user: User, password: str) -> bytes:
        message = b"\0".join((user.name.encode(), user.password_hash.encode(), password.encode("utf-8", "replace")))
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def remembered(self, name: str, password: str) -> User | None:
        """The user, if this password was found theirs before (no scrypt, no wait)."""
        user = self.users.get(name)
        if user is not None and self._verified.get(self._fingerprint(user, password)):
            return user
        return None

    async def check(self, name: str, password: str, client: str = "") -> User | None:
        """The user, if `password` is theirs; `client` (an address) is whom the check waits in turn for.

        Cancelled while it waits for its turn, the check is dropped (its client left); once
        scrypt runs, it keeps its slot until scrypt ends, so that at most `parallel` run."""
        user = self.users.get(name)
        if user is None:
            # Spend the same time as for a listed user: no probing for names.
            await self._verify(client, password, self.users.decoy_hash)
            return None
        fingerprint = self._fingerprint(user, password)
        if self._verified.get(fingerprint):
            return user
        if not await self._verify(client, password, user.password_hash):
            return None
        self._verified.put(fingerprint, True)
        return user

    async def _verify(self, client: str, password: str, password_hash: str) -> bool:
        async with self._slots.hold(client):
            verifying = asyncio.ensure_future(asyncio.to_thread(verify_password, password, password_hash))
            try:
                return await asyncio.shield(verifying)
            except asyncio.CancelledError:
                await asyncio.wait({verifying})
                retrieve(verifying)  # nobody is left to hear how it ended
                raise


# --- tokens ------------------------------------------------------------------


class TokenError(ValueError):
    """A token is malformed, forged, expired or not for this service."""


@dataclass(frozen=True)
class Claims:
    subject: str | None  # None: an anonymous token
    access: Mapping[str, frozenset[str]]  # repository name -> actions
    issued_at: int
    expires_at: int


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64decode(text: str) -> bytes:
    """Unpadded base64url as JWS writes it (RFC 7515), strictly: one encoding per value.

    The standard decoder skips characters outside the alphabet and ignores the
    unused bits of the last character, so `sig!!` or a changed last letter
    would verify as `sig`.
    """
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        raise TokenError("malformed token")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:  # unused bits set in the last character
        raise TokenError("malformed token")
    return data


def parse_scope(scope: str) -> tuple[str, frozenset[str]] | None:
    """`repository:NAME:pull,push` -> (NAME, actions); None for other scopes."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if kind.split("(", 1)[0] != "repository" or not _REPOSITORY.fullmatch(name):
        return None
    return name, frozenset(a.strip() for a in actions.split(",") if a.strip())


def grant(permissions: frozenset[str], scopes: Iterable[str]) -> dict[str, frozenset[str]]:
    """The access a holder of `permissions` gets for the requested scopes: only
    pulls (this registry takes no pushes), plus `build` for users who may build."""
    access: dict[str, frozenset[str]] = {}
    for scope in list(scopes)[:32]:
        parsed = parse_scope(scope)
        if parsed is None:
            continue
        name, actions = parsed
        if PULL in permissions and actions & {PULL, "*"}:
            access[name] = access.get(name, frozenset()) | {PULL} | ({BUILD} & permissions)
    return access


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class TokenSigner:
    def __init__(
        self, secret: bytes, *, ttl: int = 300, service: str = "nixery", clock: Callable[[], float] = time.time
    ):
        if len(secret) < 16:
            raise ValueError("token secret too short")
        self._secret = secret
        self.ttl = ttl
        self.service = service
        self._clock = clock

    def _sign(self, signing_input: bytes) -> bytes:
        return hmac.new(self._secret, signing_input, hashlib.sha256).digest()

    def issue(self, subject: str | None, access: Mapping[str, frozenset[str]]) -> tuple[str, Claims]:
        now = int(self._clock())
        claims = Claims(subject, dict(access), now, now + self.ttl)
        header = {"alg": "HS256", "typ": "JWT"}
        payload = {
            "iss": "nixery",
            "sub": subject or "",
            "aud": self.service,
            "iat": now,
            "nbf": now - 1,
            "exp": claims.expires_at,
            "jti": secrets.token_hex(8),
            "access": [
                {"type": "repository", "name": name, "actions": sorted(actions)} for name, actions in access.items()
            ],
        }
        signing_input = ".".join(
            _b64encode(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload)
        )
        token = f"{signing_input}.{_b64encode(self._sign(signing_input.encode('ascii')))}"
        return token, claims

    def verify(self, token: str) -> Claims:
        parts = token.split(".")
        if len(parts) != 3 or not token.isascii():
            raise TokenError("malformed token")
        signature = _b64decode(parts[2])
        if not hmac.compare_digest(self._sign(f"{parts[0]}.{parts[1]}".encode("ascii")), signature):
            raise TokenError("token signature does not match")
        try:
            header = json.loads(_b64decode(parts[0]))
            payload = json.loads(_b64decode(parts[1]))
            if header.get("alg") != "HS256" or payload.get("aud") != self.service:
                raise TokenError("token is not for this registry")
            expires_at, not_before, issued_at = int(payload["exp"]), int(payload["nbf"]), int(payload["iat"])
            access = {
                entry["name"]: frozenset(entry["actions"])
                for entry in payload.get("access", [])
                if entry.get("type") == "repository"
            }
            subject = payload.get("sub") or None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenError("malformed token") from None
        now = self._clock()
        if now >= expires_at:
            raise TokenError("token expired")
        if now < not_before - 5:  # a little leeway for replicas' clocks
            raise TokenError("token not valid yet")
        return Claims(subject, access, issued_at, expires_at)


# --- `nixery auth hash-password` ---------------------------------------------


def _read_password(stdin=None) -> str:
    stdin = stdin or sys.stdin
    if stdin is None:  # closed (`<&-`): Python has no sys.stdin at all
        raise ValueError("standard input is closed: type the password on a terminal, or give it as stdin's first line")
    if stdin.isatty():
        try:
            first = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except EOFError:  # Ctrl-D at a prompt: EOFError says nothing ("nixery auth hash-password: ")
            print(file=sys.stderr)  # the prompt's line was left open
            raise ValueError("no password: the input ended at the prompt (Ctrl-D)") from None
        except KeyboardInterrupt:
            print(file=sys.stderr)  # "interrupted" on a line of its own, not after "Password: "
            raise
        if first != again:
            raise ValueError("the passwords differ")
        line = first
    else:
        try:
            line = stdin.readline()
        except UnicodeDecodeError:
            line = "\udcff"  # reported below, as an undecodable byte kept as a surrogate is
        except OSError as exc:  # a directory (`< /etc`), an unreadable device
            raise ValueError(f"cannot read the password from standard input: {exc.strerror or exc}") from None
        line = line[:-1] if line.endswith("\n") else line
    try:  # it is hashed as UTF-8 and compared with what clients send as UTF-8
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the password is not UTF-8 text") from None
    return line


def hash_password_main(argv: list[str], stdin=None, stdout=None) -> int:
    """`nixery auth hash-password [--user NAME [--permissions pull,build]]`:
    reads a password (prompted on a terminal, else the first line of stdin) and
    prints its hash, or a whole users-file line when --user is given."""
    stdout = stdout or sys.stdout
    parser = argparse.ArgumentParser(
        prog="nixery auth hash-password", description="Hash a password for the users file (NIXERY_AUTH_USERS)."
    )
    parser.add_argument("--user", help="print a whole users-file line for this user")
    parser.add_argument("--permissions", default="pull", help="with --user: `pull` (default) or `pull,build`")
    parser.add_argument("--cost", type=int, default=SCRYPT_LOG_N, help=f"log2 of scrypt's N (default {SCRYPT_LOG_N})")
    args = parser.parse_args(argv)
    try:
        if args.user is not None and not _USER_NAME.fullmatch(args.user):
            raise ValueError("invalid user name (letters, digits, '.', '_', '@', '-')")
        permissions = parse_permissions(args.permissions)
        if not 10 <= args.cost <= 18:
            raise ValueError("--cost must be within 10..18")
        password = _read_password(stdin)
        if not password:
            raise ValueError("empty password")
    except (ValueError, EOFError) as exc:
        print(f"nixery auth hash-password: {exc}", file=sys.stderr)
        return 2
    encoded = hash_password(password, log_n=args.cost)
    if args.user is None:
        print(encoded, file=stdout)
    else:
        print(f"{args.user}:{encoded}:{','.join(p for p in PERMISSIONS if p in permissions)}", file=stdout)
    return 0
