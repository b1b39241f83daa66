"""Vendor key files: loading, generating, and the demo pair.

The demo pair in ``tools/keys/`` exists for tests and the demo only. Its
private key is public knowledge, so a gateway that trusts the demo public
key accepts codes anyone can mint. See ``tools/keys/README.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    KeySerializationEncryption,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from policy.codes import private_key_from_pem, public_key_from_pem
from policy.errors import BadInput

KEYS_DIR = Path(__file__).resolve().parent / "keys"
DEMO_PRIVATE_KEY_PATH = KEYS_DIR / "demo-vendor-private.pem"
DEMO_PUBLIC_KEY_PATH = KEYS_DIR / "demo-vendor-public.pem"


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read the vendor's Ed25519 public key from a PEM file."""
    return public_key_from_pem(_read(path), source=f"key file {path}")


def load_private_key(path: Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """Read the vendor's Ed25519 private key from a PEM (PKCS#8) file."""
    return private_key_from_pem(_read(path), password, source=f"key file {path}")


def generate_keypair(
    private_path: Path, public_path: Path, password: bytes | None = None
) -> Ed25519PrivateKey:
    """Make a new vendor key pair and write it; existing files are kept.

    The private key file is created readable by its owner only.
    """
    for path in (private_path, public_path):
        if path.exists():
            raise BadInput(f"key file {path} exists; refusing to overwrite it")

    key = Ed25519PrivateKey.generate()
    encryption: KeySerializationEncryption = (
        BestAvailableEncryption(password) if password else NoEncryption()
    )
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return key


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read key file {path}: {exc.strerror}") from exc


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: a key that appeared since the check above is not replaced, and
    # the mode applies from the first byte written, not after a chmod.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except OSError as exc:
        raise BadInput(f"cannot write key file {path}: {exc.strerror}") from exc
