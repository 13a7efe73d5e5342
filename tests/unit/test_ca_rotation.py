"""CA rotation driven by a FakeClock and tick(): prepare -> activate -> old dropped.

Defaults (ca_ttl 24h): prepare at 12h, activate at 20h; the old slot leaves the
bundle once what it signed has expired (signed_until) plus the safety margin.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

import migrations
from ca.authority import (
    KIND_JWT,
    KIND_X509,
    AuthorityConfig,
    AuthorityStateError,
    CertificateAuthority,
    subject_key_id,
    ttl_warnings,
)
from ca.datastore import CaKeyRecord, Datastore
from ca.errors import NotFoundError
from ca.keys import MemoryKeyManager
from identity.clock import FakeClock
from identity.keys import generate_private_key
from identity.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
H = dt.timedelta(hours=1)
MARGIN = dt.timedelta(minutes=10)
WORKLOAD = SpiffeId.parse("spiffe://example.org/w")


def _ca(url: str, clock: FakeClock, keys: MemoryKeyManager, owner: str = "a") -> (
        CertificateAuthority):
    ca = CertificateAuthority(AuthorityConfig(
        trust_domain=TD, datastore=Datastore(url), key_manager=keys, clock=clock,
        ca_ttl=24 * H, owner=owner, safety_margin=MARGIN))
    ca.load_or_create()
    return ca


@pytest.fixture
def url(tmp_path: Path) -> str:
    u = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(u)
    return u


def _statuses(ca: CertificateAuthority, kind: str) -> list[str]:
    return [a.status for a in ca.list_authorities(kind)]


def test_full_cycle_x509_and_jwt(url: str) -> None:
    clock = FakeClock()
    keys = MemoryKeyManager()
    ca = _ca(url, clock, keys)
    first = ca.ca_certificate()
    ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), ttl=H)
    assert _statuses(ca, KIND_X509) == ["active"]
    assert len(ca.bundle().x509_authorities) == 1

    clock.advance(12 * H - dt.timedelta(seconds=1))
    ca.tick()
    assert _statuses(ca, KIND_X509) == ["active"]

    clock.advance(dt.timedelta(seconds=1))  # 1/2 of the CA lifetime
    ca.tick()
    assert _statuses(ca, KIND_X509) == ["active", "prepared"]
    assert _statuses(ca, KIND_JWT) == ["active", "prepared"]
    assert len(ca.bundle().x509_authorities) == 2
    assert len(ca.bundle().jwt_authorities) == 2
    assert ca.ca_certificate() == first  # published, not yet signing

    clock.advance(8 * H)  # 5/6 of the lifetime: 20h
    ca.tick()
    assert _statuses(ca, KIND_X509) == ["old", "active"]
    second = ca.ca_certificate()
    assert second != first
    (leaf,) = ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), ttl=H)
    assert leaf.issuer == second.subject
    jwt = ca.sign_jwt_svid(WORKLOAD, ["db"], ttl=dt.timedelta(minutes=5))
    assert jwt.token

    # The old slot signed its last SVID at t=0 (1h TTL): it has long expired, so
    # the old slot goes at the first tick after activation, plus the margin.
    old = ca.list_authorities(KIND_X509)[0]
    assert old.signed_until is not None
    clock.advance(MARGIN)
    ca.tick()
    assert _statuses(ca, KIND_X509) == ["active"]
    assert ca.bundle().x509_authorities == (second,)


def test_old_stays_while_its_svids_are_valid(url: str) -> None:
    clock = FakeClock()
    ca = _ca(url, clock, MemoryKeyManager())
    clock.advance(12 * H)
    ca.tick()
    clock.advance(8 * H - dt.timedelta(minutes=1))
    ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), ttl=H)
    clock.advance(dt.timedelta(minutes=1))
    ca.tick()
    assert _statuses(ca, KIND_X509) == ["old", "active"]
    clock.advance(H)  # the last SVID expired, but the safety margin has not passed
    ca.tick()
    assert _statuses(ca, KIND_X509) == ["old", "active"]
    clock.advance(dt.timedelta(minutes=5) + MARGIN)  # watermark step + margin
    ca.tick()
    assert _statuses(ca, KIND_X509) == ["active"]


def test_restart_resumes_mid_rotation(url: str) -> None:
    clock = FakeClock()
    keys = MemoryKeyManager()
    ca = _ca(url, clock, keys)
    clock.advance(12 * H)
    ca.tick()
    restarted = _ca(url, clock, keys)
    assert _statuses(restarted, KIND_X509) == ["active", "prepared"]
    clock.advance(8 * H)
    restarted.tick()
    assert _statuses(restarted, KIND_X509) == ["old", "active"]
    assert restarted.ca_certificate() != ca.ca_certificate()


def test_svid_never_outlives_its_ca(url: str) -> None:
    clock = FakeClock()
    ca = _ca(url, clock, MemoryKeyManager())
    clock.advance(23 * H + dt.timedelta(minutes=30))
    # tick() not called: the active CA has 30 minutes left; a 1h SVID is clamped.
    (leaf,) = ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), ttl=H)
    assert leaf.not_valid_after_utc == ca.ca_certificate().not_valid_after_utc
    jwt = ca.sign_jwt_svid(WORKLOAD, ["db"], ttl=H)
    assert jwt.expires_at == clock.now() - dt.timedelta(hours=23, minutes=30) + 24 * H


def test_operator_steps_and_bad_sequences(url: str) -> None:
    clock = FakeClock()
    ca = _ca(url, clock, MemoryKeyManager())
    with pytest.raises(AuthorityStateError, match="no x509 authority is prepared"):
        ca.activate(KIND_X509)
    first_id = ca.list_authorities(KIND_X509)[0].authority_id
    with pytest.raises(AuthorityStateError, match="only an old x509 authority can be tainted"):
        ca.taint(KIND_X509, first_id)
    with pytest.raises(AuthorityStateError, match="is active; only a tainted one"):
        ca.revoke(KIND_X509, first_id)
    with pytest.raises(NotFoundError, match="no x509 authority nope"):
        ca.taint(KIND_X509, "nope")

    prepared = ca.prepare(KIND_X509)
    assert prepared.status == "prepared"
    with pytest.raises(AuthorityStateError, match="already prepared"):
        ca.prepare(KIND_X509)
    seq = ca.bundle().sequence_number
    ca.activate(KIND_X509)
    assert subject_key_id(ca.ca_certificate()) == prepared.authority_id
    with pytest.raises(AuthorityStateError, match="is not tainted; taint it first"):
        ca.revoke(KIND_X509, first_id)

    # The old CA signed the server's... nothing here; sign one so revoke must wait.
    tainted = ca.taint(KIND_X509, first_id)
    assert tainted.status == "tainted"
    assert [subject_key_id(c) for c in ca.tainted_x509_authorities()] == [first_id]
    assert (ca.bundle().sequence_number or 0) > (seq or 0)
    with pytest.raises(AuthorityStateError, match="already tainted"):
        ca.taint(KIND_X509, first_id)
    # Nothing signed by it is valid any more (it signed nothing): revoke succeeds.
    revoked = ca.revoke(KIND_X509, first_id)
    assert revoked.status == "revoked"
    assert [subject_key_id(c) for c in ca.bundle().x509_authorities] == [prepared.authority_id]
    assert ca.tainted_x509_authorities() == ()


def test_revoke_waits_for_signed_svids_unless_forced(url: str) -> None:
    clock = FakeClock()
    ca = _ca(url, clock, MemoryKeyManager())
    ca.sign_jwt_svid(WORKLOAD, ["db"], ttl=dt.timedelta(minutes=5))
    old_kid = ca.list_authorities(KIND_JWT)[0].authority_id
    ca.prepare(KIND_JWT)
    ca.activate(KIND_JWT)
    ca.taint(KIND_JWT, old_kid)
    assert ca.tainted_jwt_key_ids() == (old_kid,)
    with pytest.raises(AuthorityStateError, match="signed SVIDs valid until"):
        ca.revoke(KIND_JWT, old_kid)
    ca.revoke(KIND_JWT, old_kid, force=True)
    assert old_kid not in {a.key_id for a in ca.bundle().jwt_authorities}


def test_two_servers_share_the_bundle(url: str) -> None:
    clock = FakeClock()
    a = _ca(url, clock, MemoryKeyManager(), owner="a")
    b = _ca(url, clock, MemoryKeyManager(), owner="b")
    assert a.ca_certificate() != b.ca_certificate()
    assert set(b.bundle().x509_authorities) == {a.ca_certificate(), b.ca_certificate()}
    assert a.bundle().sequence_number == 1  # stale until it refreshes
    assert a.refresh_bundle() is True
    assert a.bundle() == b.bundle()
    # Each rotates only its own slots; the other's are listed but cannot be tainted.
    other = next(x for x in a.list_authorities(KIND_X509) if x.owner == "b")
    with pytest.raises(AuthorityStateError, match="belongs to another server"):
        a.taint(KIND_X509, other.authority_id)


def test_ttl_warnings() -> None:
    assert ttl_warnings(24 * H, H, dt.timedelta(minutes=5)) == []
    (msg,) = ttl_warnings(24 * H, 5 * H, dt.timedelta(minutes=5))
    assert msg.startswith("x509_svid_ttl 5:00:00 is longer than ca_ttl/6 (4:00:00)")
    assert len(ttl_warnings(6 * H, 2 * H, 2 * H)) == 2


def test_intermediate_under_upstream(url: str, tmp_path: Path) -> None:
    from ca.authority import UpstreamAuthority
    from identity.x509svid import new_ca_certificate

    clock = FakeClock()
    root_key = generate_private_key()
    root = new_ca_certificate(trust_domain=TD, public_key=root_key.public_key(),
                              signer_key=root_key, not_before=clock.now() - H,
                              not_after=clock.now() + 100 * H)
    ca = CertificateAuthority(AuthorityConfig(
        trust_domain=TD, datastore=Datastore(url), key_manager=MemoryKeyManager(),
        clock=clock, ca_ttl=24 * H,
        upstream=UpstreamAuthority(certificate=root, key=root_key, roots=(root,))))
    ca.load_or_create()
    leaf, inter = ca.sign_x509_svid(WORKLOAD, generate_private_key().public_key(), ttl=H)
    assert inter == ca.ca_certificate()
    assert leaf.issuer == inter.subject
    assert inter.issuer == root.subject
    assert ca.bundle().x509_authorities == (root,)
    bc = inter.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca


# ---- worker processes (worker_processes > 1): one owner, several processes -------------


def _follower(url: str, clock: FakeClock, keys: MemoryKeyManager) -> CertificateAuthority:
    """What an extra worker process builds: the main process's slots, rotate=False."""
    ca = CertificateAuthority(AuthorityConfig(
        trust_domain=TD, datastore=Datastore(url), key_manager=keys, clock=clock,
        ca_ttl=24 * H, owner="a", safety_margin=MARGIN, rotate=False))
    ca.load_or_create()
    return ca


def test_a_worker_follows_the_main_process(url: str) -> None:
    clock = FakeClock()
    keys = MemoryKeyManager()
    main = _ca(url, clock, keys)
    worker = _follower(url, clock, keys)
    first = main.ca_certificate()
    first_kid = main.list_authorities(KIND_JWT)[0].authority_id
    main.prepare(KIND_X509)
    main.prepare(KIND_JWT)
    worker.tick()
    assert len(worker.bundle().x509_authorities) == 2
    assert worker.ca_certificate() == first  # prepared: published, not signing
    main.activate(KIND_X509)
    main.activate(KIND_JWT)
    main.taint(KIND_X509, subject_key_id(first))
    main.taint(KIND_JWT, first_kid)
    worker.tick()
    assert worker.ca_certificate() == main.ca_certificate() != first
    signed = worker.sign_jwt_svid(WORKLOAD, ["db"], ttl=H)
    assert main.sign_jwt_svid(WORKLOAD, ["db"], ttl=H).token.split(".")[0] == \
        signed.token.split(".")[0]  # the same header: the same kid
    assert worker.tainted_x509_authorities() == (first,)
    assert worker.tainted_jwt_key_ids() == (first_kid,)
    assert worker.bundle() == main.bundle()
    assert sorted(_statuses(worker, KIND_X509)) == ["active", "tainted"]  # unchanged


def test_signed_until_never_moves_back_when_processes_share_a_slot(url: str) -> None:
    clock = FakeClock()
    keys = MemoryKeyManager()
    main = _ca(url, clock, keys)
    worker = _follower(url, clock, keys)
    key = generate_private_key().public_key()
    (long,) = worker.sign_x509_svid(WORKLOAD, key, ttl=3 * H)
    main.sign_x509_svid(WORKLOAD, key, ttl=dt.timedelta(minutes=10))
    worker.sign_jwt_svid(WORKLOAD, ["db"], ttl=2 * H)
    main.sign_jwt_svid(WORKLOAD, ["db"], ttl=dt.timedelta(minutes=5))
    x, j = main.list_authorities(KIND_X509)[0], main.list_authorities(KIND_JWT)[0]
    assert x.signed_until is not None and x.signed_until >= long.not_valid_after_utc
    assert j.signed_until is not None and j.signed_until >= clock.now() + 2 * H


def test_a_worker_tls_certificate_follows_an_activation_it_reads_late(
        url: str, tmp_path: Path) -> None:
    from ca.api.tls_front import TlsContextSource

    clock = FakeClock()
    keys = MemoryKeyManager()
    main = _ca(url, clock, keys)
    worker = _follower(url, clock, keys)
    contexts = TlsContextSource(worker, clock, tmp_path)
    contexts.current()
    main.prepare(KIND_X509)
    main.activate(KIND_X509)
    # The worker reads the bundle published by the activation before it reloads the
    # active slot (its tick ran between the two reads): the context is rebuilt with
    # the old CA, then again once the worker signs with the new one.
    worker.refresh_bundle()
    stale = contexts.current()
    assert worker.ca_certificate() != main.ca_certificate()
    worker.tick()
    assert worker.ca_certificate() == main.ca_certificate()
    assert contexts.current() is not stale


def test_a_worker_tick_during_an_activation_loads_what_it_read(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    keys = MemoryKeyManager()
    main = _ca(url, clock, keys)
    worker = _follower(url, clock, keys)
    main.prepare(KIND_X509)
    main.prepare(KIND_JWT)
    main.activate(KIND_X509)
    ds = worker._cfg.datastore
    reads = ds.list_ca_keys
    calls = 0

    def list_ca_keys(kind: str | None = None) -> list[CaKeyRecord]:
        nonlocal calls
        calls += 1
        records = reads(kind)
        if calls == 2:
            # The worker has read both active slots (a new X.509 one); now the main
            # process is half-way through activating the JWT key: the old one is
            # "old", the prepared one not yet active.
            (rec,) = [r for r in records if r.status == "active"]
            ds.update_ca_key(rec.id, status="old")
        return records

    monkeypatch.setattr(ds, "list_ca_keys", list_ca_keys)
    worker.tick()  # must not fail
    assert worker.ca_certificate() == main.ca_certificate()
