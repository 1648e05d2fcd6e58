"""Settings: which are text, checked as text, follows from each setting's declared type."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from nixery import config
from tests.registry import REPOSITORY

_VARIABLE = re.compile(r"[A-Z][A-Z0-9_]{2,}")


def variables_config_reads() -> set[str]:
    """Every environment variable nixery/config.py names: each string in it that looks like one
    (they are read as `env.get("X")`, `env["X"]`, `_int(env, "X", ...)`, or from a tuple of names)."""
    tree = ast.parse(Path(config.__file__).read_text())
    return {
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _VARIABLE.fullmatch(node.value)
    }


def test_every_variable_config_reads_has_a_declared_type() -> None:
    """`_TEXT_SETTINGS` was a list kept by hand: a text setting added to config.py without adding
    it there was taken as it came, and a value that is not UTF-8 ended in a UnicodeError
    traceback wherever it was first encoded. The text settings now follow from SETTING_TYPES, and
    a variable read without a declared type fails here."""
    read = variables_config_reads()
    assert {"PORT", "NIXERY_HOST", "S3_ENDPOINT", "NIXERY_PKGS_PATH", "KUBECONFIG"} <= read and len(read) > 50
    not_settings = {config.SETTING_PREFIX, *config.CLIENT_VARIABLES, *config.NIXERY_GO_ONLY}  # named to warn of
    undeclared = read - set(config.SETTING_TYPES) - set(config.MACHINE_VARIABLES) - not_settings
    assert not undeclared, f"read by nixery/config.py without a type in config.SETTING_TYPES: {sorted(undeclared)}"
    stale = set(config.SETTING_TYPES) - read
    assert not stale, f"declared in config.SETTING_TYPES but not read: {sorted(stale)}"


def test_the_text_settings_are_those_that_do_not_name_files() -> None:
    assert set(config._TEXT_SETTINGS) == {name for name, kind in config.SETTING_TYPES.items() if kind is not Path}
    # Those the hand-kept list named are all still checked.
    assert {
        "PORT", "NIXERY_HOST", "LOG_LEVEL", "LOG_FORMAT", "NIXERY_PKGS_REPO", "NIXERY_CHANNEL", "NIXERY_CHANNEL_URL",
        "NIXERY_FLAKE", "NIXERY_BUNDLED_SET", "NIXERY_BASELINE", "NIXERY_NIX_EVALUATOR", "NIXERY_PLATFORMS",
        "NIXERY_LAYER_COMPRESSION", "NIX_POPULARITY_URL", "NIXERY_STORAGE_BACKEND", "NIXERY_BLOB_ACCEL_REDIRECT",
        "S3_BUCKET", "BUCKET", "S3_ENDPOINT", "S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION", "S3_PATH_STYLE",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GCS_BUCKET", "GCS_SIGNING_ACCOUNT", "NIXERY_AUTH",
        "NIXERY_TOKEN_SECRET", "NIXERY_TOKEN_REALM", "NIXERY_SIGNING_KEY_PASSWORD", "NIXERY_PUBLIC_HOST",
    } <= set(config._TEXT_SETTINGS)


@pytest.mark.parametrize("name", sorted(config.SETTING_TYPES))
def test_each_text_setting_that_is_not_utf8_is_refused_by_name(name: str, tmp_path: Path) -> None:
    """Every text setting is covered by the check (a value Python keeps as surrogates: bytes that
    are not UTF-8); a file name may be any bytes, and is taken."""
    env = {"STORAGE_PATH": str(tmp_path), "NIXERY_BUNDLED_SET": "busybox", name: "x\udcff"}
    if config.SETTING_TYPES[name] is Path:
        try:
            config.load(env)
        except config.ConfigError as exc:  # a file that does not exist, say: but not refused as text
            assert "UTF-8" not in str(exc)
        return
    with pytest.raises(config.ConfigError) as caught:
        config.load(env)
    assert str(caught.value) == f"{name}='x\\udcff' is not UTF-8 text"


def test_a_misspelt_setting_is_named_with_the_one_meant() -> None:
    env = {"NIXERY_PKG_PATH": "/srv/pkgs", "NIXERY_SHINY": "1", "WEB_DIR": "/srv/web", "NIXERY_REGISTRY": "x",
           "NIXERY_STORAGE_PATH": "/srv", "NIXERY_MAX_BUILDS": "2", "PATH": "/bin"}
    assert config.unknown_settings(env) == [
        "NIXERY_PKG_PATH is not a setting: did you mean NIXERY_PKGS_PATH?",
        "NIXERY_SHINY is not a setting: `nixery serve --help` lists the settings",
        "NIXERY_STORAGE_PATH is not a setting: did you mean STORAGE_PATH?",
        "WEB_DIR is not read: Nixery's directory of web pages; this registry serves its own pages",
    ]


def test_the_repositorys_own_tools_variables_are_not_taken_for_misspelt_settings() -> None:
    """.ci/run exports NIXERY_REQUIRE_DEBIAN_SET: every registry the tests started warned of it, and
    tests that expect one line on stderr failed in CI alone."""
    read_by_tools = set()
    for pattern in ("Makefile", ".ci/*", "tests/*.py", "bench/*.py", "bench/*.sh"):
        for path in REPOSITORY.glob(pattern):
            read_by_tools |= set(re.findall(r"environ(?:\.get)?\(?\[?\"(NIXERY_[A-Z0-9_]+)", path.read_text()))
            read_by_tools |= set(re.findall(r"\$\{?(NIXERY_[A-Z0-9_]+)", path.read_text()))
            read_by_tools |= set(re.findall(r"export (NIXERY_[A-Z0-9_]+)=", path.read_text()))
    assert "NIXERY_REQUIRE_DEBIAN_SET" in read_by_tools
    assert config.unknown_settings(dict.fromkeys(read_by_tools, "1")) == []


def test_kubernetes_service_variables_are_not_taken_for_misspelt_settings() -> None:
    """Kubernetes gives every pod these for the Service named nixery (deploy/base/service.yaml)."""
    env = {
        "NIXERY_PORT": "tcp://10.96.0.7:80", "NIXERY_PORT_80_TCP": "tcp://10.96.0.7:80",
        "NIXERY_PORT_80_TCP_ADDR": "10.96.0.7", "NIXERY_PORT_80_TCP_PORT": "80", "NIXERY_PORT_80_TCP_PROTO": "tcp",
        "NIXERY_SERVICE_HOST": "10.96.0.7", "NIXERY_SERVICE_PORT": "80", "NIXERY_SERVICE_PORT_HTTP": "80",
    }
    assert config.unknown_settings(env) == []


def test_the_registry_says_at_start_which_settings_it_does_not_know(start_registry) -> None:
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_PKG_PATH="/srv/pkgs", WEB_DIR="/srv/web")
    assert registry.request("/v2/")[0] == 200  # it serves: a warning, not a refusal
    problems = [event["problem"] for event in registry.log_events("config.unknown_setting")]
    assert problems == [
        "NIXERY_PKG_PATH is not a setting: did you mean NIXERY_PKGS_PATH?",
        "WEB_DIR is not read: Nixery's directory of web pages; this registry serves its own pages",
    ]
