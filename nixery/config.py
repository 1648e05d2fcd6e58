"""Settings, read once from the environment and validated at start-up.

Every problem is a `ConfigError` whose message names the variable, so the
command line can print one line and exit.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from nixery.baseline import DEBIAN_SET_BASELINE, DEFAULT_BASELINE
from nixery.errors import NameInvalid
from nixery.failures import DEFAULT_TTL as DEFAULT_FAILED_BUILD_TTL
from nixery.images import DEFAULT_CAPACITY as DEFAULT_RECORD_CACHE
from nixery.layers.cost import DEFAULT_LAYER_COST_MB, parse_layer_cost_mb
from nixery.layers.popularity import check_url
from nixery.platforms import host_arch, parse_platforms
from nixery.registry.mediatypes import Compression
from nixery.registry.names import Arch, parse_image_name
from nixery.signing import SigningKey, SigningKeyError

REPOSITORY = Path(__file__).resolve().parent.parent

#: Where the registry keeps its storage when STORAGE_PATH is not set: in a source
#: checkout (the one `make run` set up, with nixery installed from it in editable
#: mode), its `var/storage`, which `make run` uses, so that `nixery serve`, `check`
#: and `gc` find the same storage from any directory; installed as a package,
#: /var/lib/nixery.
DEFAULT_STORAGE_PATH = (
    REPOSITORY / "var" / "storage"
    if (REPOSITORY / "pyproject.toml").is_file() and (REPOSITORY / "Makefile").is_file()
    else Path("/var/lib/nixery")
)


@dataclass(frozen=True)
class BundledSet:
    name: str
    path: Path  # a directory with default.nix
    #: Served because the Debian set is not generated (NIXERY_BUNDLED_SET=auto), not because it was asked for.
    fallback: bool = False
    #: NIXERY_BASELINE's default when this set is served.
    baseline: tuple[str, ...] = DEFAULT_BASELINE


#: Package sets that ship with the registry, served when no source is configured.
#: busybox: in the repository, always available. debian: generated from .deb
#: files by `make debian-set` into a cache directory outside git (`debian_set`).
BUSYBOX_SET = BundledSet("busybox", REPOSITORY / "pkgs" / "busybox")
DEFAULT_DEBIAN_SET_DIR = REPOSITORY / ".cache" / "debian-set"


def debian_set(env: Mapping[str, str] | None = None) -> BundledSet:
    """The Debian-derived set, where NIXERY_DEBIAN_SET_DIR in `env` (default: the process
    environment, read now) puts it."""
    env = os.environ if env is None else env
    return BundledSet(
        "debian", Path(env.get("NIXERY_DEBIAN_SET_DIR") or DEFAULT_DEBIAN_SET_DIR), baseline=DEBIAN_SET_BASELINE
    )


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    endpoint: str | None = None
    region: str = "us-east-1"
    #: None: path-style with an explicit endpoint (as the AWS SDKs do), virtual-hosted on AWS.
    path_style: bool | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None

    @property
    def uses_path_style(self) -> bool:
        return self.path_style if self.path_style is not None else self.endpoint is not None


@dataclass(frozen=True)
class GCSSettings:
    bucket: str
    signing_key: Path | None = None
    signing_account: str | None = None


@dataclass(frozen=True)
class AuthSettings:
    """Access control (docs/auth.md); off unless NIXERY_AUTH is basic or token."""

    mode: str = "none"  # none | basic | token
    users_file: Path | None = None
    anonymous_pull: bool = False
    token_secret: str | None = field(default=None, repr=False)
    token_secret_generated: bool = False  # random per start (shared by NIXERY_WORKERS, not by replicas)
    token_ttl: int = 300
    token_realm: str | None = None  # None: http://HOST/token from the request

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Package source: at most one of these three; none means the bundled set.
    pkgs_path: Path | None = None
    pkgs_repo: str | None = None
    channel: str | None = None
    # NIXERY_FLAKE: a flake reference (nixery/nix/flake.py).
    flake: str | None = None
    channel_url: str = "https://github.com/NixOS/nixpkgs/archive/{rev}.tar.gz"
    git_ref_ttl: float = 30.0
    # Seconds a channel name's revision is used before the channel is asked again (nixery/nix/channel.py).
    channel_ttl: float = 3600.0
    storage_backend: str = "filesystem"
    storage_path: Path = DEFAULT_STORAGE_PATH
    # Local cache of fetched package sources (git checkouts, channel tarballs).
    cache_dir: Path = DEFAULT_STORAGE_PATH / "cache"
    s3: S3Settings | None = None
    gcs: GCSSettings | None = None
    blob_redirect: bool = True
    # An nginx `internal` location serving the filesystem blob directory (deploy/nginx/nixery.conf).
    blob_accel_redirect: str | None = None
    # Blobs found intact are hard-linked under STORAGE_PATH/verified for nginx to send without asking.
    verified_blob_links: bool = False
    signed_url_ttl: int = 300
    bundled_set: BundledSet = BUSYBOX_SET
    nix_timeout: float = 600.0
    # "repl": a long-running `nix repl` per system resolves image names (nixery/nix/evaluator.py);
    # "process": one nix-instantiate per image.
    nix_evaluator: str = "repl"
    evaluator_memory_limit: int = 1024 << 20  # bytes of an evaluating Nix process; past it, it is killed
    max_layers: int = 100
    # What a client's wait for one layer is worth, in MB: the layering trades bytes for layers at it.
    layer_cost_mb: float = DEFAULT_LAYER_COST_MB
    # NIX_POPULARITY_URL: package-wide popularity counts for a young registry's layering.
    popularity_url: str | None = None
    max_concurrent_builds: int = 2
    # NIXERY_FAILED_BUILD_TTL: seconds a build Nix failed is answered with its error, not run (0: never).
    failed_build_ttl: float = DEFAULT_FAILED_BUILD_TTL
    # Image records kept in memory per process, least recently used dropped first.
    record_cache: int = DEFAULT_RECORD_CACHE
    # zstd layers are smaller but need OCI manifests and a client that unpacks them (README).
    layer_compression: Compression = Compression.GZIP
    # NIXERY_PLATFORMS: a name without a platform is built for each (an image index) when several.
    platforms: tuple[Arch, ...] = field(default_factory=lambda: (host_arch(),))
    # NIXERY_BASELINE: packages every image gets when its package set has them (nixery.baseline).
    baseline: tuple[str, ...] = DEFAULT_BASELINE
    # NIXERY_NIX_ANNOTATIONS: each layer lists its store paths for nix-snapshotter (other manifests, digests).
    nix_annotations: bool = False
    shutdown_grace: float = 30.0
    shutdown_delay: float = 0.0
    # Seconds a connection may take to send a request's line and headers (slow or stalled clients).
    header_timeout: float = 60.0
    # Seconds what a connection was sent may wait for its client to take it (clients that stop reading).
    send_timeout: float = 60.0
    # Client connections open at once, per process; None: what the open-files limit leaves room for.
    max_connections: int | None = None
    workers: int = 1
    # Not from the environment: with several workers, the directory `nixery serve` makes for
    # them to share their builds in (nixery/shared_builds.py).
    shared_builds_dir: Path | None = None
    log_level: str = "info"
    log_format: str = "auto"
    auth: AuthSettings = AuthSettings()
    # Declared images (docs/kubernetes.md): NixImage YAML files, and/or a watch on the cluster's objects.
    images_path: Path | None = None
    images_poll: float = 10.0
    prebuild: bool = False
    k8s_watch: bool = False
    kubeconfig: Path | None = None
    # NIXERY_SIGNING_KEY: manifests are signed in the cosign format (docs/signing.md).
    signing_key: SigningKey | None = None
    # The host clients name the registry by, in signatures; unset: each request's Host.
    public_host: str | None = None
    # NIXERY_TRUSTED_PROXIES: peers whose X-Forwarded-For names the client (nixery/http/proxies.py).
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def source_description(self) -> str:
        if self.pkgs_path:
            return f"path {self.pkgs_path}"
        if self.pkgs_repo:
            return f"git {self.pkgs_repo}"
        if self.channel:
            return f"channel {self.channel}"
        if self.flake:
            return f"flake {self.flake}"
        return f"bundled {self.bundled_set.name} set ({self.bundled_set.path})"


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..{high}")
    return value


def _float(
    env: Mapping[str, str], name: str, default: float, *, zero: bool = False, high: tuple[float, str] | None = None,
) -> float:
    """Seconds, above 0 (or, with `zero`, at least 0: 0 turns the wait off); with `high`, at most
    its number of seconds, past which its words say what fails."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value):  # nan timed every Nix build out at once (NIX_TIMEOUT=nan)
        raise ConfigError(f"{name}={raw!r} is not a number of seconds")
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{name}={raw!r} must be positive" + (" or 0" if zero else ""))
    if high is not None and value > high[0]:
        raise ConfigError(f"{name}={raw!r} is over {high[0]:.0f} seconds: {high[1]}")
    return value


#: The longest NIXERY_SEND_TIMEOUT: the kernel's TCP_USER_TIMEOUT is a C int of milliseconds. Past
#: it, every connection's socket option failed (an error logged per connection) and none was limited.
MAX_SEND_TIMEOUT = (2**31 - 1) // 1000


#: Every environment variable the settings are read from, with the type of what it holds: `Path`
#: for the name of a file or directory (any bytes, as file systems allow), else text: words,
#: URLs, names, and the numbers and switches written in it. `_TEXT_SETTINGS` follows from it, and
#: test_config checks that every variable this module reads is declared here (or in
#: `MACHINE_VARIABLES`), so a new setting cannot be left out of the text check.
SETTING_TYPES: dict[str, type] = {
    # the server
    "NIXERY_HOST": str, "PORT": int, "NIXERY_WORKERS": int,
    "NIXERY_SHUTDOWN_GRACE": float, "NIXERY_SHUTDOWN_DELAY": float,
    "NIXERY_HEADER_TIMEOUT": float, "NIXERY_SEND_TIMEOUT": float, "NIXERY_MAX_CONNECTIONS": int,
    "NIXERY_PUBLIC_HOST": str, "NIXERY_TRUSTED_PROXIES": str,
    "LOG_LEVEL": str, "LOG_FORMAT": str,
    # package sources
    "NIXERY_PKGS_PATH": Path, "NIXERY_PKGS_REPO": str, "NIXERY_CHANNEL": str, "NIXERY_CHANNEL_URL": str,
    "NIXERY_FLAKE": str, "NIXERY_GIT_REF_TTL": float, "NIXERY_CHANNEL_TTL": float,
    "NIXERY_BUNDLED_SET": str, "NIXERY_DEBIAN_SET_DIR": Path, "NIXERY_BASELINE": str,
    # building
    "NIX_TIMEOUT": float, "NIXERY_NIX_EVALUATOR": str, "NIXERY_EVALUATOR_MEMORY_MB": int,
    "NIXERY_MAX_LAYERS": int, "NIXERY_LAYER_COST_MB": float, "NIX_POPULARITY_URL": str,
    "NIXERY_MAX_BUILDS": int, "NIXERY_RECORD_CACHE": int, "NIXERY_LAYER_COMPRESSION": str,
    "NIXERY_PLATFORMS": str, "NIXERY_NIX_ANNOTATIONS": bool, "NIXERY_FAILED_BUILD_TTL": float,
    # storage
    "NIXERY_STORAGE_BACKEND": str, "STORAGE_PATH": Path, "NIXERY_CACHE_DIR": Path,
    "NIXERY_BLOB_REDIRECT": bool, "NIXERY_BLOB_ACCEL_REDIRECT": str, "NIXERY_VERIFIED_BLOB_LINKS": bool,
    "NIXERY_SIGNED_URL_TTL": int,
    "S3_BUCKET": str, "BUCKET": str, "S3_ENDPOINT": str, "S3_REGION": str, "AWS_REGION": str,
    "AWS_DEFAULT_REGION": str, "S3_PATH_STYLE": bool, "AWS_ACCESS_KEY_ID": str, "AWS_SECRET_ACCESS_KEY": str,
    "GCS_BUCKET": str, "GCS_SIGNING_KEY": Path, "GCS_SIGNING_ACCOUNT": str,
    # access
    "NIXERY_AUTH": str, "NIXERY_AUTH_USERS": Path, "NIXERY_AUTH_ANONYMOUS_PULL": bool,
    "NIXERY_TOKEN_SECRET": str, "NIXERY_TOKEN_TTL": int, "NIXERY_TOKEN_REALM": str,
    "NIXERY_SIGNING_KEY": Path, "NIXERY_SIGNING_KEY_PASSWORD": str,
    # declared images
    "NIXERY_IMAGES_PATH": Path, "NIXERY_IMAGES_POLL": float, "NIXERY_PREBUILD": bool,
    "NIXERY_K8S_WATCH": bool, "KUBECONFIG": Path,  # KUBECONFIG: paths, as kubectl reads it
}

#: What this module reads of the machine's environment that is no setting of the registry's:
#: never refused, whatever it holds.
MACHINE_VARIABLES = ("HOME", "KUBERNETES_SERVICE_HOST")

#: In the settings' namespace but no setting: what `nixery build` reads (its registry), and what
#: the repository's own tools read (the Makefile, .ci/run, the tests and the benchmarks), which
#: a registry started from their shell sees.
CLIENT_VARIABLES = (
    "NIXERY_REGISTRY", "NIXERY_BENCH_SCRATCH", "NIXERY_DEBIAN_CACHE", "NIXERY_REQUIRE_DEBIAN_SET",
    "NIXERY_SELF_IMAGE_CACHE", "NIXERY_SELF_SET_DIR", "NIXERY_LAYERING_DATA", "NIXERY_TEST_CHROMIUM",
)
#: What Nixery (Go) reads and this registry does not, with why.
#: The settings' own prefix (some keep the names Nixery gave them: PORT, STORAGE_PATH, NIX_TIMEOUT).
SETTING_PREFIX = "NIXERY_"
NIXERY_GO_ONLY = {"WEB_DIR": "Nixery's directory of web pages; this registry serves its own pages"}


#: What Kubernetes sets in every pod for each Service of its namespace (the repository's is named
#: `nixery`): NIXERY_PORT=tcp://10.0.0.7:80, NIXERY_SERVICE_HOST, NIXERY_PORT_80_TCP_ADDR...
_SERVICE_LINK = re.compile(r"NIXERY_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_[A-Z]+)?)?)")


def unknown_settings(env: Mapping[str, str]) -> list[str]:
    """A line for each variable that looks like a setting but is none. Each was ignored without a
    word, so that a misspelt one (NIXERY_PKG_PATH) left the registry serving the bundled set."""
    lines = []
    for name in sorted(env):
        if name in NIXERY_GO_ONLY:
            lines.append(f"{name} is not read: {NIXERY_GO_ONLY[name]}")
        elif (
            name.startswith(SETTING_PREFIX)
            and name not in SETTING_TYPES
            and name not in CLIENT_VARIABLES
            and not _SERVICE_LINK.fullmatch(name)
        ):
            unprefixed = name.removeprefix(SETTING_PREFIX)  # NIXERY_PORT: PORT
            close = [unprefixed] if unprefixed in SETTING_TYPES else []
            close = close or difflib.get_close_matches(name, SETTING_TYPES, n=1, cutoff=0.8)
            hint = f"did you mean {close[0]}?" if close else "`nixery serve --help` lists the settings"
            lines.append(f"{name} is not a setting: {hint}")
    return lines


#: The settings that are text: all but the names of files, which may be any bytes.
_TEXT_SETTINGS = tuple(name for name, kind in SETTING_TYPES.items() if kind is not Path)


def _check_text(env: Mapping[str, str]) -> None:
    """A text setting that is not UTF-8 (Python keeps its bytes as surrogates) ended in a
    UnicodeError traceback wherever it was first encoded (the host to listen on, a git URL,
    a channel name), some only at the first build. A number or a switch that is not is
    refused here too, before its own check quotes it."""
    for name in _TEXT_SETTINGS:
        value = env.get(name)
        try:
            (value or "").encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{name}={value!r:.100} is not UTF-8 text") from None


def _layer_cost_mb(env: Mapping[str, str]) -> float:
    raw = env.get("NIXERY_LAYER_COST_MB", "").strip()
    if raw == "":
        return DEFAULT_LAYER_COST_MB
    try:
        return parse_layer_cost_mb(raw)
    except ValueError as exc:
        raise ConfigError(f"NIXERY_LAYER_COST_MB={exc}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (true/false)")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _popularity_url(env: Mapping[str, str]) -> str | None:
    url = env.get("NIX_POPULARITY_URL", "").strip()
    if not url:
        return None
    if (problem := check_url(url)) is not None:
        raise ConfigError(f"NIX_POPULARITY_URL={url!r}: {problem}")
    return url


def _flake(env: Mapping[str, str]) -> str | None:
    reference = env.get("NIXERY_FLAKE", "").strip()
    if not reference:
        return None
    if ":" not in reference or any(c.isspace() for c in reference):
        raise ConfigError(f"NIXERY_FLAKE={reference!r} is not a flake reference (git+file:///srv/pkgs, path:/srv/pkgs)")
    return reference


def _source(env: Mapping[str, str]) -> tuple[Path | None, str | None, str | None]:
    given = [n for n in ("NIXERY_PKGS_PATH", "NIXERY_PKGS_REPO", "NIXERY_CHANNEL", "NIXERY_FLAKE") if env.get(n)]
    if len(given) > 1:
        raise ConfigError(f"set only one package source, not {' and '.join(given)}")
    pkgs_path = None
    if env.get("NIXERY_PKGS_PATH"):
        pkgs_path = Path(env["NIXERY_PKGS_PATH"]).absolute()  # a link is followed on each pull (LocalPathSource)
        if not (pkgs_path / "default.nix").is_file():
            raise ConfigError(f"NIXERY_PKGS_PATH={env['NIXERY_PKGS_PATH']!r} has no default.nix")
    return pkgs_path, env.get("NIXERY_PKGS_REPO") or None, env.get("NIXERY_CHANNEL") or None


def _bundled_set(env: Mapping[str, str]) -> BundledSet:
    """`auto` prefers the Debian-derived set when it has been generated."""
    choice = _choice(env, "NIXERY_BUNDLED_SET", "auto", ("auto", "busybox", "debian"))
    debian = debian_set(env)
    debian_ready = (debian.path / "default.nix").is_file()
    if choice == "debian" and not debian_ready:
        # Named by NIXERY_DEBIAN_SET_DIR, the message names it: the path alone did not say where it came from.
        where = f"NIXERY_DEBIAN_SET_DIR={given!r}" if (given := env.get("NIXERY_DEBIAN_SET_DIR")) else debian.path
        raise ConfigError(f"NIXERY_BUNDLED_SET=debian but {where} has no default.nix (run `make debian-set`, which "
                          "writes the set where NIXERY_DEBIAN_SET_DIR says)")
    if choice == "debian" or (choice == "auto" and debian_ready):
        return debian
    return BUSYBOX_SET if choice == "busybox" else replace(BUSYBOX_SET, fallback=True)


def _bucket_setting(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """The bucket named by `name` (S3_BUCKET, GCS_BUCKET) or else BUCKET, with the variable that named it."""
    if value := env.get(name):
        return name, value
    if value := env.get("BUCKET"):
        return "BUCKET", value
    return None


def _check_bucket_name(variable: str, bucket: str, *, gcs: bool) -> None:
    """The provider's naming rules for a bucket: GCS's (3-63 characters of a-z, 0-9, '_', '.'
    and '-'; up to 222 when dotted, each part at most 63), or S3's as its older buckets have them
    (also upper case, up to 255: us-east-1 took such names before 2018, and some S3-compatible
    stores still do). A value outside them is no bucket: with a '/' or '..' the store's URL would
    name another bucket (S3_BUCKET=nixery/.. wrote the start-up probe into bucket `probes`)."""
    allowed = "a-z0-9._-" if gcs else "A-Za-z0-9._-"
    characters = "lowercase letters, digits, '_', '.' and '-'" if gcs else "letters, digits, '_', '.' and '-'"
    shortest_longest = "3-63" if gcs else "3-255"
    rules = (
        f"a bucket name is {shortest_longest} characters of {characters}, starting and ending with a letter "
        "or digit, with no '..', not an IP address"
    )
    longest = (222 if "." in bucket else 63) if gcs else 255
    problem = None
    if (bad := re.search(f"[^{allowed}]", bucket)) is not None:
        problem = f"has {bad.group()!r}"
    elif not 3 <= len(bucket) <= longest:  # (an empty value is unset)
        problem = f"is {len(bucket)} characters long"
    elif not (bucket[0].isalnum() and bucket[-1].isalnum()):
        problem = "does not start and end with a letter or digit"
    elif ".." in bucket:
        problem = "has '..'"
    elif gcs and any(len(part) > 63 for part in bucket.split(".")):
        problem = "has a dot-separated part longer than 63 characters"
    elif re.fullmatch(r"[0-9]+(\.[0-9]+){3}", bucket):
        problem = "is an IP address"
    if problem is not None:
        raise ConfigError(f"{variable}={bucket[:100]!r} {problem}: {rules}")


def _s3(env: Mapping[str, str]) -> S3Settings:
    named = _bucket_setting(env, "S3_BUCKET")
    if named is None:
        raise ConfigError("S3_BUCKET must be set when NIXERY_STORAGE_BACKEND=s3")
    variable, bucket = named
    _check_bucket_name(variable, bucket, gcs=False)
    keys = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if env.get(name)]
    if len(keys) == 1:  # the one given was ignored: the registry went on to look for other credentials
        other = "AWS_SECRET_ACCESS_KEY" if keys[0] == "AWS_ACCESS_KEY_ID" else "AWS_ACCESS_KEY_ID"
        raise ConfigError(f"{keys[0]} is set but {other} is not: S3 keys are a pair (set both, or neither)")
    endpoint = env.get("S3_ENDPOINT") or None
    path_style = _bool(env, "S3_PATH_STYLE", True) if env.get("S3_PATH_STYLE", "").strip() else None
    if endpoint is not None:
        _check_s3_endpoint(endpoint, virtual_hosted=path_style is False)
    return S3Settings(
        bucket=bucket,
        endpoint=endpoint,
        region=env.get("S3_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        path_style=path_style,
        access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
        secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
    )


def _check_s3_endpoint(endpoint: str, *, virtual_hosted: bool) -> None:
    """An endpoint names a server only: a path in it would be read as a bucket
    (objects written outside S3_BUCKET), and virtual-hosted requests put the
    bucket in the host name, which an IP address cannot carry."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"S3_ENDPOINT={endpoint!r} must be an http:// or https:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"S3_ENDPOINT={endpoint!r} must name the server only (no path): the bucket is S3_BUCKET")
    if virtual_hosted:
        try:
            ipaddress.ip_address(parts.hostname)
        except ValueError:
            return
        raise ConfigError(
            f"S3_PATH_STYLE=false needs a host name in S3_ENDPOINT={endpoint!r} to put the bucket in; "
            "leave S3_PATH_STYLE unset (path-style) for an IP address"
        )


def _gcs(env: Mapping[str, str]) -> GCSSettings:
    named = _bucket_setting(env, "GCS_BUCKET")
    if named is None:
        raise ConfigError("GCS_BUCKET must be set when NIXERY_STORAGE_BACKEND=gcs")
    variable, bucket = named
    _check_bucket_name(variable, bucket, gcs=True)
    key = env.get("GCS_SIGNING_KEY")
    if key and not Path(key).is_file():
        raise ConfigError(f"GCS_SIGNING_KEY={key!r} is not a readable file")
    return GCSSettings(
        bucket=bucket,
        signing_key=Path(key) if key else None,
        signing_account=env.get("GCS_SIGNING_ACCOUNT") or None,
    )


def _auth(env: Mapping[str, str]) -> AuthSettings:
    import secrets

    from nixery.auth import UsersFileError, load_users

    mode = _choice(env, "NIXERY_AUTH", "none", ("none", "basic", "token"))
    users = env.get("NIXERY_AUTH_USERS") or None
    if mode == "none":
        if users:  # a users file without NIXERY_AUTH would leave the registry open by mistake
            raise ConfigError("NIXERY_AUTH_USERS is set but NIXERY_AUTH=none: set NIXERY_AUTH=basic or token")
        return AuthSettings()
    if not users:
        raise ConfigError(f"NIXERY_AUTH_USERS (a users file) must be set when NIXERY_AUTH={mode}")
    try:
        load_users(Path(users))
    except UsersFileError as exc:
        raise ConfigError(f"NIXERY_AUTH_USERS={users!r} {exc}") from None
    secret = env.get("NIXERY_TOKEN_SECRET") or None
    if secret is not None and len(secret) < 32:
        raise ConfigError("NIXERY_TOKEN_SECRET must be at least 32 characters (e.g. `openssl rand -hex 32`)")
    realm = env.get("NIXERY_TOKEN_REALM") or None
    if realm is not None and not realm.startswith(("http://", "https://")):
        raise ConfigError(f"NIXERY_TOKEN_REALM={realm!r} must be an http:// or https:// URL")
    generated = mode == "token" and secret is None
    if generated:  # made here, before NIXERY_WORKERS fork, so that every worker signs alike
        secret = secrets.token_hex(32)
    return AuthSettings(
        mode=mode,
        users_file=Path(users).absolute(),  # not resolved: a Secret's link is followed at each read
        anonymous_pull=_bool(env, "NIXERY_AUTH_ANONYMOUS_PULL", False),
        token_secret=secret,
        token_secret_generated=generated,
        # Docker's token spec: never under 60 s, as docker keeps a token at least that long.
        token_ttl=_int(env, "NIXERY_TOKEN_TTL", 300, low=60, high=24 * 3600),
        token_realm=realm,
    )


def _accel_redirect(env: Mapping[str, str], backend: str) -> str | None:
    """The path prefix of nginx's internal location for blobs, as /prefix/: nginx sends the
    blob files of the filesystem store (a bucket's blobs are no files nginx could send)."""
    raw = env.get("NIXERY_BLOB_ACCEL_REDIRECT") or None
    if raw is None:
        return None
    if backend != "filesystem":
        raise ConfigError(
            f"NIXERY_BLOB_ACCEL_REDIRECT needs NIXERY_STORAGE_BACKEND=filesystem (not {backend}): nginx sends "
            "the filesystem store's blob files; bucket backends hand blobs to the bucket with signed redirects "
            "(NIXERY_BLOB_REDIRECT)"
        )
    if not (raw.startswith("/") and raw.endswith("/")) or any(c in raw for c in " ?#%\r\n"):
        raise ConfigError(
            f"NIXERY_BLOB_ACCEL_REDIRECT={raw!r} must be a path that starts and ends with / (e.g. /_nixery_blobs/)"
        )
    return raw


def _verified_links(env: Mapping[str, str], backend: str, auth: AuthSettings) -> bool:
    """NIXERY_VERIFIED_BLOB_LINKS: only where anyone may pull, as nginx then sends blobs unasked."""
    if not _bool(env, "NIXERY_VERIFIED_BLOB_LINKS", False):
        return False
    if backend != "filesystem":
        raise ConfigError(
            f"NIXERY_VERIFIED_BLOB_LINKS=true needs NIXERY_STORAGE_BACKEND=filesystem (not {backend}): "
            "bucket backends hand blobs to the bucket with signed redirects instead"
        )
    if auth.enabled and not auth.anonymous_pull:
        raise ConfigError(
            "NIXERY_VERIFIED_BLOB_LINKS=true lets nginx send blobs without asking the registry, so it cannot "
            f"be combined with NIXERY_AUTH={auth.mode} unless NIXERY_AUTH_ANONYMOUS_PULL=true; "
            "use NIXERY_BLOB_ACCEL_REDIRECT alone for a private registry"
        )
    return True


def _platforms(env: Mapping[str, str]) -> tuple[Arch, ...]:
    raw = env.get("NIXERY_PLATFORMS", "").strip()
    if not raw:
        return (host_arch(),)
    try:
        return parse_platforms(raw)
    except ValueError as exc:
        raise ConfigError(f"NIXERY_PLATFORMS={raw!r}: {exc}") from None


def _baseline(env: Mapping[str, str], default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get("NIXERY_BASELINE")
    if raw is None:
        return default
    names = tuple(dict.fromkeys(raw.replace(",", " ").split()))
    for name in names:
        try:
            parse_image_name(name)
        except NameInvalid as exc:
            raise ConfigError(f"NIXERY_BASELINE={raw!r}: {exc}") from None
    return names


def _images_path(env: Mapping[str, str]) -> Path | None:
    raw = env.get("NIXERY_IMAGES_PATH")
    if not raw:
        return None
    path = Path(raw).absolute()  # not resolved: a ConfigMap's link is followed at each scan
    if not path.exists():
        raise ConfigError(f"NIXERY_IMAGES_PATH={raw!r} does not exist (a directory of NixImage YAML files)")
    return path


def _signing_key(env: Mapping[str, str]) -> SigningKey | None:
    raw = env.get("NIXERY_SIGNING_KEY")
    if not raw:
        if env.get("NIXERY_SIGNING_KEY_PASSWORD"):
            raise ConfigError("NIXERY_SIGNING_KEY_PASSWORD is set but NIXERY_SIGNING_KEY is not")
        return None
    try:
        return SigningKey.load(Path(raw), env.get("NIXERY_SIGNING_KEY_PASSWORD") or None)
    except SigningKeyError as exc:
        raise ConfigError(f"NIXERY_SIGNING_KEY: {exc} (`nixery keys generate` writes a key pair)") from None


def _public_host(env: Mapping[str, str]) -> str | None:
    raw = env.get("NIXERY_PUBLIC_HOST")
    if not raw:
        return None
    if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?", raw):
        raise ConfigError(f"NIXERY_PUBLIC_HOST={raw[:100]!r} is not HOST or HOST:PORT (no scheme, no path)")
    return raw


def _trusted_proxies(env: Mapping[str, str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`127.0.0.1, 10.0.0.0/8, ::1`: addresses and networks (host bits allowed: 10.1.2.3/8 is 10.0.0.0/8)."""
    networks = []
    for entry in env.get("NIXERY_TRUSTED_PROXIES", "").split(","):
        if not (entry := entry.strip()):
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(
                f"NIXERY_TRUSTED_PROXIES: {entry[:100]!r} is not an IP address or network (127.0.0.1, 10.0.0.0/8, ::1)"
            ) from None
    return tuple(networks)


def _kubeconfig(env: Mapping[str, str]) -> Path | None:
    """The kubeconfig to use for NIXERY_K8S_WATCH; None: in-cluster, else ~/.kube/config."""
    first = next((p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p), None)
    if first:
        if not Path(first).is_file():
            raise ConfigError(f"KUBECONFIG={first!r} is not a readable file")
        return Path(first)
    token = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    in_cluster = env.get("KUBERNETES_SERVICE_HOST") and token.is_file()
    if not in_cluster and not (Path(env.get("HOME") or Path.home()) / ".kube" / "config").is_file():
        raise ConfigError("NIXERY_K8S_WATCH=true needs cluster credentials: run in a pod, or set KUBECONFIG")
    return None


def load(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    _check_text(env)
    pkgs_path, pkgs_repo, channel = _source(env)
    storage_path = Path(env.get("STORAGE_PATH") or DEFAULT_STORAGE_PATH)
    backend = _choice(env, "NIXERY_STORAGE_BACKEND", "filesystem", ("filesystem", "s3", "gcs"))
    auth = _auth(env)
    flake, bundled_set = _flake(env), _bundled_set(env)
    # The bundled set's own default baseline when it is the one served.
    served_bundled = not (pkgs_path or pkgs_repo or channel or flake)
    return Settings(
        host=env.get("NIXERY_HOST") or "127.0.0.1",
        port=_int(env, "PORT", 8080, low=0, high=65535),
        pkgs_path=pkgs_path,
        pkgs_repo=pkgs_repo,
        channel=channel,
        flake=flake,
        channel_url=env.get("NIXERY_CHANNEL_URL") or Settings.channel_url,
        git_ref_ttl=_float(env, "NIXERY_GIT_REF_TTL", 30.0),
        channel_ttl=_float(env, "NIXERY_CHANNEL_TTL", 3600.0),
        storage_backend=backend,
        storage_path=storage_path,
        cache_dir=Path(env.get("NIXERY_CACHE_DIR") or storage_path / "cache"),
        s3=_s3(env) if backend == "s3" else None,
        gcs=_gcs(env) if backend == "gcs" else None,
        blob_redirect=_bool(env, "NIXERY_BLOB_REDIRECT", True),
        blob_accel_redirect=_accel_redirect(env, backend),
        verified_blob_links=_verified_links(env, backend, auth),
        signed_url_ttl=_int(env, "NIXERY_SIGNED_URL_TTL", 300, low=10, high=7 * 24 * 3600),
        bundled_set=bundled_set,
        nix_timeout=_float(env, "NIX_TIMEOUT", 600.0),
        nix_evaluator=_choice(env, "NIXERY_NIX_EVALUATOR", "repl", ("repl", "process")),
        evaluator_memory_limit=_int(env, "NIXERY_EVALUATOR_MEMORY_MB", 1024, low=64, high=1 << 20) << 20,
        max_layers=_int(env, "NIXERY_MAX_LAYERS", 100, low=2, high=125),
        layer_cost_mb=_layer_cost_mb(env),
        popularity_url=_popularity_url(env),
        max_concurrent_builds=_int(env, "NIXERY_MAX_BUILDS", 2, low=1, high=64),
        failed_build_ttl=_float(env, "NIXERY_FAILED_BUILD_TTL", DEFAULT_FAILED_BUILD_TTL, zero=True),
        record_cache=_int(env, "NIXERY_RECORD_CACHE", DEFAULT_RECORD_CACHE, low=1, high=10_000_000),
        layer_compression=Compression(
            _choice(env, "NIXERY_LAYER_COMPRESSION", "gzip", tuple(c.value for c in Compression))
        ),
        platforms=_platforms(env),
        baseline=_baseline(env, bundled_set.baseline if served_bundled else DEFAULT_BASELINE),
        nix_annotations=_bool(env, "NIXERY_NIX_ANNOTATIONS", False),
        shutdown_grace=_float(env, "NIXERY_SHUTDOWN_GRACE", 30.0),
        shutdown_delay=_float(env, "NIXERY_SHUTDOWN_DELAY", 0.0, zero=True),
        header_timeout=_float(env, "NIXERY_HEADER_TIMEOUT", 60.0),
        send_timeout=_float(env, "NIXERY_SEND_TIMEOUT", 60.0, high=(
            MAX_SEND_TIMEOUT, "the longest wait the kernel's TCP_USER_TIMEOUT takes (24 days)")),
        max_connections=_int(env, "NIXERY_MAX_CONNECTIONS", 0, low=1, high=10_000_000) or None,
        workers=_int(env, "NIXERY_WORKERS", 1, low=1, high=64),
        log_level=_choice(env, "LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        log_format=_choice(env, "LOG_FORMAT", "auto", ("auto", "json", "console")),
        auth=auth,
        images_path=_images_path(env),
        images_poll=_float(env, "NIXERY_IMAGES_POLL", 10.0),
        prebuild=_bool(env, "NIXERY_PREBUILD", False),
        k8s_watch=_bool(env, "NIXERY_K8S_WATCH", False),
        kubeconfig=_kubeconfig(env) if _bool(env, "NIXERY_K8S_WATCH", False) else None,
        signing_key=_signing_key(env),
        public_host=_public_host(env),
        trusted_proxies=_trusted_proxies(env),
    )
