"""Private and public keys: generation, encodings, key IDs and strength rules.

Sigil signs with ECDSA (P-256 by default) or RSA; those are the key types every
SPIFFE implementation and TLS stack handles, and the ones the JWT-SVID standard's
algorithm table (JWT-SVID §2.1: RS*, ES*, PS*) can use. Ed25519 is deliberately
not offered: no JWT-SVID algorithm covers it.

JWT-SVIDs may also be signed with ML-DSA (FIPS 204; :mod:`identity.mldsa`), an
opt-in beyond the JWT-SVID standard's table. ML-DSA keys are JWT keys only: the
:data:`PrivateKey`/:data:`PublicKey` types, which X.509 and TLS code takes, stay
EC and RSA, and the ``Jwt*`` types and functions below add ML-DSA.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from identity import mldsa
from identity.errors import InvalidKeyError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
"""A private key Sigil can sign with."""

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
"""A public key Sigil can verify with."""

JwtPrivateKey = PrivateKey | mldsa.MlDsaPrivateKey
"""A private key Sigil can sign JWT-SVIDs with (EC, RSA or ML-DSA)."""

JwtPublicKey = PublicKey | mldsa.MlDsaPublicKey
"""A public key JWT-SVIDs can be verified with (EC, RSA or ML-DSA)."""

# RSA below 2048 bits is deprecated for signatures (NIST SP 800-131A); the web PKI
# and go-spiffe's test CAs agree.
MIN_RSA_BITS = 2048

# The curves of RFC 7518 §3.4 (ES256/384/512) and of the web PKI. Anything else
# has no JWS algorithm and is rejected by most TLS stacks.
ALLOWED_CURVES: frozenset[str] = frozenset({"secp256r1", "secp384r1", "secp521r1"})

# RSA public exponent: 65537 is the only value anyone should generate (RFC 8017
# recommends it; small exponents invite attacks on bad padding).
_RSA_EXPONENT = 65537


class KeyType(enum.Enum):
    """The key types Sigil generates."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_4096 = "rsa-4096"
    ML_DSA_44 = "ml-dsa-44"
    ML_DSA_65 = "ml-dsa-65"
    ML_DSA_87 = "ml-dsa-87"

    @property
    def jwt_only(self) -> bool:
        """ML-DSA: for JWT-SVID signing keys only (no X.509 CA, no TLS)."""
        return self in _ML_DSA_ALG


_ML_DSA_ALG = {KeyType.ML_DSA_44: mldsa.ML_DSA_44, KeyType.ML_DSA_65: mldsa.ML_DSA_65,
               KeyType.ML_DSA_87: mldsa.ML_DSA_87}


def generate_private_key(key_type: KeyType = KeyType.EC_P256) -> PrivateKey:
    """Generate a fresh private key.

    Args:
        key_type: which algorithm and size; P-256 by default.

    Returns:
        The new private key.

    Raises:
        InvalidKeyError: an ML-DSA type (those are JWT keys: :func:`generate_jwt_key`).
    """
    if key_type.jwt_only:
        raise InvalidKeyError(f"{key_type.value} keys sign JWT-SVIDs only, not certificates")
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if key_type is KeyType.RSA_2048:
        return rsa.generate_private_key(public_exponent=_RSA_EXPONENT, key_size=2048)
    return rsa.generate_private_key(public_exponent=_RSA_EXPONENT, key_size=4096)


def generate_jwt_key(key_type: KeyType) -> JwtPrivateKey:
    """Generate a fresh JWT-SVID signing key of any type, ML-DSA included.

    Args:
        key_type: which algorithm and size.

    Returns:
        The new private key.
    """
    if key_type.jwt_only:
        return mldsa.generate(_ML_DSA_ALG[key_type])
    return generate_private_key(key_type)


def jwt_key_type_of(key: JwtPrivateKey | JwtPublicKey) -> KeyType:
    """The :class:`KeyType` of a key (RSA above 4096 bits reads as rsa-4096).

    Args:
        key: a private or public key.

    Returns:
        Its key type.
    """
    alg = mldsa.algorithm_of(key)
    if alg is not None:
        return next(t for t, a in _ML_DSA_ALG.items() if a == alg)
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return KeyType.EC_P384 if key.curve.name == "secp384r1" else KeyType.EC_P256
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return KeyType.RSA_4096 if key.key_size >= 4096 else KeyType.RSA_2048
    raise InvalidKeyError(f"no key type for {type(key).__name__}")


def private_key_to_pkcs8_der(key: PrivateKey) -> bytes:
    """Encode a private key as unencrypted PKCS#8 DER.

    The Workload API carries keys in exactly this form (SPIFFE Workload API §5.3,
    ``x509_svid_key``).

    Args:
        key: the private key.

    Returns:
        PKCS#8 DER bytes.
    """
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_to_pem(key: JwtPrivateKey) -> bytes:
    """Encode a private key as an unencrypted PKCS#8 ``PRIVATE KEY`` PEM block.

    Args:
        key: the private key.

    Returns:
        PEM bytes.
    """
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _as_private_key(obj: object, what: str) -> PrivateKey:
    if isinstance(obj, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        check_public_key_strength(obj.public_key())
        return obj
    raise InvalidKeyError(f"{what}: unsupported key type {type(obj).__name__}; want EC or RSA")


def _parse_private_key(data: bytes, form: Literal["PEM", "DER"]) -> object:
    """What cryptography makes of unencrypted private key bytes in ``form``.

    Raises:
        InvalidKeyError: not that form, encrypted, or malformed.
    """
    load = (serialization.load_pem_private_key if form == "PEM"
            else serialization.load_der_private_key)
    try:
        return load(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKeyError(f"cannot parse {form} private key: {exc}") from None


def load_private_key_pem(data: bytes) -> PrivateKey:
    """Load an unencrypted private key from PEM (PKCS#8, or the legacy EC/RSA forms).

    Args:
        data: PEM bytes.

    Returns:
        The private key.

    Raises:
        InvalidKeyError: not PEM, encrypted, malformed, of another type, or too weak.
    """
    return _as_private_key(_parse_private_key(data, "PEM"), "PEM private key")


def load_jwt_private_key_pem(data: bytes) -> JwtPrivateKey:
    """Load an unencrypted JWT signing key from PEM: EC, RSA or ML-DSA (PKCS#8).

    What :func:`load_private_key_pem` accepts, and ML-DSA keys as well; it raises
    InvalidKeyError for the same reasons.
    """
    obj = _parse_private_key(data, "PEM")
    if mldsa.is_private_key(obj):
        return obj  # type: ignore[return-value]
    return _as_private_key(obj, "PEM private key")


def load_private_key_der(data: bytes) -> PrivateKey:
    """Load an unencrypted private key from DER (PKCS#8, or the legacy EC/RSA forms).

    Args:
        data: DER bytes.

    Returns:
        The private key.

    Raises:
        InvalidKeyError: malformed, encrypted, of another type, or too weak.
    """
    return _as_private_key(_parse_private_key(data, "DER"), "DER private key")


def public_key_der(key: JwtPublicKey | JwtPrivateKey) -> bytes:
    """Encode a public key as SubjectPublicKeyInfo DER.

    Args:
        key: a public key, or a private key whose public half is wanted.

    Returns:
        SPKI DER bytes.
    """
    pub = (
        key.public_key()
        if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                            *mldsa.PRIVATE_KEY_TYPES))
        else key
    )
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _parse_public_key_der(data: bytes) -> object:
    """What cryptography makes of SPKI DER bytes.

    Raises:
        InvalidKeyError: malformed, or of a type cryptography does not know.
    """
    try:
        return serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKeyError(f"cannot parse DER public key: {exc}") from None


def load_public_key_der(data: bytes) -> PublicKey:
    """Load a SubjectPublicKeyInfo DER public key.

    Args:
        data: SPKI DER bytes.

    Returns:
        The public key.

    Raises:
        InvalidKeyError: malformed, of another type, or too weak.
    """
    obj = _parse_public_key_der(data)
    if not isinstance(obj, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise InvalidKeyError(
            f"DER public key: unsupported key type {type(obj).__name__}; want EC or RSA"
        )
    check_public_key_strength(obj)
    return obj


def load_jwt_public_key_der(data: bytes) -> JwtPublicKey:
    """Load a SubjectPublicKeyInfo DER JWT key: EC, RSA or ML-DSA.

    What :func:`load_public_key_der` accepts, and ML-DSA keys as well; it raises
    InvalidKeyError for the same reasons.
    """
    obj = _parse_public_key_der(data)
    if mldsa.is_public_key(obj):
        return obj  # type: ignore[return-value]
    return load_public_key_der(data)


def key_id(public_key: JwtPublicKey) -> str:
    """A stable key ID: base64url (no padding) of the SHA-256 of the SPKI DER, 32 chars.

    Derived from the key, so the server and anyone holding the bundle compute the same
    kid, and a key keeps its kid across restarts. 24 bytes of the digest (192 bits) keep
    the kid short while collisions stay out of reach.

    Args:
        public_key: the public key.

    Returns:
        A 32-character kid.
    """
    digest = hashlib.sha256(public_key_der(public_key)).digest()
    return base64.urlsafe_b64encode(digest[:24]).decode("ascii")


def check_public_key_strength(pub: object) -> None:
    """Reject keys Sigil will not sign for or trust.

    Args:
        pub: a public key of any type.

    Raises:
        InvalidKeyError: not EC or RSA, RSA below 2048 bits, or a curve other than
            P-256, P-384 or P-521.
    """
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < MIN_RSA_BITS:
            raise InvalidKeyError(
                f"RSA key of {pub.key_size} bits is too weak; at least {MIN_RSA_BITS} required"
            )
        return
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ALLOWED_CURVES:
            raise InvalidKeyError(
                f"EC curve {pub.curve.name} is not allowed; use P-256, P-384 or P-521"
            )
        return
    raise InvalidKeyError(f"unsupported public key type {type(pub).__name__}; want EC or RSA")


def check_jwt_public_key(pub: object) -> None:
    """Reject keys Sigil will not trust for JWT-SVIDs: EC/RSA as above, or ML-DSA.

    Args:
        pub: a public key of any type.

    Raises:
        InvalidKeyError: not EC, RSA or ML-DSA, or a weak EC/RSA key.
    """
    if mldsa.is_public_key(pub):
        return  # every FIPS 204 parameter set is at least NIST category 2
    check_public_key_strength(pub)


def public_keys_equal(a: object, b: object) -> bool:
    """True when two public keys are the same key (compared by SPKI DER).

    Args:
        a: a public key (any type; non-keys compare unequal).
        b: a public key (any type).

    Returns:
        Whether both are EC/RSA public keys encoding to the same SubjectPublicKeyInfo.
    """
    def known(k: object) -> bool:
        return isinstance(k, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)) \
            or mldsa.is_public_key(k)

    if not known(a) or not known(b):
        return False
    return public_key_der(a) == public_key_der(b)  # type: ignore[arg-type]
