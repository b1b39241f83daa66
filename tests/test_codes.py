"""Signed license codes: minting, verifying, refusing, and the key files."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import stat
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from hypothesis import given
from hypothesis import strategies as st

from policy.codes import (
    MAX_CODE_LENGTH,
    CodePayload,
    fingerprint,
    mint,
    new_license_id,
    normalize,
    verify,
)
from policy.errors import BadInput, CodeError, RuleViolation
from policy.licenses import Kind
from tools.keys import (
    DEMO_PRIVATE_KEY_PATH,
    DEMO_PUBLIC_KEY_PATH,
    generate_keypair,
    load_private_key,
    load_public_key,
)

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()
ISSUED = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
PAYLOAD = CodePayload("a1b2c3", Kind.BASIC_25, 25, 12, ISSUED)
CODE = mint(KEY, PAYLOAD)
GOOD_FIELDS: dict[str, Any] = {
    "id": "a1b2c3",
    "kind": "cloud-basic-1",
    "cap": 1,
    "term": 12,
    "iss": "2025-03-01T09:30:00Z",
}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def sign_fields(fields: Any, key: Ed25519PrivateKey = KEY) -> str:
    """A code built by hand from the documented format, bypassing mint()."""
    return sign_body(json.dumps(fields).encode(), key)


def sign_body(body: bytes, key: Ed25519PrivateKey = KEY) -> str:
    signed = f"IRM1.{b64(body)}"
    return f"{signed}.{b64(key.sign(signed.encode('ascii')))}"


def refusal(code: str) -> str:
    with pytest.raises(CodeError) as caught:
        verify(code, PUBLIC)
    message = str(caught.value)
    if len(normalize(code)) > 16:  # shorter ones may be words of the message
        assert normalize(code) not in message, "an error must not reveal the code"
    return message


# --- round trip and the wire format ----------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        PAYLOAD,
        CodePayload("x", Kind.BASIC_1, 1, 1, ISSUED),
        CodePayload("free-1", Kind.FREE, 1000, 12, ISSUED),
        CodePayload("b-120", Kind.BASIC_1, 1, 120, ISSUED + timedelta(microseconds=7)),
        CodePayload(new_license_id(), Kind.FREE, 1, 12, ISSUED),
    ],
)
def test_verify_returns_what_mint_signed(payload: CodePayload) -> None:
    assert verify(mint(KEY, payload), PUBLIC) == payload


def test_issue_instant_comes_back_in_utc() -> None:
    berlin = timezone(timedelta(hours=1))
    payload = replace(PAYLOAD, issued_at=datetime(2025, 3, 1, 10, 30, tzinfo=berlin))

    issued = verify(mint(KEY, payload), PUBLIC).issued_at

    assert issued == ISSUED
    assert issued.utcoffset() == timedelta(0)


def test_code_is_prefix_json_payload_and_ed25519_signature() -> None:
    prefix, payload_part, signature_part = CODE.split(".")

    assert prefix == "IRM1"
    assert "=" not in CODE
    assert json.loads(unb64(payload_part)) == {
        "id": "a1b2c3",
        "kind": "cloud-basic-25",
        "cap": 25,
        "term": 12,
        "iss": "2025-03-01T09:30:00Z",
    }
    PUBLIC.verify(unb64(signature_part), f"IRM1.{payload_part}".encode("ascii"))


def test_a_code_built_by_hand_from_the_format_verifies() -> None:
    payload = verify(sign_fields(GOOD_FIELDS), PUBLIC)

    assert payload == CodePayload("a1b2c3", Kind.BASIC_1, 1, 12, ISSUED)


def test_whitespace_pasted_into_a_code_is_ignored() -> None:
    wrapped = f"  \n{CODE[:40]}\r\n{CODE[40:100]}\n\t{CODE[100:]}  \n"

    assert verify(wrapped, PUBLIC) == PAYLOAD


def test_new_license_ids_are_unique_and_mintable() -> None:
    ids = {new_license_id() for _ in range(100)}

    assert len(ids) == 100
    for lid in list(ids)[:3]:
        assert verify(mint(KEY, replace(PAYLOAD, id=lid)), PUBLIC).id == lid


# --- forged, altered and damaged codes ---------------------------------------


def test_altered_payload_byte_is_refused_as_forged() -> None:
    prefix, payload_part, signature_part = CODE.split(".")
    body = unb64(payload_part).replace(b'"cap":25', b'"cap":26')
    altered = f"{prefix}.{b64(body)}.{signature_part}"

    assert "does not match the vendor key" in refusal(altered)


def test_altered_payload_character_is_refused() -> None:
    index = len("IRM1.") + 10
    flipped = "A" if CODE[index] != "A" else "B"

    refusal(CODE[:index] + flipped + CODE[index + 1 :])


def test_altered_signature_is_refused_as_forged() -> None:
    index = CODE.rindex(".") + 20
    flipped = "A" if CODE[index] != "A" else "B"

    message = refusal(CODE[:index] + flipped + CODE[index + 1 :])

    assert "forged or was altered" in message


def test_a_code_signed_by_another_key_is_refused() -> None:
    forged = mint(Ed25519PrivateKey.generate(), PAYLOAD)

    assert "does not match the vendor key" in refusal(forged)


def test_non_canonical_base64_in_the_signature_is_refused() -> None:
    # 64 bytes in base64 end in a character of which only 2 bits count;
    # a different character with the same 2 bits decodes the same.
    last = CODE[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) ^ 1]

    assert "damaged" in refusal(CODE[:-1] + twin)


@pytest.mark.parametrize(
    "cut",
    [CODE[:-1], CODE[:-10], CODE[: CODE.rindex(".")], CODE[:60], "IRM1.", "IRM1"],
)
def test_truncated_code_is_refused(cut: str) -> None:
    refusal(cut)


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        ("hello world", "not a code of this product"),
        ("irm1.abc.def", "not a code of this product"),
        (f'"{CODE}"', "not a code of this product"),
        (f"<{CODE}>", "not a code of this product"),
        ("IRM1..", "damaged"),
        ("IRM1.!!!!.abcd", "damaged"),
        ("IRM1.a.b", "damaged"),
        (f"{CODE}.{CODE}", "damaged"),
        (f"{CODE};", "damaged"),
        ("IRM1.ab=.cd", "damaged"),
        ("IRM1.äöü.abc", "damaged"),
        ("IRM1." + "A" * MAX_CODE_LENGTH + ".AAAA", "damaged"),
    ],
)
def test_garbage_is_refused_with_its_reason(garbage: str, reason: str) -> None:
    assert reason in refusal(garbage)


@pytest.mark.parametrize("empty", ["", " ", "\r\n\t "])
def test_empty_code_is_refused(empty: str) -> None:
    with pytest.raises(CodeError, match="empty"):
        verify(empty, PUBLIC)


# --- signed by the vendor key, but not a valid license -----------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"cap": 25}, "capacity 25 does not match kind Cloud Basic 1"),
        ({"kind": "cloud-basic-25", "cap": 1}, "capacity 1 does not match"),
        ({"kind": "cloud-free", "cap": 1001}, "capacity 1001 does not match"),
        ({"kind": "cloud-free", "cap": 0}, "capacity 0 does not match"),
        ({"kind": "cloud-free", "cap": 10, "term": 24}, "Cloud Free always runs 12"),
        ({"term": 0}, "a term is 1 to 120 months"),
        ({"term": 121}, "a term is 1 to 120 months"),
        ({"term": -3}, "a term is 1 to 120 months"),
        ({"id": ""}, "license id ''"),
        ({"id": "=cmd|x"}, "license id '=cmd|x'"),
        ({"iss": "1970-01-01T00:00:00Z"}, "outside the years"),
    ],
)
def test_signed_code_breaking_a_license_rule_is_refused(
    change: dict[str, Any], reason: str
) -> None:
    with pytest.raises(CodeError, match="signed but refused") as caught:
        verify(sign_fields(GOOD_FIELDS | change), PUBLIC)

    assert reason in str(caught.value)
    assert isinstance(caught.value.__cause__, RuleViolation)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({k: v for k, v in GOOD_FIELDS.items() if k != "cap"}, "cap missing"),
        ({}, "id, kind, cap, term, iss missing"),
        (GOOD_FIELDS | {"cap": "1"}, "field cap is str, expected int"),
        (GOOD_FIELDS | {"cap": True}, "field cap is bool, expected int"),
        (GOOD_FIELDS | {"term": 12.0}, "field term is float"),
        (GOOD_FIELDS | {"id": 7}, "field id is int"),
        (GOOD_FIELDS | {"kind": "cloud-gold"}, "kind 'cloud-gold' is not one of"),
        (GOOD_FIELDS | {"iss": "2025-03-01T09:30:00"}, "ending in Z"),
        (GOOD_FIELDS | {"iss": "2025-03-01T09:30:00+01:00Z"}, "ending in Z"),
        (GOOD_FIELDS | {"iss": "yesterdayZ"}, "ending in Z"),
        (GOOD_FIELDS | {"seats": 99}, "unknown field(s) seats"),
        ([GOOD_FIELDS], "not a JSON object"),
    ],
)
def test_signed_code_with_unusable_payload_is_refused(fields: Any, reason: str) -> None:
    message = refusal(sign_fields(fields))

    assert "payload is unusable" in message
    assert reason in message


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "damaged"),
        (b"{", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[" * 600, "not JSON"),
        (b"[" * 5000, "characters long"),
    ],
)
def test_signed_code_whose_payload_is_not_json_is_refused(
    body: bytes, reason: str
) -> None:
    assert reason in refusal(sign_body(body))


def test_mint_refuses_a_payload_that_verify_would_refuse() -> None:
    with pytest.raises(RuleViolation, match="capacity 5"):
        mint(KEY, replace(PAYLOAD, kind=Kind.BASIC_1, capacity=5))
    with pytest.raises(RuleViolation, match="always runs 12"):
        mint(KEY, CodePayload("f", Kind.FREE, 100, 6, ISSUED))


def test_mint_refuses_a_naive_issue_instant() -> None:
    with pytest.raises(BadInput, match="no time zone"):
        mint(KEY, replace(PAYLOAD, issued_at=datetime(2025, 3, 1)))


# --- fingerprint ------------------------------------------------------------


def test_fingerprint_is_short_stable_and_not_the_code() -> None:
    label = fingerprint(CODE)

    assert label == f"IRM1…{CODE[-8:]}"
    assert fingerprint(f" {CODE[:50]}\n{CODE[50:]} ") == label
    assert CODE.split(".")[1] not in label
    assert fingerprint(mint(KEY, replace(PAYLOAD, id="other"))) != label


def test_fingerprint_of_non_codes_is_safe_to_print() -> None:
    assert fingerprint("") == "(0 characters)"
    assert fingerprint("IRM1.a.b") == "(8 characters)"
    assert fingerprint("hello world, this is no code") == "…isnocode"
    assert fingerprint("0123456789abcdefx\x00\x1b[31m") == "…fx\\x00\\x1b[31m"


def test_errors_name_the_code_by_its_fingerprint() -> None:
    forged = mint(Ed25519PrivateKey.generate(), PAYLOAD)

    assert fingerprint(forged) in refusal(forged)


# --- fuzz -------------------------------------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@given(st.text())
def test_any_text_is_verified_or_refused_with_code_error(text: str) -> None:
    with contextlib.suppress(CodeError):
        verify(text, PUBLIC)


@given(
    st.text(alphabet=B64 + ".=+/ \n", max_size=300),
    st.text(alphabet=B64 + ".", max_size=120),
)
def test_code_shaped_text_is_refused_with_code_error(head: str, tail: str) -> None:
    with pytest.raises(CodeError):
        verify(f"IRM1.{head}.{tail}", PUBLIC)


@given(st.integers(min_value=0, max_value=len(CODE) - 1), st.characters())
def test_any_single_character_change_is_refused(index: int, char: str) -> None:
    altered = CODE[:index] + char + CODE[index + 1 :]
    if normalize(altered) == CODE:
        return
    with pytest.raises(CodeError):
        verify(altered, PUBLIC)


# --- key files --------------------------------------------------------------


def test_generated_key_pair_loads_and_signs(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "vendor.pem", tmp_path / "vendor.pub.pem"

    generate_keypair(private_path, public_path)
    code = mint(load_private_key(private_path), PAYLOAD)

    assert verify(code, load_public_key(public_path)) == PAYLOAD
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_password_protected_private_key(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    generate_keypair(private_path, public_path, password=b"s3cret")

    key = load_private_key(private_path, password=b"s3cret")

    assert verify(mint(key, PAYLOAD), load_public_key(public_path)) == PAYLOAD
    with pytest.raises(BadInput, match=re.escape(str(private_path))):
        load_private_key(private_path)
    with pytest.raises(BadInput, match="password is wrong"):
        load_private_key(private_path, password=b"guess")


def test_generate_keypair_never_overwrites(tmp_path: Path) -> None:
    private_path, public_path = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    public_path.write_text("keep me")

    with pytest.raises(BadInput, match="refusing to overwrite"):
        generate_keypair(private_path, public_path)

    assert public_path.read_text() == "keep me"
    assert not private_path.exists()


def test_unreadable_or_wrong_key_files_raise_bad_input(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnope\n")
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )

    with pytest.raises(BadInput, match="cannot read key file"):
        load_public_key(tmp_path / "missing.pem")
    with pytest.raises(BadInput, match="not a PEM public key"):
        load_public_key(garbage)
    with pytest.raises(BadInput, match="not an Ed25519 key"):
        load_private_key(ec_key)
    with pytest.raises(BadInput, match="not a PEM private key"):
        load_private_key(DEMO_PUBLIC_KEY_PATH)


def test_demo_key_pair_is_shipped_and_matches() -> None:
    code = mint(load_private_key(DEMO_PRIVATE_KEY_PATH), PAYLOAD)

    assert DEMO_PRIVATE_KEY_PATH.name == "demo-vendor-private.pem"
    assert verify(code, load_public_key(DEMO_PUBLIC_KEY_PATH)) == PAYLOAD
    with pytest.raises(CodeError):
        verify(code, PUBLIC)
