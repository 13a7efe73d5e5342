"""identity.revocation: serial parsing, the revocation set, the signed list."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from identity import revocation as rv
from identity.bundle import Bundle, JwtAuthority
from identity.errors import InvalidValueError, JwtSvidError
from identity.spiffeid import TrustDomain

TD = TrustDomain("example.org")
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = ec.generate_private_key(ec.SECP256R1())
BUNDLE = Bundle(TD, jwt_authorities=(JwtAuthority("k1", KEY.public_key()),))
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("4f1a", 0x4F1A),
    ("4F:1A:09", 0x4F1A09),
    ("0x00ff", 0xFF),
    (" 01 ", 1),
    ("f" * 40, int("f" * 40, 16)),
])
def test_serials_parse_as_openssl_prints_them(text: str, expected: int) -> None:
    assert rv.parse_serial(text) == expected


@pytest.mark.parametrize(("text", "error"), [
    ("", "not a hex serial"),
    ("12g4", "not a hex serial"),
    ("4f:1", "not a hex serial"),
    ("-5", "not a hex serial"),
    ("0", "positive number"),
    ("1" + "0" * 40, "not a hex serial"),
])
def test_bad_serials_are_refused(text: str, error: str) -> None:
    with pytest.raises(InvalidValueError, match=error):
        rv.parse_serial(text)


def test_serial_text_is_canonical() -> None:
    assert rv.serial_text(rv.parse_serial("00:0A:Bc")) == "abc"


def test_the_set_answers_for_serials_ids_jtis_and_keys() -> None:
    held = rv.RevocationSet()
    held.add([
        rv.Revocation(1, rv.X509_SERIAL, "abc"),
        rv.Revocation(2, rv.X509_SPIFFE_ID, "spiffe://example.org/w", not_before_max=1000),
        rv.Revocation(3, rv.JWT_ID, "j1"),
        rv.Revocation(4, rv.JWT_KEY_ID, "k9", expires_at=500),
    ])
    at = dt.datetime.fromtimestamp
    assert held.x509_revoked(serial=0xABC, spiffe_id="spiffe://example.org/x",
                             not_before=at(5000, dt.UTC))
    assert held.x509_revoked(serial=1, spiffe_id="spiffe://example.org/w",
                             not_before=at(1000, dt.UTC))
    assert not held.x509_revoked(serial=1, spiffe_id="spiffe://example.org/w",
                                 not_before=at(1001, dt.UTC))
    assert held.jwt_revoked(jwt_id="j1", key_id="k1")
    assert held.jwt_revoked(jwt_id=None, key_id="k9")
    assert not held.jwt_revoked(jwt_id="j2", key_id="k1")
    assert held.prune(at(600, dt.UTC)) == 1
    assert not held.jwt_revoked(jwt_id=None, key_id="k9")
    assert [r.id for r in held.all()] == [1, 2, 3]


def _list(n: int = 3) -> list[rv.Revocation]:
    return [rv.Revocation(i + 1, rv.X509_SERIAL, rv.serial_text(2**150 + i),
                          expires_at=1_900_000_000, created_at=1_893_456_000)
            for i in range(n)]


def test_a_signed_list_verifies_with_the_bundle_key() -> None:
    token = rv.sign_revocation_list(trust_domain="example.org", version=3, issued_at=NOW,
                                    revocations=_list(), key=KEY, key_id="k1")
    got = rv.verify_revocation_list(token, bundle=BUNDLE)
    assert got.version == 3 and got.trust_domain == "example.org"
    assert got.revocations == tuple(_list())
    assert got.issued_at == int(NOW.timestamp())


def _tamper(token: str) -> str:
    header, payload, sig = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc["revocations"] = doc["revocations"][1:]
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{sig}"


def test_a_tampered_or_foreign_list_is_refused() -> None:
    token = rv.sign_revocation_list(trust_domain="example.org", version=3, issued_at=NOW,
                                    revocations=_list(), key=KEY, key_id="k1")
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        rv.verify_revocation_list(_tamper(token), bundle=BUNDLE)
    by_other = rv.sign_revocation_list(trust_domain="example.org", version=3, issued_at=NOW,
                                       revocations=_list(), key=OTHER, key_id="k1")
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        rv.verify_revocation_list(by_other, bundle=BUNDLE)
    unknown = rv.sign_revocation_list(trust_domain="example.org", version=3, issued_at=NOW,
                                      revocations=_list(), key=KEY, key_id="k2")
    with pytest.raises(JwtSvidError, match="no JWT authority 'k2'"):
        rv.verify_revocation_list(unknown, bundle=BUNDLE)
    other_td = rv.sign_revocation_list(trust_domain="other.org", version=3, issued_at=NOW,
                                       revocations=_list(), key=KEY, key_id="k1")
    with pytest.raises(JwtSvidError, match=r"of 'other\.org'"):
        rv.verify_revocation_list(other_td, bundle=BUNDLE)


def test_ten_thousand_serials_fit_in_a_small_list() -> None:
    token = rv.sign_revocation_list(trust_domain="example.org", version=10_000,
                                    issued_at=NOW, revocations=_list(10_000), key=KEY,
                                    key_id="k1")
    # About 173 bytes a 20-octet serial once base64url-encoded: ~1.7 MB, under
    # grpc's 4 MiB default message limit (docs/internals.md, "Revocations").
    assert len(token) < 1_800_000
    assert len(rv.verify_revocation_list(token, bundle=BUNDLE).revocations) == 10_000


def test_a_list_signed_with_an_ml_dsa_key_verifies() -> None:
    from identity.keys import KeyType, generate_jwt_key

    key = generate_jwt_key(KeyType.ML_DSA_65)
    bundle = Bundle(TD, jwt_authorities=(JwtAuthority("ml", key.public_key()),))
    token = rv.sign_revocation_list(trust_domain="example.org", version=1, issued_at=NOW,
                                    revocations=_list(1), key=key, key_id="ml")
    assert rv.verify_revocation_list(token, bundle=bundle).revocations == tuple(_list(1))
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        rv.verify_revocation_list(_tamper(token), bundle=bundle)
