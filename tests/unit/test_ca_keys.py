"""One contract for every key manager: disk, memory and PKCS#11 (SoftHSM2).

Like SPIRE's keymanagertest: the same tests run against each implementation, so
the CA can rely on the Protocol alone.
"""

from __future__ import annotations

import datetime as dt
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ca.errors import KeyManagerError
from ca.keys import DiskKeyManager, KeyManager, MemoryKeyManager
from identity.bundle import Bundle, BundleSet, JwtAuthority
from identity.clock import FakeClock
from identity.jwtsvid import sign_jwt_svid, validate_jwt_svid
from identity.keys import KeyType, key_id
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import new_ca_certificate, new_svid_certificate, verify_chain
from tests import softhsm

TD = TrustDomain("example.org")
ALL_TYPES = [k for k in KeyType if not k.jwt_only]
ML_DSA_TYPES = [k for k in KeyType if k.jwt_only]


@pytest.fixture(params=["disk", "memory", "pkcs11"])
def manager(request: pytest.FixtureRequest, tmp_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyManager]:
    if request.param == "disk":
        yield DiskKeyManager(tmp_path / "keys")
    elif request.param == "memory":
        yield MemoryKeyManager()
    else:
        token = softhsm.make_token(tmp_path_factory)
        from ca.keys.pkcs11 import Pkcs11KeyManager

        km = Pkcs11KeyManager(token.module_path, token.token_label, token.pin)
        yield km
        km.close()


def _verify(key_type: KeyType, public: object, signature: bytes, data: bytes) -> None:
    if key_type in (KeyType.EC_P256, KeyType.EC_P384):
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("key_type", ALL_TYPES, ids=[k.value for k in ALL_TYPES])
def test_generate_get_sign_verify(manager: KeyManager, key_type: KeyType) -> None:
    handle = manager.generate_key("x509-ca-1", key_type)
    assert handle.key_id == "x509-ca-1"
    assert handle.key_type is key_type
    again = manager.get_key("x509-ca-1")
    assert again is not None
    assert again.key_type is key_type
    assert key_id(again.public_key) == key_id(handle.public_key)
    data = b"to be signed"
    if key_type in (KeyType.EC_P256, KeyType.EC_P384):
        assert isinstance(again.private_key, ec.EllipticCurvePrivateKey)
        sig = again.private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(again.private_key, rsa.RSAPrivateKey)
        sig = again.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    _verify(key_type, handle.public_key, sig, data)
    expected_bits = {KeyType.EC_P256: 256, KeyType.EC_P384: 384, KeyType.RSA_2048: 2048,
                     KeyType.RSA_4096: 4096}[key_type]
    assert again.public_key.key_size == expected_bits


@pytest.mark.parametrize("key_type", ML_DSA_TYPES, ids=[k.value for k in ML_DSA_TYPES])
def test_ml_dsa_jwt_keys(manager: KeyManager, key_type: KeyType) -> None:
    if not isinstance(manager, (DiskKeyManager, MemoryKeyManager)):
        # PKCS#11: refused before the token is touched; no key is left behind.
        with pytest.raises(KeyManagerError, match=f"cannot make {key_type.value} keys"):
            manager.generate_key("jwt-1", key_type)
        assert manager.get_key("jwt-1") is None
        return
    handle = manager.generate_key("jwt-1", key_type)
    again = manager.get_key("jwt-1")
    assert again is not None and again.key_type is key_type
    assert key_id(again.public_key) == key_id(handle.public_key)
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    token = sign_jwt_svid(spiffe_id=SpiffeId.parse("spiffe://example.org/w"), audience=["a"],
                          key=again.private_key, key_id="k", issued_at=now,
                          expires_at=now + dt.timedelta(minutes=5))
    bundles = BundleSet([Bundle(TD, jwt_authorities=(JwtAuthority("k", handle.public_key),))])
    assert validate_jwt_svid(token, bundles=bundles, audience="a", now=now).claims["sub"] \
        == "spiffe://example.org/w"
    # Never a certificate signer.
    with pytest.raises(KeyManagerError, match="signs JWT-SVIDs only"):
        _ = again.x509_key
    if isinstance(manager, DiskKeyManager):
        path = manager.directory / "jwt-1.pem"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert b"BEGIN PRIVATE KEY" in path.read_bytes()


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048],
                         ids=["ec-p256", "ec-p384", "rsa-2048"])
def test_ca_and_jwt_signing_through_the_manager(manager: KeyManager, key_type: KeyType) -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    ca = manager.generate_key("ca", key_type)
    cert = new_ca_certificate(trust_domain=TD, public_key=ca.public_key,
                              signer_key=ca.private_key, not_before=now,
                              not_after=now + dt.timedelta(hours=1))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    workload = SpiffeId.parse("spiffe://example.org/w")
    leaf = new_svid_certificate(spiffe_id=workload, public_key=leaf_key.public_key(),
                                ca_cert=cert, ca_key=ca.private_key, not_before=now,
                                not_after=now + dt.timedelta(minutes=5))
    bundle = Bundle(TD, (cert,), (JwtAuthority(key_id(ca.public_key), ca.public_key, None),),
                    None, None)
    assert verify_chain((leaf,), BundleSet([bundle]), now=now) == workload
    token = sign_jwt_svid(spiffe_id=workload, audience=["db"], key=ca.private_key,
                          key_id=key_id(ca.public_key), issued_at=now,
                          expires_at=now + dt.timedelta(minutes=5))
    svid = validate_jwt_svid(token, bundles=BundleSet([bundle]), audience="db", now=now)
    assert svid.spiffe_id == workload


def test_missing_key_is_none(manager: KeyManager) -> None:
    assert manager.get_key("never-made") is None


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "a/b", ".hidden", "x" * 200])
def test_invalid_key_id_is_refused(manager: KeyManager, bad: str) -> None:
    with pytest.raises(KeyManagerError, match="invalid key id"):
        manager.generate_key(bad, KeyType.EC_P256)
    with pytest.raises(KeyManagerError, match="invalid key id"):
        manager.get_key(bad)


def test_generate_replaces(manager: KeyManager) -> None:
    first = manager.generate_key("k", KeyType.EC_P256)
    second = manager.generate_key("k", KeyType.EC_P256)
    got = manager.get_key("k")
    assert got is not None
    assert key_id(got.public_key) == key_id(second.public_key) != key_id(first.public_key)


def test_repr_shows_no_key_material(manager: KeyManager) -> None:
    handle = manager.generate_key("k", KeyType.EC_P256)
    assert repr(handle) == "KeyHandle(key_id='k', key_type=ec-p256)"


def test_disk_files_are_private(tmp_path: Path) -> None:
    km = DiskKeyManager(tmp_path / "keys")
    km.generate_key("k", KeyType.EC_P256)
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    path = tmp_path / "keys" / "k.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8


def test_disk_corrupt_file_is_an_error(tmp_path: Path) -> None:
    km = DiskKeyManager(tmp_path / "keys")
    km.generate_key("k", KeyType.EC_P256)
    (tmp_path / "keys" / "k.pem").write_text("garbage")
    with pytest.raises(KeyManagerError, match="key file for k is invalid"):
        km.get_key("k")


def test_pkcs11_keys_never_leave_the_token(tmp_path_factory: pytest.TempPathFactory) -> None:
    token = softhsm.make_token(tmp_path_factory)
    from ca.keys.pkcs11 import Pkcs11KeyManager

    km = Pkcs11KeyManager(token.module_path, token.token_label, token.pin)
    try:
        for key_type in (KeyType.EC_P256, KeyType.RSA_2048):
            handle = km.generate_key(f"k-{key_type.value}", key_type)
            assert km.private_key_attributes(handle.key_id) == {
                "sensitive": True, "extractable": False}
            with pytest.raises(KeyManagerError, match="cannot be exported"):
                handle.private_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption())
            with pytest.raises(KeyManagerError, match="cannot be exported"):
                handle.private_key.private_numbers()
    finally:
        km.close()


def test_pkcs11_bad_token_and_pin(tmp_path_factory: pytest.TempPathFactory) -> None:
    token = softhsm.make_token(tmp_path_factory)
    from ca.keys.pkcs11 import Pkcs11KeyManager

    with pytest.raises(KeyManagerError, match="token 'nope' not found"):
        Pkcs11KeyManager(token.module_path, "nope", token.pin)
    with pytest.raises(KeyManagerError, match="the PIN was refused"):
        Pkcs11KeyManager(token.module_path, token.token_label, "0000")
    with pytest.raises(KeyManagerError, match="cannot open PKCS#11 token"):
        Pkcs11KeyManager("/nonexistent/lib.so", token.token_label, token.pin)


def test_fake_clock_unused_marker() -> None:
    # FakeClock import keeps the contract test ready for time-based checks.
    assert FakeClock().now().year == 2030
