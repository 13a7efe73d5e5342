"""ML-DSA JWT-SVIDs (draft-ietf-cose-dilithium-11 / RFC 9964 names): signing,
validation, AKP JWKs in bundles, and no algorithm confusion."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import mldsa as crypto_mldsa

from identity import mldsa
from identity.bundle import Bundle, BundleSet, JwtAuthority
from identity.errors import BundleError, InvalidKeyError, JwtSvidError
from identity.jwtsvid import parse_insecure, sign_jwt_svid, validate_jwt_svid
from identity.keys import (
    JwtPrivateKey,
    KeyType,
    generate_jwt_key,
    generate_private_key,
    jwt_key_type_of,
    key_id,
    load_jwt_public_key_der,
    load_public_key_der,
    public_key_der,
    public_keys_equal,
)
from identity.spiffeid import SpiffeId, TrustDomain

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
TD = TrustDomain("example.org")
SUB = SpiffeId.parse("spiffe://example.org/web")

EC = generate_private_key(KeyType.EC_P256)
ML44 = generate_jwt_key(KeyType.ML_DSA_44)
ML65 = generate_jwt_key(KeyType.ML_DSA_65)
ML87 = generate_jwt_key(KeyType.ML_DSA_87)
KIDS = {"ec": EC, "ml44": ML44, "ml65": ML65, "ml87": ML87}
BUNDLES = BundleSet([Bundle(TD, jwt_authorities=tuple(
    JwtAuthority(kid, k.public_key()) for kid, k in KIDS.items()))])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key: JwtPrivateKey, kid: str, **kw: Any) -> str:
    return sign_jwt_svid(spiffe_id=SUB, audience=["db"], key=key, key_id=kid, issued_at=NOW,
                         expires_at=NOW + dt.timedelta(minutes=5), **kw)


def validate(token: str, bundles: Any = BUNDLES) -> Any:
    return validate_jwt_svid(token, bundles=bundles, audience="db", now=NOW)


def parts(token: str) -> tuple[dict[str, Any], str, str]:
    h, p, s = token.split(".")
    return json.loads(base64.urlsafe_b64decode(h + "==")), p, s


@pytest.mark.parametrize(("kid", "alg", "sig_len"), [
    ("ml44", "ML-DSA-44", 2420), ("ml65", "ML-DSA-65", 3309), ("ml87", "ML-DSA-87", 4627)])
def test_sign_and_validate_each_parameter_set(kid: str, alg: str, sig_len: int) -> None:
    token = sign(KIDS[kid], kid)
    header, _, sig = parts(token)
    assert header == {"alg": alg, "kid": kid, "typ": "JWT"}
    assert len(base64.urlsafe_b64decode(sig + "==")) == sig_len
    svid = validate(token)
    assert svid.spiffe_id == SUB and svid.audience == ("db",)
    assert parse_insecure(token, audience=["db"]).spiffe_id == SUB
    # A bit flipped in the signature: refused.
    h, p, s = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(s + "=="))
    raw[10] ^= 1
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        validate(f"{h}.{p}.{b64(bytes(raw))}")


def _swap_header(token: str, **changes: Any) -> str:
    header, payload, sig = parts(token)
    header.update(changes)
    return f"{b64(json.dumps(header).encode())}.{payload}.{sig}"


CONFUSION = [
    # (signed with, kid in header, header alg forced to, expected error)
    ("ml65", "ec", None, "algorithm ML-DSA-65 needs an ML-DSA-65 key, got EC"),
    ("ec", "ml65", None, "algorithm ES256 needs an EC key, got MLDSA65PublicKey"),
    ("ml44", "ml65", None, "algorithm ML-DSA-44 needs an ML-DSA-44 key, got MLDSA65PublicKey"),
    ("ml65", "ml65", "ML-DSA-87", "algorithm ML-DSA-87 needs an ML-DSA-87 key"),
    ("ec", "ml65", "ML-DSA-65", "signature does not verify"),
    ("ml65", "ml65", "none", "token algorithm 'none' is not allowed"),
    ("ml65", "ml65", "HS256", "token algorithm 'HS256' is not allowed"),
    ("ml65", "ml65", "ml-dsa-65", "token algorithm 'ml-dsa-65' is not allowed"),
]


@pytest.mark.parametrize(("signer", "kid", "alg", "message"), CONFUSION)
def test_alg_must_match_the_key_type_of_the_kid(signer: str, kid: str, alg: str | None,
                                                message: str) -> None:
    token = sign(KIDS[signer], kid)
    if alg is not None:
        token = _swap_header(token, alg=alg)
    with pytest.raises(JwtSvidError) as info:
        validate(token)
    assert message in str(info.value)


def test_none_token_with_empty_signature_is_refused() -> None:
    header = b64(json.dumps({"alg": "none", "kid": "ml65", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": str(SUB), "aud": ["db"], "exp": 1_900_000_000}).encode())
    for token in (f"{header}.{payload}.", f"{header}.{payload}"):
        with pytest.raises(JwtSvidError):
            validate(token)
        with pytest.raises(JwtSvidError):
            parse_insecure(token, audience=["db"])


def test_signing_refuses_an_alg_that_does_not_fit() -> None:
    with pytest.raises(JwtSvidError, match="needs an ML-DSA-44 key"):
        sign(ML65, "ml65", algorithm="ML-DSA-44")
    with pytest.raises(JwtSvidError, match="needs an EC key"):
        sign(ML65, "ml65", algorithm="ES256")


def test_bundle_carries_akp_jwks_and_reads_them_back() -> None:
    bundle = BUNDLES.bundle_for(TD)
    assert bundle is not None
    doc = bundle.to_jwks()
    by_kid = {k["kid"]: k for k in doc["keys"]}
    assert by_kid["ml65"] == {"use": "jwt-svid", "kty": "AKP", "alg": "ML-DSA-65",
                              "pub": b64(ML65.public_key().public_bytes_raw()), "kid": "ml65"}
    assert by_kid["ec"]["kty"] == "EC"
    back = Bundle.from_jwks(TD, json.dumps(doc))
    assert back == bundle
    assert back.to_json() == bundle.to_json()
    # The Workload API's plain JWKS too.
    plain = Bundle.from_jwt_jwks(TD, bundle.jwt_jwks())
    assert {a.key_id for a in plain.jwt_authorities} == set(KIDS)
    # Tokens validate against what was read back.
    assert validate(sign(ML87, "ml87"), BundleSet([back])).spiffe_id == SUB


def _akp(**over: Any) -> dict[str, Any]:
    jwk = {"use": "jwt-svid", "kty": "AKP", "alg": "ML-DSA-65", "kid": "k",
           "pub": b64(ML65.public_key().public_bytes_raw())}
    jwk.update(over)
    return {k: v for k, v in jwk.items() if v is not None}


BAD_AKP = [
    (_akp(pub=b64(b"\x01" * 1951)), "ML-DSA-65 'pub' must be 1952 bytes, got 1951"),
    (_akp(alg="ML-DSA-44"), "ML-DSA-44 'pub' must be 1312 bytes, got 1952"),
    (_akp(pub="not base64url!"), "AKP 'pub' must be base64url"),
    (_akp(pub=b64(ML65.public_key().public_bytes_raw()) + "="), "must be base64url"),
    (_akp(pub=None), "AKP 'pub' must be base64url"),
    (_akp(priv=b64(b"\x00" * 32)), "contains private key material"),
    (_akp(kid=None), "a jwt-svid key must have a non-empty 'kid'"),
]


@pytest.mark.parametrize(("jwk", "message"), BAD_AKP)
def test_bad_akp_keys_refuse_the_bundle(jwk: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleError) as info:
        Bundle.from_jwks(TD, json.dumps({"keys": [jwk]}))
    assert message in str(info.value)


@pytest.mark.parametrize("jwk", [
    _akp(alg=None),            # AKP without alg: a key type we cannot know
    _akp(alg="SLH-DSA-SHA2-128s"),
    _akp(use="x509-svid"),     # no ML-DSA X.509 authorities (docs/standards.md)
    _akp(use="wit-svid"),
])
def test_akp_keys_we_do_not_understand_are_ignored(jwk: dict[str, Any]) -> None:
    # Trust Domain and Bundle §4.2.1: an unknown key type is ignored, not fatal.
    bundle = Bundle.from_jwks(TD, json.dumps({"keys": [jwk]}))
    assert bundle.jwt_authorities == () and bundle.x509_authorities == ()


def test_key_helpers() -> None:
    with pytest.raises(InvalidKeyError, match="sign JWT-SVIDs only"):
        generate_private_key(KeyType.ML_DSA_65)
    assert isinstance(ML65, crypto_mldsa.MLDSA65PrivateKey)
    assert [jwt_key_type_of(k) for k in (ML44, ML65.public_key(), ML87, EC)] == [
        KeyType.ML_DSA_44, KeyType.ML_DSA_65, KeyType.ML_DSA_87, KeyType.EC_P256]
    der = public_key_der(ML65)
    assert public_keys_equal(load_jwt_public_key_der(der), ML65.public_key())
    assert not public_keys_equal(ML65.public_key(), ML44.public_key())
    # X.509 paths keep refusing ML-DSA keys.
    with pytest.raises(InvalidKeyError, match="unsupported key type MLDSA65PublicKey"):
        load_public_key_der(der)
    assert key_id(ML65.public_key()) == key_id(load_jwt_public_key_der(der))
    assert len(key_id(ML65.public_key())) == 32
    assert mldsa.public_key_from_jwk(mldsa.public_jwk(ML44.public_key())).public_bytes_raw() \
        == ML44.public_key().public_bytes_raw()


def test_oidc_discovery_names_the_ml_dsa_algorithm() -> None:
    from ca.federation.oidc import configuration, jwks

    bundle = BUNDLES.bundle_for(TD)
    assert bundle is not None
    keys = {k["kid"]: k for k in jwks(bundle)["keys"]}
    assert keys["ml65"]["alg"] == "ML-DSA-65" and keys["ml65"]["use"] == "sig"
    assert keys["ml65"]["kty"] == "AKP" and "priv" not in keys["ml65"]
    assert keys["ec"]["alg"] == "ES256"
    assert configuration("oidc.example.org", bundle)["id_token_signing_alg_values_supported"] \
        == ["ES256", "ML-DSA-44", "ML-DSA-65", "ML-DSA-87"]


class _StubAuthority:
    """What OidcDiscovery reads from the CA: its bundle."""

    def __init__(self, bundle: Bundle) -> None:
        self._bundle = bundle

    def bundle(self) -> Bundle:
        return self._bundle


@pytest.mark.parametrize("omit", [None, True, False])
def test_oidc_keys_omit_ml_dsa_keys_by_default(tmp_path: Any, omit: bool | None) -> None:
    """[oidc_discovery] omit_post_quantum_keys: /keys leaves the AKP keys out unless false."""
    from ca.config.federation import OidcDiscoveryConfig
    from ca.federation.oidc import OidcDiscovery

    bundle = BUNDLES.bundle_for(TD)
    assert bundle is not None
    extra = {} if omit is None else {"omit_post_quantum_keys": omit}
    cfg = OidcDiscoveryConfig(address="127.0.0.1:0", domain="oidc.example.org",
                              cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem",
                              **extra)
    # The handlers are plain methods: no listening socket (nor certificate) needed.
    oidc = OidcDiscovery(cfg, _StubAuthority(bundle))  # type: ignore[arg-type]
    keys = json.loads(oidc.keys_document().body)["keys"]
    algs = json.loads(oidc.configuration_document().body)["id_token_signing_alg_values_supported"]
    if omit is False:
        assert {k["kid"]: k["kty"] for k in keys} == {
            "ec": "EC", "ml44": "AKP", "ml65": "AKP", "ml87": "AKP"}
        assert algs == ["ES256", "ML-DSA-44", "ML-DSA-65", "ML-DSA-87"]
    else:
        assert [(k["kid"], k["kty"], k["alg"], k["use"]) for k in keys] == [
            ("ec", "EC", "ES256", "sig")]
        assert algs == ["ES256"]


def test_pyjwt_algorithm_object() -> None:
    from jwt.exceptions import InvalidKeyError as JwtInvalidKeyError

    alg = mldsa.MlDsaAlgorithm("ML-DSA-65")
    doc = alg.to_jwk(ML65, as_dict=True)  # a private key gives its public JWK only
    assert set(doc) == {"kty", "alg", "pub"}
    back = alg.from_jwk(json.dumps(doc))
    assert back.public_bytes_raw() == ML65.public_key().public_bytes_raw()
    with pytest.raises(JwtInvalidKeyError, match="needs an ML-DSA-65 key object"):
        alg.prepare_key(ML44)
    with pytest.raises(JwtInvalidKeyError, match="got str"):
        alg.prepare_key("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(JwtInvalidKeyError, match="alg ML-DSA-44/65/87"):
        alg.from_jwk({"kty": "AKP", "alg": "ES256", "pub": doc["pub"]})
    sig = alg.sign(b"m", ML65)
    assert alg.verify(b"m", ML65.public_key(), sig)
    assert not alg.verify(b"n", ML65.public_key(), sig)
    assert not alg.verify(b"m", ML65.public_key(), sig[:-1])
    assert not alg.verify(b"m", ML44.public_key(), sig)
    with pytest.raises(ValueError, match="not an ML-DSA algorithm"):
        mldsa.MlDsaAlgorithm("ML-DSA-66")


def test_without_ml_dsa_keys_keeps_everything_else() -> None:
    """What the bundle endpoint serves with omit_post_quantum_keys (the default)."""
    ec_key = generate_private_key().public_key()
    ec_auth = JwtAuthority(key_id(ec_key), ec_key)
    pq_auth = JwtAuthority("pq-kid", ML65.public_key())
    wit_key = generate_private_key().public_key()
    wit_ec = JwtAuthority(key_id(wit_key), wit_key)
    wit_pq = JwtAuthority("wit-pq", ML44.public_key())
    mixed = Bundle(TD, jwt_authorities=(ec_auth, pq_auth), wit_authorities=(wit_ec, wit_pq),
                   sequence_number=9, refresh_hint=60)
    kept = mixed.without_ml_dsa_keys()
    assert kept.jwt_authorities == (ec_auth,) and kept.wit_authorities == (wit_ec,)
    assert (kept.trust_domain, kept.sequence_number, kept.refresh_hint) == (TD, 9, 60)
    assert {k["kty"] for k in kept.to_jwks()["keys"]} == {"EC"}
    classical = Bundle(TD, jwt_authorities=(ec_auth,), sequence_number=1)
    assert classical.without_ml_dsa_keys() is classical
