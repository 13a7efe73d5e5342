"""ML-DSA (FIPS 204) for JOSE: the algorithms ``ML-DSA-44/65/87`` and ``AKP`` JWKs.

The encoding is that of draft-ietf-cose-dilithium-11 ("ML-DSA for JOSE and
COSE", November 2025; published as RFC 9964 in May 2026 with the same JOSE
names):

- JWS ``alg``: ``ML-DSA-44``, ``ML-DSA-65``, ``ML-DSA-87`` (§5), pure ML-DSA
  (FIPS 204 Algorithm 2) with an empty context string; HashML-DSA is not
  registered (§7.2). The JWS signature is the raw FIPS 204 signature,
  base64url-encoded like any other.
- JWK (§3): ``{"kty": "AKP", "alg": "ML-DSA-65", "pub": <base64url of the
  FIPS 204 public key>}``. ``alg`` is REQUIRED for an AKP key and binds the key
  to one parameter set; ``priv`` (the 32-byte seed) never appears in a public
  key.

The signing and verification themselves are ``cryptography``'s (OpenSSL 3.5's
ML-DSA, bundled in its wheels); this module only names and encodes. It registers
the three algorithms with PyJWT's extension point (:func:`register`), so PyJWT
does the JWS compact serialization for them as for ES256.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import mldsa
from jwt.algorithms import Algorithm
from jwt.exceptions import InvalidKeyError as JwtInvalidKeyError

from identity.errors import InvalidKeyError

MlDsaPrivateKey = mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
"""An ML-DSA private key of any parameter set."""

MlDsaPublicKey = mldsa.MLDSA44PublicKey | mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey
"""An ML-DSA public key of any parameter set."""

PUBLIC_KEY_TYPES = (mldsa.MLDSA44PublicKey, mldsa.MLDSA65PublicKey, mldsa.MLDSA87PublicKey)
"""For ``isinstance``: the ML-DSA public key classes."""
PRIVATE_KEY_TYPES = (mldsa.MLDSA44PrivateKey, mldsa.MLDSA65PrivateKey,
                     mldsa.MLDSA87PrivateKey)
"""For ``isinstance``: the ML-DSA private key classes."""

ML_DSA_44 = "ML-DSA-44"
ML_DSA_65 = "ML-DSA-65"
ML_DSA_87 = "ML-DSA-87"
ALGORITHMS: tuple[str, ...] = (ML_DSA_44, ML_DSA_65, ML_DSA_87)
"""The JOSE algorithm names, weakest first."""

KTY = "AKP"
"""The JWK key type of ML-DSA keys (Algorithm Key Pair)."""

# FIPS 204 Table 2 (repeated in the draft's Table 1): public key and signature bytes.
PUBLIC_KEY_BYTES = {ML_DSA_44: 1312, ML_DSA_65: 1952, ML_DSA_87: 2592}
SIGNATURE_BYTES = {ML_DSA_44: 2420, ML_DSA_65: 3309, ML_DSA_87: 4627}

_PUBLIC_CLASSES: dict[str, type[Any]] = {
    ML_DSA_44: mldsa.MLDSA44PublicKey,
    ML_DSA_65: mldsa.MLDSA65PublicKey,
    ML_DSA_87: mldsa.MLDSA87PublicKey,
}
_PRIVATE_CLASSES: dict[str, type[Any]] = {
    ML_DSA_44: mldsa.MLDSA44PrivateKey,
    ML_DSA_65: mldsa.MLDSA65PrivateKey,
    ML_DSA_87: mldsa.MLDSA87PrivateKey,
}


def is_public_key(key: object) -> bool:
    """True for an ML-DSA public key of any parameter set."""
    return isinstance(key, PUBLIC_KEY_TYPES)


def is_private_key(key: object) -> bool:
    """True for an ML-DSA private key of any parameter set."""
    return isinstance(key, PRIVATE_KEY_TYPES)


def algorithm_of(key: object) -> str | None:
    """The JOSE algorithm an ML-DSA key (public or private) is bound to, else None.

    Args:
        key: any key object.

    Returns:
        ``ML-DSA-44``, ``ML-DSA-65`` or ``ML-DSA-87``, or None for other keys.
    """
    for alg in ALGORITHMS:
        if isinstance(key, (_PUBLIC_CLASSES[alg], _PRIVATE_CLASSES[alg])):
            return alg
    return None


def generate(alg: str) -> MlDsaPrivateKey:
    """A fresh ML-DSA private key for ``alg``.

    Args:
        alg: ``ML-DSA-44``, ``ML-DSA-65`` or ``ML-DSA-87``.

    Returns:
        The key.

    Raises:
        InvalidKeyError: another name.
    """
    cls = _PRIVATE_CLASSES.get(alg)
    if cls is None:
        raise InvalidKeyError(f"{alg!r} is not an ML-DSA algorithm")
    key: MlDsaPrivateKey = cls.generate()
    return key


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    # RFC 7515 §2: base64url without padding; refuse anything else (no silent
    # acceptance of standard base64 or stray characters).
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_jwk(key: MlDsaPublicKey) -> dict[str, str]:
    """The public JWK of an ML-DSA key: ``kty``, ``alg``, ``pub`` (draft §3, §5).

    Args:
        key: the public key.

    Returns:
        ``{"kty": "AKP", "alg": ..., "pub": ...}``.
    """
    alg = algorithm_of(key)
    if alg is None:
        raise InvalidKeyError(f"{type(key).__name__} is not an ML-DSA public key")
    return {"kty": KTY, "alg": alg, "pub": _b64url(key.public_bytes_raw())}


def public_key_from_jwk(jwk: dict[str, Any]) -> MlDsaPublicKey:
    """Load the public key of an ``AKP`` JWK whose ``alg`` is an ML-DSA algorithm.

    Args:
        jwk: the JWK members.

    Returns:
        The public key.

    Raises:
        InvalidKeyError: not AKP, ``alg`` missing or not ML-DSA, ``priv`` present,
            ``pub`` missing, not base64url, or of the wrong length.
    """
    if jwk.get("kty") != KTY:
        raise InvalidKeyError(f"kty must be {KTY!r} for an ML-DSA key, got {jwk.get('kty')!r}")
    alg = jwk.get("alg")
    if alg not in _PUBLIC_CLASSES:
        raise InvalidKeyError(f"an AKP key needs alg ML-DSA-44/65/87, got {alg!r}")
    if "priv" in jwk:
        raise InvalidKeyError("an AKP public key must not carry 'priv'")
    pub = jwk.get("pub")
    try:
        raw = _b64url_decode(pub)  # type: ignore[arg-type]
    except (ValueError, binascii.Error):
        raise InvalidKeyError(f"AKP 'pub' must be base64url, got {str(pub)[:20]!r}") from None
    if len(raw) != PUBLIC_KEY_BYTES[alg]:
        # FIPS 204 pkDecode takes exactly this many bytes; the draft (§7.3) asks
        # for the length check before use.
        raise InvalidKeyError(
            f"{alg} 'pub' must be {PUBLIC_KEY_BYTES[alg]} bytes, got {len(raw)}")
    try:
        key: MlDsaPublicKey = _PUBLIC_CLASSES[alg].from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidKeyError(f"{alg} 'pub' is not a valid key: {exc}") from None
    return key


class MlDsaAlgorithm(Algorithm):
    """PyJWT's view of one ML-DSA parameter set: sign and verify with a bound key.

    A key of another parameter set (or of another family) is refused in
    :meth:`prepare_key`, so a token can never be checked with a key its ``alg``
    does not name.
    """

    def __init__(self, alg: str) -> None:
        """Bind to ``alg`` (``ML-DSA-44``, ``ML-DSA-65`` or ``ML-DSA-87``)."""
        if alg not in _PUBLIC_CLASSES:
            raise ValueError(f"{alg!r} is not an ML-DSA algorithm")
        self.alg = alg
        self._types = (_PUBLIC_CLASSES[alg], _PRIVATE_CLASSES[alg])

    def prepare_key(self, key: Any) -> Any:
        """Accept only a key object of this parameter set (no PEM, no JWK text)."""
        if not isinstance(key, self._types):
            raise JwtInvalidKeyError(
                f"{self.alg} needs an {self.alg} key object, got {type(key).__name__}")
        return key

    def sign(self, msg: bytes, key: Any) -> bytes:
        """FIPS 204 ML-DSA.Sign with an empty context (draft §5)."""
        if not isinstance(key, _PRIVATE_CLASSES[self.alg]):
            raise JwtInvalidKeyError(f"{self.alg} signs with an {self.alg} private key")
        signature: bytes = key.sign(msg)
        return signature

    def verify(self, msg: bytes, key: Any, sig: bytes) -> bool:
        """FIPS 204 ML-DSA.Verify with an empty context; False on any mismatch."""
        if isinstance(key, _PRIVATE_CLASSES[self.alg]):
            key = key.public_key()
        if not isinstance(key, _PUBLIC_CLASSES[self.alg]):
            return False
        if len(sig) != SIGNATURE_BYTES[self.alg]:
            return False
        try:
            key.verify(sig, msg)
        except InvalidSignature:
            return False
        return True

    @staticmethod
    def to_jwk(key_obj: Any, as_dict: bool = False) -> Any:
        """The public JWK of an ML-DSA key (private keys give their public half)."""
        if is_private_key(key_obj):
            key_obj = key_obj.public_key()
        doc = public_jwk(key_obj)
        return doc if as_dict else json.dumps(doc)

    @staticmethod
    def from_jwk(jwk: Any) -> Any:
        """A public key from an AKP JWK (dict or JSON text)."""
        doc = json.loads(jwk) if isinstance(jwk, str) else jwk
        if not isinstance(doc, dict):
            raise JwtInvalidKeyError("a JWK must be a JSON object")
        try:
            return public_key_from_jwk(doc)
        except InvalidKeyError as exc:
            raise JwtInvalidKeyError(str(exc)) from None


_register_lock = threading.Lock()


def register() -> None:
    """Register ML-DSA-44/65/87 with PyJWT's default JWS object (idempotent).

    Registration only makes the names known: PyJWT still verifies with an
    algorithm only when the caller lists it in ``algorithms=``, and our
    validator lists exactly the one that fits the key found by ``kid``.
    """
    with _register_lock:
        for alg in ALGORITHMS:
            try:
                existing = jwt.get_algorithm_by_name(alg)
            except NotImplementedError:
                jwt.register_algorithm(alg, MlDsaAlgorithm(alg))
                continue
            if not isinstance(existing, MlDsaAlgorithm):
                # Someone else's handler under our name: verifying with it would
                # not be ours to vouch for.
                raise RuntimeError(f"PyJWT already has a foreign handler for {alg}")
