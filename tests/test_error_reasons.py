"""Why a pull failed, as registry clients show it.

docker, podman, skopeo and containerd's ctr print the JSON error body of a 4xx
answer ("manifest unknown: packages not found ..."), but of a 5xx only its
status line: "received unexpected HTTP status: 500 Internal Server Error". A
package that does not build, a git repository or channel that does not answer,
a build past NIX_TIMEOUT: the user saw none of the reasons, which were in the
body and in the registry's log. A 5xx answer's reason phrase now carries its
message.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from nixery import errors
from nixery.http.errors import REASON_MESSAGE_CHARS, reason_phrase
from tests.registry import RegistryProcess, busybox_set_with, ctr_pull_and_run, have, run

pytestmark = pytest.mark.nix

FAILS = "echo the-build-says-why >&2; exit 3"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("error-reasons")
    pkgs = busybox_set_with(base / "pkgs", "broken", "broken-1.0", FAILS)
    process = RegistryProcess(storage=base / "storage", env={"NIXERY_PKGS_PATH": str(pkgs)}).start()
    yield process
    process.stop()


def test_the_reason_of_a_failed_build_is_in_the_status_line(registry: RegistryProcess) -> None:
    for method in ("GET", "HEAD"):  # docker asks with HEAD first
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=120)
        connection.request(method, "/v2/shell/broken/manifests/latest")
        response = connection.getresponse()
        body = response.read()
        connection.close()
        assert response.status == 500, (response.status, body)
        reason = response.reason
        assert reason.startswith("Internal Server Error: ") and "broken-1.0" in reason, reason
    error = json.loads(body or registry.request("/v2/shell/broken/manifests/latest")[2])["errors"][0]
    assert error["detail"]["kind"] == "BUILD_FAILED" and "the-build-says-why" in error["message"], error


@pytest.mark.skipif(not have("podman") or not have("skopeo"), reason="needs podman and skopeo")
def test_podman_and_skopeo_say_why_a_build_failed(registry: RegistryProcess) -> None:
    image = f"{registry.host}/shell/broken"
    for argv in (
        ["podman", "pull", "--tls-verify=false", image],
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{image}"],
    ):
        result = run(argv, check=False)
        assert result.returncode != 0, result
        # Not just "received unexpected HTTP status: 500 Internal Server Error".
        assert "500 Internal Server Error: " in result.stderr, result.stderr
        assert "broken-1.0" in result.stderr, result.stderr


@pytest.mark.skipif(not have("containerd") or not have("ctr"), reason="needs containerd")
def test_ctr_says_why_a_build_failed(registry: RegistryProcess, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failed:
        ctr_pull_and_run(f"{registry.host}/shell/broken:latest", tmp_path / "containerd", "true")
    assert "500 Internal Server Error: " in str(failed.value) and "broken-1.0" in str(failed.value), failed.value


def test_the_reason_phrase_is_one_short_line_of_ascii() -> None:
    error = errors.SourceUnavailable("cannot reach\r\nthe repo \u00e9t\u00e9\x00 " + "x" * 1000)
    phrase = reason_phrase(error)
    assert phrase is not None and phrase.startswith("Bad Gateway: cannot reach the repo ?t?? xxx"), phrase
    assert phrase.endswith("...") and len(phrase) == len("Bad Gateway: ") + REASON_MESSAGE_CHARS
    assert all(" " <= c <= "~" for c in phrase), phrase
    assert reason_phrase(errors.ManifestUnknown("packages not found")) is None  # clients read 4xx bodies
