"""The refresher against real local HTTPS servers (Python ssl): good answers are
stored and roll forward through a rotation; every bad answer keeps the bundle held,
is counted in sigil_federation_refresh_errors_total{trust_domain,reason}, and
pushes the next attempt out by one interval."""

from __future__ import annotations

import dataclasses
import datetime as dt
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import migrations
from ca.config.federation import FederationConfig
from ca.config.relationship import Relationship
from ca.datastore import Datastore
from ca.federation import fetch
from ca.federation.https import Document
from ca.federation.refresher import Refresher
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.spiffeid import SpiffeId, TrustDomain
from tests.integration.federation_helpers import NOW, TestCa, body, context_for, https_server

CONFIG = FederationConfig(refresh_min_interval=dt.timedelta(seconds=30),
                          refresh_max_interval=dt.timedelta(hours=1),
                          refresh_default_interval=dt.timedelta(minutes=5),
                          fetch_timeout=dt.timedelta(seconds=5))


@pytest.fixture
def datastore(tmp_path: Path) -> Iterator[Datastore]:
    url = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(url)
    ds = Datastore(url)
    yield ds
    ds.close()


def _spiffe_rel(ca: TestCa, address: str, endpoint_path: str = "/sigil/server"
                ) -> Relationship:
    return Relationship(ca.td, f"https://{address}/", "https_spiffe",
                        SpiffeId.parse(f"spiffe://{ca.td.name}{endpoint_path}"))


def _hold(ds: Datastore, bundle: Bundle) -> str:
    data = bundle.to_json().decode()
    ds.set_bundle(bundle.trust_domain, data, bundle.sequence_number or 0)
    return data


def _errors(td: TrustDomain, reason: str) -> float:
    return REGISTRY.get_sample_value("sigil_federation_refresh_errors_total",
                                     {"trust_domain": td.name, "reason": reason}) or 0.0


def _refresher(ds: Datastore, config: FederationConfig = CONFIG) -> tuple[Refresher, FakeClock]:
    clock = FakeClock(NOW)
    return Refresher(ds, config, clock), clock


def test_https_spiffe_fetch_stores_and_schedules_by_hint(
        datastore: Datastore, tmp_path: Path) -> None:
    ca = TestCa("good.fed.test")
    _hold(datastore, ca.bundle(sequence=1))
    served = ca.bundle(sequence=2, hint=120)
    with https_server(context_for(tmp_path, *ca.svid()), {"/": body(served.to_json())}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, clock = _refresher(datastore)
        [outcome] = refresher.tick()
        assert (outcome.ok, outcome.changed, outcome.sequence) == (True, True, 2)
        assert outcome.next_refresh_at == NOW + dt.timedelta(seconds=120)
        stored = datastore.get_bundle(ca.td)
        assert stored is not None and Bundle.from_jwks(ca.td, stored.data) == served
        # Not due yet: nothing fetched; due: fetched again, unchanged, nothing written.
        assert refresher.tick() == []
        clock.advance(dt.timedelta(seconds=120))
        [again] = refresher.tick()
        assert (again.ok, again.changed, again.message) == (True, False, "unchanged")


def test_hint_is_bounded_by_min_and_max(datastore: Datastore) -> None:
    refresher, _ = _refresher(datastore)
    assert refresher.interval_for(1) == dt.timedelta(seconds=30)
    assert refresher.interval_for(86400) == dt.timedelta(hours=1)
    assert refresher.interval_for(None) == dt.timedelta(minutes=5)
    assert refresher.interval_for(600) == dt.timedelta(minutes=10)


def test_rotation_on_the_other_side_rolls_forward(datastore: Datastore, tmp_path: Path) -> None:
    old, new = TestCa("rot.fed.test"), TestCa("rot.fed.test")
    _hold(datastore, old.bundle(sequence=1))  # the bootstrap bundle: old CA only
    both = old.bundle(sequence=2, extra=(new.cert,))
    refresher, _ = _refresher(datastore)
    # 1. Still served with an SVID of the old CA; the bundle now carries both.
    with https_server(context_for(tmp_path / "a", *old.svid()), {"/": body(both.to_json())}
                      ) as addr:
        datastore.put_relationship(_spiffe_rel(old, addr), now=NOW)
        assert refresher.refresh(old.td).changed
    # 2. The endpoint switched to the new CA's SVID and dropped the old CA: trusted,
    #    because the bundle held (fetched in step 1) has the new CA.
    only_new = dataclasses.replace(new.bundle(sequence=3), jwt_authorities=())
    with https_server(context_for(tmp_path / "b", *new.svid()),
                      {"/": body(only_new.to_json())}) as addr:
        datastore.put_relationship(_spiffe_rel(old, addr), now=NOW)
        outcome = refresher.refresh(old.td)
    assert (outcome.ok, outcome.sequence) == (True, 3), outcome.message
    stored = datastore.get_bundle(old.td)
    assert stored is not None
    assert Bundle.from_jwks(old.td, stored.data).x509_authorities == (new.cert,)


def test_https_web_with_configured_ca_and_host_check(datastore: Datastore, tmp_path: Path) -> None:
    web = TestCa("webpki.test")
    ca_file = tmp_path / "roots.pem"
    ca_file.write_bytes(web.bundle().x509_pem())
    foreign = TestCa("web.fed.test")
    config = dataclasses.replace(CONFIG, web_ca_file=ca_file)
    chain, key = web.svid("/web", dns_names=("localhost",))
    with https_server(context_for(tmp_path, chain, key),
                      {"/b": body(foreign.bundle(sequence=4).to_json())}) as addr:
        port = addr.rsplit(":", 1)[1]
        refresher, _ = _refresher(datastore, config)
        datastore.put_relationship(
            Relationship(foreign.td, f"https://localhost:{port}/b", "https_web"), now=NOW)
        assert refresher.refresh(foreign.td).sequence == 4
        # The certificate names localhost, not 127.0.0.1: the host check refuses it.
        before = _errors(foreign.td, "unauthenticated")
        datastore.put_relationship(
            Relationship(foreign.td, f"https://127.0.0.1:{port}/b", "https_web"), now=NOW)
        outcome = refresher.refresh(foreign.td)
        assert outcome.reason == "unauthenticated"
        assert _errors(foreign.td, "unauthenticated") == before + 1


# ---- bad answers: each keeps the bundle held ---------------------------------------


def _expect_refused(ds: Datastore, refresher: Refresher, td: TrustDomain, held: str,
                    reason: str, clock: FakeClock) -> str:
    before = _errors(td, reason)
    outcome = refresher.refresh(td)
    assert outcome.reason == reason, outcome.message
    assert not outcome.changed
    stored = ds.get_bundle(td)
    assert stored is not None and stored.data == held
    assert _errors(td, reason) == before + 1
    # A failure is retried at the next interval (the held bundle's hint: 60 s -> min 30 s
    # is below it, so 60 s), not at once.
    assert refresher.next_refresh_at(td) == clock.now() + dt.timedelta(seconds=60)
    return outcome.message


def test_http_url_is_refused_without_connecting(datastore: Datastore) -> None:
    ca = TestCa("plain.fed.test")
    held = _hold(datastore, ca.bundle())
    datastore.put_relationship(Relationship(ca.td, "http://127.0.0.1:9/", "https_spiffe",
                                            SpiffeId.parse("spiffe://plain.fed.test/s")),
                               now=NOW)
    refresher, clock = _refresher(datastore)
    message = _expect_refused(datastore, refresher, ca.td, held, "not_https", clock)
    assert "not an https URL" in message


def test_endpoint_speaking_plain_http_is_refused(datastore: Datastore) -> None:
    ca = TestCa("cleartext.fed.test")
    held = _hold(datastore, ca.bundle())

    class Plain(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = ca.bundle(sequence=9).to_json()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        datastore.put_relationship(_spiffe_rel(ca, f"127.0.0.1:{server.server_address[1]}"),
                                   now=NOW)
        refresher, clock = _refresher(datastore)
        _expect_refused(datastore, refresher, ca.td, held, "tls", clock)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("case", ["wrong_ca", "wrong_id"])
def test_unauthenticated_endpoint(datastore: Datastore, tmp_path: Path, case: str) -> None:
    ca = TestCa(f"{case.replace('_', '-')}.fed.test")
    held = _hold(datastore, ca.bundle())
    if case == "wrong_ca":
        impostor = TestCa(ca.td.name)  # same trust domain name, another key
        chain, key = impostor.svid()
    else:
        chain, key = ca.svid("/someone/else")
    with https_server(context_for(tmp_path, chain, key),
                      {"/": body(ca.bundle(sequence=5).to_json())}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, clock = _refresher(datastore)
        message = _expect_refused(datastore, refresher, ca.td, held, "unauthenticated", clock)
    expected = ("not a valid X509-SVID" if case == "wrong_ca"
                else f"endpoint is spiffe://{ca.td.name}/someone/else, expected "
                     f"spiffe://{ca.td.name}/sigil/server")
    assert expected in message


@pytest.mark.parametrize(("answer", "reason"), [
    (b"<html>hello</html>", "not_a_bundle"),
    (b'{"spiffe_sequence": 3}', "not_a_bundle"),
    (b"{" + b" " * (fetch.MAX_BODY_BYTES + 10) + b"}", "too_large"),
])
def test_body_that_is_not_a_bundle_or_too_large(datastore: Datastore, tmp_path: Path,
                                               answer: bytes, reason: str) -> None:
    ca = TestCa(f"{reason.replace('_', '-')}-{len(answer)}.fed.test")
    held = _hold(datastore, ca.bundle())
    with https_server(context_for(tmp_path, *ca.svid()), {"/": body(answer)}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, clock = _refresher(datastore)
        _expect_refused(datastore, refresher, ca.td, held, reason, clock)


def test_exactly_one_mib_is_accepted(datastore: Datastore, tmp_path: Path) -> None:
    ca = TestCa("mib.fed.test")
    _hold(datastore, ca.bundle())
    doc = ca.bundle(sequence=2).to_json()
    padded = doc[:-1] + b" " * (fetch.MAX_BODY_BYTES - len(doc)) + b"}"
    assert len(padded) == fetch.MAX_BODY_BYTES
    with https_server(context_for(tmp_path, *ca.svid()), {"/": body(padded)}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, _ = _refresher(datastore)
        assert refresher.refresh(ca.td).sequence == 2


def test_http_error_status(datastore: Datastore, tmp_path: Path) -> None:
    ca = TestCa("status.fed.test")
    held = _hold(datastore, ca.bundle())
    with https_server(context_for(tmp_path, *ca.svid()), {"/other": body(b"{}")}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, clock = _refresher(datastore)
        assert "HTTP status 404" in _expect_refused(datastore, refresher, ca.td, held,
                                                    "http_status", clock)


def test_bundle_of_another_trust_domain(datastore: Datastore, tmp_path: Path) -> None:
    ca = TestCa("mine.fed.test")
    other = TestCa("other.fed.test")
    held = _hold(datastore, ca.bundle())
    # Authenticated endpoint of mine.fed.test, serving other.fed.test's bundle.
    with https_server(context_for(tmp_path, *ca.svid()),
                      {"/": body(other.bundle(sequence=50).to_json())}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, clock = _refresher(datastore)
        message = _expect_refused(datastore, refresher, ca.td, held, "wrong_trust_domain",
                                  clock)
    assert "authority of trust domain other.fed.test, not mine.fed.test" in message


def test_bundle_that_does_not_authenticate_its_own_endpoint(
        datastore: Datastore, tmp_path: Path) -> None:
    # A CA certificate without any URI SAN cannot be attributed by name; for a
    # self-serving endpoint the bundle must still verify the endpoint's SVID.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from identity.keys import generate_private_key

    ca = TestCa("anon.fed.test")
    held = _hold(datastore, ca.bundle())
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anonymous root")])
    anon = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(NOW - dt.timedelta(hours=1))
            .not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    served = Bundle(ca.td, (anon,), sequence_number=60)
    with https_server(context_for(tmp_path, *ca.svid()), {"/": body(served.to_json())}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, clock = _refresher(datastore)
        message = _expect_refused(datastore, refresher, ca.td, held, "wrong_trust_domain",
                                  clock)
    assert "does not authenticate its own endpoint" in message


def test_lower_sequence_than_held(datastore: Datastore, tmp_path: Path) -> None:
    ca = TestCa("seq.fed.test")
    held = _hold(datastore, ca.bundle(sequence=10))
    with https_server(context_for(tmp_path, *ca.svid()),
                      {"/": body(ca.bundle(sequence=9).to_json())}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, clock = _refresher(datastore)
        message = _expect_refused(datastore, refresher, ca.td, held, "sequence_regressed",
                                  clock)
    assert "sequence 9 is lower than the 10 held" in message


def test_timeout(datastore: Datastore, tmp_path: Path) -> None:
    ca = TestCa("slow.fed.test")
    held = _hold(datastore, ca.bundle())
    release = threading.Event()

    def slow() -> Document:
        release.wait(10)
        return Document(ca.bundle(sequence=2).to_json())

    config = dataclasses.replace(CONFIG, fetch_timeout=dt.timedelta(seconds=1))
    with https_server(context_for(tmp_path, *ca.svid()), {"/": slow}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, clock = _refresher(datastore, config)
        started = time.monotonic()
        try:
            message = _expect_refused(datastore, refresher, ca.td, held, "timeout", clock)
        finally:
            release.set()
    assert "timed out after 1s" in message
    assert time.monotonic() - started < 9  # gave up on its own, not when released


def test_no_bundle_to_authenticate_with(datastore: Datastore, tmp_path: Path) -> None:
    ca = TestCa("nobundle.fed.test")
    datastore.put_relationship(_spiffe_rel(ca, "127.0.0.1:9"), now=NOW)
    refresher, _ = _refresher(datastore)
    before = _errors(ca.td, "no_trust_bundle")
    outcome = refresher.refresh(ca.td)
    assert outcome.reason == "no_trust_bundle"
    assert datastore.get_bundle(ca.td) is None
    assert _errors(ca.td, "no_trust_bundle") == before + 1


def test_tick_follows_the_datastore_and_stops_between_fetches(datastore: Datastore) -> None:
    cas = [TestCa(f"tick{i}.fed.test") for i in range(3)]
    calls: list[str] = []
    refresher: Refresher | None = None

    def fake_fetch(rel: Relationship, **_: object) -> fetch.Fetched:
        calls.append(rel.trust_domain.name)
        if rel.trust_domain == cas[1].td:
            assert refresher is not None
            refresher.stop()  # as a shutdown arriving during this fetch
        ca = next(c for c in cas if c.td == rel.trust_domain)
        return fetch.Fetched(ca.bundle(sequence=1, hint=None), ())

    for ca in cas:
        datastore.put_relationship(Relationship(ca.td, "https://x.test/", "https_web"), now=NOW)
    refresher = Refresher(datastore, CONFIG, FakeClock(NOW), fetch=fake_fetch)
    outcomes = refresher.tick()
    # Stopped during the second fetch: the third is not started.
    assert calls == ["tick0.fed.test", "tick1.fed.test"]
    assert [o.trust_domain for o in outcomes] == [cas[0].td, cas[1].td]
    assert outcomes[0].next_refresh_at == NOW + dt.timedelta(minutes=5)  # no hint: default
    datastore.delete_relationship(cas[0].td)
    refresher._stopping.clear()
    calls.clear()
    refresher.tick()
    assert calls == ["tick2.fed.test"]  # tick0 deleted, tick1 not due yet
    assert refresher.next_refresh_at(cas[0].td) is None


def test_a_newer_bundle_another_server_stored_meanwhile_is_not_overwritten(
        datastore: Datastore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two servers on one database refresh the same relationship.

    Ours reads the held bundle (sequence 1) and fetches sequence 2; before it
    writes, the other server stores sequence 3. Ours must not put 2 over 3: its
    write is conditional on what it read, so it reads again, finds 2 older, and
    says it was superseded (a good answer, not counted as a refused one).
    """
    ca = TestCa("ha.fed.test")
    _hold(datastore, ca.bundle(sequence=1))
    newer = ca.bundle(sequence=3)
    real_get = datastore.get_bundle
    reads = []

    def get_bundle(td: TrustDomain) -> object:
        found = real_get(td)
        reads.append(found)
        if td == ca.td and len([r for r in reads if r is not None]) == 2:
            _hold(datastore, newer)  # the other server, between our read and write
        return found

    with https_server(context_for(tmp_path, *ca.svid()),
                      {"/": body(ca.bundle(sequence=2).to_json())}) as addr:
        datastore.put_relationship(_spiffe_rel(ca, addr), now=NOW)
        refresher, _ = _refresher(datastore)
        monkeypatch.setattr(datastore, "get_bundle", get_bundle)
        outcome = refresher.refresh(ca.td)
    assert (outcome.ok, outcome.changed, outcome.sequence) == (True, False, 3), outcome.message
    assert "superseded" in outcome.message
    stored = real_get(ca.td)
    assert stored is not None and stored.sequence == 3
    assert Bundle.from_jwks(ca.td, stored.data) == newer
