"""The server's WIT-SVID signing authority: its own slot, rotated like the JWT key.

WIT-SVID §6.1 (kid unique in the bundle across jwt-svid and wit-svid keys) and
§2.3 (RS/ES/PS only) are why it is not the JWT key; docs/standards.md, "WIT-SVID".
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

import migrations
from ca.authority import (
    KIND_JWT,
    KIND_WIT,
    AuthorityConfig,
    CertificateAuthority,
)
from ca.datastore import Datastore
from ca.keys import MemoryKeyManager
from identity.clock import FakeClock
from identity.keys import KeyType, generate_private_key, jwt_key_type_of
from identity.spiffeid import SpiffeId, TrustDomain
from identity.witsvid import ReplayCache, sign_wpt, validate_wit_svid, verify_presentation

TD = TrustDomain("example.org")
H = dt.timedelta(hours=1)
WORKLOAD = SpiffeId.parse("spiffe://example.org/w")


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(u)
    return u


def _ca(url: str, clock: FakeClock, keys: MemoryKeyManager,
        jwt_key_type: KeyType = KeyType.EC_P256) -> CertificateAuthority:
    ca = CertificateAuthority(AuthorityConfig(
        trust_domain=TD, datastore=Datastore(url), key_manager=keys, clock=clock,
        ca_ttl=24 * H, owner="a", safety_margin=dt.timedelta(minutes=10),
        jwt_key_type=jwt_key_type))
    ca.load_or_create()
    return ca


def test_wit_key_is_its_own_and_signs_valid_wit_svids(url: str) -> None:
    clock = FakeClock()
    ca = _ca(url, clock, MemoryKeyManager())
    bundle = ca.bundle()
    wit_kids = {a.key_id for a in bundle.wit_authorities}
    jwt_kids = {a.key_id for a in bundle.jwt_authorities}
    assert len(wit_kids) == 1 and len(jwt_kids) == 1 and not wit_kids & jwt_kids
    key = generate_private_key()
    signed = ca.sign_wit_svid(WORKLOAD, key.public_key(), ttl=dt.timedelta(minutes=5))
    now = clock.now()
    wit = validate_wit_svid(signed.token, bundles=bundle, now=now)
    assert wit.spiffe_id == WORKLOAD
    assert signed.expires_at - signed.issued_at == dt.timedelta(minutes=5)
    proof = sign_wpt(wit_token=signed.token, key=key, audience="https://a/",
                     expires_at=now + dt.timedelta(seconds=30))
    assert verify_presentation(signed.token, proof, bundles=bundle, audience="https://a/",
                               now=now, replay_cache=ReplayCache()).spiffe_id == WORKLOAD


def test_wit_slot_rotates_on_the_same_timeline(url: str) -> None:
    clock = FakeClock()
    ca = _ca(url, clock, MemoryKeyManager())
    assert [a.status for a in ca.list_authorities(KIND_WIT)] == ["active"]
    clock.advance(12 * H)
    ca.tick()
    assert [a.status for a in ca.list_authorities(KIND_WIT)] == ["active", "prepared"]
    assert len(ca.bundle().wit_authorities) == 2  # published before it signs
    clock.advance(8 * H)
    ca.tick()
    assert [a.status for a in ca.list_authorities(KIND_WIT)] == ["old", "active"]
    new_kid = ca.list_authorities(KIND_WIT)[1].authority_id
    signed = ca.sign_wit_svid(WORKLOAD, generate_private_key().public_key(), ttl=H / 12)
    assert validate_wit_svid(signed.token, bundles=ca.bundle(), now=clock.now()).claims
    import jwt

    assert jwt.get_unverified_header(signed.token)["kid"] == new_kid


def test_operator_steps_for_wit(url: str) -> None:
    ca = _ca(url, FakeClock(), MemoryKeyManager())
    prepared = ca.prepare(KIND_WIT)
    assert prepared.status == "prepared"
    ca.activate(KIND_WIT)
    by_status = {a.status: a for a in ca.list_authorities(KIND_WIT)}
    assert sorted(by_status) == ["active", "old"]
    old, active = by_status["old"], by_status["active"]
    assert active.authority_id == prepared.authority_id
    ca.taint(KIND_WIT, old.authority_id)
    ca.revoke(KIND_WIT, old.authority_id, force=True)
    assert [a.key_id for a in ca.bundle().wit_authorities] == [active.authority_id]
    assert len(ca.list_authorities(KIND_JWT)) == 1  # the JWT key is not touched


def test_ml_dsa_jwt_keys_leave_the_wit_key_ec(url: str) -> None:
    keys = MemoryKeyManager()
    ca = _ca(url, FakeClock(), keys, jwt_key_type=KeyType.ML_DSA_65)
    (jwt_auth,) = ca.bundle().jwt_authorities
    (wit_auth,) = ca.bundle().wit_authorities
    assert jwt_key_type_of(jwt_auth.public_key) is KeyType.ML_DSA_65
    assert jwt_key_type_of(wit_auth.public_key) is KeyType.EC_P256  # WIT-SVID §2.3
