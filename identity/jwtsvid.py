"""JWT-SVIDs: signing and validation (JWT-SVID standard, ``standards/JWT-SVID.md``).

PyJWT does the JWS work (RFC 7515 compact serialization, raw ``r||s`` ECDSA
signatures per RFC 7518 §3.4; ML-DSA through the handlers :mod:`identity.mldsa`
registers). Everything SPIFFE adds is checked here, in the
order of the recommended validation procedure: algorithm allow-list before any
cryptography, then header and claims, then the key from the bundle of the
subject's trust domain, then the signature, then time and audience. Time is always
passed in; PyJWT's own time checks are switched off so results do not depend on
the wall clock.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identity import mldsa
from identity.bundle import JwtBundleSource
from identity.errors import InvalidSpiffeIdError, JwtSvidError, SigilError
from identity.keys import JwtPrivateKey, JwtPublicKey
from identity.spiffeid import SpiffeId

if TYPE_CHECKING:
    from jwt.types import Options  # PyJWT >= 2.10; annotations only

mldsa.register()

# JWT-SVID §2.1: the algorithms a JWT-SVID may use. 'none', HMAC (a shared secret
# is not an identity) and EdDSA are not among them.
STANDARD_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)

# Beyond the standard's table: ML-DSA (draft-ietf-cose-dilithium-11 / RFC 9964
# names), for trust domains that opt in with jwt_key_type = "ml-dsa-*". A token
# is only ever checked with the key its kid names, and only if that key's type is
# the one its alg names (_check_key_fits), so accepting these names here lets no
# EC or RSA key be used under an ML-DSA alg, nor the reverse.
ALLOWED_ALGORITHMS: frozenset[str] = STANDARD_ALGORITHMS | frozenset(mldsa.ALGORITHMS)

# JWT-SVID §2.3: typ, when present, is JWT or JOSE.
_ALLOWED_TYP = frozenset({"JWT", "JOSE"})

# RFC 7518 §3.4: each ES algorithm is bound to one curve.
_EC_CURVE_FOR_ALG = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

# A JWT-SVID is a few hundred bytes; bound what we decode (DESIGN.md invariants).
MAX_TOKEN_BYTES = 32 * 1024

# Claims PyJWT would otherwise check against the wall clock or require; we do the
# SPIFFE checks ourselves with the injected time.
PYJWT_OPTIONS: Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


@dataclass(frozen=True)
class JwtSvid:
    """A parsed JWT-SVID.

    Attributes:
        token: the compact serialization.
        spiffe_id: the ``sub`` claim.
        audience: the ``aud`` claim, always as a tuple.
        expires_at: the ``exp`` claim (aware UTC).
        issued_at: the ``iat`` claim, if any.
        claims: every claim of the token.
    """

    token: str
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expires_at: dt.datetime
    issued_at: dt.datetime | None
    claims: Mapping[str, Any] = field(compare=False, hash=False)


def aware_utc(value: dt.datetime, what: str,
              error: type[SigilError] = JwtSvidError) -> dt.datetime:
    """``value`` in UTC; a naive datetime raises ``error`` (WIT-SVIDs pass theirs)."""
    if value.tzinfo is None:
        raise error(f"{what} must be timezone-aware, got naive {value}")
    return value.astimezone(dt.UTC)



def check_issue(spiffe_id: SpiffeId, key_id: str, issued_at: dt.datetime,
                expires_at: dt.datetime, kind: str = "JWT-SVID",
                error: type[SigilError] = JwtSvidError) -> tuple[dt.datetime, dt.datetime]:
    """What signing a ``kind`` token requires of its subject, kid and lifetime.

    Returns:
        ``(issued_at, expires_at)`` in UTC.

    Raises:
        error: an empty kid, a root ID, a naive time, or an empty lifetime.
    """
    if not key_id:
        raise error("key_id must not be empty")
    if not spiffe_id.has_path:
        raise error(f"a {kind} subject needs an ID with a path, got {spiffe_id}")
    issued_at = aware_utc(issued_at, "issued_at", error)
    expires_at = aware_utc(expires_at, "expires_at", error)
    if expires_at <= issued_at:
        raise error(f"expires_at {expires_at} is not after issued_at {issued_at}")
    return issued_at, expires_at


def default_algorithm(key: JwtPrivateKey | JwtPublicKey) -> str:
    """The algorithm Sigil signs with for a key: ES* by curve, RS256, or ML-DSA-*.

    Args:
        key: a private key, or its public half.

    Returns:
        The JWS ``alg``.

    Raises:
        JwtSvidError: a key of no JWT-SVID algorithm.
    """
    ml = mldsa.algorithm_of(key)
    if ml is not None:
        return ml
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return "RS256"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        for alg, curve in _EC_CURVE_FOR_ALG.items():
            if key.curve.name == curve:
                return alg
        raise JwtSvidError(f"no JWT-SVID algorithm for EC curve {key.curve.name}")
    raise JwtSvidError(f"no JWT-SVID algorithm for {type(key).__name__}")


def check_key_fits(alg: str, key: JwtPublicKey | object) -> None:
    """Check that ``key`` can verify ``alg`` (shared with :mod:`identity.witsvid`).

    Args:
        alg: a JWS algorithm of :data:`ALLOWED_ALGORITHMS`.
        key: the public key chosen by kid (or a WIT's ``cnf`` key).

    Raises:
        JwtSvidError: the key's type, size or curve does not fit ``alg``.
    """
    _check_key_fits(alg, key)


def _check_key_fits(alg: str, key: JwtPublicKey | object) -> None:
    """RFC 7518 §3.3-3.5: RS/PS need RSA of >= 2048 bits, ES need their curve;
    ML-DSA-n needs an ML-DSA key of that very parameter set."""
    if alg in mldsa.ALGORITHMS:
        if mldsa.algorithm_of(key) != alg:
            raise JwtSvidError(f"algorithm {alg} needs an {alg} key, got {type(key).__name__}")
        return
    if alg.startswith(("RS", "PS")):
        if not isinstance(key, rsa.RSAPublicKey):
            raise JwtSvidError(f"algorithm {alg} needs an RSA key, got {type(key).__name__}")
        if key.key_size < 2048:
            raise JwtSvidError(f"algorithm {alg} needs an RSA key of >= 2048 bits")
        return
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise JwtSvidError(f"algorithm {alg} needs an EC key, got {type(key).__name__}")
    if key.curve.name != _EC_CURVE_FOR_ALG[alg]:
        raise JwtSvidError(
            f"algorithm {alg} needs curve {_EC_CURVE_FOR_ALG[alg]}, got {key.curve.name}"
        )


def sign_jwt_svid(
    *,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    key: JwtPrivateKey,
    key_id: str,
    issued_at: dt.datetime,
    expires_at: dt.datetime,
    algorithm: str | None = None,
    issuer: str | None = None,
    jwt_id: str | None = None,
) -> str:
    """Sign a JWT-SVID.

    The header is exactly ``{alg, kid, typ: "JWT"}`` (JWT-SVID §2: no other header);
    the claims are ``sub``, ``aud`` (always a list: py-spiffe and go-spiffe accept
    both forms, a list is what SPIRE emits), ``exp`` and ``iat``.

    Args:
        spiffe_id: the subject; must have a path (a workload, not a trust domain).
        audience: one or more audiences, all put in ``aud``.
        key: the signing key.
        key_id: the kid of the key in the bundle.
        issued_at: ``iat`` (aware).
        expires_at: ``exp`` (aware), after ``issued_at``.
        algorithm: a JWT-SVID algorithm; by default ES256/ES384/ES512 by curve,
            RS256 for RSA, ML-DSA-44/65/87 for an ML-DSA key. PS256 etc. on request.
        issuer: an ``iss`` claim, when set. JWT-SVID §3 allows it; identity
            providers that trust us through OIDC discovery require it to equal the
            discovery document's issuer.
        jwt_id: a ``jti`` claim, when set (RFC 7519 §4.1.7): names this one token,
            so it can be revoked alone.

    Returns:
        The compact serialization.

    Raises:
        JwtSvidError: no audience, an empty kid, a root ID, an empty lifetime, an
            algorithm outside the allow-list or not fitting the key.
    """
    if isinstance(audience, str):
        raise JwtSvidError("audience must be a sequence of strings, not a single str")
    audiences = list(dict.fromkeys(audience))
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise JwtSvidError(f"audience must be one or more non-empty strings, got {audience!r}")
    issued_at, expires_at = check_issue(spiffe_id, key_id, issued_at, expires_at)
    alg = algorithm if algorithm is not None else default_algorithm(key)
    if alg not in ALLOWED_ALGORITHMS:
        raise JwtSvidError(f"algorithm {alg!r} is not a JWT-SVID algorithm")
    _check_key_fits(alg, key.public_key())
    claims = {
        "sub": str(spiffe_id),
        "aud": audiences,
        # RFC 7519 §2 NumericDate; truncating exp never lengthens the token's life.
        "exp": math.floor(expires_at.timestamp()),
        "iat": math.floor(issued_at.timestamp()),
    }
    if issuer:
        claims["iss"] = issuer
    if jwt_id:
        claims["jti"] = jwt_id
    # PyJWT's annotation lists its built-in key types; a registered algorithm
    # (ML-DSA) takes its own, which PyJWT passes through to it untouched.
    signing_key: Any = key
    return jwt.encode(claims, signing_key, algorithm=alg, headers={"kid": key_id, "typ": "JWT"})


def _parse_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims, with the JOSE-level checks that need no key."""
    if not isinstance(token, str):
        raise JwtSvidError(f"token must be a str, not {type(token).__name__}")
    if len(token) > MAX_TOKEN_BYTES:
        raise JwtSvidError(f"token of {len(token)} bytes exceeds {MAX_TOKEN_BYTES}")
    # JWT-SVID §5.1: JWS Compact Serialization only (three dot-separated parts).
    if token.count(".") != 2:
        raise JwtSvidError("token is not a JWS compact serialization (want header.payload.sig)")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise JwtSvidError(f"cannot parse token header: {exc}") from None
    alg = header.get("alg")
    # JWT-SVID §3: "Validators MUST ensure that the alg header is set to a supported
    # value before processing" - before any key lookup or signature work.
    if alg not in ALLOWED_ALGORITHMS:
        raise JwtSvidError(
            f"token algorithm {alg!r} is not allowed; JWT-SVIDs use one of "
            f"{', '.join(sorted(ALLOWED_ALGORITHMS))}"
        )
    typ = header.get("typ")
    if typ is not None and typ not in _ALLOWED_TYP:
        raise JwtSvidError(f"token header typ {typ!r} is neither JWT nor JOSE")
    if "crit" in header:
        # RFC 7515 §4.1.11: extensions listed in crit must be understood; we know none.
        raise JwtSvidError(f"token header has critical extensions {header['crit']!r}")
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise JwtSvidError(f"cannot parse token claims: {exc}") from None
    return header, claims


def numeric_date(claims: Mapping[str, Any], name: str, what: str = "token",
                 error: type[SigilError] = JwtSvidError) -> dt.datetime | None:
    """Claim ``name`` as an aware UTC datetime, None when absent; anything but a finite
    NumericDate in range raises ``error`` naming ``what`` (WIT-SVIDs pass theirs)."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(f"{what} claim {name} must be a NumericDate, got {value!r}")
    try:
        return dt.datetime.fromtimestamp(value, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise error(f"{what} claim {name} is out of range: {value!r}") from None



def _svid_from_claims(token: str, claims: Mapping[str, Any]) -> JwtSvid:
    sub = claims.get("sub")
    if not sub:
        raise JwtSvidError("token missing subject claim")
    if not isinstance(sub, str):
        raise JwtSvidError(f"token subject claim must be a string, got {sub!r}")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except InvalidSpiffeIdError as exc:
        raise JwtSvidError(f"token has an invalid subject claim: {exc}") from None
    expires_at = numeric_date(claims, "exp")
    if expires_at is None:
        raise JwtSvidError("token missing exp claim")
    aud = claims.get("aud")
    # RFC 7519 §4.1.3: a string or an array of strings; JWT-SVID §3: at least one.
    audience = (aud,) if isinstance(aud, str) else aud
    if (
        not isinstance(audience, (list, tuple))
        or not audience
        or not all(isinstance(a, str) and a for a in audience)
    ):
        raise JwtSvidError(f"token aud claim must hold one or more strings, got {aud!r}")
    return JwtSvid(
        token=token,
        spiffe_id=spiffe_id,
        audience=tuple(audience),
        expires_at=expires_at,
        issued_at=numeric_date(claims, "iat"),
        claims=dict(claims),
    )


def _leeway_seconds(leeway: float | dt.timedelta) -> float:
    seconds = leeway.total_seconds() if isinstance(leeway, dt.timedelta) else float(leeway)
    if seconds < 0:
        raise JwtSvidError(f"leeway must not be negative, got {leeway!r}")
    return seconds


def _check_times(svid: JwtSvid, now: dt.datetime, leeway: float) -> None:
    now = aware_utc(now, "now")
    slack = dt.timedelta(seconds=leeway)
    # RFC 7519 §4.1.4: the current time MUST be before exp (plus a small leeway).
    if now >= svid.expires_at + slack:
        raise JwtSvidError(
            f"token has expired (exp {svid.expires_at.isoformat()}, now {now.isoformat()})"
        )
    # RFC 7519 §4.1.5; iat in the future is rejected as go-jose does (SPIFFE-NOTES §3.2).
    nbf = numeric_date(svid.claims, "nbf")
    if nbf is not None and now + slack < nbf:
        raise JwtSvidError(f"token is not valid before {nbf.isoformat()}")
    if svid.issued_at is not None and now + slack < svid.issued_at:
        raise JwtSvidError(f"token was issued in the future ({svid.issued_at.isoformat()})")


def validate_jwt_svid(
    token: str,
    *,
    bundles: JwtBundleSource,
    audience: str,
    now: dt.datetime,
    leeway: float | dt.timedelta = 0,
) -> JwtSvid:
    """Validate a JWT-SVID (JWT-SVID §3, §4; SPIFFE Workload API ValidateJWTSVID).

    Order: compact form; alg allow-list; typ; sub, exp, aud present and well formed;
    kid present; the bundle of sub's trust domain; the key by kid; the key fits
    alg; the signature; exp/nbf/iat against ``now`` with ``leeway``; ``audience``
    is an element of aud.

    Args:
        token: the compact JWS.
        bundles: where to find JWT authorities, by trust domain.
        audience: the audience the caller expects; must be in ``aud``.
        now: the validation time (aware); the wall clock is never read.
        leeway: seconds (or a timedelta) of clock skew tolerated.

    Returns:
        The validated SVID.

    Raises:
        JwtSvidError: naming the failed check.
    """
    if not audience:
        raise JwtSvidError("an expected audience is required")
    slack = _leeway_seconds(leeway)
    header, claims = _parse_unverified(token)
    svid = _svid_from_claims(token, claims)
    kid = header.get("kid")
    if not kid:
        raise JwtSvidError("token header missing key id")
    td = svid.spiffe_id.trust_domain
    bundle = bundles.bundle_for(td)
    if bundle is None:
        raise JwtSvidError(f"no JWT bundle found for trust domain {td}")
    authority = bundle.jwt_authority(kid)
    if authority is None:
        raise JwtSvidError(f"no JWT authority {kid!r} found for trust domain {td}")
    alg = header["alg"]
    _check_key_fits(alg, authority.public_key)
    verify_key: Any = authority.public_key  # ML-DSA: see sign_jwt_svid
    try:
        jwt.decode(token, verify_key, algorithms=[alg], options=PYJWT_OPTIONS)
    except jwt.InvalidSignatureError:
        raise JwtSvidError(
            f"token signature does not verify with JWT authority {kid!r} of {td}"
        ) from None
    except jwt.PyJWTError as exc:
        raise JwtSvidError(f"token failed verification: {exc}") from None
    _check_times(svid, now, slack)
    if audience not in svid.audience:
        raise JwtSvidError(f"expected audience {audience!r} not in token aud {list(svid.audience)}")
    return svid


def parse_insecure(
    token: str,
    *,
    audience: Sequence[str],
    now: dt.datetime | None = None,
    leeway: float | dt.timedelta = 0,
) -> JwtSvid:
    """Parse a JWT-SVID without checking its signature.

    For tokens that came from a trusted source (our own agent), as go-spiffe's
    ``ParseInsecure``. The alg allow-list, typ, sub, exp and aud rules still apply.
    Every value in ``audience`` must be in ``aud`` (py-spiffe's rule, the stricter
    of the two clients).

    Args:
        token: the compact JWS.
        audience: the expected audiences (at least one).
        now: when given, exp/nbf/iat are checked against it; when None, no time
            check is made (the wall clock is never read here).
        leeway: seconds (or a timedelta) of skew tolerated when ``now`` is given.

    Returns:
        The parsed SVID.

    Raises:
        JwtSvidError: naming the failed check.
    """
    if isinstance(audience, str):
        raise JwtSvidError("audience must be a sequence of strings, not a single str")
    if not audience:
        raise JwtSvidError("at least one expected audience is required")
    slack = _leeway_seconds(leeway)
    _, claims = _parse_unverified(token)
    svid = _svid_from_claims(token, claims)
    if now is not None:
        _check_times(svid, now, slack)
    missing = [a for a in audience if a not in svid.audience]
    if missing:
        raise JwtSvidError(f"expected audience {missing} not in token aud {list(svid.audience)}")
    return svid
