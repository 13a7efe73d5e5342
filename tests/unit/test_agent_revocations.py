"""The agent cache and revocations: revoked SVIDs are dropped and planned again."""

from __future__ import annotations

import datetime as dt

from identity import revocation as rv
from identity.jwtsvid import parse_insecure, sign_jwt_svid
from identity.keys import generate_private_key
from identity.spiffeid import SpiffeId
from tests.unit.test_agent_cache import T0, entry, make_cache, plan_ids, svid

MINUTE = dt.timedelta(minutes=1)


def test_a_revoked_serial_drops_the_svid_and_plans_a_new_one() -> None:
    cache = make_cache()
    cache.set_entries([entry("a", "spiffe://example.org/a"), entry("b", "spiffe://example.org/b")])
    a, b = svid("spiffe://example.org/a"), svid("spiffe://example.org/b")
    cache.set_x509_svid("a", a)
    cache.set_x509_svid("b", b)
    version = cache.version
    assert plan_ids(cache, T0) == []
    serial = rv.serial_text(a.leaf.serial_number)
    dropped = cache.apply_revocations([rv.Revocation(1, rv.X509_SERIAL, serial)], full=False)
    assert dropped == ["a"]
    assert cache.version > version  # streams are told
    assert set(cache.snapshot().svids) == {"b"}
    assert plan_ids(cache, T0) == ["a"]
    # A new SVID (another serial) is kept through the next syncs.
    cache.set_x509_svid("a", svid("spiffe://example.org/a"))
    assert cache.apply_revocations([], full=False) == []
    assert plan_ids(cache, T0) == []


def test_a_revoked_spiffe_id_drops_svids_issued_up_to_the_cutoff_only() -> None:
    cache = make_cache()
    cache.set_entries([entry("a", "spiffe://example.org/a")])
    cache.set_x509_svid("a", svid("spiffe://example.org/a", start=T0))
    cutoff = int(T0.timestamp())
    revocation = rv.Revocation(4, rv.X509_SPIFFE_ID, "spiffe://example.org/a",
                               not_before_max=cutoff)
    assert cache.apply_revocations([revocation], full=True) == ["a"]
    cache.set_x509_svid("a", svid("spiffe://example.org/a", start=T0 + MINUTE))
    assert cache.apply_revocations([revocation], full=False) == []
    assert set(cache.snapshot().svids) == {"a"}


def test_a_full_set_replaces_and_expired_revocations_are_forgotten() -> None:
    cache = make_cache()
    cache.apply_revocations([rv.Revocation(1, rv.JWT_ID, "j1"),
                             rv.Revocation(2, rv.JWT_ID, "j2", expires_at=int(T0.timestamp()))],
                            full=False, now=T0 - MINUTE)
    assert len(cache.revoked) == 2
    cache.apply_revocations([], full=False, now=T0)
    assert [r.value for r in cache.revoked.all()] == ["j1"]
    cache.apply_revocations([rv.Revocation(3, rv.JWT_KEY_ID, "k")], full=True, now=T0)
    assert [r.value for r in cache.revoked.all()] == ["k"]


def test_jwt_svids_are_revoked_by_jti_or_key_id() -> None:
    cache = make_cache()
    key = generate_private_key()

    def token(jti: str, kid: str) -> str:
        return sign_jwt_svid(spiffe_id=SpiffeId.parse("spiffe://example.org/a"),
                             audience=["x"], key=key, key_id=kid, issued_at=T0,
                             expires_at=T0 + MINUTE, jwt_id=jti)

    one, two = parse_insecure(token("j1", "k1"), audience=["x"]), parse_insecure(
        token("j2", "k2"), audience=["x"])
    assert one.claims["jti"] == "j1"
    assert not cache.jwt_revoked(one)
    cache.apply_revocations([rv.Revocation(1, rv.JWT_ID, "j1")], full=False)
    assert cache.jwt_revoked(one) and not cache.jwt_revoked(two)
    cache.apply_revocations([rv.Revocation(2, rv.JWT_KEY_ID, "k2")], full=False)
    assert cache.jwt_revoked(two)
