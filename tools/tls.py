"""Certificates for the broker's TLS listener: a CA, the server, routers.

A router's certificate names it in its Common Name as its broker account
(``{tenant}/{router}``, tools/accounts.py): the TLS listener takes the CN
as the user name (``use_identity_as_username``), so the same access rules
hold for both listeners. Keys are made where they are used (the tests make
theirs in a temporary directory); no private key ships with the product.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from policy.errors import BadInput
from tools import accounts

T = TypeVar("T")
VALID = timedelta(days=365)
HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def server_name(name: str) -> str:
    """``name`` if it is a host name routers can connect to, else BadInput."""
    labels = name.split(".")
    if len(name) > 253 or not all(HOST_LABEL.match(label) for label in labels):
        raise BadInput(
            f"server name {name!r}: must be a DNS name, dot-separated labels of "
            "1 to 63 of A-Z a-z 0-9 -, not beginning or ending with -"
        )
    return name


def make_directory(path: Path) -> Path:
    """``path`` as a directory, made if need be, or BadInput naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot make the directory {path}: {exc.strerror}") from exc
    return path


def _write_all(files: list[tuple[Path, bytes, bool]]) -> None:
    """Write every file, or none: what was written is removed on a failure.

    The third item says the file is secret (a key: owner only).
    """
    written: list[Path] = []
    try:
        for path, data, secret in files:
            make_directory(path.parent)
            path.write_bytes(data)
            written.append(path)
            if secret:
                path.chmod(0o600)
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        raise BadInput(f"cannot write {exc.filename}: {exc.strerror}") from exc


def _pem(
    cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[bytes, bytes]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _save(
    directory: Path, name: str, cert: x509.Certificate, key: object,
    also: tuple[Path, ...] = (),
) -> Issued:  # fmt: skip
    """Save a certificate and its key as ``name``; ``also``: more copies of
    the certificate."""
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert_pem, key_pem = _pem(cert, key)
    issued = Issued(directory / f"{name}.pem", directory / f"{name}-key.pem")
    files = [(issued.cert, cert_pem, False), (issued.key, key_pem, True)]
    _write_all(files + [(path, cert_pem, False) for path in also])
    return issued


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


def check_ca(directory: Path) -> None:
    """BadInput naming the file, unless ``directory`` holds a usable CA."""
    _load(ca_in(directory))
    _read(directory / "crl.pem", "revocation list", x509.load_pem_x509_crl)


def issue_router(ca_dir: Path, out_dir: Path, tenant: str, router: str) -> Issued:
    """A router's certificate and key in ``out_dir``; the CA keeps a copy of
    the certificate, so that it can be revoked by the router's name."""
    name = accounts.router_account(tenant, router)
    ca_cert, ca_key = _load(ca_in(ca_dir))
    cert, key = _sign(ca_cert, ca_key, name, server=False)
    kept = ca_dir / "issued" / f"{cert.serial_number:x}.pem"
    return _save(out_dir, f"{tenant}-{router}", cert, key, also=(kept,))


def issued_to(ca_dir: Path, common_name: str) -> list[int]:
    """The serial numbers of every certificate issued to ``common_name``."""
    return [
        cert.serial_number
        for path in sorted((ca_dir / "issued").glob("*.pem"))
        if _common_name(cert := _read(path, "certificate", _certificate)) == common_name
    ]


def revoke(ca_dir: Path, common_name: str) -> int:
    """Add every certificate issued to ``common_name`` to the CA's
    revocation list; returns how many there were."""
    serials = issued_to(ca_dir, common_name)
    revoke_serials(ca_dir, serials)
    return len(serials)


def revoke_serials(ca_dir: Path, serials: list[int]) -> None:
    """Add these serial numbers to the CA's revocation list (``crl.pem``)."""
    crl_path = ca_dir / "crl.pem"
    crl = _read(crl_path, "revocation list", x509.load_pem_x509_crl)
    listed = {entry.serial_number for entry in crl}
    _write_crl(ca_in(ca_dir), crl_path, sorted(listed | set(serials)))


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
    # A new file renamed over the old: the broker never reads half a list.
    # It keeps the old one's owner, group and mode: the broker reads it
    # through its group (docs/operating.md).
    spare = path.with_name(f".{path.name}.new")
    _write_all([(spare, crl.public_bytes(serialization.Encoding.PEM), False)])
    with contextlib.suppress(FileNotFoundError):
        old = path.stat()
        if os.geteuid() == 0:
            os.chown(spare, old.st_uid, old.st_gid)
        spare.chmod(stat.S_IMODE(old.st_mode))
    spare.replace(path)


def _read(path: Path, what: str, load: Callable[[bytes], T]) -> T:
    """A PEM file, or BadInput naming it and what is wrong with it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise BadInput(
            f"{path}: no such file (the routers' CA directory is made by "
            "irm-tool accounts cert init)"
        ) from exc
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return load(data)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"{path}: not a PEM {what}") from exc


def _certificate(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


def _private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError("not an EC key, as irm-tool makes them")
    return key


def _load(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = _read(ca.cert, "certificate", _certificate)
    return cert, _read(ca.key, "private key", _private_key)


def _sign(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
    common_name: str, *, server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:  # fmt: skip
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
    return builder.sign(ca_key, hashes.SHA256()), key


def issue(
    ca: Issued, directory: Path, name: str, common_name: str, *, server: bool = False
) -> Issued:
    """A certificate for ``common_name`` signed by ``ca``, saved as ``name``."""
    ca_cert, ca_key = _load(ca)
    cert, key = _sign(ca_cert, ca_key, common_name, server=server)
    return _save(directory, name, cert, key)
