"""ca.datastore on a real SQLite file: CRUD, uniqueness, change events, join tokens.

SQLite in a temporary directory is fast enough for the unit suite; the same tests
are meant to run against PostgreSQL and MariaDB in integration.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

import migrations
from attestation.node import join_token as jt
from ca.datastore import Datastore, EntryRecord, NodeRecord
from ca.errors import AlreadyExistsError, NotFoundError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[Datastore]:
    url = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(url)
    store = Datastore(url)
    yield store
    store.close()


def _entry(spiffe: str = "spiffe://example.org/web", parent: str = "spiffe://example.org/a",
           *selectors: str) -> EntryRecord:
    return EntryRecord(
        spiffe_id=SpiffeId.parse(spiffe), parent_id=SpiffeId.parse(parent),
        selectors=tuple(Selector.parse(s) for s in (selectors or ("unix:uid:1",))),
        dns_names=("web.example.org",), federates_with=(TrustDomain("other.org"),),
        x509_svid_ttl=60,
    )


def test_sqlite_pragmas(ds: Datastore) -> None:
    with ds.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 10000


def test_entry_crud_and_revisions(ds: Datastore) -> None:
    assert ds.current_revision() == 0
    created = ds.create_entry(_entry(), now=NOW)
    assert created.id and created.revision == 1
    assert created.created_at == int(NOW.timestamp())
    got = ds.get_entry(created.id)
    assert got == created
    assert got.dns_names == ("web.example.org",)
    assert got.federates_with == (TrustDomain("other.org"),)
    assert ds.list_entries(parent_id=SpiffeId.parse("spiffe://example.org/a")) == [created]
    assert ds.list_entries(spiffe_id=SpiffeId.parse("spiffe://example.org/nope")) == []
    assert ds.list_entries(selectors=[Selector.parse("unix:uid:1")]) == [created]
    assert ds.list_entries(selectors=[Selector.parse("unix:uid:2")]) == []
    ds.delete_entry(created.id, now=NOW)
    assert ds.current_revision() == 2
    with pytest.raises(NotFoundError):
        ds.get_entry(created.id)
    with pytest.raises(NotFoundError):
        ds.delete_entry(created.id, now=NOW)
    # Children went with the entry (foreign keys with cascade are on).
    with ds.engine.connect() as conn:
        for table in ("entry_selectors", "entry_dns_names", "entry_federates_with"):
            assert conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar() == 0


def test_uniqueness_ignores_selector_order(ds: Datastore) -> None:
    ds.create_entry(_entry("spiffe://example.org/w", "spiffe://example.org/a", "a:1", "b:2"),
                    now=NOW)
    with pytest.raises(AlreadyExistsError):
        ds.create_entry(_entry("spiffe://example.org/w", "spiffe://example.org/a", "b:2", "a:1"),
                        now=NOW)
    # A different selector set, parent or ID is a different entry.
    ds.create_entry(_entry("spiffe://example.org/w", "spiffe://example.org/a", "a:1"), now=NOW)
    ds.create_entry(_entry("spiffe://example.org/w", "spiffe://example.org/b", "a:1", "b:2"),
                    now=NOW)
    assert ds.current_revision() == 3  # the refused insert left no change event


def test_nodes(ds: Datastore) -> None:
    agent = SpiffeId.parse("spiffe://example.org/sigil/agent/join_token/abc")
    node = NodeRecord(spiffe_id=agent, attestor="join_token", serial=2**100, expires_at=5,
                      selectors=(Selector("join_token", "abc"),))
    ds.put_node(node, now=NOW)
    got = ds.get_node(agent)
    assert got is not None and got.serial == 2**100 and got.selectors == node.selectors
    ds.set_node_new_serial(agent, serial=7, expires_at=9, now=NOW)
    got = ds.get_node(agent)
    assert got is not None and (got.serial, got.new_serial) == (2**100, 7)
    ds.promote_node_serial(agent, now=NOW)
    got = ds.get_node(agent)
    assert got is not None and (got.serial, got.new_serial) == (7, None)


def _add_token(ds: Datastore, expires: dt.datetime = NOW + dt.timedelta(minutes=5)) -> str:
    token_id, token = jt.new_token()
    ds.create_join_token(token_id=token_id, secret_sha256=jt.secret_sha256(token.split(".")[1]),
                         alias=None, expires_at=expires, now=NOW)
    return token


def test_join_token_rolls_back_on_failure(ds: Datastore) -> None:
    token = _add_token(ds, expires=NOW - dt.timedelta(seconds=1))
    payload = jt.make_attestation(token)[1]
    for _ in range(2):  # expired both times: the failed verify did not mark it used
        with pytest.raises(jt.ExpiredJoinTokenError), ds.transaction() as tx:
            jt.verify(payload, tx, trust_domain=TrustDomain("example.org"), now=NOW)


def test_join_token_single_use_under_concurrency(ds: Datastore) -> None:
    token = _add_token(ds)
    payload = jt.make_attestation(token)[1]
    workers = 8
    barrier = threading.Barrier(workers)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            with ds.transaction() as tx:
                jt.verify(payload, tx, trust_domain=TrustDomain("example.org"), now=NOW)
            result = "ok"
        except jt.UsedJoinTokenError:
            result = "used"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] + ["used"] * (workers - 1)


def test_bundle_sequence_increments(ds: Datastore) -> None:
    td = TrustDomain("example.org")
    assert ds.get_bundle(td) is None
    first = ds.put_bundle(td, lambda seq: f"doc-{seq}")
    second = ds.put_bundle(td, lambda seq: f"doc-{seq}")
    assert (first.sequence, second.sequence, second.data) == (1, 2, "doc-2")
