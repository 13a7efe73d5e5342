"""The change-event feed reads a bounded page at a time; the entry index pages through.

A backlog larger than a page (as after a bulk import) reaches the entry index
completely and in event order, and no single read returns more than a page.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Iterator

import pytest
from sqlalchemy import select

from ca.datastore import Datastore, EntryRecord
from ca.datastore import models as m
from ca.datastore.feed import DatastoreFeed
from ca.registry import entry_index
from ca.registry.entry_index import EntryIndex
from identity.clock import FakeClock
from identity.selectors import Selector
from identity.spiffeid import SpiffeId

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
SERVER = SpiffeId.parse("spiffe://example.org/sigil/server")
AGENT = SpiffeId.parse("spiffe://example.org/sigil/agent/join_token/a")
PAGE = 7
BACKLOG = 3 * PAGE + 2


@pytest.fixture
def ds(database_url: str) -> Iterator[Datastore]:
    store = Datastore(database_url)
    try:
        yield store
    finally:
        store.close()


def _create(ds: Datastore, n: int) -> list[str]:
    return [ds.create_entry(EntryRecord(
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/w/{i}"), parent_id=AGENT,
        selectors=(Selector("unix", f"uid:{i}"),)), now=NOW).id for i in range(n)]


def _event_ids(ds: Datastore) -> list[int]:
    with ds.engine.connect() as conn:
        return list(conn.scalars(select(m.ChangeEvent.id).order_by(m.ChangeEvent.id)))


def test_events_after_is_bounded_and_pages_in_order(ds: Datastore) -> None:
    created = _create(ds, BACKLOG)
    ids = _event_ids(ds)
    feed = DatastoreFeed(ds)
    first = feed.events_after(0, limit=PAGE)
    assert first == list(zip(ids[:PAGE], created[:PAGE], strict=True))
    pages, after = [], 0
    while page := feed.events_after(after, limit=PAGE):
        assert len(page) <= PAGE
        pages.append(page)
        after = page[-1][0]
    assert [e for p in pages for e in p] == list(zip(ids, created, strict=True))
    assert [len(p) for p in pages] == [PAGE, PAGE, PAGE, 2]
    # Asked-for gaps come on top of a page, in id order.
    assert feed.events_after(ids[5], also=[ids[0], ids[2]], limit=2) == [
        (ids[0], created[0]), (ids[2], created[2]), (ids[6], created[6]),
        (ids[7], created[7])]


class _CountingFeed(DatastoreFeed):
    def __init__(self, ds: Datastore) -> None:
        super().__init__(ds)
        self.pages: list[list[tuple[int, str]]] = []
        self.loaded: list[int] = []

    def events_after(self, after: int, also: Collection[int] = (), *,
                     limit: int = PAGE) -> list[tuple[int, str]]:
        page = super().events_after(after, also, limit=limit)
        self.pages.append(page)
        return page

    def entries_by_id(self, ids: Collection[str]) -> list[EntryRecord]:
        self.loaded.append(len(ids))
        return super().entries_by_id(ids)


def test_entry_index_applies_a_backlog_larger_than_a_page(
        ds: Datastore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(entry_index, "EVENT_PAGE", PAGE)
    feed = _CountingFeed(ds)
    index = EntryIndex(feed, server_id=SERVER, clock=FakeClock(NOW))
    index.build()
    assert index.authorized_entries(agent_id=AGENT, node_selectors=()) == []
    created = _create(ds, BACKLOG)
    feed.pages.clear()
    feed.loaded.clear()
    index.poll()  # one poll catches up with the whole backlog
    got = index.authorized_entries(agent_id=AGENT, node_selectors=())
    assert sorted(e.id for e in got) == sorted(created)
    # Page by page, in event order, none larger than a page.
    assert [e for p in feed.pages for _, e in p] == created
    assert all(len(p) <= PAGE for p in feed.pages)
    assert all(n <= PAGE for n in feed.loaded)
    assert index.revision == BACKLOG
