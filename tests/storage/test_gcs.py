"""GCS driver against fake-gcs-server.

The emulator serves signed URLs without checking them, so these tests check
the V4 signature themselves: rebuild the canonical request and string to sign
from the URL, as Google's servers do, and verify X-Goog-Signature with the
public half of the key the test generated.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from nixery.app import open_storage
from nixery.config import ConfigError
from nixery.registry.digest import Digest
from nixery.storage import ByteStream, Redirect, Storage
from tests.storage.conftest import Backend, SigningKey, make_signing_key
from tests.storage.test_conformance import fetch, put


@pytest.fixture
def gcs(make_backend) -> Backend:
    return make_backend("gcs")


def verify_v4(url: str, public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """Check a V4 signed GET URL; return its query parameters. Raises
    InvalidSignature when the URL is not what the key signed."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    params = dict(query)
    assert params["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert params["X-Goog-SignedHeaders"] == "host"
    canonical_query = "&".join(
        f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}"
        for name, value in sorted(query)
        if name != "X-Goog-Signature"
    )
    canonical_request = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"]
    )
    scope = params["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = "\n".join(
        [
            "GOOG4-RSA-SHA256",
            params["X-Goog-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    public_key.verify(
        bytes.fromhex(params["X-Goog-Signature"]), string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    return params


async def redirect_url(store: Storage, digest: Digest) -> str:
    source = await store.blob_source(digest, allow_redirect=True)
    assert isinstance(source, Redirect), source
    return source.url


async def test_signed_url_is_v4_short_lived_and_verifies(gcs: Backend, signing_key: SigningKey, tmp_path: Path) -> None:
    store = gcs.open(signed_url_ttl=120)
    data, other = os.urandom(2000), os.urandom(2000)
    digest, other_digest = await put(store, data), await put(store, other)
    url = await redirect_url(store, digest)

    params = verify_v4(url, signing_key.private_key.public_key())
    account, date, location, service, kind = params["X-Goog-Credential"].split("/")
    assert account == signing_key.account
    assert (service, kind) == ("storage", "goog4_request")
    signed = datetime.strptime(params["X-Goog-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs(signed.timestamp() - time.time()) < 60 and date == params["X-Goog-Date"][:8]
    assert params["X-Goog-Expires"] == "120"
    assert urlsplit(url).path == f"/{gcs.gcs.bucket}/blobs/sha256/{digest.hex}"
    assert await fetch(url) == (200, data)

    # The check is not a formality: changing what was signed breaks it.
    parts = urlsplit(url)
    other_object = urlunsplit(parts._replace(path=parts.path.replace(digest.hex, other_digest.hex)))
    longer = urlunsplit(parts._replace(query=urlencode({**params, "X-Goog-Expires": "604800"})))
    for tampered in (other_object, longer):
        with pytest.raises(InvalidSignature):
            verify_v4(tampered, signing_key.private_key.public_key())
    with pytest.raises(InvalidSignature):
        verify_v4(url, make_signing_key(tmp_path).private_key.public_key())


async def test_signs_with_service_account_key_without_signing_key(gcs: Backend, tmp_path: Path) -> None:
    """No GCS_SIGNING_KEY: the service account's own key file
    (GOOGLE_APPLICATION_CREDENTIALS) signs."""
    key = make_signing_key(tmp_path, account="registry@nixery-test.iam.gserviceaccount.com")
    key_file = service_account_file(tmp_path / "sa.json", key, "https://oauth2.googleapis.com/token")
    store = gcs.open(google_credentials=str(key_file), signing_key=None, signing_account=None)
    data = os.urandom(500)
    digest = await put(store, data)
    url = await redirect_url(store, digest)
    params = verify_v4(url, key.private_key.public_key())
    assert params["X-Goog-Credential"].startswith(key.account + "/")
    assert await fetch(url) == (200, data)


def service_account_file(path: Path, key: SigningKey, token_uri: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "nixery-test",
                "private_key_id": "0123456789abcdef",
                "private_key": key.pem,
                "client_email": key.account,
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )
    return path


async def test_production_credentials_path(
    gcs: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aiohttp_server
) -> None:
    """No emulator: Application Default Credentials from
    GOOGLE_APPLICATION_CREDENTIALS authenticate the API calls (OAuth token from
    the key's token_uri, served here) and sign the URLs. API_ENDPOINT_OVERRIDE
    points the real client at the fake server."""
    tokens: list[str] = []

    async def token(request: web.Request) -> web.Response:
        form = await request.post()
        tokens.append(str(form.get("grant_type")))
        return web.json_response({"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"})

    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app)
    key = make_signing_key(tmp_path, account="registry@nixery-test.iam.gserviceaccount.com")
    key_file = service_account_file(tmp_path / "sa.json", key, str(server.make_url("/token")))
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.setenv("API_ENDPOINT_OVERRIDE", gcs.gcs.endpoint)
    settings = gcs.settings(signing_key=None, signing_account=None)
    store = open_storage(settings)
    try:
        data = os.urandom(700)
        digest = await put(store, data)
        assert tokens and tokens[0] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
        url = await redirect_url(store, digest)
        params = verify_v4(url, key.private_key.public_key())
        assert params["X-Goog-Credential"].startswith(key.account + "/")
        assert url.startswith(f"{gcs.gcs.endpoint}/{settings.gcs.bucket}/blobs/sha256/{digest.hex}?")
        assert await fetch(url) == (200, data)
    finally:
        await store.close()


async def test_without_any_signer_blobs_are_relayed(gcs: Backend) -> None:
    store = gcs.open(signing_key=None, signing_account=None)
    data = os.urandom(500)
    digest = await put(store, data)
    source = await store.blob_source(digest, allow_redirect=True)
    assert isinstance(source, ByteStream)
    assert b"".join([chunk async for chunk in source.chunks]) == data


def test_pem_signing_key_needs_its_account(gcs: Backend, signing_key: SigningKey) -> None:
    with pytest.raises(ConfigError, match="GCS_SIGNING_ACCOUNT"):
        gcs.open(signing_account=None)


def test_signing_key_must_be_a_private_key(gcs: Backend, tmp_path: Path) -> None:
    public_only = tmp_path / "public.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_only.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="GCS_SIGNING_KEY"):
        gcs.open(signing_key=public_only)
