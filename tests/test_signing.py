"""Signed images (issue 25, item 1; docs/signing.md): every manifest a registry serves has a
cosign-format signature under its `sha256-<hex>.sig` tag, by NIXERY_SIGNING_KEY.

Real registries (`nixery serve`) sign; real skopeo fetches the signature tag. The check
of the signature itself is a stand-in (`verify_sigstore`), because no real verifier
runs here: Debian's skopeo 1.9.3 and podman 4.3.1 are built with sigstore verification
disabled (a `sigstoreSigned` requirement answers "Debian-local change: sigstore
disabled"), and cosign cannot be installed. The stand-in follows containers/image's
rules for a `sigstoreSigned` requirement with `matchRepository`: the signature is
fetched by its tag, each layer of type application/vnd.dev.cosign.simplesigning.v1+json
is a payload whose base64 ECDSA-SHA256 signature is in the
`dev.cosignproject.cosign/signature` annotation; the payload has exactly the fields
critical{identity{docker-reference}, image{docker-manifest-digest}, type} and
optional; its type is "cosign container image signature", its digest the pulled
manifest's, its reference's repository the pulled one. `test_skopeo_policy_...` runs
the real check where skopeo can do it. The cryptographic check is the openssl command's.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nixery import collected, config
from nixery.http.signatures import SIGNATURES, sign_pulled
from nixery.registry.digest import Digest
from nixery.registry.mediatypes import DOCKER_MANIFEST_LIST, OCI_INDEX
from nixery.signatures import MAX_REPOSITORIES_PER_MANIFEST, Signatures
from nixery.signing import SigningKey, generate_pair, signature_documents
from nixery.storage import FilesystemStorage
from nixery.storage.base import StorageFull
from tests.registry import DOCKER_MANIFEST, OCI_MANIFEST, REPOSITORY, RegistryProcess, have, run
from tests.test_gc_live import age_everything, blob_file, collect, record_key, wait_for
from tests.test_platforms import _record

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
ANNOTATION = "dev.cosignproject.cosign/signature"


class SignatureRejected(Exception):
    """What a verifying client reports: the image is refused for its signature."""


def openssl_verify(public_pem: bytes, payload: bytes, signature_b64: str) -> str | None:
    """The ECDSA-SHA256 check by the openssl command (not the library that signed): None when
    the signature over `payload` verifies with the key, else what openssl said."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except ValueError as exc:
        return f"signature is not base64: {exc}"
    with tempfile.TemporaryDirectory() as scratch:
        files = {"pub.pem": public_pem, "payload": payload, "signature": signature}
        for name, data in files.items():
            (Path(scratch) / name).write_bytes(data)
        checked = subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "signature", "payload"],
            cwd=scratch, capture_output=True, text=True, timeout=30,
        )
    return None if checked.returncode == 0 else (checked.stdout + checked.stderr).strip()[:300]


def verify_sigstore(
    registry: RegistryProcess, name: str, digest: str, public_pem: bytes, *, host: str | None = None
) -> dict:
    """The stand-in verifier (module docstring): the accepted payload, or SignatureRejected.
    `host`: the one clients name the registry by (default: the address it listens on)."""
    tag = digest.replace(":", "-") + ".sig"
    fetched = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{name}:{tag}"],
        capture_output=True, text=True, timeout=120,
    )
    if fetched.returncode != 0:
        raise SignatureRejected(f"no signature: {fetched.stderr.strip()}")
    manifest = json.loads(fetched.stdout)
    reasons = []
    for layer in manifest["layers"]:
        if layer["mediaType"] != SIMPLE_SIGNING:
            continue
        status, _, payload = registry.request(f"/v2/{name}/blobs/{layer['digest']}", accept=None)
        assert status == 200
        failure = openssl_verify(public_pem, payload, layer.get("annotations", {}).get(ANNOTATION, ""))
        if failure is not None:
            reasons.append(f"cryptographic signature verification failed: {failure}")
            continue
        document = json.loads(payload)
        critical = document["critical"]
        assert set(document) == {"critical", "optional"} and set(critical) == {"identity", "image", "type"}
        assert set(critical["identity"]) == {"docker-reference"}
        assert set(critical["image"]) == {"docker-manifest-digest"}
        if critical["type"] != "cosign container image signature":
            reasons.append(f"type {critical['type']}")
        elif critical["image"]["docker-manifest-digest"] != digest:
            reasons.append("signature for another manifest")
        elif critical["identity"]["docker-reference"] != f"{host or registry.host}/{name}":
            reasons.append(f"signature for another repository: {critical['identity']['docker-reference']}")
        else:
            return document
    raise SignatureRejected("; ".join(reasons) or "no simple-signing layer")


def digests_of(registry: RegistryProcess, name: str) -> list[str]:
    """The digests a client gets for `name:latest`: one per manifest format."""
    return [registry.manifest(name, accept=accept)[0] for accept in (DOCKER_MANIFEST, OCI_MANIFEST)]


def referrers_of(registry: RegistryProcess, name: str, digest: str) -> list[str]:
    """The digests of the documents (SBOMs, provenance) the referrers API lists for a manifest."""
    status, _, body = registry.request(f"/v2/{name}/referrers/{digest}", accept=OCI_INDEX)
    assert status == 200, body
    return [entry["digest"] for entry in json.loads(body)["manifests"]]


def signed_subjects(registry: RegistryProcess, name: str) -> list[str]:
    """Every manifest a pull of `name:latest` leads a client to: one per format, and the
    documents attached to each (what the registry signs on that pull)."""
    manifests = digests_of(registry, name)
    return [*manifests, *(referrer for digest in manifests for referrer in referrers_of(registry, name, digest))]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two key pairs, as `nixery keys generate` writes them."""
    made = {}
    for name in ("registry", "other"):
        result = run(["nixery", "keys", "generate", str(tmp_path / name)], env_extra={"PATH": _venv_path()})
        assert "NIXERY_SIGNING_KEY=" in result.stdout
        made[name] = tmp_path / name / "nixery-signing.key"
        made[f"{name}.pub"] = tmp_path / name / "nixery-signing.pub"
    return made


def _venv_path() -> str:
    return f"{Path(sys.executable).parent}:{os.environ['PATH']}"


# ---- units: keys and documents ----------------------------------------------------------


def test_keys_generate_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path: Path) -> None:
    private, public = generate_pair(tmp_path / "keys")
    assert private.stat().st_mode & 0o777 == 0o600
    key = SigningKey.load(private)
    assert key.public_pem == public.read_bytes()
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")  # what cosign --key and keyPath read
    with pytest.raises(FileExistsError):
        generate_pair(tmp_path / "keys")
    assert SigningKey.load(private).key_id == key.key_id


def test_signatures_are_deterministic_and_verify() -> None:
    key, subject = SigningKey.generate(), Digest.of(b"a manifest")
    first = signature_documents(key, "example.org/shell", subject)
    # RFC 6979: replicas sharing a key write the same bytes
    assert signature_documents(key, "example.org/shell", subject) == first
    manifest = json.loads(first.manifest)
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == SIMPLE_SIGNING and layer["digest"] == str(Digest.of(first.payload))
    assert json.loads(first.config)["rootfs"]["diff_ids"] == [layer["digest"]]
    key.private.public_key().verify(
        base64.b64decode(layer["annotations"][ANNOTATION]), first.payload, ec.ECDSA(hashes.SHA256())
    )
    assert json.loads(first.payload) == {
        "critical": {
            "identity": {"docker-reference": "example.org/shell"},
            "image": {"docker-manifest-digest": str(subject)},
            "type": "cosign container image signature",
        },
        "optional": None,
    }
    assert signature_documents(key, "example.org/other", subject).manifest != first.manifest


def test_signing_settings_are_checked_at_start(tmp_path: Path) -> None:
    private, _ = generate_pair(tmp_path)
    assert config.load({"NIXERY_SIGNING_KEY": str(private)}).signing_key is not None
    assert config.load({}).signing_key is None
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(SigningKey.load(private).private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    ))
    loaded = config.load({"NIXERY_SIGNING_KEY": str(encrypted), "NIXERY_SIGNING_KEY_PASSWORD": "pw"}).signing_key
    assert loaded is not None and loaded.key_id == SigningKey.load(private).key_id
    rsa = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA"], capture_output=True, check=True).stdout
    (tmp_path / "rsa.pem").write_bytes(rsa)
    for env, message in [
        ({"NIXERY_SIGNING_KEY": str(encrypted), "NIXERY_SIGNING_KEY_PASSWORD": "wrong"}, "password is wrong"),
        ({"NIXERY_SIGNING_KEY": str(encrypted)}, "encrypted"),
        ({"NIXERY_SIGNING_KEY": str(tmp_path / "missing.pem")}, "cannot read"),
        ({"NIXERY_SIGNING_KEY": str(tmp_path / "rsa.pem")}, "not an ECDSA P-256 key"),
        ({"NIXERY_SIGNING_KEY_PASSWORD": "pw"}, "NIXERY_SIGNING_KEY is not"),
        ({"NIXERY_PUBLIC_HOST": "https://registry.example.org/"}, "HOST or HOST:PORT"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.load(env)
    assert config.load({"NIXERY_PUBLIC_HOST": "registry.example.org:5000"}).public_host == "registry.example.org:5000"


def test_a_file_that_is_not_the_signing_key_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A certificate, the public key, an empty file, cosign's own key format, and a damaged or
    non-PEM file all said "is not a PEM private key (or the password is wrong)", with no password
    set: a user went looking for a password. Now each says what the file is; "the password is wrong"
    only for an encrypted key given a password that does not open it."""
    private, public = generate_pair(tmp_path)
    certificate = subprocess.run(
        ["openssl", "req", "-x509", "-key", str(private), "-subj", "/CN=nixery", "-days", "1"],
        capture_output=True, check=True,
    ).stdout
    label = b"ENCRYPTED SIGSTORE PRIVATE KEY"  # what `cosign generate-key-pair` writes
    cosign = b"-----BEGIN " + label + b"-----\neyJrZGYiOnt9fQ==\n-----END " + label + b"-----\n"
    files = {
        "certificate.pem": (certificate, "holds a certificate, not a private key"),
        "public.pem": (public.read_bytes(), "holds a public key, not the private key"),
        "empty.pem": (b"", "is empty"),
        "cosign.key": (cosign, "cosign's own encrypted format"),
        "notes.txt": (b"my signing key\n", "is not a PEM file"),
        "image.tar": (b"\0" * (1 << 20), "larger than 64 KiB: not a key file"),
    }
    for name, (content, said) in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(config.ConfigError) as raised:
            config.load({"NIXERY_SIGNING_KEY": str(tmp_path / name)})
        assert said in str(raised.value) and "password" not in str(raised.value), (name, str(raised.value))
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(SigningKey.load(private).private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    ))
    # a device that never ends was read until memory ran out: now its first 64 KiB
    with pytest.raises(config.ConfigError, match="larger than 64 KiB"):
        config.load({"NIXERY_SIGNING_KEY": "/dev/zero"})
    for env, said in [
        ({"NIXERY_SIGNING_KEY": str(encrypted)}, "is encrypted: give its password in NIXERY_SIGNING_KEY_PASSWORD"),
        ({"NIXERY_SIGNING_KEY": str(encrypted), "NIXERY_SIGNING_KEY_PASSWORD": "wrong"}, "the password is wrong"),
        ({"NIXERY_SIGNING_KEY": str(private), "NIXERY_SIGNING_KEY_PASSWORD": "pw"}, "is not encrypted"),
    ]:
        with pytest.raises(config.ConfigError, match=re.escape(said)):
            config.load(env)


# ---- a registry that signs ----------------------------------------------------------------

needs_skopeo = pytest.mark.skipif(not have("skopeo"), reason="needs skopeo")


@needs_skopeo
def test_every_manifest_is_signed_for_the_repository_it_was_pulled_through(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path]
) -> None:
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_SIGNING_KEY=str(keys["registry"]))
    public = keys["registry.pub"].read_bytes()
    status, headers, served = registry.request("/signing-key.pub", accept=None)
    assert status == 200 and served == public
    landing = registry.request("/", accept="text/html")[2].decode()
    assert "BEGIN PUBLIC KEY" in landing  # shown on the landing page, with no advice to fetch it from here
    assert "curl" not in landing.split('id="signing"')[1].split("</section>")[0]
    flags = "--allow-insecure-registry --insecure-ignore-tlog"  # plain HTTP, no Rekor: docs/signing.md
    assert f"cosign verify {flags} --key nixery-signing.pub {registry.host}/shell/" in landing
    for name in ("shell", "hello/shell"):
        for digest in digests_of(registry, name):
            payload = verify_sigstore(registry, name, digest, public)
            assert payload["critical"]["identity"]["docker-reference"] == f"{registry.host}/{name}"
            # ... and only by the registry's key: a policy naming another key refuses the image.
            with pytest.raises(SignatureRejected, match="cryptographic signature verification failed"):
                verify_sigstore(registry, name, digest, keys["other.pub"].read_bytes())
    # A signature names its repository: `shell`'s is no signature of the same manifest as `hello/shell`'s.
    with pytest.raises(SignatureRejected, match="no signature"):
        verify_sigstore(registry, "hello", digests_of(registry, "shell")[0], public)
    # A signature tag is never a build, and a digest nobody pulled has none.
    status, _, body = registry.request(f"/v2/shell/manifests/sha256-{'0' * 64}.sig", accept=OCI_MANIFEST)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # The signature manifest is served by its digest too, as any manifest (skopeo copies it so).
    digest = digests_of(registry, "shell")[1]
    sig_digest = registry.manifest("shell", digest.replace(":", "-") + ".sig", accept=OCI_MANIFEST)[0]
    assert registry.manifest("shell", sig_digest, accept=OCI_MANIFEST)[0] == sig_digest


def test_a_manifest_is_signed_for_a_bounded_number_of_repositories(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path]
) -> None:
    """Without NIXERY_PUBLIC_HOST each Host header is a repository of its own, and each
    signature is stored: a client sending a new Host on every pull had the registry sign,
    and store, without end. Past the bound, pulls are answered as before, unsigned."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_SIGNING_KEY=str(keys["registry"]))

    def pull(host: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=300)
        try:
            connection.putrequest("GET", "/v2/shell/manifests/latest", skip_host=True)
            connection.putheader("Host", host)
            connection.putheader("Accept", DOCKER_MANIFEST)
            connection.endheaders()
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    hosts = [f"registry-{n}.example" for n in range(MAX_REPOSITORIES_PER_MANIFEST + 8)]
    assert [pull(host) for host in hosts] == [200] * len(hosts)
    signed = registry.log_events("signing.signed")
    manifests = len({event["subject"] for event in signed})  # the image's Docker and OCI manifests, their documents
    assert manifests == len(signed_subjects(registry, "shell")) == 8
    assert len(signed) == manifests * MAX_REPOSITORIES_PER_MANIFEST, len(signed)
    first_hosts = hosts[:MAX_REPOSITORIES_PER_MANIFEST]
    assert {event["identity"] for event in signed} == {f"{host}/shell" for host in first_hosts}
    warned = registry.log_events("signing.too_many_repositories")
    assert len(warned) == manifests and "NIXERY_PUBLIC_HOST" in warned[0]["problem"]
    # The first hosts keep their signatures; a pull through them signs nothing again.
    assert pull(hosts[0]) == 200 and len(registry.log_events("signing.signed")) == len(signed)


@needs_skopeo
def test_signatures_are_stored_once_shared_by_replicas_and_made_anew_for_a_new_key(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path], tmp_path: Path
) -> None:
    storage = tmp_path / "shared"
    # Replicas behind one name: NIXERY_PUBLIC_HOST (each listens on its own port here).
    env = {"NIXERY_BUNDLED_SET": "busybox", "NIXERY_PUBLIC_HOST": "nixery.example"}
    # Built before any key was configured: signed on its next pull once there is one.
    unsigned = start_registry(storage, **env)
    digest = digests_of(unsigned, "shell")[0]
    with pytest.raises(SignatureRejected, match="no signature"):
        verify_sigstore(unsigned, "shell", digest, keys["registry.pub"].read_bytes(), host="nixery.example")
    unsigned.stop()
    first = start_registry(storage, **env, NIXERY_SIGNING_KEY=str(keys["registry"]))
    assert digests_of(first, "shell")[0] == digest  # the same image: signing changes no manifest
    verify_sigstore(first, "shell", digest, keys["registry.pub"].read_bytes(), host="nixery.example")
    signed = len(first.log_events("signing.signed"))
    assert signed == 8  # the Docker and the OCI manifest and the 3 documents about each, once each
    digests_of(first, "shell")
    assert len(first.log_events("signing.signed")) == signed  # once: not on every pull
    # A replica on the same storage and key serves the stored signature, even pulled by digest only.
    replica = start_registry(storage, **env, NIXERY_SIGNING_KEY=str(keys["registry"]))
    verify_sigstore(replica, "shell", digest, keys["registry.pub"].read_bytes(), host="nixery.example")
    digests_of(replica, "shell")
    assert replica.log_events("signing.signed") == []
    # Another key: signed again by it on the next pull.
    first.stop()
    replica.stop()
    rekeyed = start_registry(storage, **env, NIXERY_SIGNING_KEY=str(keys["other"]))
    digests_of(rekeyed, "shell")
    verify_sigstore(rekeyed, "shell", digest, keys["other.pub"].read_bytes(), host="nixery.example")
    with pytest.raises(SignatureRejected, match="cryptographic signature verification failed"):
        verify_sigstore(rekeyed, "shell", digest, keys["registry.pub"].read_bytes(), host="nixery.example")


@needs_skopeo
def test_a_tampered_signature_is_refused(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path], tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    env = {"NIXERY_BUNDLED_SET": "busybox", "NIXERY_PUBLIC_HOST": "nixery.example"}
    env["NIXERY_SIGNING_KEY"] = str(keys["registry"])
    registry = start_registry(storage, **env)
    digest = digests_of(registry, "shell")[1]
    verify_sigstore(registry, "shell", digest, keys["registry.pub"].read_bytes(), host="nixery.example")
    registry.stop()
    # Someone with write access to the storage swaps in a signature whose annotation was edited:
    # a new signature manifest (stored under its own digest, as storage checks digests) and the
    # entry pointing at it.
    (entry,) = [path for path in (storage / "meta" / "signatures").rglob(digest.split(":")[1])]
    attached = json.loads(entry.read_text())
    manifest = json.loads(_read_blob(storage, attached["manifest"]["digest"]))
    signature = bytearray(base64.b64decode(manifest["layers"][0]["annotations"][ANNOTATION]))
    signature[-1] ^= 1
    manifest["layers"][0]["annotations"][ANNOTATION] = base64.b64encode(bytes(signature)).decode()
    forged = json.dumps(manifest).encode()
    _write_blob(storage, forged)
    attached["manifest"].update(digest=str(Digest.of(forged)), size=len(forged))
    entry.write_text(json.dumps(attached))
    restarted = start_registry(storage, **env)
    with pytest.raises(SignatureRejected, match="cryptographic signature verification failed"):
        verify_sigstore(restarted, "shell", digest, keys["registry.pub"].read_bytes(), host="nixery.example")


@needs_skopeo
def test_the_sboms_and_provenance_of_an_image_are_signed_too(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path]
) -> None:
    """The documents the referrers API lists are manifests the registry serves: a client that
    takes an SBOM from there checks it is the registry's as it checks the image
    (`cosign verify --key ... HOST/NAME@<its digest>`). They were served unsigned."""
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_SIGNING_KEY=str(keys["registry"]))
    public = keys["registry.pub"].read_bytes()
    for digest in digests_of(registry, "hello/shell"):
        documents = referrers_of(registry, "hello/shell", digest)
        assert len(documents) == 3  # SPDX, CycloneDX, provenance
        for document in documents:
            payload = verify_sigstore(registry, "hello/shell", document, public)
            assert payload["critical"]["image"]["docker-manifest-digest"] == document
            with pytest.raises(SignatureRejected, match="cryptographic signature verification failed"):
                verify_sigstore(registry, "hello/shell", document, keys["other.pub"].read_bytes())
    # Signed per repository, as the image: not for a name it was not pulled through.
    with pytest.raises(SignatureRejected, match="no signature"):
        verify_sigstore(registry, "figlet", documents[0], public)


@needs_skopeo
def test_a_signature_whose_manifest_was_damaged_in_storage_is_made_again(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path], tmp_path: Path
) -> None:
    """A signature's blob that no longer hashes to its digest (a disk's fault) is set aside when
    it is read: the signature tag is then made again, not `404 MANIFEST_UNKNOWN` for as long as
    the registry runs (which made clients that require a signature refuse the image)."""
    storage = tmp_path / "storage"
    env = {"NIXERY_BUNDLED_SET": "busybox", "NIXERY_PUBLIC_HOST": "nixery.example",
           "NIXERY_SIGNING_KEY": str(keys["registry"])}
    public = keys["registry.pub"].read_bytes()
    registry = start_registry(storage, **env)
    digest = digests_of(registry, "shell")[1]
    verify_sigstore(registry, "shell", digest, public, host="nixery.example")
    registry.stop()
    (entry,) = [path for path in (storage / "meta" / "signatures").rglob(digest.split(":")[1])]
    damaged = blob_file(storage, json.loads(entry.read_text())["manifest"]["digest"])
    data = bytearray(damaged.read_bytes())
    data[-2] ^= 1  # one bit of the manifest's last byte but one flipped in place
    damaged.write_bytes(bytes(data))
    restarted = start_registry(storage, **env)
    for _ in range(2):  # the first request finds the damage; neither is refused
        verify_sigstore(restarted, "shell", digest, public, host="nixery.example")
    assert restarted.log_events("storage.damaged_blob_set_aside")


def _read_blob(storage: Path, digest: str) -> bytes:
    return asyncio.run(_storage(storage).read_blob(Digest.parse(digest)))


def _write_blob(storage: Path, data: bytes) -> None:
    asyncio.run(_storage(storage).put_blob_bytes(data))


def _storage(root: Path) -> FilesystemStorage:
    return FilesystemStorage(root)


def test_without_a_key_nothing_is_signed(registry: RegistryProcess) -> None:
    digest = registry.manifest("shell")[0]
    status, _, body = registry.request(f"/v2/shell/manifests/{digest.replace(':', '-')}.sig", accept=OCI_MANIFEST)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, _, body = registry.request("/signing-key.pub", accept=None)
    error = json.loads(body)["errors"][0]
    assert status == 404 and error["message"].startswith("this registry does not sign its images"), error
    assert not (registry.storage / "meta" / "signatures").exists()


# ---- a real client's policy ---------------------------------------------------------------


@needs_skopeo
@pytest.mark.clients
def test_skopeo_policy_requiring_the_registrys_signature(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path], tmp_path: Path
) -> None:
    registry = start_registry(NIXERY_BUNDLED_SET="busybox", NIXERY_SIGNING_KEY=str(keys["registry"]))

    def copy(public: Path) -> subprocess.CompletedProcess[str]:
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps({
            "default": [{"type": "reject"}],
            "transports": {
                "docker": {registry.host: [{
                    "type": "sigstoreSigned", "keyPath": str(public), "signedIdentity": {"type": "matchRepository"},
                }]},
                "dir": {"": [{"type": "insecureAcceptAnything"}]},
            },
        }))
        registries_d = tmp_path / "registries.d"
        registries_d.mkdir(exist_ok=True)
        (registries_d / "nixery.yaml").write_text(f"docker:\n  {registry.host}:\n    use-sigstore-attachments: true\n")
        target = tmp_path / "copied"
        shutil.rmtree(target, ignore_errors=True)
        return subprocess.run(
            ["skopeo", "--policy", str(policy), "--registries.d", str(registries_d), "copy", "--src-tls-verify=false",
             f"docker://{registry.host}/shell", f"dir:{target}"],
            capture_output=True, text=True, timeout=300, cwd=REPOSITORY,
        )

    accepted = copy(keys["registry.pub"])
    if "sigstore disabled" in accepted.stderr:
        pytest.skip("this skopeo is built without sigstore verification (Debian's 1.9.3): see the module docstring")
    assert accepted.returncode == 0, accepted.stderr
    refused = copy(keys["other.pub"])
    assert refused.returncode != 0 and "signature" in refused.stderr.lower(), refused.stderr


@needs_skopeo
def test_gc_keeps_the_signatures_of_kept_images_and_the_registry_signs_a_rebuilt_one_again(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path], tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    env = {"NIXERY_BUNDLED_SET": "busybox", "NIXERY_SIGNING_KEY": str(keys["registry"])}
    registry = start_registry(storage, **env)
    public = keys["registry.pub"].read_bytes()
    kept, collected_ = digests_of(registry, "shell"), digests_of(registry, "hello")
    for digest in (kept[0], collected_[0]):
        wait_for(storage / "meta" / "usage" / record_key(storage, digest))  # written in the background
    age_everything(storage)
    (storage / "meta" / "usage" / record_key(storage, kept[0])).write_text(json.dumps({"last_used": time.time()}))
    entries = {path.name: json.loads(path.read_bytes()) for path in (storage / "meta" / "signatures").rglob("*")
               if path.is_file()}
    kept_subjects = signed_subjects(registry, "shell")  # its manifests and the documents about them
    assert len(entries) == 2 * len(kept_subjects) == 16

    assert "removed 1 image and" in collect(storage)
    for digest in kept:
        attached = entries[Digest.parse(digest).hex]
        assert all(blob_file(storage, blob).exists() for blob in (attached["manifest"]["digest"], *attached["blobs"]))
        verify_sigstore(registry, "shell", digest, public)
    for digest in collected_:
        attached = entries[Digest.parse(digest).hex]
        assert not blob_file(storage, attached["manifest"]["digest"]).exists()
    remaining = sorted(path.name for path in (storage / "meta" / "signatures").rglob("*") if path.is_file())
    assert remaining == sorted(Digest.parse(digest).hex for digest in kept_subjects)  # the others' went too
    # The registry hears of the collection (one poll) and signs the rebuilt image again on its next pull.
    time.sleep(collected.POLL_INTERVAL + 1)
    assert digests_of(registry, "hello") == collected_
    for digest in collected_:
        verify_sigstore(registry, "hello", digest, public)


@needs_skopeo
def test_an_image_index_and_each_platforms_manifest_are_signed(
    start_registry: Callable[..., RegistryProcess], keys: dict[str, Path]
) -> None:
    registry = start_registry(
        NIXERY_BUNDLED_SET="busybox", NIXERY_PLATFORMS="linux/amd64,linux/arm64",
        NIXERY_SIGNING_KEY=str(keys["registry"]),
    )
    public = keys["registry.pub"].read_bytes()
    every = [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST]
    status, headers, body = registry.request("/v2/shell/manifests/latest", accept=every)
    assert status == 200 and headers["Content-Type"] == OCI_INDEX
    index = json.loads(body)
    signed = [headers["Docker-Content-Digest"], *(entry["digest"] for entry in index["manifests"])]
    signed.append(registry.manifest("shell", accept=DOCKER_MANIFEST_LIST)[0])
    assert len(set(signed)) == 4  # both indexes, and the amd64 and arm64 manifests
    for digest in signed:
        verify_sigstore(registry, "shell", digest, public)


class _FullStorage(FilesystemStorage):
    """Filesystem storage whose disk is full while `full` is set."""

    full = True

    async def put_blob_bytes(self, data: bytes) -> Digest:
        if self.full:
            raise StorageFull(f"the filesystem storage at {self.root}", "no space left on device")
        return await super().put_blob_bytes(data)


async def test_a_signing_that_fails_leaves_the_pull_alone_and_is_tried_again(tmp_path: Path) -> None:
    storage = _FullStorage(tmp_path / "storage")
    app = web.Application()
    app[SIGNATURES] = signatures = Signatures(storage, SigningKey.generate())
    request = make_mocked_request("GET", "/v2/shell/manifests/latest", headers={"Host": "nixery.example"},
                                  app=app, match_info={"name": "shell"})
    record = _record("amd64", "a")
    await sign_pulled(request, record)  # logged (signing.failed), not raised: the manifest is still answered
    subject = record.descriptors[0].digest
    assert await signatures.find("nixery.example/shell", subject) is None
    storage.full = False
    await sign_pulled(request, record)
    for descriptor in record.descriptors:
        found = await signatures.find("nixery.example/shell", descriptor.digest)
        assert found is not None and found.tag == f"sha256-{descriptor.digest.hex}.sig"
        assert await storage.stat_blob(found.manifest.digest) is not None
