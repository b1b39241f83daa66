"""Signed license codes: what the vendor mints and everyone else verifies.

A code is three parts joined by dots::

    IRM1.<payload>.<signature>

``payload`` is compact JSON (keys ``id``, ``kind``, ``cap``, ``term``,
``iss``) and ``signature`` is the 64-byte Ed25519 signature over the ASCII
bytes of ``IRM1.<payload>``; both are base64url without padding. Signing
the text rather than the decoded JSON means only the exact characters the
vendor wrote verify, and nothing inside the payload is parsed before its
signature has been checked.

Keys are handed in as objects; reading key files is left to the caller
(:mod:`tools.keys` for the tool). A code is a bearer token: whoever holds
it can redeem it, so messages name a code by its :func:`fingerprint`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)

from policy.errors import BadInput, CodeError, RuleViolation
from policy.licenses import Kind, check_capacity
from policy.timeutil import to_text

PREFIX = "IRM1"
MAX_TERM_MONTHS = 120
FREE_TERM_MONTHS = 12
# A real code is about 230 characters; the cap keeps a pasted file or a
# fuzzer's megabyte from being decoded at all.
MAX_CODE_LENGTH = 1024
# Issue dates outside these years are a minting mistake; the upper bound
# also keeps the stock limit and the expiry within what datetime holds.
ISSUE_YEARS = range(2000, 9000)

_SIGNATURE_BYTES = 64
_TAIL = 8
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
# Ids go into messages, CSV cells and file names: keep them plain, and
# never starting with a character a spreadsheet reads as a formula.
_LICENSE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FIELDS: dict[str, type] = {"id": str, "kind": str, "cap": int, "term": int, "iss": str}


@dataclass(frozen=True, slots=True)
class CodePayload:
    """What a code says about its license; ``issued_at`` is in UTC."""

    id: str
    kind: Kind
    capacity: int
    term_months: int
    issued_at: datetime


def new_license_id() -> str:
    """A fresh, unique license id for the vendor to mint."""
    return uuid.uuid4().hex


def normalize(code: str) -> str:
    """The code without any whitespace: pasted codes carry line breaks."""
    return "".join(code.split())


def fingerprint(code: str) -> str:
    """A short, stable label for a code in messages, never the code itself.

    It is the code's last 8 characters (whitespace removed), after ``IRM1…``
    when the code has our prefix. Those characters are the tail of the
    signature, so they redeem nothing, but an editor's search finds them in
    the file the user has. Text too short to be a code is named by its
    length, so that the label never shows all of it.
    """
    text = normalize(code)
    if len(text) < 2 * _TAIL:
        return f"({len(text)} characters)"
    tail = text[-_TAIL:].encode("unicode_escape").decode("ascii")
    return f"{PREFIX}…{tail}" if text.startswith(f"{PREFIX}.") else f"…{tail}"


def mint(private_key: Ed25519PrivateKey, payload: CodePayload) -> str:
    """Sign ``payload`` into a code; refuses a payload :func:`verify` would."""
    check_payload(payload)
    fields = {
        "id": payload.id,
        "kind": payload.kind.value,
        "cap": payload.capacity,
        "term": payload.term_months,
        "iss": to_text(payload.issued_at),
    }
    body = json.dumps(fields, separators=(",", ":")).encode("utf-8")
    signed = f"{PREFIX}.{_b64encode(body)}"
    return f"{signed}.{_b64encode(private_key.sign(signed.encode('ascii')))}"


def verify(code: str, public_key: Ed25519PublicKey) -> CodePayload:
    """Check a code against the vendor key and return what it says.

    Whitespace anywhere in ``code`` is ignored; anything else that is not
    exactly what the vendor signed raises :class:`CodeError`.
    """
    text = normalize(code)
    label = f"license code {fingerprint(text)}"
    payload_part, body, signature = _split(text, label)

    try:
        public_key.verify(signature, f"{PREFIX}.{payload_part}".encode("ascii"))
    except InvalidSignature as exc:
        raise CodeError(
            f"{label}: the signature does not match the vendor key; "
            "the code is forged or was altered"
        ) from exc

    payload = _parse_payload(body, label)
    try:
        check_payload(payload)
    except RuleViolation as exc:
        raise CodeError(f"{label} is signed but refused: {exc}") from exc
    return payload


def check_payload(payload: CodePayload) -> None:
    """Refuse a payload no license may carry (a rule, hence RuleViolation)."""
    if not _LICENSE_ID.fullmatch(payload.id):
        raise RuleViolation(
            f"license id {payload.id!r} is not 1 to 64 letters, digits, "
            "'.', '_' or '-' starting with a letter or digit"
        )
    if payload.issued_at.year not in ISSUE_YEARS:
        raise RuleViolation(
            f"license {payload.id} has the issue date "
            f"{payload.issued_at.date().isoformat()}, outside the years "
            f"{ISSUE_YEARS.start} to {ISSUE_YEARS.stop - 1}"
        )
    check_capacity(payload.kind, payload.capacity)
    if not 1 <= payload.term_months <= MAX_TERM_MONTHS:
        raise RuleViolation(
            f"license {payload.id} has a term of {payload.term_months} months; "
            f"a term is 1 to {MAX_TERM_MONTHS} months"
        )
    if payload.kind is Kind.FREE and payload.term_months != FREE_TERM_MONTHS:
        raise RuleViolation(
            f"Cloud Free license {payload.id} has a term of "
            f"{payload.term_months} months; Cloud Free always runs "
            f"{FREE_TERM_MONTHS} months"
        )


def public_key_from_pem(data: bytes, source: str = "public key") -> Ed25519PublicKey:
    """Parse a PEM public key; ``source`` names it in the error."""
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadInput(f"{source} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BadInput(f"{source} is a {type(key).__name__}, not an Ed25519 key")
    return key


def private_key_from_pem(
    data: bytes, password: bytes | None = None, source: str = "private key"
) -> Ed25519PrivateKey:
    """Parse a PEM private key, encrypted with ``password`` or not at all."""
    try:
        key = load_pem_private_key(data, password)
    except TypeError as exc:
        # cryptography says "password was not given" (or "given but not
        # encrypted") with a TypeError.
        raise BadInput(f"{source}: {exc}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadInput(
            f"{source} is not a PEM private key, or the password is wrong"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInput(f"{source} is a {type(key).__name__}, not an Ed25519 key")
    return key


def _split(text: str, label: str) -> tuple[str, bytes, bytes]:
    """The payload part as text, the payload bytes and the signature."""
    if not text:
        raise CodeError("the license code is empty")
    if not text.startswith(f"{PREFIX}."):
        raise CodeError(
            f"{label} is not a code of this product: "
            f"irm-gateway codes start with '{PREFIX}.'"
        )
    if len(text) > MAX_CODE_LENGTH:
        raise CodeError(
            f"{label} is damaged: it is {len(text)} characters long, "
            f"a code has at most {MAX_CODE_LENGTH}"
        )
    parts = text.split(".")
    if len(parts) != 3:
        raise CodeError(
            f"{label} is damaged: it has {len(parts)} parts separated by '.', "
            "a code has 3 (was it cut short or joined with another?)"
        )

    body = _b64decode(parts[1], "payload", label)
    signature = _b64decode(parts[2], "signature", label)
    if len(signature) != _SIGNATURE_BYTES:
        raise CodeError(
            f"{label} is damaged: its signature is {len(signature)} bytes, "
            f"an Ed25519 signature is {_SIGNATURE_BYTES}"
        )
    return parts[1], body, signature


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(part: str, what: str, label: str) -> bytes:
    damaged = CodeError(f"{label} is damaged: its {what} is not base64url text")
    if not _BASE64URL.fullmatch(part):
        raise damaged
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except binascii.Error as exc:
        raise damaged from exc
    # Only the canonical spelling is accepted, so that one license has one
    # code: otherwise the unused low bits of the last character could vary.
    if _b64encode(raw) != part:
        raise damaged
    return raw


def _parse_payload(body: bytes, label: str) -> CodePayload:
    label = f"{label} is signed but its payload is unusable"
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise CodeError(f"{label}: it is not JSON") from exc
    if not isinstance(fields, dict):
        raise CodeError(f"{label}: it is not a JSON object")

    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise CodeError(f"{label}: field(s) {', '.join(missing)} missing")
    # Fields this version does not know may carry a restriction it would
    # silently drop; a new field comes with a new prefix instead.
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise CodeError(f"{label}: unknown field(s) {', '.join(unknown)}")
    for name, wanted in _FIELDS.items():
        # type() and not isinstance(): JSON true must not count as 1.
        if type(fields[name]) is not wanted:
            raise CodeError(
                f"{label}: field {name} is {type(fields[name]).__name__}, "
                f"expected {wanted.__name__}"
            )

    return CodePayload(
        id=fields["id"],
        kind=_parse_kind(fields["kind"], label),
        capacity=fields["cap"],
        term_months=fields["term"],
        issued_at=_parse_iss(fields["iss"], label),
    )


def _parse_kind(value: str, label: str) -> Kind:
    try:
        return Kind(value)
    except ValueError as exc:
        known = ", ".join(kind.value for kind in Kind)
        raise CodeError(f"{label}: kind {value!r} is not one of {known}") from exc


def _parse_iss(value: str, label: str) -> datetime:
    wrong = CodeError(
        f"{label}: iss {value!r} is not an ISO 8601 UTC instant ending in Z"
    )
    if not value.endswith("Z"):
        raise wrong
    try:
        moment = datetime.fromisoformat(value[:-1])
    except ValueError as exc:
        raise wrong from exc
    if moment.tzinfo is not None:
        raise wrong
    return moment.replace(tzinfo=UTC)
