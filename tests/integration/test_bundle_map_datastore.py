"""Several foreign bundles in one transaction (``Datastore.set_bundles``,
``ForeignBundles.set_many``: what ``bundle set --format spiffe-map`` calls), on
SQLite, PostgreSQL and MariaDB: all are written or none, whatever fails where."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest

from ca.datastore import Datastore
from ca.errors import InvalidArgumentError
from ca.registry.foreign_bundles import MAX_BATCH_BUNDLES, ForeignBundles
from identity.bundle import Bundle, JwtAuthority
from identity.keys import generate_private_key, key_id
from identity.spiffeid import TrustDomain
from identity.x509svid import new_ca_certificate

OWN = TrustDomain("own.fed.test")
B, C, D = TrustDomain("b.fed.test"), TrustDomain("c.fed.test"), TrustDomain("d.fed.test")
NOW = dt.datetime.now(dt.UTC)


class Boom(Exception):
    """Raised by a render function in the middle of a transaction."""


@pytest.fixture
def ds(database_url: str) -> Iterator[Datastore]:
    store = Datastore(database_url)
    yield store
    store.close()


def _bundle(td: TrustDomain, *, sequence: int | None = 7) -> Bundle:
    key = generate_private_key()
    cert = new_ca_certificate(trust_domain=td, public_key=key.public_key(), signer_key=key,
                              not_before=NOW - dt.timedelta(minutes=1),
                              not_after=NOW + dt.timedelta(days=1))
    jwt_key = generate_private_key()
    return Bundle(td, (cert,), (JwtAuthority(key_id(jwt_key.public_key()),
                                             jwt_key.public_key(), None),),
                  sequence_number=sequence)


def _jwt_only(td: TrustDomain) -> Bundle:
    key = generate_private_key().public_key()
    return Bundle(td, (), (JwtAuthority(key_id(key), key, None),), sequence_number=1)


def _held(ds: Datastore) -> list[tuple[str, str, int]]:
    return [(b.trust_domain, b.data, b.sequence) for b in ds.list_bundles()]


def test_set_bundles_writes_all_in_order(ds: Datastore) -> None:
    ds.set_bundle(C, "old", 4)
    held_seen: list[int] = []

    def render(text: str, sequence: int | None):  # type: ignore[no-untyped-def]
        def fn(held: int) -> tuple[str, int]:
            held_seen.append(held)
            return text, held + 1 if sequence is None else sequence
        return fn

    revision = ds.current_revision()
    stored = ds.set_bundles([(B, render("b", 3)), (C, render("c", None))])
    assert [(s.trust_domain, s.data, s.sequence) for s in stored] == [
        ("b.fed.test", "b", 3), ("c.fed.test", "c", 5)]
    assert held_seen == [0, 4]
    assert _held(ds) == [("b.fed.test", "b", 3), ("c.fed.test", "c", 5)]
    assert ds.current_revision() > revision  # one change event: agents' syncs read again
    assert ds.set_bundles([]) == []


def test_failure_in_the_middle_of_the_transaction_writes_nothing(ds: Datastore) -> None:
    ds.set_bundle(C, "old c", 4)
    before, revision = _held(ds), ds.current_revision()

    def fails(held: int) -> tuple[str, int]:
        raise Boom("the second member fails after the first was written")

    # B is a new row, C an update, D never reached: the write of B (flushed to the
    # database already) and of C are rolled back with the transaction.
    with pytest.raises(Boom):
        ds.set_bundles([(B, lambda held: ("new b", 1)), (C, fails),
                        (D, lambda held: ("new d", 1))])
    assert _held(ds) == before
    with pytest.raises(Boom):
        ds.set_bundles([(C, lambda held: ("new c", 9)), (B, lambda held: ("new b", 1)),
                        (D, fails)])
    assert _held(ds) == before
    assert ds.current_revision() == revision
    # And the datastore is usable afterwards.
    ds.set_bundles([(B, lambda held: ("b", 1))])
    assert [t for t, _, _ in _held(ds)] == ["b.fed.test", "c.fed.test"]


def test_set_many_stores_each_with_its_sequence(ds: Datastore) -> None:
    store = ForeignBundles(ds, OWN)
    ds.set_bundle(C, _bundle(C, sequence=11).to_json().decode(), 11)
    b, c = _bundle(B, sequence=7), _bundle(C, sequence=None)
    out = store.set_many([("b.fed.test", "spiffe", b.to_json()),
                          ("spiffe://c.fed.test", "pem", c.x509_pem())])
    assert [(x.trust_domain, x.sequence_number) for x in out] == [(B, 7), (C, 12)]
    assert store.get(B).x509_authorities == b.x509_authorities
    assert store.get(B).jwt_authorities == b.jwt_authorities
    assert store.get(C).x509_authorities == c.x509_authorities
    assert store.get(C).sequence_number == 12


def _bad_batches() -> list[tuple[str, list[tuple[str, str, bytes]], str]]:
    good_b = ("b.fed.test", "spiffe", _bundle(B).to_json())
    good_d = ("d.fed.test", "spiffe", _bundle(D).to_json())
    many = [(f"t{i}.fed.test", "spiffe", _jwt_only(TrustDomain(f"t{i}.fed.test")).to_json())
            for i in range(MAX_BATCH_BUNDLES + 1)]
    return [
        ("duplicate", [good_b, good_d, ("spiffe://b.fed.test", "spiffe", good_b[2])],
         "trust domain 'b.fed.test' appears more than once"),
        ("own trust domain", [good_b, ("own.fed.test", "spiffe", _bundle(OWN).to_json()),
                              good_d],
         "member 'own.fed.test': own.fed.test is this server's own trust domain"),
        ("malformed in the middle", [good_b, ("c.fed.test", "spiffe", b'{"keys": 5}'), good_d],
         "member 'c.fed.test': bundle of c.fed.test (spiffe): bundle 'keys' must be an array"),
        ("another domain's CA", [good_b, ("c.fed.test", "spiffe", _bundle(D).to_json()),
                                 good_d],
         "member 'c.fed.test': bundle holds a CA certificate of trust domain d.fed.test"),
        ("empty member", [good_b, ("c.fed.test", "spiffe", b'{"keys": []}'), good_d],
         "holds no CA certificate and no JWT key"),
        ("bad name", [good_b, ("Bad_Name", "spiffe", good_b[2])],
         "bundles[1].trust_domain"),
        ("bad format", [good_b, ("c.fed.test", "der", b"x")], "format must be one of"),
        ("too many", many, f"at most {MAX_BATCH_BUNDLES} trust domains, not "
                           f"{MAX_BATCH_BUNDLES + 1}"),
    ]


@pytest.mark.parametrize(("members", "message"),
                         [pytest.param(m, e, id=name) for name, m, e in _bad_batches()])
def test_set_many_refuses_and_writes_nothing(
        ds: Datastore, members: list[tuple[str, str, bytes]], message: str) -> None:
    store = ForeignBundles(ds, OWN)
    ds.set_bundle(D, _bundle(D, sequence=3).to_json().decode(), 3)
    before, revision = _held(ds), ds.current_revision()
    with pytest.raises(InvalidArgumentError) as info:
        store.set_many(members)
    assert message in str(info.value)
    assert _held(ds) == before
    assert ds.current_revision() == revision
    assert ds.get_bundle(OWN) is None
