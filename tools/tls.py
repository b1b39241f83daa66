"""Certificates for the broker's TLS listener: a CA, the server, routers.

A router's certificate names it in its Common Name as its broker account
(``{tenant}/{router}``, tools/accounts.py): the TLS listener takes the CN
as the user name (``use_identity_as_username``), so the same access rules
hold for both listeners. Keys are made where they are used (the tests make
theirs in a temporary directory); no private key ships with the product.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID = timedelta(days=365)


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, *, secret: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if secret:
        path.chmod(0o600)
    return path


def _save(directory: Path, name: str, cert: x509.Certificate, key: object) -> Issued:
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return Issued(
        _write(
            directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)
        ),
        _write(directory / f"{name}-key.pem", key_pem, secret=True),
    )


def _builder(
    subject: str, issuer: x509.Name, public: object
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + VALID)
    )


def make_ca(directory: Path, name: str = "irm-gateway router CA") -> Issued:
    """A new certificate authority that signs the server's and routers' certs."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _save(directory, "ca", cert, key)


def _load(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def issue(
    ca: Issued, directory: Path, name: str, common_name: str, *, server: bool = False
) -> Issued:
    """A certificate for ``common_name`` signed by ``ca``, saved as ``name``."""
    ca_cert, ca_key = _load(ca)
    key = _key()
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = _builder(common_name, ca_cert.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if server:
        names = [x509.DNSName(common_name), x509.IPAddress(IPv4Address("127.0.0.1"))]
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names), critical=False
        )
    return _save(directory, name, builder.sign(ca_key, hashes.SHA256()), key)
