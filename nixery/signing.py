"""Signing keys and sigstore ("cosign") signatures of manifests.

A signature says "the registry at HOST serves the manifest with this digest as
the repository HOST/NAME". It is laid out as cosign lays it out, so that
cosign, sigstore policy-controller, Kyverno and containers/image (skopeo,
podman, CRI-O: `sigstoreSigned` in policy.json) verify it:

* the payload, a "simple signing" document (the blob that is signed):
  `{"critical": {"identity": {"docker-reference": "HOST/NAME"},
  "image": {"docker-manifest-digest": "sha256:..."},
  "type": "cosign container image signature"}, "optional": null}`;
* an OCI image manifest whose one layer is the payload, of media type
  `application/vnd.dev.cosign.simplesigning.v1+json`, with the base64 of the
  ECDSA P-256 / SHA-256 signature (DER) of the payload's bytes in its
  `dev.cosignproject.cosign/signature` annotation, and a config naming the
  payload as its one diff id; served under the tag `sha256-<hex>.sig`.

Guarantees: the same key, identity and digest always give the same documents,
byte for byte (canonical JSON, RFC 6979 deterministic ECDSA), so registries
sharing a storage and a key make and store identical signatures.

Keys: a PEM ECDSA P-256 private key (PKCS#8, or the "EC PRIVATE KEY" form
openssl writes), optionally encrypted with a password; its public key is PEM
SubjectPublicKeyInfo, the form cosign's `--key` and containers/image's
`keyPath` read. `generate_pair` writes unencrypted PKCS#8 (cosign's own
encrypted format is not written: `cosign import-key-pair` reads ours).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nixery.registry.descriptors import Descriptor
from nixery.registry.digest import Digest
from nixery.registry.image import canonical_json
from nixery.registry.mediatypes import OCI_CONFIG, OCI_MANIFEST

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
PRIVATE_KEY_FILE = "nixery-signing.key"
PUBLIC_KEY_FILE = "nixery-signing.pub"

# RFC 6979: the signature is a function of the key and the message, not of a random nonce.
_ALGORITHM = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)


#: A PEM P-256 key is a few hundred bytes; a certificate chain beside it a few KiB.
MAX_KEY_FILE_BYTES = 64 * 1024


class SigningKeyError(ValueError):
    """A signing key that cannot be used (unreadable, wrong password, not ECDSA P-256)."""


#: PEM labels of files people mistake for the signing key, and what to say of each.
_COSIGN_FORMAT = (
    "is in cosign's own encrypted format (`cosign generate-key-pair`), which is not read here: use a PEM "
    "PKCS#8 key, which `cosign import-key-pair` takes for cosign"
)
_NOT_THE_KEY = {
    "ENCRYPTED SIGSTORE PRIVATE KEY": _COSIGN_FORMAT,
    "ENCRYPTED COSIGN PRIVATE KEY": _COSIGN_FORMAT,
    "CERTIFICATE": "holds a certificate, not a private key",
    "PUBLIC KEY": "holds a public key, not the private key",
}
_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,64})-----")


def _unreadable_pem(data: bytes, password: str | None) -> str:
    """Why a file that the PEM reader refused is not a usable key, as far as its labels tell: "the
    password is wrong" only when it is an encrypted key and a password was given."""
    labels = [label.decode() for label in _PEM_LABEL.findall(data)]
    if not data.strip():
        return "is empty"
    if not labels:
        return "is not a PEM file (no -----BEGIN ...----- line)"
    encrypted = "ENCRYPTED PRIVATE KEY" in labels or b"Proc-Type: 4,ENCRYPTED" in data  # PKCS#8, or openssl's legacy
    if encrypted and password:
        return "could not be decrypted: the password is wrong (NIXERY_SIGNING_KEY_PASSWORD)"
    if any(label.endswith("PRIVATE KEY") and label not in _NOT_THE_KEY for label in labels):
        return "is not a PEM private key that can be read (a damaged or unsupported key?)"
    return next((_NOT_THE_KEY[label] for label in labels if label in _NOT_THE_KEY),
                f"is not a private key (it holds: {', '.join(dict.fromkeys(labels))})")


@dataclass(frozen=True)
class SigningKey:
    private: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, path: Path, password: str | None = None) -> SigningKey:
        try:
            with path.open("rb") as file:
                data = file.read(MAX_KEY_FILE_BYTES + 1)  # not to the end: /dev/zero has none
        except OSError as exc:
            raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror}") from None
        if len(data) > MAX_KEY_FILE_BYTES:
            raise SigningKeyError(
                f"the signing key {path} is larger than {MAX_KEY_FILE_BYTES // 1024} KiB: not a key file"
            )
        try:
            key = serialization.load_pem_private_key(data, password.encode() if password else None)
        except TypeError:  # a password for a plain key, or none for an encrypted one
            if password:
                raise SigningKeyError(
                    f"the signing key {path} is not encrypted, but a password was given "
                    "(NIXERY_SIGNING_KEY_PASSWORD): unset it"
                ) from None
            raise SigningKeyError(
                f"the signing key {path} is encrypted: give its password in NIXERY_SIGNING_KEY_PASSWORD"
            ) from None
        except ValueError:
            raise SigningKeyError(f"the signing key {path} {_unreadable_pem(data, password)}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise SigningKeyError(f"the signing key {path} is not an ECDSA P-256 key")
        return cls(key)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def key_id(self) -> str:
        """Names the key in storage keys: signatures by another key are made anew."""
        der = self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).hexdigest()[:16]

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data, _ALGORITHM)


def generate_pair(directory: Path) -> tuple[Path, Path]:
    """Write a new key pair into `directory` (the private key readable by its owner only);
    an existing pair is never overwritten, and a failure (a full disk) leaves no part of one.

    Raises OSError with a message that says what to do."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is not a directory: give the directory to write the key pair in")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot make the directory {directory}: {exc.strerror}") from None
    private, public = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} exists: remove it first to make a new key pair")
    key = SigningKey.generate()
    written: list[Path] = []
    try:
        # Each written whole under a temporary name, then linked to its own (which fails, rather than
        # replaces, if the name was taken meanwhile): a half-written key would block the next try.
        for path, content, mode in ((private, key.private_pem, 0o600), (public, key.public_pem, 0o644)):
            staged = path.with_name(f".{path.name}.{os.getpid()}")
            descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(content)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.link(staged, path)
                written.append(path)
            finally:
                staged.unlink(missing_ok=True)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            raise FileExistsError(f"{path} exists: remove it first to make a new key pair") from None
        raise OSError(exc.errno, f"cannot write a key pair in {directory}: {exc.strerror}") from None
    return private, public


def signature_tag(subject: Digest) -> str:
    """The tag cosign gives the signatures of the manifest `subject`."""
    return f"sha256-{subject.hex}.sig"


def payload(identity: str, subject: Digest) -> bytes:
    """The simple-signing document: `identity` (HOST/NAME) serves `subject`."""
    return canonical_json({
        "critical": {
            "identity": {"docker-reference": identity},
            "image": {"docker-manifest-digest": str(subject)},
            "type": SIGNATURE_TYPE,
        },
        "optional": None,
    })


@dataclass(frozen=True, slots=True)
class SignatureDocuments:
    """What one signature is stored as: its manifest, and the config and payload it names."""

    manifest: bytes
    config: bytes
    payload: bytes

    @property
    def blobs(self) -> tuple[bytes, bytes, bytes]:
        return self.config, self.payload, self.manifest


def signature_documents(key: SigningKey, identity: str, subject: Digest) -> SignatureDocuments:
    signed = payload(identity, subject)
    signature = base64.b64encode(key.sign(signed)).decode()
    payload_digest = Digest.of(signed)
    # As cosign writes it: the payload is the image's one "layer", so its diff id.
    config = canonical_json({
        "architecture": "", "config": {}, "created": "0001-01-01T00:00:00Z", "os": "",
        "rootfs": {"type": "layers", "diff_ids": [str(payload_digest)]},
    })
    layer = Descriptor(SIMPLE_SIGNING, payload_digest, len(signed), annotations={SIGNATURE_ANNOTATION: signature})
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": Descriptor(OCI_CONFIG, Digest.of(config), len(config)).to_json(),
        "layers": [layer.to_json()],
    })
    return SignatureDocuments(manifest, config, signed)


def verify(public_pem: bytes, signed: bytes, signature_b64: str) -> bool:
    """Whether `signature_b64` is a signature of `signed` by the key (for `nixery` checks and tests)."""
    public = serialization.load_pem_public_key(public_pem)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return False
    try:
        public.verify(base64.b64decode(signature_b64), signed, _ALGORITHM)
    except (InvalidSignature, ValueError):
        return False
    return True
