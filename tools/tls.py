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

from tools import accounts

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
    """A new certificate authority that signs the server's and routers' certs,
    with an empty revocation list (``crl.pem``) beside it."""
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    ca = _save(directory, "ca", cert, key)
    _write_crl(ca, directory / "crl.pem", [])
    return ca


def ca_in(directory: Path) -> Issued:
    """The CA that :func:`make_ca` saved in ``directory``."""
    return Issued(directory / "ca.pem", directory / "ca-key.pem")


def issue_router(ca_dir: Path, out_dir: Path, tenant: str, router: str) -> Issued:
    """A router's certificate and key in ``out_dir``; the CA keeps a copy of
    the certificate, so that it can be revoked by the router's name."""
    name = accounts.router_account(tenant, router)
    issued = issue(ca_in(ca_dir), out_dir, f"{tenant}-{router}", name)
    cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
    _write(ca_dir / "issued" / f"{cert.serial_number:x}.pem", issued.cert.read_bytes())
    return issued


def revoke(ca_dir: Path, common_name: str) -> int:
    """Add every certificate issued to ``common_name`` to the CA's
    revocation list; returns how many there were."""
    crl_path = ca_dir / "crl.pem"
    serials = {
        entry.serial_number for entry in x509.load_pem_x509_crl(crl_path.read_bytes())
    }
    named = [
        cert.serial_number
        for path in sorted((ca_dir / "issued").glob("*.pem"))
        if _common_name(cert := x509.load_pem_x509_certificate(path.read_bytes()))
        == common_name
    ]
    _write_crl(ca_in(ca_dir), crl_path, sorted(serials | set(named)))
    return len(named)


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _write_crl(ca: Issued, path: Path, serials: list[int]) -> None:
    ca_cert, ca_key = _load(ca)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(now + VALID)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(path, crl.public_bytes(serialization.Encoding.PEM))


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
