"""ca.datastore on SQLite, PostgreSQL and MariaDB: CRUD, uniqueness, change events,
join tokens, and what concurrent writers may and may not do.

Every test runs once per database (the ``database_url`` fixture, tests/conftest.py).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import event, text

from attestation.node import join_token as jt
from ca.datastore import Datastore, EntryRecord, NodeRecord
from ca.datastore import models as m
from ca.errors import AlreadyExistsError, NotFoundError
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def ds(database_url: str) -> Iterator[Datastore]:
    store = Datastore(database_url)
    try:
        yield store
    finally:
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
    if ds.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only")
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


def _run_concurrently(workers: int, fn: Callable[[], str]) -> list[str]:
    """Run ``fn`` in ``workers`` threads released together; their results, sorted."""
    barrier = threading.Barrier(workers)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        result = fn()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=run) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(outcomes)


def _count(ds: Datastore, table: str) -> int:
    with ds.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def test_duplicate_entry_under_concurrent_creates(ds: Datastore) -> None:
    entry = _entry("spiffe://example.org/dup", "spiffe://example.org/a", "unix:uid:7", "k8s:ns:x")

    def create() -> str:
        try:
            ds.create_entry(entry, now=NOW)
        except AlreadyExistsError:
            return "exists"
        return "created"

    workers = 8
    assert _run_concurrently(workers, create) == ["created"] + ["exists"] * (workers - 1)
    # The losers left nothing behind: one entry, its children once, one event.
    assert _count(ds, "registration_entries") == 1
    assert _count(ds, "entry_selectors") == 2
    assert _count(ds, "entry_dns_names") == 1
    assert _count(ds, "change_events") == 1
    [stored] = ds.list_entries(spiffe_id=SpiffeId.parse("spiffe://example.org/dup"))
    assert stored.revision == ds.current_revision()


def test_lost_entry_race_leaves_the_transaction_usable(ds: Datastore) -> None:
    """Two transactions insert the same entry at once; the loser is told it exists
    and its transaction goes on to commit its other writes (as AttestAgent does)."""
    entry = _entry("spiffe://example.org/alias", "spiffe://example.org/sigil/server",
                   "spiffe_id:spiffe://example.org/sigil/agent/x")
    barrier = threading.Barrier(2, timeout=5)
    sqlite = ds.engine.dialect.name == "sqlite"

    def before_flush(session: object, _ctx: object, _instances: object) -> None:
        # Both past their "does it exist?" check before either inserts. (SQLite
        # serializes write transactions at BEGIN: nothing to hold there.)
        if not sqlite and any(isinstance(o, m.RegistrationEntry)
                              for o in session.new):  # type: ignore[attr-defined]
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass

    ds.listen_session_event("before_flush", before_flush)
    names = iter(range(2))
    lock = threading.Lock()

    def attest() -> str:
        with lock:
            n = next(names)
        with ds.transaction() as tx:
            outcome = "created"
            try:
                tx.create_entry(entry, now=NOW)
            except AlreadyExistsError:
                outcome = "exists"
            tx.put_node(NodeRecord(
                spiffe_id=SpiffeId.parse(f"spiffe://example.org/sigil/agent/n{n}"),
                attestor="test", serial=n + 1, expires_at=0, selectors=()), now=NOW)
        return outcome

    assert sorted(_run_concurrently(2, attest)) == ["created", "exists"]
    assert _count(ds, "registration_entries") == 1
    assert _count(ds, "change_events") == 1
    assert _count(ds, "attested_nodes") == 2


def test_concurrent_deletes_of_one_entry_delete_it_once(ds: Datastore) -> None:
    """Two servers' controllers (or operators) deleting one entry at once: one wins,
    the others are told it is gone, and one deletion event is written."""
    workers = 8
    for n in range(3):
        created = ds.create_entry(_entry(f"spiffe://example.org/del{n}"), now=NOW)
        events = _count(ds, "change_events")

        def delete(entry_id: str = created.id) -> str:
            try:
                ds.delete_entry(entry_id, now=NOW)
            except NotFoundError:
                return "gone"
            return "deleted"

        assert sorted(_run_concurrently(workers, delete)) == (
            ["deleted"] + ["gone"] * (workers - 1))
        assert _count(ds, "change_events") == events + 1
    assert _count(ds, "registration_entries") == 0


def test_each_entry_change_writes_exactly_one_event(ds: Datastore) -> None:
    a = ds.create_entry(_entry("spiffe://example.org/a1"), now=NOW)
    b = ds.create_entry(_entry("spiffe://example.org/b1"), now=NOW)
    ds.delete_entry(a.id, now=NOW)
    with ds.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT id, kind, entry_id FROM change_events ORDER BY id")).all()
    assert [(r.kind, r.entry_id) for r in rows] == [
        ("entry_created", a.id), ("entry_created", b.id), ("entry_deleted", a.id)]
    assert (a.revision, b.revision) == (rows[0].id, rows[1].id)


def test_entry_write_that_fails_leaves_no_event(ds: Datastore) -> None:
    # The change event is flushed before the entry row; a failure while writing
    # the entry's selectors must take the event down with it.
    def fail(*_args: object) -> None:
        raise RuntimeError("disk full (simulated)")

    event.listen(m.EntrySelector, "before_insert", fail)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            ds.create_entry(_entry("spiffe://example.org/half"), now=NOW)
    finally:
        event.remove(m.EntrySelector, "before_insert", fail)
    for table in ("registration_entries", "entry_selectors", "entry_dns_names",
                  "entry_federates_with", "change_events"):
        assert _count(ds, table) == 0, table
    assert ds.current_revision() == 0


def test_transaction_that_raises_after_an_entry_write_leaves_nothing(ds: Datastore) -> None:
    with pytest.raises(LookupError), ds.transaction() as tx:
        tx.create_entry(_entry("spiffe://example.org/rolled-back"), now=NOW)
        raise LookupError("the caller's next step failed")
    assert _count(ds, "registration_entries") == 0
    assert _count(ds, "change_events") == 0


def test_ids_and_selectors_compare_byte_for_byte(ds: Datastore) -> None:
    # MariaDB's default collation would find "/Web" when asked for "/web" and
    # call these two entries duplicates; revision 0002 makes it binary.
    lower = ds.create_entry(_entry("spiffe://example.org/web", "spiffe://example.org/a",
                                   "unix:user:alice"), now=NOW)
    upper = ds.create_entry(_entry("spiffe://example.org/Web", "spiffe://example.org/a",
                                   "unix:user:Alice"), now=NOW)
    assert ds.list_entries(spiffe_id=SpiffeId.parse("spiffe://example.org/web")) == [lower]
    assert ds.list_entries(spiffe_id=SpiffeId.parse("spiffe://example.org/Web")) == [upper]
    agent = "spiffe://example.org/sigil/agent/join_token/"
    for suffix in ("abc", "ABC"):
        ds.put_node(NodeRecord(spiffe_id=SpiffeId.parse(agent + suffix), attestor="join_token",
                               serial=1, expires_at=5), now=NOW)
    assert _count(ds, "attested_nodes") == 2


def test_large_ids_round_trip(ds: Datastore) -> None:
    # 64-bit counters, 20-octet serials and a 2048-byte SPIFFE ID fit on every database.
    long_id = "spiffe://example.org/" + "x" * (2048 - len("spiffe://example.org/"))
    created = ds.create_entry(_entry(long_id), now=NOW)
    assert ds.get_entry(created.id).spiffe_id == SpiffeId.parse(long_id)
    node = NodeRecord(spiffe_id=SpiffeId.parse("spiffe://example.org/sigil/agent/x/y"),
                      attestor="x", serial=2**159 - 1, expires_at=2**40)
    ds.put_node(node, now=NOW)
    got = ds.get_node(node.spiffe_id)
    assert got is not None and (got.serial, got.expires_at) == (2**159 - 1, 2**40)


def test_connection_settings(ds: Datastore) -> None:
    with ds.engine.connect() as conn:
        name = conn.dialect.name
        if name == "postgresql":
            assert conn.execute(text("SHOW transaction_isolation")).scalar_one() == (
                "read committed")
            assert conn.execute(text("SHOW server_encoding")).scalar_one() == "UTF8"
        elif name in ("mysql", "mariadb"):
            assert conn.execute(text("SELECT @@tx_isolation")).scalar_one() == "READ-COMMITTED"
            assert conn.execute(text("SELECT @@character_set_client")).scalar_one() == "utf8mb4"
        else:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"


def test_unicode_selectors_round_trip(ds: Datastore) -> None:
    created = ds.create_entry(_entry("spiffe://example.org/u", "spiffe://example.org/a",
                                     "k8s:label:team=Zürich-🚀"), now=NOW)
    assert ds.get_entry(created.id).selectors == (Selector("k8s", "label:team=Zürich-🚀"),)


def test_first_bundle_written_by_two_servers_at_once(database_url: str) -> None:
    # Two servers starting on one empty database both create the bundle row.
    stores = [Datastore(database_url) for _ in range(2)]
    td = TrustDomain("example.org")
    try:
        def put(store: Datastore) -> Callable[[], str]:
            return lambda: str(store.put_bundle(td, lambda seq: f"doc-{seq}").sequence)

        workers = iter(stores * 2)
        results = _run_concurrently(4, lambda: put(next(workers))())
        assert results == ["1", "2", "3", "4"]
        stored = stores[0].get_bundle(td)
        assert stored is not None and (stored.sequence, stored.data) == (4, "doc-4")
    finally:
        for s in stores:
            s.close()


def test_ca_key_signed_until_only_moves_forward(ds: Datastore) -> None:
    # worker_processes: several processes sign with one slot and each writes what it
    # signed; a smaller value written later must not lower a larger one.
    from ca.datastore import CaKeyRecord

    ds.add_ca_key(CaKeyRecord(id="slot-1", kind="x509", status="active", key_id="k",
                              public_key=b"\x01", certificate=None, not_after=9000,
                              created_at=1000))
    ds.update_ca_key("slot-1", signed_until=5000)
    ds.update_ca_key("slot-1", status="old", deactivated_at=3000, signed_until=4000)
    (rec,) = ds.list_ca_keys()
    assert (rec.status, rec.deactivated_at, rec.signed_until) == ("old", 3000, 5000)
    ds.update_ca_key("slot-1", signed_until=6000)
    assert ds.list_ca_keys()[0].signed_until == 6000
    with pytest.raises(NotFoundError):
        ds.update_ca_key("slot-2", signed_until=7000)


def test_reads_never_wait_for_a_writer(ds: Datastore) -> None:
    """SQLite: a transaction that only reads takes no write lock.

    Another connection holds the write lock (BEGIN IMMEDIATE) throughout. Reads
    must be answered; before, each read began IMMEDIATE too, waited the 10 s busy
    timeout, then failed with "database is locked". A write still needs the lock.
    """
    if ds.engine.dialect.name != "sqlite":
        pytest.skip("SQLite only: the other databases have no database-wide write lock")
    from ca.datastore.feed import DatastoreFeed

    created = ds.create_entry(_entry(), now=NOW)
    feed = DatastoreFeed(ds)
    path = ds.engine.url.database
    assert path is not None
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        assert ds.get_entry(created.id) == created
        assert [e.id for e in ds.list_entries()] == [created.id]
        assert ds.count_entries() == 1
        assert ds.get_node(SpiffeId.parse("spiffe://example.org/agent")) is None
        assert ds.list_ca_keys() == []
        assert ds.get_bundle(TrustDomain("example.org")) is None
        assert [e for _, e in feed.events_after(0)] == [created.id]
        assert [e.id for e in feed.entries_by_id([created.id])] == [created.id]
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    ds.delete_entry(created.id, now=NOW)  # the lock is free again: writes proceed
    assert ds.count_entries() == 0


def test_replace_bundle_only_over_what_was_read(ds: Datastore) -> None:
    td = TrustDomain("partner.example")
    assert ds.replace_bundle(td, None, '{"keys": []}', 1)  # nothing held: inserted
    assert not ds.replace_bundle(td, None, '{"keys": [1]}', 9)  # a row exists now
    first = ds.get_bundle(td)
    assert first is not None and first.sequence == 1
    assert ds.replace_bundle(td, first, '{"keys": [2]}', 2)
    # A stale read (what another server has since replaced) changes nothing.
    assert not ds.replace_bundle(td, first, '{"keys": [3]}', 3)
    now = ds.get_bundle(td)
    assert now is not None and (now.sequence, now.data) == (2, '{"keys": [2]}')
