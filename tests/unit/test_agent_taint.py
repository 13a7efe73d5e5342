"""agent/taint.py and Cache.rotation_plan: SVIDs signed by a tainted CA rotate early."""

from __future__ import annotations

import datetime as dt

from cryptography.hazmat.primitives.serialization import Encoding

from agent.taint import load_tainted, signed_by_tainted
from identity.clock import FakeClock
from identity.keys import generate_private_key
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate
from tests.unit.test_agent_cache import T0, entry, make_cache

TD = TrustDomain("example.org")


def _ca() -> tuple[object, object]:
    key = generate_private_key()
    cert = new_ca_certificate(trust_domain=TD, public_key=key.public_key(), signer_key=key,
                              not_before=T0 - dt.timedelta(hours=1),
                              not_after=T0 + dt.timedelta(days=1))
    return cert, key


def _svid(ca: tuple[object, object], sid: str) -> X509Svid:
    cert, key = ca
    leaf_key = generate_private_key()
    leaf = new_svid_certificate(spiffe_id=SpiffeId.parse(sid), public_key=leaf_key.public_key(),
                                ca_cert=cert, ca_key=key, not_before=T0,  # type: ignore[arg-type]
                                not_after=T0 + dt.timedelta(hours=1))
    return X509Svid(SpiffeId.parse(sid), (leaf,), leaf_key)


def test_signed_by_tainted_matches_signature_not_just_name() -> None:
    old, new = _ca(), _ca()
    svid = _svid(old, "spiffe://example.org/a")
    assert signed_by_tainted(svid, [old[0]])  # type: ignore[list-item]
    # Same subject name (every CA of a trust domain has it), other key: no match.
    assert not signed_by_tainted(svid, [new[0]])  # type: ignore[list-item]
    assert not signed_by_tainted(svid, [])


def test_load_tainted_ignores_garbage() -> None:
    cert, _ = _ca()
    der = cert.public_bytes(Encoding.DER)  # type: ignore[attr-defined]
    assert load_tainted([b"not a certificate", der]) == (cert,)


def test_rotation_plan_reissues_svids_of_a_tainted_ca_at_once() -> None:
    old, new = _ca(), _ca()
    cache = make_cache(FakeClock(T0))
    cache.set_entries([entry("a", "spiffe://example.org/a"), entry("b", "spiffe://example.org/b")])
    cache.set_x509_svid("a", _svid(old, "spiffe://example.org/a"))
    cache.set_x509_svid("b", _svid(new, "spiffe://example.org/b"))
    assert cache.rotation_plan(T0) == []  # fresh SVIDs: nothing due
    cache.set_tainted([old[0].public_bytes(Encoding.DER)])  # type: ignore[attr-defined]
    assert [e.id for e in cache.rotation_plan(T0)] == ["a"]
    cache.set_x509_svid("a", _svid(new, "spiffe://example.org/a"))
    assert cache.rotation_plan(T0) == []
