"""identity.bundle: the SPIFFE bundle codec, JWKS for the Workload API, sources."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identity.bundle import Bundle, BundleSet, JwtAuthority
from identity.errors import BundleError
from identity.keys import KeyType, PrivateKey, generate_private_key, key_id
from identity.spiffeid import TrustDomain
from identity.x509svid import new_ca_certificate

TD = TrustDomain("example.org")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def ca(key: PrivateKey | None = None, start: dt.datetime = NOW) -> x509.Certificate:
    key = key or generate_private_key()
    return new_ca_certificate(
        trust_domain=TD,
        public_key=key.public_key(),
        signer_key=key,
        not_before=start,
        not_after=start + dt.timedelta(days=1),
    )


CA_EC = ca()
CA_RSA = ca(generate_private_key(KeyType.RSA_2048), NOW + dt.timedelta(hours=1))
JWT_EC = generate_private_key()
JWT_RSA = generate_private_key(KeyType.RSA_2048)
AUTH_EC = JwtAuthority(key_id(JWT_EC.public_key()), JWT_EC.public_key())
AUTH_RSA = JwtAuthority("rsa-key", JWT_RSA.public_key())
FULL = Bundle(TD, (CA_EC, CA_RSA), (AUTH_EC, AUTH_RSA), sequence_number=7, refresh_hint=300)


def doc() -> dict[str, Any]:
    return copy.deepcopy(FULL.to_jwks())


def test_round_trip() -> None:
    assert Bundle.from_jwks(TD, FULL.to_json()) == FULL
    assert Bundle.from_jwks(TD, FULL.to_json().decode()) == FULL
    assert Bundle.from_jwks(TD, FULL.to_jwks()) == FULL
    assert Bundle.from_x509_der(TD, FULL.x509_der()).x509_authorities == FULL.x509_authorities
    assert Bundle.from_x509_pem(TD, FULL.x509_pem()).x509_authorities == FULL.x509_authorities
    assert Bundle.from_jwt_jwks(TD, FULL.jwt_jwks()).jwt_authorities == FULL.jwt_authorities


def test_document_shape() -> None:
    d = FULL.to_jwks()
    assert set(d) == {"keys", "spiffe_sequence", "spiffe_refresh_hint"}
    assert d["spiffe_sequence"] == 7 and d["spiffe_refresh_hint"] == 300
    x509_entries = [k for k in d["keys"] if k["use"] == "x509-svid"]
    jwt_entries = [k for k in d["keys"] if k["use"] == "jwt-svid"]
    assert len(x509_entries) == 2 and len(jwt_entries) == 2
    for entry, cert in zip(x509_entries, (CA_EC, CA_RSA), strict=True):
        assert "kid" not in entry
        assert entry["x5c"] == [
            base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        ]
    assert set(x509_entries[0]) == {"use", "kty", "crv", "x", "y", "x5c"}
    assert set(x509_entries[1]) == {"use", "kty", "n", "e", "x5c"}
    assert x509_entries[1]["e"] == "AQAB"
    for entry in jwt_entries:
        assert entry["kid"]
        assert "x5c" not in entry
    # parameters consistent with the key: PyJWT reads the same key back
    by_kid = {e["kid"]: jwt.PyJWK(e).key for e in jwt_entries}
    assert by_kid[AUTH_EC.key_id] == AUTH_EC.public_key
    assert by_kid["rsa-key"] == AUTH_RSA.public_key
    assert Bundle(TD).to_jwks() == {"keys": []}


def test_stable_order_and_dedup() -> None:
    shuffled = Bundle(TD, (CA_RSA, CA_EC, CA_RSA), (AUTH_RSA, AUTH_EC, AUTH_EC), 7, 300)
    assert shuffled == FULL
    assert shuffled.to_json() == FULL.to_json()
    assert [a.key_id for a in FULL.jwt_authorities] == sorted([AUTH_EC.key_id, "rsa-key"])


def test_conflicting_kid_rejected() -> None:
    with pytest.raises(BundleError, match="share key ID"):
        Bundle(TD, jwt_authorities=(AUTH_RSA, JwtAuthority("rsa-key", JWT_EC.public_key())))


def test_lookups() -> None:
    assert FULL.jwt_authority("rsa-key") == AUTH_RSA
    assert FULL.jwt_authority("nope") is None
    assert FULL.bundle_for(TD) is FULL
    assert FULL.bundle_for(TrustDomain("other.org")) is None
    other = Bundle(TrustDomain("other.org"))
    bundles = BundleSet([FULL, other])
    assert bundles.bundle_for(TD) is FULL
    assert bundles.bundle_for(TrustDomain("x.org")) is None
    assert list(bundles) == [FULL, other] and len(bundles) == 2
    with pytest.raises(BundleError, match="two bundles"):
        BundleSet([FULL, Bundle(TD)])


def test_jwt_jwks_for_workload_api() -> None:
    data = json.loads(FULL.jwt_jwks())
    assert set(data) == {"keys"}
    assert all(k["use"] == "jwt-svid" and k["kid"] for k in data["keys"])
    # py-spiffe parses this with PyJWKSet; every key must be usable and carry a kid.
    keyset = jwt.PyJWKSet.from_json(FULL.jwt_jwks().decode())
    assert sorted(k.key_id for k in keyset.keys) == sorted([AUTH_EC.key_id, "rsa-key"])
    assert json.loads(Bundle(TD, (CA_EC,)).jwt_jwks()) == {"keys": []}


def _mutate(change: Any) -> dict[str, Any]:
    d = doc()
    change(d)
    return d


def _ec_jwt(d: dict[str, Any]) -> int:
    """Index of the EC jwt-svid entry (kids are random, so its position varies)."""
    return next(i for i, k in enumerate(d["keys"]) if k.get("kid") == AUTH_EC.key_id)


def _set(d: dict[str, Any], index: int, **kw: Any) -> None:
    for k, v in kw.items():
        if v is None:
            d["keys"][index].pop(k, None)
        else:
            d["keys"][index][k] = v


# (document, expected x509 count, expected jwt count) -- follow the standard
@pytest.mark.parametrize(
    ("make", "n_x509", "n_jwt"),
    [
        (lambda: _mutate(lambda d: _set(d, 0, use=None)), 1, 2),  # §4.2.2 missing use: skip
        (lambda: _mutate(lambda d: _set(d, 0, use="X509-SVID")), 1, 2),  # case-sensitive
        (lambda: _mutate(lambda d: _set(d, 2, use="wit-svid")), 2, 1),  # a WIT key, not JWT
        (lambda: _mutate(lambda d: _set(d, 2, kty="OKP")), 2, 1),  # §4.2.1 unknown kty: skip
        (lambda: _mutate(lambda d: _set(d, 2, kty=None)), 2, 1),
        (lambda: _mutate(lambda d: _set(d, 0, x5c=None)), 1, 2),  # no x5c: skip the entry
        (lambda: _mutate(lambda d: _set(d, 0, x5c=[])), 1, 2),
        # several x5c: the standard says use the first (go-spiffe rejects the bundle)
        (lambda: _mutate(lambda d: _set(d, 0, x5c=d["keys"][0]["x5c"] * 2)), 2, 2),
        (lambda: _mutate(lambda d: d["keys"].clear()), 0, 0),  # [] = all keys revoked
        (lambda: _mutate(lambda d: d.update(extra={"a": 1})), 2, 2),  # §4.1: MAY be present
    ],
)
def test_parse_follows_the_standard(make: Any, n_x509: int, n_jwt: int) -> None:
    bundle = Bundle.from_jwks(TD, make())
    assert (len(bundle.x509_authorities), len(bundle.jwt_authorities)) == (n_x509, n_jwt)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"\xff", "not UTF-8"),
        (b'{"keys": [], "keys": []}', "duplicate JSON member 'keys'"),
        (b'{"keys": [{"kty": "EC", "kty": "RSA"}]}', "duplicate JSON member 'kty'"),
        (b'{"spiffe_sequence": 1}', "no 'keys' member"),
        (b'{"keys": null}', "no 'keys' member"),
        (b'{"keys": {}}', "must be an array"),
        (b'{"keys": [1]}', "key 0 is not a JSON object"),
        (b'{"keys": [], "spiffe_sequence": -1}', "spiffe_sequence must be a non-negative"),
        (b'{"keys": [], "spiffe_sequence": 1.5}', "spiffe_sequence must be a non-negative"),
        (b'{"keys": [], "spiffe_refresh_hint": "60"}', "spiffe_refresh_hint must be"),
        (b'{"keys": [], "spiffe_refresh_hint": true}', "spiffe_refresh_hint must be"),
        (b'{"keys": [], "spiffe_sequence": NaN}', "invalid JSON number NaN"),
    ],
)
def test_parse_rejects_documents(data: bytes, error: str) -> None:
    with pytest.raises(BundleError, match=error):
        Bundle.from_jwks(TD, data)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: _set(d, 2, kid=None), "key 2: a jwt-svid key must have a non-empty 'kid'"),
        (lambda d: _set(d, 2, kid=""), "non-empty 'kid'"),
        (lambda d: _set(d, _ec_jwt(d), x="!!"), "bad EC parameters"),
        (lambda d: _set(d, _ec_jwt(d), crv=None), "bad EC parameters"),
        (lambda d: d["keys"][2].update(d="AAAA"), "private key material"),
        (lambda d: _set(d, 0, x5c=["not base64!"]), "x5c\\[0\\] is not a DER certificate"),
        (lambda d: _set(d, 0, x5c=[base64.b64encode(b"junk").decode()]), "not a DER certificate"),
        (lambda d: _set(d, 0, x5c=[1]), "must be a string"),
        # x509 entry whose key parameters are another key's (go-jose rejects too)
        (
            lambda d: _set(d, 0, x=d["keys"][_ec_jwt(d)]["x"], y=d["keys"][_ec_jwt(d)]["y"]),
            "do not match",
        ),
    ],
)
def test_parse_rejects_keys(change: Any, error: str) -> None:
    with pytest.raises(BundleError, match=error):
        Bundle.from_jwks(TD, _mutate(change))


def test_jwt_key_must_be_strong() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    weak = RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 1024).public_key(), as_dict=True)
    data = {"keys": [{**weak, "use": "jwt-svid", "kid": "weak"}]}
    with pytest.raises(BundleError, match="too weak"):
        Bundle.from_jwks(TD, data)


def test_x509_inputs() -> None:
    assert Bundle.from_x509_pem(TD, b"").x509_authorities == ()
    assert Bundle.from_x509_der(TD, b"").x509_authorities == ()
    with pytest.raises(BundleError, match="no PEM blocks found"):
        Bundle.from_x509_pem(TD, b"Not PEM encoded file")
    with pytest.raises(BundleError, match="cannot parse DER"):
        Bundle.from_x509_der(TD, b"junk")


def test_from_jwt_jwks_rules() -> None:
    plain = {
        "keys": [
            {k: v for k, v in e.items() if k != "use"} for e in json.loads(FULL.jwt_jwks())["keys"]
        ]
    }
    assert len(Bundle.from_jwt_jwks(TD, plain).jwt_authorities) == 2  # use is not needed
    plain["keys"][1].pop("kid")
    with pytest.raises(BundleError, match=r"key 1: .*'kid'"):
        Bundle.from_jwt_jwks(TD, plain)
    with pytest.raises(BundleError, match="'keys' array"):
        Bundle.from_jwt_jwks(TD, b"{}")


def test_bundle_field_validation() -> None:
    with pytest.raises(BundleError, match="non-negative"):
        Bundle(TD, sequence_number=-1)
    with pytest.raises(BundleError, match="non-empty key ID"):
        JwtAuthority("", JWT_EC.public_key())
