"""identity.jwtsvid: signing and validating JWT-SVIDs."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest

from identity.bundle import Bundle, BundleSet, JwtAuthority
from identity.errors import JwtSvidError
from identity.jwtsvid import (
    ALLOWED_ALGORITHMS,
    STANDARD_ALGORITHMS,
    JwtSvid,
    parse_insecure,
    sign_jwt_svid,
    validate_jwt_svid,
)
from identity.keys import KeyType, PrivateKey, generate_private_key, key_id
from identity.spiffeid import SpiffeId, TrustDomain

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
TD = TrustDomain("trustdomain")
SUB = SpiffeId.parse("spiffe://trustdomain/host")

EC_KEY = generate_private_key(KeyType.EC_P256)
EC384_KEY = generate_private_key(KeyType.EC_P384)
RSA_KEY = generate_private_key(KeyType.RSA_2048)
OTHER_KEY = generate_private_key(KeyType.EC_P256)

BUNDLES = BundleSet(
    [
        Bundle(
            TD,
            jwt_authorities=(
                JwtAuthority("authority1", EC_KEY.public_key()),
                JwtAuthority("authority2", RSA_KEY.public_key()),
                JwtAuthority("authority3", EC384_KEY.public_key()),
            ),
        )
    ]
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64(json.dumps(obj).encode())


def sign(
    key: PrivateKey = EC_KEY,
    kid: str = "authority1",
    audience: tuple[str, ...] = ("audience",),
    lifetime: dt.timedelta = dt.timedelta(minutes=5),
    **kw: Any,
) -> str:
    return sign_jwt_svid(
        spiffe_id=kw.pop("spiffe_id", SUB),
        audience=audience,
        key=key,
        key_id=kid,
        issued_at=NOW,
        expires_at=NOW + lifetime,
        **kw,
    )


def craft(header: dict[str, Any], claims: dict[str, Any], key: PrivateKey = EC_KEY) -> str:
    """A token signed by PyJWT with arbitrary header and claims."""
    alg = header.pop("alg", "ES256")
    return jwt.encode(claims, key, algorithm=alg, headers=header)


def _resign(header: dict[str, Any], claims: dict[str, Any], key: PrivateKey = EC_KEY) -> str:
    """Sign exactly this header (no typ added) with PyJWT's algorithm objects."""
    from jwt.algorithms import get_default_algorithms

    alg = get_default_algorithms()[header["alg"]]
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    sig = alg.sign(signing_input.encode(), alg.prepare_key(key))
    return f"{signing_input}.{b64(sig)}"


GOOD_CLAIMS = {"sub": str(SUB), "aud": ["audience"], "exp": int(NOW.timestamp()) + 300}


# ------------------------------------------------------------------ signing


def test_sign_header_and_claims() -> None:
    token = sign(audience=("a", "b"))
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": "authority1", "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims == {
        "sub": "spiffe://trustdomain/host",
        "aud": ["a", "b"],
        "exp": int(NOW.timestamp()) + 300,
        "iat": int(NOW.timestamp()),
    }
    # RFC 7518 §3.4: ES256 signatures are raw r||s, 64 bytes, not DER.
    sig = base64.urlsafe_b64decode(token.split(".")[2] + "==")
    assert len(sig) == 64


def test_single_audience_is_still_a_list() -> None:
    claims = jwt.decode(sign(), options={"verify_signature": False})
    assert claims["aud"] == ["audience"]


@pytest.mark.parametrize(
    ("key", "algorithm", "expected"),
    [
        (EC_KEY, None, "ES256"),
        (EC384_KEY, None, "ES384"),
        (RSA_KEY, None, "RS256"),
        (RSA_KEY, "PS256", "PS256"),
        (RSA_KEY, "RS512", "RS512"),
    ],
)
def test_sign_algorithms(key: PrivateKey, algorithm: str | None, expected: str) -> None:
    kid = {EC_KEY: "authority1", RSA_KEY: "authority2", EC384_KEY: "authority3"}[key]
    token = sign(key=key, kid=kid, algorithm=algorithm)
    assert jwt.get_unverified_header(token)["alg"] == expected
    svid = validate_jwt_svid(token, bundles=BUNDLES, audience="audience", now=NOW)
    assert svid.spiffe_id == SUB


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"audience": ()}, "one or more non-empty strings"),
        ({"audience": ("",)}, "one or more non-empty strings"),
        ({"audience": "audience"}, "not a single str"),
        ({"kid": ""}, "key_id must not be empty"),
        ({"spiffe_id": SpiffeId.parse("spiffe://trustdomain")}, "needs an ID with a path"),
        ({"lifetime": dt.timedelta(0)}, "is not after issued_at"),
        ({"algorithm": "HS256"}, "not a JWT-SVID algorithm"),
        ({"algorithm": "none"}, "not a JWT-SVID algorithm"),
        ({"algorithm": "EdDSA"}, "not a JWT-SVID algorithm"),
        ({"algorithm": "ES384"}, "needs curve secp384r1"),
        ({"algorithm": "RS256"}, "needs an RSA key"),
        ({"key": RSA_KEY, "algorithm": "ES256"}, "needs an EC key"),
    ],
)
def test_sign_rejects(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(JwtSvidError, match=error):
        sign(**kwargs)


def test_sign_rejects_naive_times() -> None:
    with pytest.raises(JwtSvidError, match="timezone-aware"):
        sign_jwt_svid(
            spiffe_id=SUB,
            audience=["a"],
            key=EC_KEY,
            key_id=key_id(EC_KEY.public_key()),
            issued_at=dt.datetime(2030, 1, 1),
            expires_at=dt.datetime(2030, 1, 2),
        )


def test_allowed_algorithms_are_the_nine_and_ml_dsa() -> None:
    assert ALLOWED_ALGORITHMS == STANDARD_ALGORITHMS | {"ML-DSA-44", "ML-DSA-65", "ML-DSA-87"}
    assert STANDARD_ALGORITHMS == {
        "RS256",
        "RS384",
        "RS512",
        "ES256",
        "ES384",
        "ES512",
        "PS256",
        "PS384",
        "PS512",
    }


# ------------------------------------------------------------------ validation


def test_validate_success() -> None:
    token = sign(audience=("audience", "other"))
    svid = validate_jwt_svid(token, bundles=BUNDLES, audience="other", now=NOW)
    assert svid == JwtSvid(
        token=token,
        spiffe_id=SUB,
        audience=("audience", "other"),
        expires_at=NOW + dt.timedelta(minutes=5),
        issued_at=NOW,
        claims={},
    )
    assert svid.claims["sub"] == str(SUB)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "ES256", "kid": "authority1", "typ": "JOSE"},
        {"alg": "ES256", "kid": "authority1", "typ": "JWT"},
        {"alg": "ES256", "kid": "authority1"},
    ],
)
def test_validate_accepts_typ_variants_and_string_aud(header: dict[str, Any]) -> None:
    token = _resign(header, {**GOOD_CLAIMS, "aud": "audience"})
    svid = validate_jwt_svid(token, bundles=BUNDLES, audience="audience", now=NOW)
    assert svid.audience == ("audience",)


def _hs256_token(claims: dict[str, Any]) -> str:
    # Crafted by hand: PyJWT refuses to use a PEM public key as an HMAC secret.
    header = b64json({"alg": "HS256", "typ": "JWT", "kid": "authority1"})
    body = b64json(claims)
    mac = hmac.new(b"secret", f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(mac)}"


def _none_token(claims: dict[str, Any]) -> str:
    return f"{b64json({'alg': 'none', 'kid': 'authority1'})}.{b64json(claims)}."


EXP = int(NOW.timestamp()) + 300


@pytest.mark.parametrize(
    ("token", "audience", "error"),
    [
        ("malformed", "audience", "not a JWS compact serialization"),
        ("a.b.c.d.e", "audience", "not a JWS compact serialization"),
        ("e30.e30.", "audience", "algorithm None is not allowed"),
        (_none_token(GOOD_CLAIMS), "audience", "algorithm 'none' is not allowed"),
        (_hs256_token(GOOD_CLAIMS), "audience", "algorithm 'HS256' is not allowed"),
        (
            _resign({"alg": "ES256", "kid": "authority1", "typ": "invalid"}, GOOD_CLAIMS),
            "audience",
            "typ 'invalid' is neither JWT nor JOSE",
        ),
        (
            _resign(
                {"alg": "ES256", "kid": "authority1", "crit": ["x-ext"], "x-ext": 1}, GOOD_CLAIMS
            ),
            "audience",
            "crit",
        ),
        (
            craft({"kid": "authority1"}, {"aud": ["audience"], "exp": EXP}),
            "audience",
            "token missing subject claim",
        ),
        (
            craft({"kid": "authority1"}, {**GOOD_CLAIMS, "sub": "invalid subject"}),
            "audience",
            "invalid subject claim",
        ),
        (
            craft({"kid": "authority1"}, {"sub": str(SUB), "aud": ["audience"]}),
            "audience",
            "token missing exp claim",
        ),
        (
            craft({"kid": "authority1"}, {**GOOD_CLAIMS, "exp": "soon"}),
            "audience",
            "must be a NumericDate",
        ),
        (
            craft({"kid": "authority1"}, {"sub": str(SUB), "exp": EXP}),
            "audience",
            "aud claim must hold one or more strings",
        ),
        (
            craft({"kid": "authority1"}, {**GOOD_CLAIMS, "aud": []}),
            "audience",
            "aud claim must hold one or more strings",
        ),
        (
            _resign({"alg": "ES256", "typ": "JWT"}, GOOD_CLAIMS),
            "audience",
            "token header missing key id",
        ),
        (
            craft({"kid": "authority1"}, {**GOOD_CLAIMS, "sub": "spiffe://another.domain/host"}),
            "audience",
            "no JWT bundle found for trust domain another.domain",
        ),
        (
            craft({"kid": "noKey"}, GOOD_CLAIMS),
            "audience",
            "no JWT authority 'noKey' found for trust domain trustdomain",
        ),
        (
            craft({"kid": "authority1"}, GOOD_CLAIMS, key=OTHER_KEY),
            "audience",
            "signature does not verify",
        ),
        (
            craft({"kid": "authority2", "alg": "ES256"}, GOOD_CLAIMS),
            "audience",
            "ES256 needs an EC key",
        ),
        (
            craft({"kid": "authority1", "alg": "RS256"}, GOOD_CLAIMS, key=RSA_KEY),
            "audience",
            "RS256 needs an RSA key",
        ),
        (
            craft({"kid": "authority3", "alg": "ES256"}, GOOD_CLAIMS),
            "audience",
            "ES256 needs curve secp256r1",
        ),
        (
            craft({"kid": "authority1"}, {**GOOD_CLAIMS, "exp": int(NOW.timestamp()) - 60}),
            "audience",
            "token has expired",
        ),
        (
            craft({"kid": "authority1"}, {**GOOD_CLAIMS, "exp": int(NOW.timestamp())}),
            "audience",
            "token has expired",
        ),
        (
            craft({"kid": "authority1"}, {**GOOD_CLAIMS, "nbf": EXP - 10}),
            "audience",
            "not valid before",
        ),
        (
            craft({"kid": "authority1"}, {**GOOD_CLAIMS, "iat": EXP - 10}),
            "audience",
            "issued in the future",
        ),
        (craft({"kid": "authority1"}, GOOD_CLAIMS), "another", "expected audience 'another'"),
        (craft({"kid": "authority1"}, GOOD_CLAIMS), "", "an expected audience is required"),
    ],
)
def test_validate_rejects(token: str, audience: str, error: str) -> None:
    with pytest.raises(JwtSvidError, match=error):
        validate_jwt_svid(token, bundles=BUNDLES, audience=audience, now=NOW)


def test_tampered_payload_rejected() -> None:
    token = sign()
    h, _, s = token.split(".")
    forged = b64json({**GOOD_CLAIMS, "sub": "spiffe://trustdomain/admin"})
    with pytest.raises(JwtSvidError, match="signature does not verify"):
        validate_jwt_svid(f"{h}.{forged}.{s}", bundles=BUNDLES, audience="audience", now=NOW)


def test_leeway() -> None:
    token = sign(lifetime=dt.timedelta(minutes=1))
    later = NOW + dt.timedelta(minutes=1, seconds=30)
    with pytest.raises(JwtSvidError, match="expired"):
        validate_jwt_svid(token, bundles=BUNDLES, audience="audience", now=later)
    svid = validate_jwt_svid(token, bundles=BUNDLES, audience="audience", now=later, leeway=60)
    assert svid.spiffe_id == SUB
    svid = validate_jwt_svid(
        token, bundles=BUNDLES, audience="audience", now=later, leeway=dt.timedelta(minutes=1)
    )
    assert svid.spiffe_id == SUB
    with pytest.raises(JwtSvidError, match="naive"):
        validate_jwt_svid(token, bundles=BUNDLES, audience="audience", now=dt.datetime(2030, 1, 1))


def test_time_is_injected_not_read() -> None:
    # Expired decades ago by the wall clock? No: 'now' decides. And the reverse.
    token = sign()
    assert validate_jwt_svid(token, bundles=BUNDLES, audience="audience", now=NOW)
    old = craft({"kid": "authority1"}, {**GOOD_CLAIMS, "exp": 1_000_000_000})
    then = dt.datetime.fromtimestamp(999_999_000, dt.UTC)
    assert validate_jwt_svid(old, bundles=BUNDLES, audience="audience", now=then)


# ------------------------------------------------------------------ parse_insecure


def test_parse_insecure() -> None:
    token = craft({"kid": "whatever"}, {**GOOD_CLAIMS, "aud": ["a", "b"]}, key=OTHER_KEY)
    svid = parse_insecure(token, audience=["a", "b"])
    assert svid.spiffe_id == SUB and svid.audience == ("a", "b")
    with pytest.raises(JwtSvidError, match=r"expected audience \['c'\]"):
        parse_insecure(token, audience=["a", "c"])
    with pytest.raises(JwtSvidError, match="at least one expected audience"):
        parse_insecure(token, audience=[])
    with pytest.raises(JwtSvidError, match="expired"):
        parse_insecure(token, audience=["a"], now=NOW + dt.timedelta(hours=1))
    with pytest.raises(JwtSvidError, match="'HS256' is not allowed"):
        parse_insecure(_hs256_token(GOOD_CLAIMS), audience=["audience"])
