"""Channels that move (NIXERY_CHANNEL_TTL): a channel name is asked again once its
revision is older than the TTL; a commit stays pinned. The "channel" is a local
HTTP server that redirects, as nixos.org's channels do, to a release tarball,
and the test moves the redirect; the registry is a real `nixery serve` with real Nix.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nixery.nix.channel import ChannelSource
from tests.httpd import LocalHTTP
from tests.test_sources import channel_tarball, needs_clients, rootfs_of, run_in, started

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


class MovingChannel:
    """`/channels/<name>` redirects (302) to `/releases/<target>.tar.gz`; `target` moves."""

    def __init__(self) -> None:
        self.releases = {
            "r1": channel_tarball("nixpkgs-r1", {"hello": "echo hello from release one"}),
            "r2": channel_tarball("nixpkgs-r2", {"hello": "echo hello from release two"}),
            COMMIT: channel_tarball("nixpkgs-pinned", {"hello": "echo hello from a commit"}),
        }
        self.target = "r1"
        self.http = LocalHTTP(self._answer)
        self.requests = self.http.requests
        self.template = self.http.url("/channels/{rev}")

    def _answer(self, path: str) -> tuple[int, dict[str, str], bytes] | None:
        if path.startswith("/channels/"):
            name = path.removeprefix("/channels/")
            return 302, {"Location": f"/releases/{name if name == COMMIT else self.target}.tar.gz"}, b""
        body = self.releases.get(path.removeprefix("/releases/").removesuffix(".tar.gz"))
        return None if body is None else (200, {}, body)

    def downloads(self) -> list[str]:
        return [path for path in self.requests if path.startswith("/releases/")]

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def channel() -> Iterator[MovingChannel]:
    server = MovingChannel()
    yield server
    server.close()


def after_ttl(ttl: float) -> None:
    time.sleep(ttl + 0.2)


@pytest.mark.nix
@needs_clients
def test_a_channel_name_follows_its_redirect_after_the_ttl(tmp_path: Path, channel: MovingChannel) -> None:
    ttl = 1.0
    registry = started(
        tmp_path / "storage", NIXERY_CHANNEL="nixos-test", NIXERY_CHANNEL_URL=channel.template,
        NIXERY_CHANNEL_TTL=str(ttl),
    )
    try:
        first, _ = registry.manifest("hello")
        status, _, page = registry.request("/", accept="text/html")
        assert status == 200
        revision = re.search(r'<dt>Revision</dt><dd><code title="(sha256-[0-9a-f]+)"', page.decode())
        assert revision and "fetched just now" in page.decode(), page.decode()[:3000]
        # Asked again after the TTL: the same redirect, nothing downloaded, the same image.
        after_ttl(ttl)
        assert registry.manifest("hello")[0] == first
        assert channel.downloads() == ["/releases/r1.tar.gz"]
        assert channel.requests.count("/channels/nixos-test") >= 2  # asked again
        # The channel moves: within a TTL the registry builds from the new release.
        channel.target = "r2"
        assert registry.manifest("hello")[0] == first  # not asked yet
        after_ttl(ttl)
        assert registry.manifest("hello")[0] != first
        assert channel.downloads() == ["/releases/r1.tar.gz", "/releases/r2.tar.gz"]
        assert run_in(rootfs_of(registry, "hello", tmp_path / "pull"), "/bin/hello") == "hello from release two\n"
        moved = registry.log_events("channel.moved")
        assert len(moved) == 1 and moved[0]["previous"] == revision[1], moved
        page = registry.request("/", accept="text/html")[2].decode()
        assert moved[0]["revision"] in page and moved[0]["revision"] != revision[1]
    finally:
        registry.stop()
    # The old release is kept (builds may use it), and a restart within the TTL asks nothing.
    asked = len(channel.requests)
    registry = started(
        tmp_path / "storage", NIXERY_CHANNEL="nixos-test", NIXERY_CHANNEL_URL=channel.template,
        NIXERY_CHANNEL_TTL="3600",
    )
    try:
        registry.manifest("hello")
    finally:
        registry.stop()
    assert len(channel.requests) == asked


async def test_a_commit_stays_pinned(tmp_path: Path, channel: MovingChannel) -> None:
    source = ChannelSource(COMMIT, url_template=channel.template, cache_dir=tmp_path, timeout=60, ttl=0.1)
    revision = await source.resolve("latest")
    assert revision.id == COMMIT and revision.fetched is not None
    after_ttl(0.1)
    assert await source.resolve("latest") == revision
    assert channel.requests == [f"/channels/{COMMIT}", f"/releases/{COMMIT}.tar.gz"]


async def test_an_unreachable_channel_keeps_its_last_revision(tmp_path: Path, channel: MovingChannel) -> None:
    source = ChannelSource("nixos-test", url_template=channel.template, cache_dir=tmp_path, timeout=60, ttl=0.1)
    revision = await source.resolve("latest")
    channel.close()
    after_ttl(0.1)
    with capture_logs() as logs:
        assert await source.resolve("latest") == revision
        assert await source.resolve("latest") == revision  # asked again only after another TTL
    assert [e["event"] for e in logs] == ["channel.unreachable_using_last_revision"]
