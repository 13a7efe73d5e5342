"""Federation relationships in the datastore, on SQLite, PostgreSQL and MariaDB; and
the refresher's store rules (sequence never backwards, no write when unchanged)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from ca.config.federation import FederationConfig
from ca.config.relationship import Relationship
from ca.datastore import Datastore
from ca.errors import AlreadyExistsError, NotFoundError
from ca.federation import fetch
from ca.federation.refresher import Refresher
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.spiffeid import SpiffeId, TrustDomain
from tests.integration.federation_helpers import NOW, TestCa

B = TrustDomain("b.fed.test")
LONG_URL = "https://b.example/" + "p" * 2000


@pytest.fixture
def ds(database_url: str) -> Iterator[Datastore]:
    store = Datastore(database_url)
    yield store
    store.close()


def test_relationship_crud(ds: Datastore) -> None:
    endpoint = SpiffeId.parse("spiffe://b.fed.test/sigil/server")
    rel = Relationship(B, LONG_URL, "https_spiffe", endpoint)
    created = ds.create_relationship(rel, now=NOW)
    ts = int(NOW.timestamp())
    assert created == Relationship(B, LONG_URL, "https_spiffe", endpoint, ts, ts)
    with pytest.raises(AlreadyExistsError, match=r"b\.fed\.test already exists"):
        ds.create_relationship(rel, now=NOW)
    later = NOW + dt.timedelta(minutes=1)
    web = Relationship(B, "https://b.example/", "https_web")
    updated = ds.update_relationship(web, now=later)
    assert (updated.profile, updated.endpoint_spiffe_id, updated.created_at,
            updated.updated_at) == ("https_web", None, ts, int(later.timestamp()))
    with pytest.raises(NotFoundError):
        ds.update_relationship(Relationship(TrustDomain("c.fed.test"), "https://c/",
                                            "https_web"), now=later)
    ds.put_relationship(Relationship(TrustDomain("a.fed.test"), "https://a/", "https_web"),
                        now=later)
    assert [r.trust_domain.name for r in ds.list_relationships()] == ["a.fed.test",
                                                                     "b.fed.test"]
    assert ds.delete_relationship(B) == updated
    assert ds.get_relationship(B) is None
    with pytest.raises(NotFoundError):
        ds.delete_relationship(B)


def test_refresher_store_rules(ds: Datastore) -> None:
    ca = TestCa("b.fed.test")
    answers: list[Bundle] = []

    def fake_fetch(rel: Relationship, **_: object) -> fetch.Fetched:
        return fetch.Fetched(answers.pop(0), ())

    ds.create_relationship(Relationship(B, "https://b.example/", "https_web"), now=NOW)
    refresher = Refresher(ds, FederationConfig(), FakeClock(NOW), fetch=fake_fetch)
    answers.append(ca.bundle(sequence=5))
    assert (refresher.refresh(B).changed, ds.get_bundle(B).sequence) == (True, 5)  # type: ignore[union-attr]
    answers.append(ca.bundle(sequence=5))
    assert refresher.refresh(B).message == "unchanged"
    answers.append(ca.bundle(sequence=4))
    assert refresher.refresh(B).reason == "sequence_regressed"
    # No sequence in the document: stored as the latest fetched, numbered after the held.
    other = TestCa("b.fed.test")
    answers.append(other.bundle(sequence=None))
    outcome = refresher.refresh(B)
    stored = ds.get_bundle(B)
    assert stored is not None and (outcome.changed, stored.sequence) == (True, 6)
    assert Bundle.from_jwks(B, stored.data).x509_authorities == (other.cert,)
