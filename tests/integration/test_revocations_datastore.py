"""SVID revocations in the datastore, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from ca.datastore import Datastore
from identity import revocation as rv

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
LONG_ID = "spiffe://example.org/" + "a" * 2000


@pytest.fixture
def ds(database_url: str) -> Iterator[Datastore]:
    store = Datastore(database_url)
    try:
        yield store
    finally:
        store.close()


def test_revocations_are_listed_by_id_after_a_known_one(ds: Datastore) -> None:
    a = ds.add_revocation(rv.X509_SERIAL, "4f1a", now=NOW, expires_at=NOW + HOUR)
    b = ds.add_revocation(rv.X509_SPIFFE_ID, LONG_ID, now=NOW, expires_at=NOW + HOUR,
                          not_before_max=1_893_456_000)
    c = ds.add_revocation(rv.JWT_KEY_ID, "kid-1", now=NOW, expires_at=None)
    assert a.id < b.id < c.id
    assert ds.list_revocations(now=NOW) == [a, b, c]
    assert ds.list_revocations(now=NOW, after=a.id) == [b, c]
    assert b.value == LONG_ID and b.not_before_max == 1_893_456_000
    assert c.expires_at is None and a.expires_at == int((NOW + HOUR).timestamp())
    assert ds.last_revocation_id() == c.id


def test_revoking_the_same_serial_twice_is_one_row(ds: Datastore) -> None:
    a = ds.add_revocation(rv.JWT_ID, "jti-1", now=NOW, expires_at=NOW + HOUR)
    again = ds.add_revocation(rv.JWT_ID, "jti-1", now=NOW + dt.timedelta(minutes=1),
                              expires_at=NOW + 2 * HOUR)
    assert again == a
    assert len(ds.list_revocations(now=NOW)) == 1


def test_a_spiffe_id_revoked_again_gets_a_later_cutoff(ds: Datastore) -> None:
    a = ds.add_revocation(rv.X509_SPIFFE_ID, "spiffe://example.org/w", now=NOW,
                          expires_at=NOW + HOUR, not_before_max=100)
    b = ds.add_revocation(rv.X509_SPIFFE_ID, "spiffe://example.org/w", now=NOW,
                          expires_at=NOW + HOUR, not_before_max=200)
    assert a.id != b.id
    held = rv.RevocationSet()
    held.add(ds.list_revocations(now=NOW))
    assert held.spiffe_ids == {"spiffe://example.org/w": 200}


def test_expired_revocations_are_pruned_but_the_newest_id_stays(ds: Datastore) -> None:
    old = ds.add_revocation(rv.X509_SERIAL, "1", now=NOW, expires_at=NOW + HOUR)
    kept = ds.add_revocation(rv.X509_SERIAL, "2", now=NOW, expires_at=NOW + 3 * HOUR)
    forever = ds.add_revocation(rv.JWT_KEY_ID, "k", now=NOW, expires_at=None)
    newest = ds.add_revocation(rv.X509_SERIAL, "3", now=NOW, expires_at=NOW + HOUR)
    later = NOW + 2 * HOUR
    assert ds.list_revocations(now=later) == [kept, forever]
    assert ds.prune_revocations(now=later) == 1  # "1" only: "3" is the newest id
    assert [r.id for r in ds.list_revocations(now=NOW)] == [kept.id, forever.id, newest.id]
    assert ds.last_revocation_id() == newest.id
    assert old.id < newest.id


def test_an_unknown_kind_is_refused(ds: Datastore) -> None:
    with pytest.raises(ValueError, match="unknown revocation kind"):
        ds.add_revocation("crl", "1", now=NOW, expires_at=None)
    assert ds.list_revocations(now=NOW) == []


def test_server_revocations_send_what_an_agent_lacks(ds: Datastore) -> None:
    from types import SimpleNamespace
    from typing import Any

    from ca.api.revocations import RECENT, ServerRevocations
    from identity.clock import FakeClock

    clock = FakeClock(NOW)
    ticks = iter(range(1_000_000))
    deps: Any = SimpleNamespace(datastore=ds, clock=clock)
    # Every call polls the datastore (a monotonic clock that moves 1 s a call).
    held = ServerRevocations(deps, monotonic=lambda: float(next(ticks)))
    empty = held.delta(0)
    assert empty.full and empty.version == 0 and empty.revocations == ()
    a = ds.add_revocation(rv.X509_SERIAL, "a", now=NOW, expires_at=NOW + HOUR)
    first = held.delta(0)
    assert first.full and first.version == a.id and first.revocations == (a,)
    clock.advance(RECENT + dt.timedelta(seconds=1))
    b = ds.add_revocation(rv.X509_SERIAL, "b", now=clock.now(), expires_at=NOW + HOUR)
    # Only what is new (a is older than the resend window); nothing once up to date
    # and past the window.
    assert held.delta(a.id) == type(first)((b,), b.id, False)
    assert held.delta(b.id).revocations == (b,)  # still young: sent again
    clock.advance(RECENT + dt.timedelta(seconds=1))
    assert held.delta(b.id).revocations == ()
    # An id this database never issued: everything again.
    assert held.delta(b.id + 100).full
    # Past their expiry they are no longer sent.
    clock.advance(HOUR)
    assert held.delta(0).revocations == ()
