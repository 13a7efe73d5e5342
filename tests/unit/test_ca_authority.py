"""ca.authority and ca.keys: CA creation, reuse, signing limits, key files."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import migrations
from ca.authority import AuthorityConfig, CertificateAuthority
from ca.datastore import Datastore
from ca.keys import DiskKeyManager, KeyHandle, MemoryKeyManager
from identity.clock import FakeClock
from identity.errors import X509SvidError
from identity.keys import KeyType, generate_private_key
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import verify_chain
from tests.unit.test_x509svid import _FaultySigner

TD = TrustDomain("example.org")


def _ca(tmp_path: Path, clock: FakeClock, keys: object) -> CertificateAuthority:
    url = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(url)
    ca = CertificateAuthority(AuthorityConfig(
        trust_domain=TD, datastore=Datastore(url), key_manager=keys,  # type: ignore[arg-type]
        clock=clock, ca_ttl=dt.timedelta(hours=2)))
    ca.load_or_create()
    return ca


def test_ca_is_reused_after_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    keys = DiskKeyManager(tmp_path / "keys")
    first = _ca(tmp_path, clock, keys)
    second = _ca(tmp_path, clock, keys)
    assert first.bundle() == second.bundle()
    assert second.bundle().sequence_number == 1
    root = first.ca_certificate()
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert root.not_valid_after_utc - clock.now() == dt.timedelta(hours=2)


def test_svid_never_outlives_ca(tmp_path: Path) -> None:
    clock = FakeClock()
    ca = _ca(tmp_path, clock, MemoryKeyManager())
    key = generate_private_key()
    (leaf,) = ca.sign_x509_svid(SpiffeId.parse("spiffe://example.org/w"), key.public_key(),
                                ttl=dt.timedelta(days=30))
    assert leaf.not_valid_after_utc == ca.ca_certificate().not_valid_after_utc
    jwt = ca.sign_jwt_svid(SpiffeId.parse("spiffe://example.org/w"), ["a"],
                           ttl=dt.timedelta(days=30))
    assert jwt.expires_at <= clock.now() + dt.timedelta(hours=2)


def test_server_tls_chain_has_ca(tmp_path: Path) -> None:
    ca = _ca(tmp_path, FakeClock(), MemoryKeyManager())
    leaf, root = ca.sign_server_tls(generate_private_key().public_key(),
                                    ttl=dt.timedelta(minutes=5))
    assert root == ca.ca_certificate()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.sigil.invalid"]


def test_disk_keys_are_private(tmp_path: Path) -> None:
    keys = DiskKeyManager(tmp_path / "keys")
    handle = keys.generate_key("x509-ca-1", KeyType.EC_P256)
    path = tmp_path / "keys" / "x509-ca-1.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    loaded = keys.get_key("x509-ca-1")
    assert loaded is not None and loaded.public_key == handle.public_key
    assert keys.get_key("absent") is None
    assert "BEGIN" not in repr(handle)


@pytest.mark.parametrize("key_id", ["", "../x", "a/b", ".hidden"])
def test_bad_key_ids(tmp_path: Path, key_id: str) -> None:
    from ca.errors import KeyManagerError

    with pytest.raises(KeyManagerError):
        DiskKeyManager(tmp_path).generate_key(key_id, KeyType.EC_P256)


def _claims(token: str) -> dict[str, object]:
    import jwt as pyjwt

    return pyjwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


def test_jwt_svids_carry_the_oidc_issuer_only_when_discovery_is_on(tmp_path: Path) -> None:
    from ca.authority.setup import build_authority
    from ca.config.server import load_config

    sid = SpiffeId.parse("spiffe://example.org/w")
    (tmp_path / "a").mkdir()
    plain = _ca(tmp_path / "a", FakeClock(), MemoryKeyManager())
    assert "iss" not in _claims(plain.sign_jwt_svid(sid, ["x"], ttl=dt.timedelta(minutes=5)).token)

    (tmp_path / "b" / "data").mkdir(parents=True)
    conf = tmp_path / "b" / "server.toml"
    conf.write_text(
        'trust_domain = "example.org"\n'
        f'data_dir = "{tmp_path / "b" / "data"}"\n'
        '[oidc_discovery]\naddress = "127.0.0.1:0"\ndomain = "oidc.example.org"\n'
        f'cert_file = "{tmp_path / "c.pem"}"\nkey_file = "{tmp_path / "k.pem"}"\n'
    )
    cfg = load_config(conf, env={})
    url = f"sqlite:///{tmp_path / 'b' / 'ds.sqlite3'}"
    migrations.upgrade(url)
    ca = build_authority(cfg, Datastore(url), FakeClock(), key_manager=MemoryKeyManager())
    token = ca.sign_jwt_svid(sid, ["x"], ttl=dt.timedelta(minutes=5)).token
    # Cloud identity providers match iss against the discovery document's issuer.
    assert _claims(token)["iss"] == "https://oidc.example.org"


class _FaultyHsm(MemoryKeyManager):
    """Keys whose signatures come from another key: a faulty signer, as an HSM can be.

    ``external`` says whether the handles present the keys as living outside the
    process (as PKCS#11 handles do).
    """

    def __init__(self, *, external: bool) -> None:
        super().__init__()
        self._external = external
        self.signers: list[_FaultySigner] = []

    def generate_key(self, key_id: str, key_type: KeyType) -> KeyHandle:
        real = super().generate_key(key_id, key_type)
        assert isinstance(real.private_key, ec.EllipticCurvePrivateKey)
        signer = _FaultySigner(real.private_key, faulty=False)
        self.signers.append(signer)
        handle = KeyHandle(key_id, key_type, signer, external=self._external)
        self._keys[key_id] = handle
        return handle


@pytest.mark.parametrize("external", [True, False])
def test_signatures_of_external_keys_are_verified_before_use(
    tmp_path: Path, external: bool
) -> None:
    hsm = _FaultyHsm(external=external)
    ca = _ca(tmp_path, FakeClock(), hsm)
    for signer in hsm.signers:  # the CA was made; its key now signs wrongly
        signer.faulty = True
    workload = SpiffeId.parse("spiffe://example.org/w")
    key = generate_private_key()
    if external:
        with pytest.raises(X509SvidError, match="does not verify against its issuer"):
            ca.sign_x509_svid(workload, key.public_key(), ttl=dt.timedelta(minutes=5))
    else:
        # An in-process key is not re-verified on the server; the agent's check of
        # every SVID against the bundle is what rejects such a leaf.
        (leaf,) = ca.sign_x509_svid(workload, key.public_key(), ttl=dt.timedelta(minutes=5))
        with pytest.raises(X509SvidError):
            verify_chain([leaf], ca.bundle(), now=FakeClock().now())
