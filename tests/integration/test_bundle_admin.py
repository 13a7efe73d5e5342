"""Foreign bundles by hand (``sigil-server bundle list|show|set|delete``) and their
way to agents: SyncAuthorizedEntries sends an agent the bundles its entries
federate with, and the new one after a change.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.agent.v1 import agent_pb2
from identity.bundle import Bundle, JwtAuthority
from identity.keys import generate_private_key, key_id
from identity.spiffeid import TrustDomain
from identity.x509svid import new_ca_certificate
from tests.integration.conftest import RunningServer, server_command
from tests.integration.test_server_agent_api import Agent, _attest, _entry, _token

FOREIGN = TrustDomain("b.fed.test")
NOW = dt.datetime.now(dt.UTC)


def _foreign_bundle(td: TrustDomain = FOREIGN, *, sequence: int | None = 7) -> Bundle:
    key = generate_private_key()
    cert = new_ca_certificate(trust_domain=td, public_key=key.public_key(), signer_key=key,
                              not_before=NOW - dt.timedelta(minutes=1),
                              not_after=NOW + dt.timedelta(days=1))
    jwt_key = generate_private_key()
    return Bundle(td, (cert,), (JwtAuthority(key_id(jwt_key.public_key()),
                                             jwt_key.public_key(), None),),
                  sequence_number=sequence, refresh_hint=300)


def _run(server: RunningServer, *args: str, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*server_command(), *args, "--socket-path", str(server.socket_path)],
                          input=stdin, capture_output=True, text=True, timeout=60)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def test_set_list_show_delete(sigil_server: RunningServer, tmp_path: object) -> None:
    assert _ok(_run(sigil_server, "bundle", "list")) == "No foreign bundles.\n"
    b = _foreign_bundle()
    doc = json.loads(_ok(_run(sigil_server, "bundle", "set", "--id", "spiffe://b.fed.test",
                              "--format", "spiffe", "--output", "json",
                              stdin=b.to_json().decode())))
    assert doc == {"trust_domain": "b.fed.test", "sequence_number": 7, "refresh_hint": 300,
                   "x509_authorities": 1, "jwt_authorities": 1, "bundle": b.to_jwks()}
    # Shown back exactly as set, in both formats.
    assert _ok(_run(sigil_server, "bundle", "show", "--trust-domain", "b.fed.test",
                    "--format", "spiffe")) == b.to_json().decode() + "\n"
    assert _ok(_run(sigil_server, "bundle", "show", "--id", "spiffe://b.fed.test")
               ) == b.x509_pem().decode()
    # Our own still shows without a trust domain, and is not in the list.
    own = x509.load_pem_x509_certificates(_ok(_run(sigil_server, "bundle", "show")).encode())
    assert own[0].subject != b.x509_authorities[0].subject
    listed = json.loads(_ok(_run(sigil_server, "bundle", "list", "--output", "json")))
    assert [x["trust_domain"] for x in listed["bundles"]] == ["b.fed.test"]
    text = _ok(_run(sigil_server, "bundle", "list"))
    assert text == "# spiffe://b.fed.test sequence 7\n" + b.x509_pem().decode()

    # A PEM set by hand replaces the held one: lower sequence or not, JWT keys go.
    pem_path = f"{tmp_path}/b.pem"
    c = _foreign_bundle()
    with open(pem_path, "wb") as f:
        f.write(c.x509_pem())
    out = _ok(_run(sigil_server, "bundle", "set", "--trust-domain", "b.fed.test",
                   "--path", pem_path))
    assert out == ("Bundle of spiffe://b.fed.test set: sequence 8, 1 CA certificate(s), "
                   "0 JWT key(s).\n")
    shown = json.loads(_ok(_run(sigil_server, "bundle", "show", "--id", "spiffe://b.fed.test",
                                "--output", "json")))
    assert (shown["sequence_number"], shown["jwt_authorities"]) == (8, 0)
    # A spiffe document with a lower sequence still wins: a hand override.
    d = _foreign_bundle(sequence=2)
    _ok(_run(sigil_server, "bundle", "set", "--id", "spiffe://b.fed.test", "--format",
             "spiffe", stdin=d.to_json().decode()))
    assert _ok(_run(sigil_server, "bundle", "show", "--id", "spiffe://b.fed.test",
                    "--format", "spiffe")) == d.to_json().decode() + "\n"

    assert _ok(_run(sigil_server, "bundle", "delete", "--id", "spiffe://b.fed.test")
               ) == "Bundle of spiffe://b.fed.test deleted.\n"
    assert _ok(_run(sigil_server, "bundle", "list")) == "No foreign bundles.\n"
    assert "no bundle for trust domain b.fed.test (NOT_FOUND)" in _error(
        _run(sigil_server, "bundle", "show", "--id", "spiffe://b.fed.test"))
    assert "no bundle for trust domain b.fed.test (NOT_FOUND)" in _error(
        _run(sigil_server, "bundle", "delete", "--trust-domain", "b.fed.test"))


BAD_SET = [
    # (args, stdin, message in the one Error line)
    (["--id", "spiffe://it.sigil.test"], "PEM", "own trust domain"),
    (["--id", "b.fed.test"], "PEM", "--id 'b.fed.test' must look like spiffe://NAME"),
    (["--id", "spiffe://b.fed.test/w"], "PEM", "not a workload ID"),
    (["--trust-domain", "B_FED!"], "PEM", "--trust-domain"),
    (["--id", "spiffe://b.fed.test", "--trust-domain", "b.fed.test"], "PEM", "not both"),
    ([], "PEM", "name the foreign trust domain"),
    (["--id", "spiffe://b.fed.test"], "", "stdin is empty"),
    (["--id", "spiffe://b.fed.test"], "not a bundle", "bundle of b.fed.test (pem)"),
    (["--id", "spiffe://b.fed.test", "--format", "spiffe"], "{]",
     "bundle of b.fed.test (spiffe)"),
    (["--id", "spiffe://b.fed.test", "--format", "spiffe"], '{"keys": []}',
     "holds no CA certificate and no JWT key"),
    (["--id", "spiffe://b.fed.test", "--format", "spiffe"], '{"nokeys": 1}', "no 'keys'"),
    (["--id", "spiffe://b.fed.test"], "x" * (1024 * 1024 + 1), "larger than 1048576 bytes"),
    (["--id", "spiffe://b.fed.test", "--path", "/nonexistent/b.pem"], "", "cannot read"),
    (["--id", "spiffe://b.fed.test", "--format", "der"], "PEM", "'der'"),
    (["--id", "spiffe://c.fed.test"], "PEM",
     "bundle holds a CA certificate of trust domain b.fed.test, not c.fed.test"),
]


@pytest.fixture
def held(sigil_server: RunningServer) -> Iterator[Bundle]:
    """A foreign bundle already held: bad input must leave it exactly as it is."""
    b = _foreign_bundle()
    _ok(_run(sigil_server, "bundle", "set", "--id", "spiffe://b.fed.test", "--format",
             "spiffe", stdin=b.to_json().decode()))
    yield b


def test_bad_set_changes_nothing(sigil_server: RunningServer, held: Bundle) -> None:
    valid_pem = _foreign_bundle().x509_pem().decode()
    before = _ok(_run(sigil_server, "bundle", "list", "--output", "json"))
    own_before = _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe"))
    for args, stdin, message in BAD_SET:
        proc = _run(sigil_server, "bundle", "set", *args,
                    stdin=valid_pem if stdin == "PEM" else stdin)
        if "'der'" in message:  # click's own usage error: still exit 2
            assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        else:
            assert message in _error(proc), (args, proc.stderr)
    assert _ok(_run(sigil_server, "bundle", "list", "--output", "json")) == before
    assert _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe")) == own_before


def test_own_trust_domain_cannot_be_deleted(sigil_server: RunningServer) -> None:
    own_before = _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe"))
    line = _error(_run(sigil_server, "bundle", "delete", "--id", "spiffe://it.sigil.test"))
    assert "own trust domain" in line and "(INVALID_ARGUMENT)" in line
    assert _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe")) == own_before
    # Naming our own trust domain in show is the same as naming none.
    assert _ok(_run(sigil_server, "bundle", "show", "--trust-domain", "it.sigil.test",
                    "--format", "spiffe")) == own_before


@pytest.mark.parametrize("args", [["list"], ["set"], ["delete"], ["show"]])
def test_bundle_help_has_examples(args: list[str]) -> None:
    proc = subprocess.run([*server_command(), "bundle", *args, "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert "Example" in proc.stdout and "sigil-server bundle" in proc.stdout


def _sync_bundles(agent: Agent) -> dict[str, int]:
    pages = list(agent.stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(),
                                                  timeout=10))
    return {name: b.sequence_number for name, b in pages[0].bundles.items()}


def test_sync_sends_federated_bundles_of_the_agents_entries(sigil_server: RunningServer) -> None:
    td = sigil_server.trust_domain
    a = _attest(sigil_server, _token(sigil_server)["token"])
    b = _attest(sigil_server, _token(sigil_server)["token"])
    try:
        for name, seq in (("b.fed.test", 7), ("c.fed.test", 3)):
            bundle = _foreign_bundle(TrustDomain(name), sequence=seq)
            _ok(_run(sigil_server, "bundle", "set", "--trust-domain", name, "--format",
                     "spiffe", stdin=bundle.to_json().decode()))
        _entry(sigil_server, f"spiffe://{td}/web", a.agent_id, "--selector", "unix:uid:1",
               "--federates-with", "spiffe://b.fed.test")
        # b's entry federates with a trust domain nobody holds a bundle for.
        _entry(sigil_server, f"spiffe://{td}/db", b.agent_id, "--selector", "unix:uid:1",
               "--federates-with", "spiffe://d.fed.test")
        assert _sync_bundles(a) == {td: 1, "b.fed.test": 7}
        assert _sync_bundles(b) == {td: 1}
        unary = a.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(), timeout=10)
        assert sorted(unary.bundles) == sorted([td, "b.fed.test"])

        # A changed foreign bundle reaches the agent at its next sync, incremental too.
        first = list(a.stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(),
                                                  timeout=10))
        new = _foreign_bundle(sequence=9)
        _ok(_run(sigil_server, "bundle", "set", "--id", "spiffe://b.fed.test", "--format",
                 "spiffe", stdin=new.to_json().decode()))
        again = list(a.stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(
            known_revision=first[0].revision, known_generation=first[0].generation),
            timeout=10))
        assert not again[0].full_resync and not again[0].entries
        got = again[0].bundles["b.fed.test"]
        assert got.sequence_number == 9
        assert list(got.x509_authorities) == [new.x509_authorities[0].public_bytes(Encoding.DER)]

        # By digest: a bundle the agent holds unchanged is named, not sent again;
        # one it holds in another version comes whole.
        digests = dict(again[0].bundle_digests)
        assert sorted(digests) == sorted([td, "b.fed.test"])
        assert sorted(again[0].bundles) == sorted(digests)  # it presented none

        def resync(known: dict[str, str]) -> agent_pb2.SyncAuthorizedEntriesPage:
            pages = list(a.stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(
                known_revision=again[0].revision, known_generation=again[0].generation,
                known_bundle_digests=known), timeout=10))
            return pages[0]

        same = resync(digests)
        assert dict(same.bundle_digests) == digests and not same.bundles
        stale = resync({**digests, "b.fed.test": "0" * 32})
        assert list(stale.bundles) == ["b.fed.test"]
        assert stale.bundles["b.fed.test"].sequence_number == 9

        # Deleted: no longer sent, nor named (the agent drops it).
        _ok(_run(sigil_server, "bundle", "delete", "--id", "spiffe://b.fed.test"))
        assert _sync_bundles(a) == {td: 1}
        assert sorted(resync(digests).bundle_digests) == [td]
    finally:
        a.channel.close()
        b.channel.close()


def test_admin_api_statuses_and_nothing_written(sigil_server: RunningServer) -> None:
    """The RPCs themselves (what a client other than our CLI sends)."""
    pem = _foreign_bundle().x509_pem()
    cases = [
        ("SetBundle", admin_pb2.SetBundleRequest(trust_domain="b.fed.test", format="der",
                                                 data=pem),
         grpc.StatusCode.INVALID_ARGUMENT, "format must be one of pem, spiffe, not 'der'"),
        ("SetBundle", admin_pb2.SetBundleRequest(trust_domain="b.fed.test", format="pem",
                                                 data=b"\n" * (1024 * 1024 + 1)),
         grpc.StatusCode.INVALID_ARGUMENT,
         "bundle is 1048577 bytes, more than the limit of 1048576"),
        ("SetBundle", admin_pb2.SetBundleRequest(format="pem", data=pem),
         grpc.StatusCode.INVALID_ARGUMENT, "trust_domain is required"),
        ("SetBundle", admin_pb2.SetBundleRequest(trust_domain="spiffe://b.fed.test/x",
                                                 format="pem", data=pem),
         grpc.StatusCode.INVALID_ARGUMENT,
         "trust_domain 'spiffe://b.fed.test/x' must be a trust domain (spiffe://name), "
         "not a workload ID"),
        ("SetBundle", admin_pb2.SetBundleRequest(trust_domain="it.sigil.test", format="pem",
                                                 data=pem),
         grpc.StatusCode.INVALID_ARGUMENT, "it.sigil.test is this server's own trust domain"),
        ("GetBundle", admin_pb2.GetBundleRequest(trust_domain="Bad Domain"),
         grpc.StatusCode.INVALID_ARGUMENT, "trust_domain: "),
        ("GetBundle", admin_pb2.GetBundleRequest(trust_domain="b.fed.test"),
         grpc.StatusCode.NOT_FOUND, "no bundle for trust domain b.fed.test"),
        ("DeleteBundle", admin_pb2.DeleteBundleRequest(trust_domain="b.fed.test"),
         grpc.StatusCode.NOT_FOUND, "no bundle for trust domain b.fed.test"),
    ]
    with grpc.insecure_channel(f"unix:{sigil_server.socket_path}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        own_before = stub.GetBundle(admin_pb2.GetBundleRequest(), timeout=10)
        for method, request, code, details in cases:
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, timeout=10)
            assert err.value.code() == code, (method, err.value.details())
            assert err.value.details().startswith(details), err.value.details()
        assert list(stub.ListBundles(admin_pb2.ListBundlesRequest(), timeout=10).bundles) == []
        assert stub.GetBundle(admin_pb2.GetBundleRequest(), timeout=10) == own_before


def test_a_damaged_foreign_bundle_row_does_not_fail_the_sync(
    sigil_server: RunningServer
) -> None:
    td = sigil_server.trust_domain
    a = _attest(sigil_server, _token(sigil_server)["token"])
    try:
        _ok(_run(sigil_server, "bundle", "set", "--trust-domain", "b.fed.test", "--format",
                 "spiffe", stdin=_foreign_bundle().to_json().decode()))
        _entry(sigil_server, f"spiffe://{td}/web", a.agent_id, "--selector", "unix:uid:1",
               "--federates-with", "spiffe://b.fed.test")
        assert _sync_bundles(a) == {td: 1, "b.fed.test": 7}
        # Damaged behind the server's back (neither writer stores what does not parse).
        with sqlite3.connect(sigil_server.data_dir / "datastore.sqlite3") as db:
            db.execute("UPDATE bundles SET data = '{not json' WHERE trust_domain = 'b.fed.test'")
            # With the change event a writer records: syncs keep the bundle they
            # read until an event says it changed.
            db.execute("INSERT INTO change_events (kind, entry_id, at) "
                       "VALUES ('bundle_changed', 'foreign-bundles', 0)")
        deadline = time.monotonic() + 30  # the server polls the change log every second
        while (held := _sync_bundles(a)) != {td: 1} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held == {td: 1}
        assert "stored foreign bundle unreadable" in sigil_server.log
        assert "trust_domain=b.fed.test" in sigil_server.log
    finally:
        a.channel.close()
