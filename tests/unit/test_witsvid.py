"""WIT-SVIDs and Workload Proof Tokens: every MUST / MUST NOT of the texts has a row.

Sources: spiffe/spiffe standards/WIT-SVID.md (Incubating), draft-ietf-wimse-
workload-creds ("The Workload Identity Token") and draft-ietf-wimse-wpt (the WPT),
as summarised in identity/witsvid.py and docs/standards.md.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from identity.bundle import Bundle, BundleSet, JwtAuthority
from identity.errors import WitSvidError
from identity.jwtsvid import sign_jwt_svid
from identity.keys import KeyType, generate_jwt_key, generate_private_key, key_id
from identity.spiffeid import SpiffeId, TrustDomain
from identity.witsvid import (
    ReplayCache,
    load_private_jwk,
    parse_wit_svid_insecure,
    private_jwk,
    public_jwk,
    sign_wit_svid,
    sign_wpt,
    validate_wit_svid,
    verify_presentation,
    wit_hash,
)

TD = TrustDomain.parse("example.org")
SUB = SpiffeId.parse("spiffe://example.org/payments")
NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)
AUD = "https://api.example.org/orders"

ISSUER_KEY = generate_private_key(KeyType.EC_P256)
KID = key_id(ISSUER_KEY.public_key())
WORKLOAD_KEY = generate_private_key(KeyType.EC_P256)
OTHER_KEY = generate_private_key(KeyType.EC_P256)

MLDSA_KEY = generate_jwt_key(KeyType.ML_DSA_44)
AUTH = JwtAuthority(KID, ISSUER_KEY.public_key())
BUNDLE = Bundle(TD, wit_authorities=(AUTH,))


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def wit(**kw: Any) -> str:
    args: dict[str, Any] = dict(spiffe_id=SUB, workload_key=WORKLOAD_KEY.public_key(),
                                key=ISSUER_KEY, key_id=KID, issued_at=NOW,
                                expires_at=NOW + dt.timedelta(hours=1))
    args.update(kw)
    return sign_wit_svid(**args)


def forged_wit(header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
               *, drop_header: tuple[str, ...] = (), drop_claims: tuple[str, ...] = (),
               key: Any = ISSUER_KEY, alg: str = "ES256") -> str:
    """A WIT signed by the real issuer key with chosen header and claims."""
    h: dict[str, Any] = {"kid": KID, "typ": "wit+jwt"}
    c: dict[str, Any] = {
        "sub": str(SUB), "exp": math.floor((NOW + dt.timedelta(hours=1)).timestamp()),
        "iat": math.floor(NOW.timestamp()), "jti": "w1",
        "cnf": {"jwk": public_jwk(WORKLOAD_KEY.public_key())},
    }
    h.update(header or {})
    c.update(claims or {})
    for k in drop_header:
        h.pop(k)
        if k == "typ":
            h["typ"] = None  # PyJWT writes typ: JWT unless told None
    for k in drop_claims:
        c.pop(k)
    return jwt.encode(c, key, algorithm=alg, headers=h)


def proof(token: str, **kw: Any) -> str:
    args: dict[str, Any] = dict(wit_token=token, key=WORKLOAD_KEY, audience=AUD,
                                expires_at=NOW + dt.timedelta(seconds=60))
    args.update(kw)
    return sign_wpt(**args)


def present(token: str, wpt: str | None, cache: ReplayCache | None = None,
            **kw: Any) -> Any:
    return verify_presentation(token, wpt, bundles=BUNDLE, audience=AUD, now=NOW,
                               replay_cache=cache if cache is not None else ReplayCache(), **kw)


# ---- issuing ----------------------------------------------------------------------


def test_issued_token_has_the_profile() -> None:
    token = wit(not_before=NOW - dt.timedelta(seconds=10))
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header == {"alg": "ES256", "kid": KID, "typ": "wit+jwt"}
    assert claims["sub"] == str(SUB)
    assert claims["exp"] == math.floor((NOW + dt.timedelta(hours=1)).timestamp())
    assert claims["nbf"] == math.floor(NOW.timestamp()) - 10  # §3.5: SHOULD be present
    assert claims["iat"] == math.floor(NOW.timestamp())
    assert "iss" not in claims  # §3.7: never an OIDC issuer, so none by default
    assert claims["jti"]
    assert "aud" not in claims
    assert claims["cnf"]["jwk"]["alg"] == "ES256"
    assert claims["cnf"]["jwk"]["kty"] == "EC"
    assert "d" not in claims["cnf"]["jwk"]
    svid = validate_wit_svid(token, bundles=BUNDLE, now=NOW)
    assert svid.spiffe_id == SUB
    assert svid.confirmation_alg == "ES256"
    assert svid.confirmation_key.public_numbers() == WORKLOAD_KEY.public_key().public_numbers()


def test_every_token_gets_its_own_jti() -> None:
    assert parse_wit_svid_insecure(wit()).jti != parse_wit_svid_insecure(wit()).jti


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"key_id": ""}, "key_id must not be empty"),
        ({"spiffe_id": SpiffeId.parse("spiffe://example.org")}, "needs an ID with a path"),
        ({"expires_at": NOW}, "is not after"),
        # WIT-SVID §2.3: only RS/ES/PS; an ML-DSA authority key cannot sign one.
        ({"key": MLDSA_KEY}, "cannot be signed with ML-DSA-44"),
    ],
)
def test_issuing_refuses(kw: dict[str, Any], error: str) -> None:
    with pytest.raises(WitSvidError, match=error):
        wit(**kw)


def test_private_jwk_round_trips_and_carries_alg() -> None:
    doc = private_jwk(WORKLOAD_KEY)
    assert doc["alg"] == "ES256" and doc["d"]
    back = load_private_jwk(json.dumps(doc))
    assert back.private_numbers() == WORKLOAD_KEY.private_numbers()  # type: ignore[union-attr]


# ---- the WIT itself: header and claim MUSTs ---------------------------------------------


@pytest.mark.parametrize(
    ("make", "error"),
    [
        # WIT-SVID §2.1: kid MUST be present.
        (lambda: forged_wit(drop_header=("kid",)), "missing key id"),
        (lambda: forged_wit({"kid": ""}), "missing key id"),
        # creds draft: explicitly typed wit+jwt.
        (lambda: forged_wit({"typ": "JWT"}), "typ 'JWT' is not wit\\+jwt"),
        (lambda: forged_wit({"typ": "wpt+jwt"}), "is not wit\\+jwt"),
        (lambda: forged_wit(drop_header=("typ",)), "typ None is not wit\\+jwt"),
        # creds draft: alg none MUST NOT be used (and HMAC is no identity).
        (lambda: jwt.encode({"sub": str(SUB)}, None, algorithm="none",
                            headers={"kid": KID, "typ": "wit+jwt"}), "'none' is not allowed"),
        (lambda: jwt.encode({"sub": str(SUB)}, "s" * 32, algorithm="HS256",
                            headers={"kid": KID, "typ": "wit+jwt"}), "'HS256' is not allowed"),
        # No aud in a WIT.
        (lambda: forged_wit(claims={"aud": ["x"]}), "carries no audience"),
        # WIT-SVID §3.1: sub MUST be the SPIFFE ID.
        (lambda: forged_wit(drop_claims=("sub",)), "missing subject"),
        (lambda: forged_wit(claims={"sub": "wimse://example.org/x"}), "invalid subject"),
        (lambda: forged_wit(claims={"sub": "spiffe://example.org"}), "is a trust domain"),
        # creds draft: exp MUST be present.
        (lambda: forged_wit(drop_claims=("exp",)), "missing exp"),
        # cnf.jwk MUST be present, with alg.
        (lambda: forged_wit(drop_claims=("cnf",)), "missing cnf"),
        (lambda: forged_wit(claims={"cnf": {}}), "cnf claim has no jwk"),
        (lambda: forged_wit(claims={"cnf": {"jwk": {
            k: v for k, v in public_jwk(WORKLOAD_KEY.public_key()).items() if k != "alg"}}}),
         "cnf.jwk has no alg"),
        (lambda: forged_wit(claims={"cnf": {"jwk": {
            **public_jwk(WORKLOAD_KEY.public_key()), "alg": "none"}}}), "'none' is not an"),
        (lambda: forged_wit(claims={"cnf": {"jwk": {
            **public_jwk(WORKLOAD_KEY.public_key()), "alg": "HS256"}}}), "'HS256' is not an"),
        (lambda: forged_wit(claims={"cnf": {"jwk": {
            **public_jwk(WORKLOAD_KEY.public_key()), "alg": "RS256"}}}), "does not fit RS256"),
        (lambda: forged_wit(claims={"cnf": {"jwk": private_jwk(WORKLOAD_KEY)}}),
         "private key material"),
        (lambda: forged_wit(claims={"cnf": {"jwk": {"kty": "oct", "k": "AAAA",
                                                      "alg": "ES256"}}}),
         "private key material|unsupported kty"),
        (lambda: forged_wit({"crit": ["x"], "x": 1}), "critical extension"),
        # §2.3: validators MUST reject an alg outside the nine, even a strong one.
        (lambda: forged_wit(key=MLDSA_KEY, alg="ML-DSA-44"), "'ML-DSA-44' is not allowed"),
        (lambda: "a.b", "not a JWS compact serialization"),
        (lambda: wit() + "é", "not a JWS compact serialization"),
        (lambda: "", "non-empty string"),
        (lambda: "x" * 40_000, "exceeds"),
    ],
)
def test_wit_rules(make: Callable[[], str], error: str) -> None:
    with pytest.raises(WitSvidError, match=error):
        validate_wit_svid(make(), bundles=BUNDLE, now=NOW)


def test_forged_wit_baseline_is_valid() -> None:
    """The forger above makes valid tokens unless told otherwise (so the rows test one rule)."""
    assert validate_wit_svid(forged_wit(), bundles=BUNDLE, now=NOW).spiffe_id == SUB


@pytest.mark.parametrize("typ", ["application/wit+jwt", "WIT+JWT", "wit+JWT"])
def test_typ_must_be_exactly_wit_jwt(typ: str) -> None:
    # WIT-SVID §2.2: "MUST be set to `wit+jwt`" (no media-type spellings).
    with pytest.raises(WitSvidError, match="is not wit\\+jwt"):
        validate_wit_svid(forged_wit({"typ": typ}), bundles=BUNDLE, now=NOW)


@pytest.mark.parametrize(
    ("now", "leeway", "error"),
    [
        (NOW + dt.timedelta(hours=1), 0, "has expired"),
        (NOW + dt.timedelta(hours=2), 0, "has expired"),
        (NOW - dt.timedelta(minutes=5), 0, "not valid before"),  # nbf = iat here
    ],
)
def test_wit_times(now: dt.datetime, leeway: float, error: str) -> None:
    with pytest.raises(WitSvidError, match=error):
        validate_wit_svid(wit(), bundles=BUNDLE, now=now, leeway=leeway)


def test_wit_leeway_accepts_small_skew() -> None:
    later = NOW + dt.timedelta(hours=1, seconds=5)
    assert validate_wit_svid(wit(), bundles=BUNDLE, now=later, leeway=10).spiffe_id == SUB


def test_iat_does_not_limit_validity_nbf_does() -> None:
    # WIT-SVID §3.6: iat MUST NOT be used for the earliest validity.
    later_iat = math.floor((NOW + dt.timedelta(minutes=5)).timestamp())
    token = forged_wit(claims={"iat": later_iat})
    assert validate_wit_svid(token, bundles=BUNDLE, now=NOW).spiffe_id == SUB
    with pytest.raises(WitSvidError, match="NumericDate"):
        validate_wit_svid(forged_wit(claims={"iat": "soon"}), bundles=BUNDLE, now=NOW)


def test_nbf_in_the_future_is_refused() -> None:
    token = forged_wit(claims={"nbf": math.floor((NOW + dt.timedelta(minutes=5)).timestamp())})
    with pytest.raises(WitSvidError, match="not valid before"):
        validate_wit_svid(token, bundles=BUNDLE, now=NOW)


def test_key_lookup_and_signature() -> None:
    # WIT-SVID §6.2: only wit-svid keys validate WIT-SVIDs.
    jwt_only = Bundle(TD, jwt_authorities=(AUTH,))
    with pytest.raises(WitSvidError, match="no WIT authority"):
        validate_wit_svid(wit(), bundles=jwt_only, now=NOW)
    with pytest.raises(WitSvidError, match="no bundle found for trust domain"):
        validate_wit_svid(wit(), bundles=BundleSet(), now=NOW)
    other_td = wit(spiffe_id=SpiffeId.parse("spiffe://other.org/x"))
    with pytest.raises(WitSvidError, match=r"no bundle found for trust domain other\.org"):
        validate_wit_svid(other_td, bundles=BUNDLE, now=NOW)
    forged = forged_wit(key=OTHER_KEY)  # right kid, wrong key
    with pytest.raises(WitSvidError, match="signature does not verify"):
        validate_wit_svid(forged, bundles=BUNDLE, now=NOW)
    with pytest.raises(WitSvidError, match="needs curve"):
        validate_wit_svid(forged_wit(key=generate_private_key(KeyType.EC_P384), alg="ES384"),
                          bundles=BUNDLE, now=NOW)


def test_a_jwt_svid_is_not_a_wit_svid_and_the_reverse() -> None:
    token = sign_jwt_svid(spiffe_id=SUB, audience=["a"], key=ISSUER_KEY, key_id=KID,
                          issued_at=NOW, expires_at=NOW + dt.timedelta(minutes=5))
    with pytest.raises(WitSvidError, match="typ 'JWT'"):
        validate_wit_svid(token, bundles=BUNDLE, now=NOW)
    from identity.errors import JwtSvidError
    from identity.jwtsvid import validate_jwt_svid

    # Even with the WIT's key published as a JWT key (under another kid: §6.1),
    # a WIT is no JWT-SVID: its kid names no jwt-svid key, it has no aud and its
    # typ is wit+jwt.
    other_kid = Bundle(TD, jwt_authorities=(JwtAuthority("j-" + KID, ISSUER_KEY.public_key()),),
                       wit_authorities=(AUTH,))
    with pytest.raises(JwtSvidError, match="typ 'wit\\+jwt'"):
        validate_jwt_svid(wit(), bundles=other_kid, audience="a", now=NOW)


# ---- presentation: the proof of possession -----------------------------------------------


def test_presentation_with_a_good_proof() -> None:
    token = wit()
    assert present(token, proof(token)).spiffe_id == SUB


def test_wth_is_the_sha256_of_the_wit() -> None:
    token = wit()
    claims = jwt.decode(proof(token), options={"verify_signature": False})
    digest = hashlib.sha256(token.encode("ascii")).digest()
    assert claims["wth"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert claims["wth"] == wit_hash(token)
    assert jwt.get_unverified_header(proof(token))["typ"] == "wpt+jwt"


@pytest.mark.parametrize("missing", [None, ""])
def test_a_wit_without_proof_is_refused(missing: str | None) -> None:
    with pytest.raises(WitSvidError, match="without proof of possession"):
        present(wit(), missing)


def test_a_replayed_proof_is_refused() -> None:
    cache = ReplayCache()
    token = wit()
    wpt = proof(token, jti="j1")
    present(token, wpt, cache)
    with pytest.raises(WitSvidError, match="replayed jti"):
        present(token, wpt, cache)
    # A new proof (another jti) is fine.
    present(token, proof(token), cache)
    # The same jti from another sender is another proof (jti is unique per sender).
    theirs = wit(spiffe_id=SpiffeId.parse("spiffe://example.org/other"))
    present(theirs, proof(theirs, jti="j1"), cache)
    assert len(cache) == 3
    # Once the first proof has expired its jti is forgotten (the cache stays bounded).
    later = NOW + dt.timedelta(seconds=61)
    again = proof(token, jti="j1", expires_at=later + dt.timedelta(seconds=30))
    verify_presentation(token, again, bundles=BUNDLE, audience=AUD, now=later,
                        replay_cache=cache)
    assert len(cache) == 1  # the three earlier proofs expired at NOW + 60 s


def test_replay_cache_is_bounded_and_fails_closed() -> None:
    cache = ReplayCache(max_entries=2)
    exp = NOW + dt.timedelta(seconds=30)
    cache.check_and_remember("a", exp, NOW)
    cache.check_and_remember("b", exp, NOW)
    with pytest.raises(WitSvidError, match="too many proofs"):
        cache.check_and_remember("c", exp, NOW)
    assert len(cache) == 2
    cache.check_and_remember("c", exp + dt.timedelta(seconds=30), exp)  # a, b expired
    assert len(cache) == 1


def _raw_wpt(token: str, *, header: dict[str, Any] | None = None,
             claims: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
             key: Any = WORKLOAD_KEY, alg: str = "ES256") -> str:
    h = {"typ": "wpt+jwt"}
    h.update(header or {})
    c: dict[str, Any] = {"aud": AUD, "exp": math.floor(NOW.timestamp()) + 60, "jti": "p1",
                         "wth": wit_hash(token)}
    c.update(claims or {})
    for k in drop:
        c.pop(k)
    return jwt.encode(c, key, algorithm=alg, headers=h)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda t: _raw_wpt(t, header={"typ": "JWT"}), "typ 'JWT' is not wpt\\+jwt"),
        (lambda t: _raw_wpt(t, header={"typ": "wit+jwt"}), "is not wpt\\+jwt"),
        # signed by another key: not the cnf key
        (lambda t: _raw_wpt(t, key=OTHER_KEY), "does not verify with the WIT's cnf key"),
        # alg must string-equal cnf.jwk.alg
        (lambda t: _raw_wpt(t, key=generate_private_key(KeyType.EC_P384), alg="ES384"),
         "'ES384' does not match"),
        (lambda t: _raw_wpt(t, key="s" * 32, alg="HS256"), "'HS256' does not match"),
        (lambda t: jwt.encode({"aud": AUD}, None, algorithm="none",
                              headers={"typ": "wpt+jwt"}), "'none' does not match"),
        (lambda t: _raw_wpt(t, claims={"aud": "https://elsewhere.example.org"}),
         "does not name this recipient"),
        (lambda t: _raw_wpt(t, drop=("aud",)), "does not name this recipient"),
        (lambda t: _raw_wpt(t, drop=("exp",)), "proof missing exp"),
        (lambda t: _raw_wpt(t, claims={"exp": math.floor(NOW.timestamp())}), "proof has expired"),
        (lambda t: _raw_wpt(t, claims={"exp": math.floor(NOW.timestamp()) + 3600}),
         "too far ahead"),
        (lambda t: _raw_wpt(t, drop=("wth",)), "wth claim does not match"),
        (lambda t: _raw_wpt(t, claims={"wth": wit_hash(t + "x")}), "wth claim does not match"),
        (lambda t: _raw_wpt(t, claims={"wth": "é" * 43}), "wth claim does not match"),
        (lambda t: _raw_wpt(t, claims={"wth": 12}), "wth claim does not match"),
        (lambda t: _raw_wpt(t, drop=("jti",)), "proof missing jti"),
        (lambda t: _raw_wpt(t, claims={"jti": "j" * 300}), "jti longer"),
    ],
)
def test_proof_rules(make: Callable[[str], str], error: str) -> None:
    token = wit()
    with pytest.raises(WitSvidError, match=error):
        present(token, make(token))


def test_raw_proof_baseline_is_valid() -> None:
    token = wit()
    assert present(token, _raw_wpt(token)).spiffe_id == SUB
    assert present(token, _raw_wpt(token, claims={"aud": ["x", AUD]})).spiffe_id == SUB


def test_cnf_mismatch_a_proof_for_another_wit_is_refused() -> None:
    mine, theirs = wit(), wit(workload_key=OTHER_KEY.public_key())
    # A proof made with my key for my WIT, presented with their WIT: wrong key and wth.
    with pytest.raises(WitSvidError, match="cnf key"):
        present(theirs, proof(mine))
    # Their WIT presented with a proof by my key over their WIT: the cnf key differs.
    with pytest.raises(WitSvidError, match="cnf key"):
        present(theirs, proof(theirs))


def test_expired_wit_is_refused_even_with_a_good_proof() -> None:
    token = wit(expires_at=NOW + dt.timedelta(seconds=10))
    later = NOW + dt.timedelta(seconds=20)
    wpt = proof(token, expires_at=later + dt.timedelta(seconds=30))
    with pytest.raises(WitSvidError, match="token has expired"):
        verify_presentation(token, wpt, bundles=BUNDLE, audience=AUD, now=later,
                            replay_cache=ReplayCache())


def test_bundle_publishes_and_reads_wit_keys() -> None:
    jwt_key = generate_private_key()
    jwt_auth = JwtAuthority(key_id(jwt_key.public_key()), jwt_key.public_key())
    both = Bundle(TD, jwt_authorities=(jwt_auth,), wit_authorities=(AUTH,))
    doc = both.to_jwks()
    assert [(k["use"], k["kid"]) for k in doc["keys"]] == [
        ("jwt-svid", jwt_auth.key_id), ("wit-svid", KID)]
    back = Bundle.from_jwks(TD, doc)
    assert back == both
    assert back.wit_authority(KID) is not None
    assert back.wit_authority(jwt_auth.key_id) is None
    assert back.jwt_authority(KID) is None
    # WIT-SVID §6.1: one kid for a jwt-svid and a wit-svid key refuses the bundle.
    from identity.errors import BundleError

    with pytest.raises(BundleError, match="share key ID"):
        Bundle(TD, jwt_authorities=(AUTH,), wit_authorities=(AUTH,))
    clash = {"keys": [{**doc["keys"][1], "use": "jwt-svid"}, doc["keys"][1]]}
    with pytest.raises(BundleError, match="share key ID"):
        Bundle.from_jwks(TD, clash)
    assert json.loads(both.wit_jwks()) == {"keys": [k for k in doc["keys"]
                                                    if k["use"] == "wit-svid"]}
    # WIT-SVID §6.1: a wit-svid key without kid refuses the bundle, like jwt-svid.
    bad = {"keys": [{**doc["keys"][1], "kid": ""}]}
    with pytest.raises(BundleError, match="kid"):
        Bundle.from_jwks(TD, bad)
    # A bundle with no wit-svid key: the trust domain issues no WIT-SVIDs.
    assert Bundle.from_jwks(TD, {"keys": [doc["keys"][0]]}).wit_authorities == ()


def test_hand_built_unsigned_token_is_refused() -> None:
    # An unsigned "alg: none" token with wit+jwt, built by hand (PyJWT would sign).
    token = f"{_b64({'alg': 'none', 'kid': KID, 'typ': 'wit+jwt'})}.{_b64({'sub': str(SUB)})}."
    with pytest.raises(WitSvidError, match="'none' is not allowed"):
        validate_wit_svid(token, bundles=BUNDLE, now=NOW)


@pytest.mark.parametrize(
    ("key_type", "alg"),
    [(KeyType.EC_P384, "ES384"), (KeyType.RSA_2048, "RS256"), (KeyType.RSA_4096, "RS256")],
)
def test_any_authority_key_type_signs_and_validates(key_type: KeyType, alg: str) -> None:
    issuer = generate_jwt_key(key_type)
    kid = key_id(issuer.public_key())
    bundle = Bundle(TD, wit_authorities=(JwtAuthority(kid, issuer.public_key()),))
    token = wit(key=issuer, key_id=kid)
    assert jwt.get_unverified_header(token)["alg"] == alg
    svid = verify_presentation(token, proof(token), bundles=bundle, audience=AUD, now=NOW,
                               replay_cache=ReplayCache())
    assert svid.spiffe_id == SUB
