"""identity.keys: generation, encodings, kid, strength rules."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from identity.errors import InvalidKeyError
from identity.keys import (
    KeyType,
    check_public_key_strength,
    generate_private_key,
    key_id,
    load_private_key_der,
    load_private_key_pem,
    load_public_key_der,
    private_key_to_pem,
    private_key_to_pkcs8_der,
    public_key_der,
    public_keys_equal,
)


@pytest.mark.parametrize(
    ("key_type", "cls", "size"),
    [
        (KeyType.EC_P256, ec.EllipticCurvePrivateKey, 256),
        (KeyType.EC_P384, ec.EllipticCurvePrivateKey, 384),
        (KeyType.RSA_2048, rsa.RSAPrivateKey, 2048),
    ],
)
def test_generate(key_type: KeyType, cls: type, size: int) -> None:
    key = generate_private_key(key_type)
    assert isinstance(key, cls)
    assert key.key_size == size


def test_default_is_p256() -> None:
    key = generate_private_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert KeyType.EC_P256.value == "ec-p256"


def test_round_trips() -> None:
    key = generate_private_key()
    der = private_key_to_pkcs8_der(key)
    pem = private_key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_keys_equal(load_private_key_der(der).public_key(), key.public_key())
    assert public_keys_equal(load_private_key_pem(pem).public_key(), key.public_key())
    spki = public_key_der(key)
    assert spki == public_key_der(key.public_key())
    assert public_keys_equal(load_public_key_der(spki), key.public_key())


def test_key_id_is_stable_32_chars() -> None:
    key = generate_private_key()
    kid = key_id(key.public_key())
    assert len(kid) == 32
    assert kid == key_id(load_public_key_der(public_key_der(key)))
    assert kid != key_id(generate_private_key().public_key())
    assert set(kid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: rsa.generate_private_key(65537, 1024).public_key(), "too weak"),
        (lambda: ec.generate_private_key(ec.SECP256K1()).public_key(), "secp256k1"),
        (lambda: ed25519.Ed25519PrivateKey.generate().public_key(), "unsupported"),
        (lambda: rsa.generate_private_key(65537, 2048).public_key(), None),
        (lambda: ec.generate_private_key(ec.SECP521R1()).public_key(), None),
    ],
)
def test_strength(make: object, error: str | None) -> None:
    pub = make()  # type: ignore[operator]
    if error is None:
        check_public_key_strength(pub)
    else:
        with pytest.raises(InvalidKeyError, match=error):
            check_public_key_strength(pub)


@pytest.mark.parametrize(
    ("loader", "data"),
    [
        (load_private_key_pem, b"not pem"),
        (load_private_key_der, b"\x30\x03\x02\x01\x00"),
        (load_public_key_der, b"garbage"),
    ],
)
def test_garbage_rejected(loader: object, data: bytes) -> None:
    with pytest.raises(InvalidKeyError):
        loader(data)  # type: ignore[operator]


def test_weak_private_key_rejected_on_load() -> None:
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(InvalidKeyError, match="too weak"):
        load_private_key_der(private_key_to_pkcs8_der(weak))  # type: ignore[arg-type]


def test_ed25519_private_key_rejected() -> None:
    from cryptography.hazmat.primitives import serialization

    der = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(InvalidKeyError, match="unsupported key type"):
        load_private_key_der(der)
