"""From the environment variables an operator sets to a working driver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nixery import config
from nixery.app import open_storage
from nixery.config import ConfigError, Settings
from nixery.storage import FilesystemStorage, Redirect
from nixery.storage.gcs import GCSStorage
from nixery.storage.s3 import S3Storage
from tests.storage.conftest import SigningKey
from tests.storage.servers import GCSServer, S3Server
from tests.storage.test_conformance import fetch


async def test_s3_from_environment(s3_server: S3Server, tmp_path: Path) -> None:
    env = {
        "NIXERY_STORAGE_BACKEND": "s3",
        "STORAGE_PATH": str(tmp_path),
        "S3_BUCKET": s3_server.bucket,
        "S3_ENDPOINT": s3_server.endpoint,
        "S3_PATH_STYLE": "true",
        "S3_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "NIXERY_SIGNED_URL_TTL": "60",
    }
    store = open_storage(config.load(env))
    assert isinstance(store, S3Storage)
    assert store.staging_dir().is_relative_to(tmp_path / "tmp")
    digest = await store.put_blob_bytes(b"from the environment " + os.urandom(8))
    source = await store.blob_source(digest, allow_redirect=True)
    assert isinstance(source, Redirect)
    assert source.url.startswith(f"{s3_server.endpoint}/{s3_server.bucket}/blobs/sha256/{digest.hex}?")
    assert "X-Amz-Expires=60" in source.url
    assert (await fetch(source.url))[0] == 200


async def test_gcs_from_environment(
    gcs_server: GCSServer, signing_key: SigningKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    env = {
        "NIXERY_STORAGE_BACKEND": "gcs",
        "STORAGE_PATH": str(tmp_path),
        "GCS_BUCKET": gcs_server.bucket,
        "GCS_SIGNING_KEY": str(signing_key.pem_path),
        "GCS_SIGNING_ACCOUNT": signing_key.account,
    }
    store = open_storage(config.load(env))
    assert isinstance(store, GCSStorage)
    digest = await store.put_blob_bytes(b"from the environment " + os.urandom(8))
    source = await store.blob_source(digest, allow_redirect=True)
    assert isinstance(source, Redirect)
    assert "X-Goog-Expires=300" in source.url
    assert (await fetch(source.url))[0] == 200
    await store.close()


def test_filesystem_is_the_default(tmp_path: Path) -> None:
    store = open_storage(config.load({"STORAGE_PATH": str(tmp_path)}))
    assert isinstance(store, FilesystemStorage)
    assert store.root == tmp_path


@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_cloud_backend_without_its_settings(backend: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BUCKET"):
        open_storage(Settings(storage_backend=backend, storage_path=tmp_path))


def test_nixerys_gcs_settings_without_credentials_name_the_bucket(tmp_path: Path) -> None:
    """Nixery's settings (`BUCKET`, `NIXERY_STORAGE_BACKEND=gcs`) where no Google credentials
    are found: `nixery serve` stops with one line that named `GCS_BUCKET`, a variable this user
    never set; it names the bucket."""
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    env.update(
        NIXERY_STORAGE_BACKEND="gcs",
        BUCKET="my-nixery-bucket",
        STORAGE_PATH=str(tmp_path),
        PORT="0",
        GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "no-such-key.json"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "nixery", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 2, done
    line = done.stderr.strip()
    assert "no Google credentials for GCS bucket 'my-nixery-bucket'" in line and "GCS_BUCKET" not in line, line
    assert "no-such-key.json was not found" in line, line


def s3_settings(**env: str) -> config.S3Settings:
    settings = config.load({"NIXERY_STORAGE_BACKEND": "s3", "S3_BUCKET": "nixery", **env}).s3
    assert settings is not None
    return settings


def test_s3_addressing_always_names_the_bucket() -> None:
    """An explicit endpoint means path-style unless S3_PATH_STYLE says otherwise
    (as the AWS SDKs do); virtual-hosted requests carry the bucket in the host."""
    from nixery.storage.s3 import _addressing

    assert _addressing(s3_settings()) == (True, None)  # AWS: https://nixery.s3.REGION.amazonaws.com
    assert _addressing(s3_settings(S3_PATH_STYLE="true")) == (False, None)
    assert _addressing(s3_settings(S3_ENDPOINT="http://127.0.0.1:8333/")) == (False, "http://127.0.0.1:8333")
    virtual = s3_settings(S3_ENDPOINT="https://s3.example.com", S3_PATH_STYLE="false")
    assert _addressing(virtual) == (True, "https://nixery.s3.example.com")
    named = s3_settings(S3_ENDPOINT="https://nixery.s3.example.com:9000", S3_PATH_STYLE="false")
    assert _addressing(named) == (True, "https://nixery.s3.example.com:9000")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"S3_ENDPOINT": "http://127.0.0.1:8333/blobs"}, "must name the server only"),
        ({"S3_ENDPOINT": "127.0.0.1:8333"}, "must be an http:// or https:// URL"),
        ({"S3_ENDPOINT": "http://127.0.0.1:8333", "S3_PATH_STYLE": "false"}, "needs a host name"),
    ],
)
def test_s3_endpoints_that_would_write_elsewhere(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        s3_settings(**env)
