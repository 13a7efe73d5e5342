"""A key manager backed by a PKCS#11 module (an HSM, a cloud KMS bridge, SoftHSM).

Private keys are generated inside the token as sensitive, non-extractable objects
and never leave it: the CA signs through the module. cryptography (checked by
experiment with 50.0.2; older releases untested) accepts any object implementing the
``EllipticCurvePrivateKey`` / ``RSAPrivateKey`` interfaces in
``CertificateBuilder.sign``, and PyJWT only calls ``sign`` and ``curve`` on them,
so the keys here are such objects whose ``sign`` is a ``C_Sign`` call. That keeps
one certificate profile (identity.x509svid) for every key manager instead of a
second, hand-written TBS encoder.

A key's CKA_LABEL and CKA_ID are its key id. Sessions are not thread-safe in every
module, so one lock serialises every call into the module.
"""

from __future__ import annotations

import threading
from typing import Any, NoReturn

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key
from cryptography.utils import Buffer
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11.util.ec import (
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from ca.errors import KeyManagerError
from ca.keys import KeyHandle, check_key_id
from identity.keys import KeyType

_CURVES = {KeyType.EC_P256: "secp256r1", KeyType.EC_P384: "secp384r1"}
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_4096: 4096}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
_RSA_PKCS = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS,
             "sha512": Mechanism.SHA512_RSA_PKCS}
# Sensitive and not extractable: the token refuses to reveal the key, even wrapped.
_PRIVATE_TEMPLATE = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                     Attribute.SIGN: True, Attribute.TOKEN: True, Attribute.PRIVATE: True}


def _no_export() -> NoReturn:
    raise KeyManagerError("a PKCS#11 private key cannot be exported")


class _Signer:
    """The part of a key object that talks to the module."""

    def __init__(self, manager: Pkcs11KeyManager, key_id: str) -> None:
        self._manager = manager
        self._key_id = key_id

    def _sign(self, data: bytes, mechanism: Mechanism) -> bytes:
        return self._manager.sign(self._key_id, data, mechanism)


class Pkcs11EcPrivateKey(_Signer, ec.EllipticCurvePrivateKey):
    """An EC private key held by the token; ``sign`` returns a DER ECDSA signature."""

    def __init__(self, manager: Pkcs11KeyManager, key_id: str,
                 public: ec.EllipticCurvePublicKey) -> None:
        super().__init__(manager, key_id)
        self._public = public

    def sign(self, data: Buffer,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """Sign ``data`` (not pre-hashed) with ECDSA and the algorithm's hash."""
        algorithm = getattr(signature_algorithm, "algorithm", None)
        if not isinstance(algorithm, hashes.HashAlgorithm):
            raise KeyManagerError("PKCS#11 keys sign whole messages, not prehashed digests")
        hash_cls = _HASHES.get(algorithm.name)
        if hash_cls is None:
            raise KeyManagerError(f"unsupported ECDSA hash {algorithm.name}")
        # Hash here and sign the digest with plain CKM_ECDSA: every module has it,
        # while the combined CKM_ECDSA_SHA256 is missing from some (SoftHSM 2.6).
        digest = hashes.Hash(hash_cls())
        digest.update(bytes(data))
        # The module returns r||s (PKCS#11 §2.3.1); X.509 and PyJWT expect DER.
        return encode_ecdsa_signature(self._sign(digest.finalize(), Mechanism.ECDSA))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The public half (read from the token when the key was found)."""
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        """The key's curve."""
        return self._public.curve

    @property
    def key_size(self) -> int:
        """Bit length of the curve."""
        return self._public.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """Not supported: CA keys only sign."""
        raise KeyManagerError("PKCS#11 CA keys only sign")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        """Never: the key is not extractable."""
        _no_export()

    def private_bytes(self, *_args: Any, **_kwargs: Any) -> bytes:
        """Never: the key is not extractable."""
        _no_export()

    def __copy__(self) -> Pkcs11EcPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11EcPrivateKey:
        return self


class Pkcs11RsaPrivateKey(_Signer, rsa.RSAPrivateKey):
    """An RSA private key held by the token; PKCS#1 v1.5 signatures only."""

    def __init__(self, manager: Pkcs11KeyManager, key_id: str, public: rsa.RSAPublicKey) -> None:
        super().__init__(manager, key_id)
        self._public = public

    def sign(self, data: Buffer, padding: padding.AsymmetricPadding,
             algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo) -> bytes:
        """Sign ``data`` with RSASSA-PKCS1-v1_5 (what RS256 and our certificates use)."""
        if (not isinstance(padding, _PKCS1v15)
                or not isinstance(algorithm, hashes.HashAlgorithm)):
            raise KeyManagerError("PKCS#11 RSA keys sign with PKCS#1 v1.5 on whole messages")
        mech = _RSA_PKCS.get(algorithm.name)
        if mech is None:
            raise KeyManagerError(f"unsupported RSA hash {algorithm.name}")
        return self._sign(bytes(data), mech)

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half."""
        return self._public

    @property
    def key_size(self) -> int:
        """Modulus length in bits."""
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        """Not supported: CA keys only sign."""
        raise KeyManagerError("PKCS#11 CA keys only sign")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        """Never: the key is not extractable."""
        _no_export()

    def private_bytes(self, *_args: Any, **_kwargs: Any) -> bytes:
        """Never: the key is not extractable."""
        _no_export()

    def __copy__(self) -> Pkcs11RsaPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11RsaPrivateKey:
        return self


_PKCS1v15 = padding.PKCS1v15


class Pkcs11KeyManager:
    """Keys in a PKCS#11 token, found by label; signs through the module.

    Args:
        module_path: the PKCS#11 library, e.g. ``/usr/lib/softhsm/libsofthsm2.so``.
        token_label: the token to use.
        pin: the user PIN of that token.

    Raises:
        KeyManagerError: the module cannot be loaded, the token is absent, or the
            PIN is refused.
    """

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        self._lock = threading.RLock()
        try:
            lib = pkcs11.lib(module_path)
            token = lib.get_token(token_label=token_label)
            self._session = token.open(user_pin=pin, rw=True)
        except pkcs11.NoSuchToken:
            raise KeyManagerError(f"PKCS#11 token {token_label!r} not found in "
                                  f"{module_path}") from None
        except pkcs11.PinIncorrect:
            raise KeyManagerError(f"PKCS#11 token {token_label!r}: the PIN was refused") from None
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
            raise KeyManagerError(f"cannot open PKCS#11 token {token_label!r} with "
                                  f"{module_path}: {exc.__class__.__name__} {exc}") from None

    def close(self) -> None:
        """Close the session with the token."""
        with self._lock:
            self._session.close()

    def _find(self, key_id: str, cls: ObjectClass) -> list[Any]:
        return list(self._session.get_objects({Attribute.LABEL: key_id,
                                                 Attribute.CLASS: cls}))

    def _delete(self, key_id: str) -> None:
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in self._find(key_id, cls):
                obj.destroy()

    def generate_key(self, key_id: str, key_type: KeyType) -> KeyHandle:
        """Generate (or replace) the key ``key_id`` inside the token."""
        check_key_id(key_id)
        if key_type.jwt_only:
            raise KeyManagerError(f"the PKCS#11 key store cannot make {key_type.value} keys "
                                  "(PKCS#11 3.2 ML-DSA mechanisms are not used yet): use "
                                  "an EC or RSA jwt_key_type, or the disk key store")
        with self._lock:
            try:
                self._delete(key_id)
                common: dict[str, Any] = {"id": key_id.encode(), "label": key_id,
                                          "store": True,
                                          "private_template": _PRIVATE_TEMPLATE}
                if key_type in _CURVES:
                    params = self._session.create_domain_parameters(
                        P11KeyType.EC,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type])},
                        local=True)
                    params.generate_keypair(**common)
                else:
                    self._session.generate_keypair(P11KeyType.RSA, _RSA_BITS[key_type], **common)
            except pkcs11.PKCS11Error as exc:
                raise KeyManagerError(f"cannot generate key {key_id} in the PKCS#11 token: "
                                      f"{exc.__class__.__name__}") from None
        handle = self.get_key(key_id)
        if handle is None:  # pragma: no cover - the token just stored it
            raise KeyManagerError(f"the PKCS#11 token lost key {key_id}")
        return handle

    def get_key(self, key_id: str) -> KeyHandle | None:
        """The key ``key_id`` as a signer object, or None when the token has none."""
        check_key_id(key_id)
        with self._lock:
            try:
                pubs = self._find(key_id, ObjectClass.PUBLIC_KEY)
                privs = self._find(key_id, ObjectClass.PRIVATE_KEY)
                if not pubs or not privs:
                    return None
                pub_obj = pubs[0]
                if pub_obj.key_type == P11KeyType.EC:
                    public = load_der_public_key(encode_ec_public_key(pub_obj))
                else:
                    public = rsa.RSAPublicNumbers(
                        int.from_bytes(pub_obj[Attribute.PUBLIC_EXPONENT], "big"),
                        int.from_bytes(pub_obj[Attribute.MODULUS], "big"),
                    ).public_key()
            except pkcs11.PKCS11Error as exc:
                raise KeyManagerError(f"cannot read key {key_id} from the PKCS#11 token: "
                                      f"{exc.__class__.__name__}") from None
        if isinstance(public, ec.EllipticCurvePublicKey):
            key_type = KeyType.EC_P384 if public.curve.name == "secp384r1" else KeyType.EC_P256
            return KeyHandle(key_id, key_type, Pkcs11EcPrivateKey(self, key_id, public),
                             external=True)
        if isinstance(public, rsa.RSAPublicKey):
            key_type = KeyType.RSA_4096 if public.key_size >= 4096 else KeyType.RSA_2048
            return KeyHandle(key_id, key_type, Pkcs11RsaPrivateKey(self, key_id, public),
                             external=True)
        raise KeyManagerError(f"key {key_id} in the PKCS#11 token is neither EC nor RSA")

    def sign(self, key_id: str, data: bytes, mechanism: Mechanism) -> bytes:
        """Sign ``data`` with the token's private key ``key_id`` (raw module output).

        Raises:
            KeyManagerError: the key is gone or the module refused.
        """
        with self._lock:
            try:
                privs = self._find(key_id, ObjectClass.PRIVATE_KEY)
                if not privs:
                    raise KeyManagerError(f"key {key_id} is no longer in the PKCS#11 token")
                return bytes(privs[0].sign(data, mechanism=mechanism))
            except pkcs11.PKCS11Error as exc:
                raise KeyManagerError(f"the PKCS#11 token refused to sign with {key_id}: "
                                      f"{exc.__class__.__name__}") from None

    def private_key_attributes(self, key_id: str) -> dict[str, bool]:
        """SENSITIVE / EXTRACTABLE of the stored private key (for audits and tests)."""
        with self._lock:
            privs = self._find(key_id, ObjectClass.PRIVATE_KEY)
            if not privs:
                raise KeyManagerError(f"key {key_id} not found in the PKCS#11 token")
            return {"sensitive": bool(privs[0][Attribute.SENSITIVE]),
                    "extractable": bool(privs[0][Attribute.EXTRACTABLE])}
