"""Entry and agent management (ca.registry.entries, ca.registry.agents, the repository beneath them)
on a real SQLite file: filter semantics, paging, updates, counting, ban/evict/purge."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

import migrations
from api.protos.sigil.types.v1 import types_pb2
from ca.api.convert import entry_to_proto
from ca.datastore import Datastore, EntryRecord, NodeRecord
from ca.datastore import models as m
from ca.datastore.records import EntryFilter, Match
from ca.errors import AlreadyExistsError, ConflictError, InvalidArgumentError, NotFoundError
from ca.registry import validate
from ca.registry.agents import AgentService
from ca.registry.entries import EntryService, decode_cursor
from identity.clock import FakeClock
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[Datastore]:
    url = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(url)
    store = Datastore(url)
    yield store
    store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def entries(ds: Datastore, clock: FakeClock) -> EntryService:
    return EntryService(ds, clock)


def _e(name: str, *sels: str, fed: tuple[str, ...] = (), hint: str = "") -> EntryRecord:
    return EntryRecord(
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/{name}"),
        parent_id=SpiffeId.parse("spiffe://example.org/node"),
        selectors=tuple(Selector.parse(s) for s in sels),
        federates_with=tuple(TrustDomain(f) for f in fed), hint=hint,
    )


@pytest.fixture
def stored(entries: EntryService) -> dict[str, str]:
    """Four entries with overlapping selectors and federations; name -> id."""
    made = [
        _e("a", "u:1"),
        _e("ab", "u:1", "g:2", fed=("x.org",)),
        _e("abc", "u:1", "g:2", "k:3", fed=("x.org", "y.org"), hint="h1"),
        _e("c", "k:3", fed=("y.org",)),
    ]
    return {str(r.spiffe_id).rsplit("/", 1)[1]: entries.create(r).id for r in made}


def _names(entries: EntryService, f: EntryFilter) -> set[str]:
    rows, _ = entries.list_page(f, size=0, page_token="")
    return {str(r.spiffe_id).rsplit("/", 1)[1] for r in rows}


def _sels(*texts: str) -> tuple[Selector, ...]:
    return tuple(Selector.parse(t) for t in texts)


@pytest.mark.parametrize(
    ("given", "match", "expected"),
    [
        (("u:1", "g:2"), Match.EXACT, {"ab"}),
        (("u:1", "g:2"), Match.SUBSET, {"a", "ab"}),
        (("u:1", "g:2"), Match.SUPERSET, {"ab", "abc"}),
        (("u:1", "g:2"), Match.ANY, {"a", "ab", "abc"}),
        (("k:3",), Match.EXACT, {"c"}),
        (("k:3",), Match.SUPERSET, {"abc", "c"}),
        (("k:3", "u:1"), Match.SUBSET, {"a", "c"}),
        (("z:9",), Match.ANY, set()),
    ],
)
def test_selector_match(entries: EntryService, stored: dict[str, str],
                        given: tuple[str, ...], match: Match, expected: set[str]) -> None:
    assert _names(entries, EntryFilter(selectors=_sels(*given), selector_match=match)) == expected


@pytest.mark.parametrize(
    ("given", "match", "expected"),
    [
        (("x.org",), Match.EXACT, {"ab"}),
        (("x.org",), Match.SUPERSET, {"ab", "abc"}),
        (("x.org", "y.org"), Match.SUBSET, {"ab", "abc", "c"}),
        (("y.org",), Match.ANY, {"abc", "c"}),
    ],
)
def test_federates_with_match(entries: EntryService, stored: dict[str, str],
                              given: tuple[str, ...], match: Match, expected: set[str]) -> None:
    f = EntryFilter(federates_with=tuple(TrustDomain(g) for g in given),
                    federates_with_match=match)
    assert _names(entries, f) == expected


def test_other_filters_combine(entries: EntryService, stored: dict[str, str]) -> None:
    assert _names(entries, EntryFilter(hint="h1")) == {"abc"}
    assert _names(entries, EntryFilter(
        spiffe_id=SpiffeId.parse("spiffe://example.org/c"))) == {"c"}
    assert _names(entries, EntryFilter(
        parent_id=SpiffeId.parse("spiffe://example.org/node"), hint="h1",
        selectors=_sels("k:3"), selector_match=Match.SUPERSET)) == {"abc"}
    assert _names(entries, EntryFilter(
        parent_id=SpiffeId.parse("spiffe://example.org/other"))) == set()


def test_paging_visits_every_entry_once(entries: EntryService, clock: FakeClock) -> None:
    ids = []
    for i in range(7):
        ids.append(entries.create(_e(f"w{i}", f"u:{i}")).id)
        if i % 3 == 0:
            clock.advance(dt.timedelta(seconds=1))  # some share a created_at, some not
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        rows, token = entries.list_page(EntryFilter(), size=3, page_token=token)
        seen += [r.id for r in rows]
        pages += 1
        if not token:
            break
    assert pages == 3 and sorted(seen) == sorted(ids) and len(seen) == 7
    assert entries.count() == 7


@pytest.mark.parametrize("token", ["garbage!", "YQ", decode_cursor.__name__])
def test_bad_page_token(entries: EntryService, token: str) -> None:
    with pytest.raises(InvalidArgumentError, match="page_token"):
        entries.list_page(EntryFilter(), size=1, page_token=token)


@pytest.mark.parametrize("size", [-1, 1001])
def test_bad_page_size(entries: EntryService, size: int) -> None:
    with pytest.raises(InvalidArgumentError, match="page_size"):
        entries.list_page(EntryFilter(), size=size, page_token="")


def _change(fields: list[str], **values: object) -> object:
    patch = types_pb2.Entry(**values)  # type: ignore[arg-type]

    def change(current: EntryRecord) -> EntryRecord:
        return validate.updated_entry(entry_to_proto(current), patch, fields,
                                      trust_domain=TD, max_ttl=dt.timedelta(hours=24))
    return change


def test_update_bumps_revision_and_writes_event(
    entries: EntryService, ds: Datastore, clock: FakeClock
) -> None:
    created = entries.create(_e("w", "u:1"))
    clock.advance(dt.timedelta(seconds=5))
    updated = entries.update(created.id, _change(  # type: ignore[arg-type]
        ["selectors", "x509_svid_ttl", "dns_names"],
        selectors=[types_pb2.Selector(type="u", value="2")], x509_svid_ttl=90,
        dns_names=["W.example.org"], hint="ignored: not named"))
    assert updated.revision == created.revision + 1 == ds.current_revision()
    assert updated.selectors == _sels("u:2")
    assert (updated.x509_svid_ttl, updated.dns_names, updated.hint) == (90, ("w.example.org",), "")
    assert updated.created_at == created.created_at
    assert updated.updated_at == created.updated_at + 5
    assert ds.get_entry(created.id) == updated
    with ds.engine.connect() as conn:
        kinds = [r.kind for r in conn.execute(select(m.ChangeEvent).order_by(m.ChangeEvent.id))]
    assert kinds == ["entry_created", "entry_updated"]


@pytest.mark.parametrize(
    ("fields", "values", "message"),
    [
        ([], {}, "at least one field"),
        (["id"], {"id": "x"}, "cannot be updated"),
        (["revision"], {"revision": 9}, "cannot be updated"),
        (["selectors"], {}, "at least one selector"),
        (["spiffe_id"], {"spiffe_id": "spiffe://other.org/w"}, "not in the trust domain"),
        (["parent_id"], {"parent_id": "nope"}, "parent_id"),
        (["x509_svid_ttl"], {"x509_svid_ttl": -5}, "x509_svid_ttl"),
        (["dns_names"], {"dns_names": ["bad_name"]}, "not a valid host name"),
        (["hint"], {"hint": "h" * 1025}, "hint"),
        (["federates_with"], {"federates_with": ["spiffe://"]}, "federates_with"),
    ],
)
def test_update_rejects_bad_input_and_writes_nothing(
    entries: EntryService, ds: Datastore, fields: list[str], values: dict[str, object],
    message: str,
) -> None:
    created = entries.create(_e("w", "u:1"))
    with pytest.raises(InvalidArgumentError, match=message):
        entries.update(created.id, _change(fields, **values))  # type: ignore[arg-type]
    assert ds.get_entry(created.id) == created
    assert ds.current_revision() == created.revision


def test_update_to_a_duplicate_is_already_exists(entries: EntryService, ds: Datastore) -> None:
    entries.create(_e("w", "u:1"))
    other = entries.create(_e("w", "u:2"))
    with pytest.raises(AlreadyExistsError):
        entries.update(other.id, _change(  # type: ignore[arg-type]
            ["selectors"], selectors=[types_pb2.Selector(type="u", value="1")]))
    assert ds.get_entry(other.id) == other


def test_update_refuses_a_concurrent_change(entries: EntryService, ds: Datastore) -> None:
    created = entries.create(_e("w", "u:1"))
    with pytest.raises(ConflictError):
        ds.update_entry(created.id, created, expected_revision=created.revision - 1,
                        now=dt.datetime.now(dt.UTC))
    with pytest.raises(NotFoundError):
        entries.update("missing", _change(["hint"], hint="x"))  # type: ignore[arg-type]


def test_batch_creates_each_entry_on_its_own(entries: EntryService) -> None:
    outcomes = entries.create_batch([_e("a", "u:1"), _e("a", "u:1"), _e("b", "u:1")])
    assert isinstance(outcomes[0], EntryRecord) and isinstance(outcomes[2], EntryRecord)
    assert isinstance(outcomes[1], AlreadyExistsError)
    assert entries.count() == 2


# ---- agents ----------------------------------------------------------------------


def _node(name: str, expires_at: int) -> NodeRecord:
    return NodeRecord(spiffe_id=SpiffeId.parse(f"spiffe://example.org/sigil/agent/t/{name}"),
                      attestor="join_token", serial=0xABC, expires_at=expires_at,
                      selectors=_sels("join_token:" + name))


def test_agents_ban_evict_purge(ds: Datastore, clock: FakeClock) -> None:
    agents = AgentService(ds, clock)
    now = int(clock.now().timestamp())
    for name, expires in (("live", now + 3600), ("recent", now - 3600),
                          ("old", now - 3 * 86400), ("older", now - 9 * 86400)):
        ds.put_node(_node(name, expires), now=clock.now())
    assert agents.count() == 4
    rows, token = agents.list_page(size=3, page_token="")
    rest, end = agents.list_page(size=3, page_token=token)
    assert [str(n.spiffe_id).rsplit("/", 1)[1] for n in rows + rest] == [
        "live", "old", "older", "recent"]
    assert end == ""

    live = _node("live", 0).spiffe_id
    assert agents.ban(live).banned
    assert agents.get(live).banned

    dry = agents.purge(expired_for=dt.timedelta(hours=24), dry_run=True)
    assert [str(i).rsplit("/", 1)[1] for i in dry] == ["old", "older"]
    assert agents.count() == 4
    assert agents.purge(expired_for=dt.timedelta(hours=24)) == dry
    assert agents.count() == 2
    assert [str(i).rsplit("/", 1)[1] for i in agents.purge(
        expired_for=dt.timedelta(minutes=30))] == ["recent"]
    with pytest.raises(InvalidArgumentError, match="at least 60 seconds"):
        agents.purge(expired_for=dt.timedelta(seconds=5))

    agents.evict(live)
    assert agents.count() == 0
    with pytest.raises(NotFoundError):
        agents.get(live)
    with pytest.raises(NotFoundError):
        agents.evict(live)
    with pytest.raises(NotFoundError):
        agents.ban(live)
