"""NIX_POPULARITY_URL: Nixery's popularity counts guide a young registry's layering.

End to end with real Nix and real `nixery serve` processes: `app` refers to
`libdata` (75 KB) and nothing else does. Counted within the closure alone,
libdata is as good as app's own and joins app's layer; with data that says
libdata is in a thousand packages' closures, it gets a layer of its own.
Nixery's popcount names packages without their store hashes (`libdata`), as
its published data does; a key may also name one store path (`<hash>-libdata`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nixery.layers.popularity import TAKES_OVER_AT, Popularity, PopularityError, parse_counts
from tests.httpd import LocalHTTP
from tests.registry import REPOSITORY, RegistryProcess, free_port, have, run

BUSYBOX = REPOSITORY / "pkgs" / "busybox"


def write_set(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "default.nix").write_text(
        f"""{{ system ? builtins.currentSystem, ... }}@args:
let
  base = import {BUSYBOX} args; bb = "${{base.busybox}}/bin";
  libdata = derivation {{
    name = "libdata"; inherit system; builder = "${{bb}}/sh";
    args = [ "-c" "${{bb}}/mkdir $out; ${{bb}}/head -c 76800 /dev/zero > $out/blob" ];
  }};
in base // {{
  inherit libdata;
  app = derivation {{
    name = "app"; inherit system; builder = "${{bb}}/sh";
    args = [ "-c" "${{bb}}/mkdir -p $out/bin; echo ${{libdata}} > $out/bin/data-location" ];
  }};
}}
"""
    )
    return directory


class JSONServer(LocalHTTP):
    def __init__(self, body: bytes):
        super().__init__(lambda path: (200, {}, body))
        self.data_url = self.url("/popularity.json")


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The set, and a popularity file that makes libdata popular, keyed by its store path."""
    root = tmp_path_factory.mktemp("popularity")
    directory = write_set(root / "pkgs")
    libdata = run(["nix-build", str(directory), "-A", "libdata", "--no-out-link"]).stdout.strip()
    data = root / "popularity.json"
    data.write_text(json.dumps({Path(libdata).name: 1000, "0000000000000000000000000000000a-other": 3}))
    return directory, data


def layers_of_app(tmp_path: Path, pkgs: Path, **env: str) -> tuple[int, RegistryProcess]:
    registry = RegistryProcess(
        storage=tmp_path / f"storage-{free_port()}", env={"NIXERY_PKGS_PATH": str(pkgs), **env}
    ).start()
    try:
        _, manifest = registry.manifest("app")
        return len(manifest["layers"]), registry
    finally:
        registry.stop()


@pytest.mark.nix
@pytest.mark.parametrize("scheme", ["file", "http"])
def test_popularity_data_splits_what_the_closure_alone_would_join(
    tmp_path: Path, pkgs: tuple[Path, Path], scheme: str
) -> None:
    # Bytes only (NIXERY_LAYER_COST_MB=0): at the default price of a layer the small
    # library is packed with others whatever its popularity.
    directory, data = pkgs
    without, _ = layers_of_app(tmp_path, directory, NIXERY_LAYER_COST_MB="0")
    server = JSONServer(data.read_bytes()) if scheme == "http" else None
    try:
        url = server.data_url if server else f"file://{data}"
        with_data, registry = layers_of_app(tmp_path, directory, NIX_POPULARITY_URL=url, NIXERY_LAYER_COST_MB="0")
    finally:
        if server:
            server.close()
    assert with_data == without + 1, (with_data, without)
    assert [e["paths"] for e in registry.log_events("layering.popularity_loaded")] == [2]


def layers_pulled(registry: RegistryProcess, name: str) -> int:
    """How many layers skopeo, a real client, finds in `name`'s image."""
    inspected = run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/{name}"]).stdout
    return len(json.loads(inspected)["Layers"])


@pytest.mark.nix
@pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")
def test_nixerys_own_data_keyed_by_package_name_guides_the_layering(tmp_path: Path, pkgs: tuple[Path, Path]) -> None:
    """Nixery's popcount writes package names without store hashes ({"glibc-2.37-8": 11624}); its
    data used to match no store path at all, so every path counted 1 and the closure's own counts
    were lost: a layering worse than with no data."""
    directory, _ = pkgs
    data = tmp_path / "popularity-nixos-unstable.json"
    data.write_text(json.dumps({"libdata": 1000, "glibc-2.37-8": 11624, "zlib-1.3": 4172}))
    without, _ = layers_of_app(tmp_path, directory, NIXERY_LAYER_COST_MB="0")
    registry = RegistryProcess(
        storage=tmp_path / "storage-nixery-data",
        env={"NIXERY_PKGS_PATH": str(directory), "NIX_POPULARITY_URL": f"file://{data}", "NIXERY_LAYER_COST_MB": "0"},
    ).start()
    try:
        with_data = layers_pulled(registry, "app")
    finally:
        registry.stop()
    assert with_data == without + 1, (with_data, without)
    assert [e["paths"] for e in registry.log_events("layering.popularity_loaded")] == [3]


@pytest.mark.nix
@pytest.mark.parametrize("problem", ["unreachable", "not counts"])
def test_bad_or_unreachable_data_is_one_warning_and_layering_goes_on(
    tmp_path: Path, pkgs: tuple[Path, Path], problem: str
) -> None:
    directory, _ = pkgs
    if problem == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/popularity.json"
    else:
        bad = tmp_path / "bad.json"
        bad.write_text('["not", "an", "object"]')
        url = f"file://{bad}"
    without, _ = layers_of_app(tmp_path, directory)
    registry = RegistryProcess(
        storage=tmp_path / "storage", env={"NIXERY_PKGS_PATH": str(directory), "NIX_POPULARITY_URL": url}
    ).start()
    try:
        assert len(registry.manifest("app")[1]["layers"]) == without
        registry.manifest("shell/app")  # a second image plans too
    finally:
        registry.stop()
    warnings = registry.log_events("layering.popularity_unavailable")
    assert len(warnings) == 1 and warnings[0]["level"] == "warning", warnings


def test_counts_are_keyed_by_store_path_or_by_name() -> None:
    hashed = "0c2ak7wd00000000000000000000000a-glibc-2.37-8"
    counts = parse_counts(json.dumps({hashed: 5, "/nix/store/def-zlib": 2, "glibc-2.37-8": 7, "jq": 3}).encode())
    assert counts["/nix/store/" + hashed] == 5  # its own count first
    assert counts["/nix/store/1a9qz3r8000000000000000000000000-glibc-2.37-8"] == 7  # by name (Nixery's keys)
    assert counts["/nix/store/def-zlib"] == 2
    assert counts.get("/nix/store/1a9qz3r8000000000000000000000000-jq-1.7") is None  # names match whole
    assert counts.get("/nix/store/1a9qz3r8000000000000000000000000-other", 1) == 1
    assert len(counts) == 4
    for bad in (b"[]", b'{"x": -1}', b'{"x": true}', b'{"x": "5"}', b"{", b"[" * 100_000, b"\xff"):
        with pytest.raises(PopularityError):
            parse_counts(bad)


async def test_megabytes_of_data_are_read_whole_over_http() -> None:
    """Nixery's counts for nixpkgs are megabytes: over HTTP they are read to their end. (Only
    what the connection had delivered at first was read, so real data was "not JSON".)"""
    counts = {f"{n:032x}-package-{n}": n for n in range(100_000)}  # 5 MB
    server = JSONServer(json.dumps(counts).encode())
    try:
        loaded = await Popularity(server.data_url).load()
    finally:
        server.close()
    assert loaded is not None and len(loaded) == len(counts)


async def test_the_history_takes_over_and_data_is_read_once(tmp_path: Path) -> None:
    data = tmp_path / "p.json"
    data.write_text('{"glibc": 5}')
    popularity = Popularity(f"file://{data}")
    assert await popularity.until(0) == {"glibc": 5}
    data.write_text("changed")
    assert await popularity.until(TAKES_OVER_AT - 1) == {"glibc": 5}
    assert await popularity.until(TAKES_OVER_AT) is None
    missing = Popularity(f"file://{tmp_path}/missing.json")
    with capture_logs() as logs:
        assert await missing.load() is None
        assert await missing.until(0) is None
    assert [entry["event"] for entry in logs] == ["layering.popularity_unavailable"]


def test_a_popularity_url_of_another_scheme_is_a_start_up_error() -> None:
    from nixery.config import ConfigError, load

    with pytest.raises(ConfigError, match="NIX_POPULARITY_URL"):
        load({"NIX_POPULARITY_URL": "ftp://example.invalid/p.json"})
    assert load({"NIX_POPULARITY_URL": "https://example.invalid/p.json"}).popularity_url
