"""Entries and agents through the admin API and sigil-server's CLI, against a real
server, and the bad inputs of issue 3 that concern entries, CSRs, agents and the
admin socket: each gets its status (or exit 2 and one `Error:` line) and changes
nothing."""

from __future__ import annotations

import datetime as dt
import errno
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from api.protos.sigil.types.v1 import types_pb2
from ca.cli import main as cli_main
from ca.datastore import Datastore, NodeRecord
from identity.bundle import Bundle, BundleSet
from identity.jwtsvid import validate_jwt_svid
from identity.keys import generate_private_key, private_key_to_pem
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import certificates_to_pem, new_csr
from tests.integration.conftest import RunningServer
from tests.integration.test_server_agent_api import TARGET, Agent, _attest_request
from tests.support.require import require_root

ENTRY_KEYS = ["id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl",
              "dns_names", "federates_with", "hint", "admin", "downstream", "expires_at",
              "revision", "created_at", "updated_at"]


@pytest.fixture(scope="module")
def sigil_server() -> Iterator[RunningServer]:
    """One server for this module: starting one costs seconds, so the tests share
    it and assert on what they changed (counts before and after, their own names)."""
    root = Path(tempfile.mkdtemp(prefix="sga-", dir="/tmp"))
    srv = RunningServer(trust_domain="it.sigil.test", data_dir=root / "data",
                        socket_path=root / "admin" / "admin.sock")
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def _cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    """sigil-server's CLI in this process (a new interpreter per call costs seconds)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            cli_main([*args, "--socket-path", str(server.socket_path)])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def _stub(server: RunningServer) -> admin_pb2_grpc.AdminStub:
    channel = grpc.insecure_channel(f"unix:{server.socket_path}")
    return admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]


def _token(server: RunningServer) -> dict[str, str]:
    tok = _stub(server).CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=10)
    return {"token": tok.token, "agent_id": tok.agent_id}


def _roots(server: RunningServer) -> bytes:
    b = _stub(server).GetBundle(admin_pb2.GetBundleRequest(), timeout=10)
    return certificates_to_pem(x509.load_der_x509_certificate(d) for d in b.x509_authorities)


def _channel(server: RunningServer, *, key: object = None, chain: list[bytes] | None = None
             ) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=_roots(server),
        private_key=private_key_to_pem(key) if key is not None else None,  # type: ignore[arg-type]
        certificate_chain=certificates_to_pem(
            x509.load_der_x509_certificate(d) for d in chain) if chain else None,
    )
    return grpc.secure_channel(server.address, creds,
                               options=[("grpc.ssl_target_name_override", TARGET)])


def _attest(server: RunningServer, token: str) -> Agent:
    key = generate_private_key()
    with _channel(server) as ch:
        resp = agent_pb2_grpc.AgentStub(ch).AttestAgent(_attest_request(token, key), timeout=10)
    channel = _channel(server, key=key, chain=list(resp.svid.cert_chain))
    return Agent(resp.svid.spiffe_id, key, list(resp.svid.cert_chain),  # type: ignore[arg-type]
                 agent_pb2_grpc.AgentStub(channel), channel)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _json(proc: subprocess.CompletedProcess[str]) -> object:
    return json.loads(_ok(proc))


def _error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one `Error:` line of a failed command (exit 2)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def _count(server: RunningServer) -> int:
    return _stub(server).CountEntries(admin_pb2.CountEntriesRequest(), timeout=10).count  # type: ignore[no-any-return]


def _agents(server: RunningServer) -> int:
    return _stub(server).CountAgents(admin_pb2.CountAgentsRequest(), timeout=10).count  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def admin(sigil_server: RunningServer) -> Iterator[admin_pb2_grpc.AdminStub]:
    with grpc.insecure_channel(f"unix:{sigil_server.socket_path}") as ch:
        yield admin_pb2_grpc.AdminStub(ch)  # type: ignore[no-untyped-call]


@pytest.fixture
def before(sigil_server: RunningServer) -> int:
    """The number of entries when the test starts."""
    return _count(sigil_server)


@pytest.fixture
def agent(sigil_server: RunningServer) -> Iterator[Agent]:
    a = _attest(sigil_server, _token(sigil_server)["token"])
    yield a
    a.channel.close()


def _datastore(server: RunningServer) -> Datastore:
    return Datastore(f"sqlite:///{server.data_dir / 'datastore.sqlite3'}")


# ---- entries ----------------------------------------------------------------------


def test_entry_create_update_show_count(sigil_server: RunningServer, before: int) -> None:
    td = sigil_server.trust_domain
    node = _json(_cli(sigil_server,
        "entry", "create", "--node", "--spiffe-id", f"spiffe://{td}/nodes/rack-1",
        "--selector", "join_token:abc", "--output", "json"))
    assert list(node) == ENTRY_KEYS  # type: ignore[arg-type]
    assert node["parent_id"] == f"spiffe://{td}/sigil/server"  # type: ignore[index]
    web = _json(_cli(sigil_server,
        "entry", "create", "--spiffe-id", f"spiffe://{td}/web", "--parent-id",
        f"spiffe://{td}/nodes/rack-1", "--selector", "unix:uid:1000", "--selector",
        "unix:gid:50", "--federates-with", "partner.test", "--hint", "frontend",
        "--expires-at", "2099-01-01T00:00:00Z", "--admin", "--output", "json"))
    assert web["expires_at"] == "2099-01-01T00:00:00Z" and web["admin"] is True  # type: ignore[index]
    assert _count(sigil_server) == before + 2
    assert _json(_cli(sigil_server, "entry", "count", "--output", "json")) == {
        "count": before + 2}

    def ids(*args: str) -> list[str]:
        return [e["id"] for e in _json(_cli(sigil_server,   # type: ignore[index]
            "entry", "show", "--output", "json", *args))["entries"]]

    assert ids("--selector", "unix:uid:1000") == [web["id"]]  # type: ignore[index]
    assert ids("--selector", "unix:uid:1000", "--match", "exact") == []
    # Same-second entries come in id order: compare as sets.
    assert set(ids("--selector", "unix:uid:1000", "--selector", "join_token:abc",
                   "--match", "any")) == {node["id"], web["id"]}  # type: ignore[index]
    assert ids("--selector", "unix:uid:1000", "--selector", "unix:gid:50",
               "--selector", "unix:x:y", "--match", "subset") == [web["id"]]  # type: ignore[index]
    assert ids("--federates-with", "partner.test") == [web["id"]]  # type: ignore[index]
    assert ids("--hint", "frontend") == [web["id"]]  # type: ignore[index]
    assert ids("--hint", "nope") == []

    updated = _json(_cli(sigil_server,
        "entry", "update", "--id", web["id"], "--selector", "unix:uid:1001",  # type: ignore[index]
        "--x509-svid-ttl", "600", "--clear-federates-with", "--no-admin", "--output", "json"))
    assert updated["revision"] > web["revision"]  # type: ignore[index,operator]
    assert updated["selectors"] == [{"type": "unix", "value": "uid:1001"}]  # type: ignore[index]
    assert (updated["x509_svid_ttl"], updated["federates_with"], updated["admin"],  # type: ignore[index]
            updated["hint"], updated["created_at"]) == (
        600, [], False, "frontend", web["created_at"])  # type: ignore[index]
    assert ids("--selector", "unix:uid:1000") == []
    assert "Found 1 entry" in _ok(_cli(sigil_server, "entry", "show", "--hint", "frontend"))
    assert "event=\"entry updated\"" in sigil_server.log or "entry updated" in sigil_server.log


def test_entry_show_pages_through_everything(
    sigil_server: RunningServer, admin: admin_pb2_grpc.AdminStub
) -> None:
    td = sigil_server.trust_domain
    for i in range(7):
        admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=types_pb2.Entry(
            spiffe_id=f"spiffe://{td}/w{i}", parent_id=f"spiffe://{td}/pages",
            selectors=[types_pb2.Selector(type="u", value=str(i))])), timeout=10)
    parent = f"spiffe://{td}/pages"
    first = admin.ListEntries(admin_pb2.ListEntriesRequest(parent_id=parent, page_size=5),
                              timeout=10)
    second = admin.ListEntries(admin_pb2.ListEntriesRequest(
        parent_id=parent, page_size=5, page_token=first.next_page_token), timeout=10)
    assert (len(first.entries), len(second.entries), second.next_page_token) == (5, 2, "")
    assert len({e.id for e in [*first.entries, *second.entries]}) == 7
    assert len(_json(_cli(sigil_server, "entry", "show", "--parent-id", parent,  # type: ignore[index]
                          "--output", "json"))["entries"]) == 7
    with pytest.raises(grpc.RpcError) as err:
        admin.ListEntries(admin_pb2.ListEntriesRequest(page_token="bogus"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_entry_create_batch(sigil_server: RunningServer, tmp_path: Path, before: int) -> None:
    td = sigil_server.trust_domain
    good = [
        {"spiffe_id": f"spiffe://{td}/a", "parent_id": f"spiffe://{td}/p",
         "selectors": ["unix:uid:1"]},
        {"spiffe_id": f"spiffe://{td}/b", "parent_id": f"spiffe://{td}/p",
         "selectors": [{"type": "unix", "value": "uid:2"}], "dns_names": ["b.example.test"]},
        {"spiffe_id": f"spiffe://{td}/a", "parent_id": f"spiffe://{td}/p",
         "selectors": ["unix:uid:1"]},  # a duplicate of the first
        {"spiffe_id": f"spiffe://{td}/nodes/n", "node": True, "selectors": ["k8s:ns:x"]},
    ]
    path = tmp_path / "batch.json"
    path.write_text(json.dumps({"entries": good}))
    proc = _cli(sigil_server, "entry", "create", "--data", str(path), "--output", "json")
    assert _error(proc) == "Error: 1 of 4 entries were not created"
    results = json.loads(proc.stdout)["results"]
    assert [r["status"] for r in results] == ["created", "created", "error", "created"]
    assert results[2]["code"] == "ALREADY_EXISTS"
    assert results[3]["entry"]["parent_id"] == f"spiffe://{td}/sigil/server"
    assert _count(sigil_server) == before + 3

    # One invalid entry: the batch is refused and nothing is created.
    bad = [{"spiffe_id": f"spiffe://{td}/c", "parent_id": f"spiffe://{td}/p",
            "selectors": ["unix:uid:3"]},
           {"spiffe_id": f"spiffe://{td}/d", "parent_id": f"spiffe://{td}/p",
            "selectors": ["unix:uid:4"], "x509_svid_ttl": 10**8}]
    path.write_text(json.dumps(bad))
    line = _error(_cli(sigil_server, "entry", "create", "--data", str(path)))
    assert "nothing was created: entry 1: x509_svid_ttl 100000000" in line
    assert _count(sigil_server) == before + 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ("{}", "expected a list of entries"),
        ("[]", "holds no entries"),
        ('[{"spiffe_id": 5}]', "entry 0: spiffe_id must be a string"),
        ('[{"spiffe_id": "spiffe://x/y", "bogus": 1}]', "unknown key 'bogus'"),
        ('[{"selectors": ["nocolon"]}]', "is not type:value"),
        ('[{"expires_at": "tomorrow"}]', "not unix seconds or an RFC 3339 time"),
    ],
)
def test_entry_batch_file_errors(
    sigil_server: RunningServer, tmp_path: Path, content: str, message: str, before: int
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert message in _error(_cli(sigil_server, "entry", "create", "--data", str(path)))
    assert _count(sigil_server) == before


def _api_entry(td: str, **fields: object) -> types_pb2.Entry:
    base: dict[str, object] = {
        "spiffe_id": f"spiffe://{td}/w", "parent_id": f"spiffe://{td}/p",
        "selectors": [types_pb2.Selector(type="unix", value="uid:1")]}
    base.update(fields)
    return types_pb2.Entry(**base)  # type: ignore[arg-type]


BAD_API_ENTRIES = [
    ({"spiffe_id": "spiffe://bad domain/x"}, "spiffe_id"),
    ({"spiffe_id": "http://TD/x"}, "spiffe_id"),
    ({"spiffe_id": "spiffe://TD/a//b"}, "spiffe_id"),
    ({"spiffe_id": "spiffe://TD/sigil/server"}, "reserved"),
    ({"parent_id": ""}, "parent_id is required"),
    ({"parent_id": "spiffe://elsewhere.test/p"}, "not in the trust domain"),
    ({"selectors": []}, "at least one selector"),
    ({"selectors": [types_pb2.Selector(type="", value="x")]}, "selector"),
    ({"selectors": [types_pb2.Selector(type="unix", value="")]}, "selector"),
    ({"selectors": [types_pb2.Selector(type="u", value=str(i)) for i in range(65)]},
     "at most 64"),
    ({"x509_svid_ttl": -1}, "x509_svid_ttl"),
    ({"jwt_svid_ttl": 10**9}, "jwt_svid_ttl"),
    ({"dns_names": ["under_score.test"]}, "not a valid host name"),
    ({"dns_names": ["a" * 64 + ".test"]}, "not a valid host name"),
    ({"dns_names": ["server.sigil.invalid"]}, "reserved"),
    ({"hint": "h" * 1025}, "hint"),
    ({"federates_with": ["spiffe://"]}, "federates_with"),
    ({"federates_with": ["TD"]}, "own trust domain"),
    ({"expires_at": -5}, "expires_at"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_API_ENTRIES)
def test_bad_entry_via_api_writes_nothing(
    sigil_server: RunningServer, admin: admin_pb2_grpc.AdminStub, fields: dict[str, object],
    message: str, before: int,
) -> None:
    td = sigil_server.trust_domain
    fixed = {k: ([x.replace("TD", td) for x in v] if isinstance(v, list) and v
                 and isinstance(v[0], str) else v.replace("TD", td) if isinstance(v, str) else v)
             for k, v in fields.items()}
    with pytest.raises(grpc.RpcError) as err:
        admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=_api_entry(td, **fixed)),
                          timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert admin.CountEntries(admin_pb2.CountEntriesRequest(), timeout=10).count == before


def test_bad_entry_update_via_api_changes_nothing(
    sigil_server: RunningServer, admin: admin_pb2_grpc.AdminStub
) -> None:
    td = sigil_server.trust_domain
    created = admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=_api_entry(td)), timeout=10)
    cases = [
        (_api_entry(td, id=created.id, dns_names=["bad!"]), ["dns_names"],
         grpc.StatusCode.INVALID_ARGUMENT),
        (_api_entry(td, id=created.id), ["revision"], grpc.StatusCode.INVALID_ARGUMENT),
        (_api_entry(td, id=created.id), [], grpc.StatusCode.INVALID_ARGUMENT),
        (_api_entry(td, id="nope", hint="x"), ["hint"], grpc.StatusCode.NOT_FOUND),
    ]
    for patch, fields, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=patch, fields=fields),
                              timeout=10)
        assert err.value.code() == code, (fields, err.value.details())
    assert admin.GetEntry(admin_pb2.GetEntryRequest(id=created.id), timeout=10) == created


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spiffe-id", "spiffe://TD/w", "--selector", "unix:uid:1"], "--parent-id"),
        (["--node", "--parent-id", "spiffe://TD/p", "--spiffe-id", "spiffe://TD/w",
          "--selector", "unix:uid:1"], "not both"),
        (["--node", "--spiffe-id", "spiffe://TD/w"], "--selector"),
        (["--node", "--spiffe-id", "spiffe://TD/w", "--selector", "unix:b",
          "--expires-at", "soon"], "--expires-at"),
        (["--data", "/nonexistent/file.json"], "cannot read"),
    ],
)
def test_bad_entry_create_cli(
    sigil_server: RunningServer, args: list[str], message: str, before: int
) -> None:
    argv = [a.replace("TD", sigil_server.trust_domain) for a in args]
    assert message in _error(_cli(sigil_server, "entry", "create", *argv))
    assert _count(sigil_server) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["update", "--id", "x"], "nothing to change"),
        (["update", "--id", "x", "--hint", "h"], "not found"),
        (["update", "--id", "x", "--x509-svid-ttl", "-3"], "--x509-svid-ttl"),
        (["show", "--match", "most"], "most"),
        (["show", "--federates-with", "spiffe://"], "federates_with"),
    ],
)
def test_bad_entry_other_cli(sigil_server: RunningServer, args: list[str], message: str) -> None:
    assert message in _error(_cli(sigil_server, "entry", *args))


def test_oversized_admin_message_is_refused(
    sigil_server: RunningServer, admin: admin_pb2_grpc.AdminStub, before: int
) -> None:
    td = sigil_server.trust_domain
    huge = _api_entry(td, dns_names=["a.test"] * 800_000)  # ~6 MiB, over the 4 MiB limit
    with pytest.raises(grpc.RpcError) as err:
        admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=huge), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admin.CountEntries(admin_pb2.CountEntriesRequest(), timeout=10).count == before


# ---- agents -------------------------------------------------------------------------


def _sync_code(a: Agent) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        a.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(), timeout=10)
    return err.value.code(), err.value.details() or ""


def _sign_code(a: Agent, entry_id: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        a.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
            agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=new_csr(generate_private_key()))
        ]), timeout=10)
    return err.value.code(), err.value.details() or ""


def _entry_for(server: RunningServer, parent: str) -> str:
    td = server.trust_domain
    return _json(_cli(server,   # type: ignore[index,no-any-return]
        "entry", "create", "--spiffe-id", f"spiffe://{td}/web", "--parent-id", parent,
        "--selector", "unix:uid:1", "--output", "json"))["id"]


def test_agent_list_show_count(sigil_server: RunningServer, agent: Agent) -> None:
    listed = _json(_cli(sigil_server, "agent", "list", "--output", "json"))["agents"]  # type: ignore[index]
    (mine,) = [a for a in listed if a["id"] == agent.agent_id]  # type: ignore[attr-defined]
    shown = _json(_cli(sigil_server, "agent", "show", "--id", agent.agent_id, "--output", "json"))
    assert shown == mine
    assert list(shown) == ["id", "attestor", "selectors", "serial", "expires_at", "banned",  # type: ignore[arg-type]
                           "can_reattest", "created_at", "updated_at"]
    leaf = x509.load_der_x509_certificate(agent.chain_der[0])
    assert shown["serial"] == format(leaf.serial_number, "x")  # type: ignore[index]
    assert shown["attestor"] == "join_token" and shown["banned"] is False  # type: ignore[index]
    count = _agents(sigil_server)
    assert count == len(listed)  # type: ignore[arg-type]
    assert _json(_cli(sigil_server, "agent", "count", "--output", "json")) == {"count": count}
    assert agent.agent_id in _ok(_cli(sigil_server, "agent", "list"))


def test_banned_agent_is_refused_at_sync_and_signing(
    sigil_server: RunningServer, agent: Agent
) -> None:
    entry_id = _entry_for(sigil_server, agent.agent_id)
    assert len(agent.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(),
                                         timeout=10).entries) == 1
    banned = _json(_cli(sigil_server, "agent", "ban", "--id", agent.agent_id, "--output", "json"))
    assert banned["banned"] is True  # type: ignore[index]
    assert _sync_code(agent) == (grpc.StatusCode.PERMISSION_DENIED,
                                 f"agent is banned: {agent.agent_id}")
    assert _sign_code(agent, entry_id)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert "agent banned" in sigil_server.log
    assert "request refused" in sigil_server.log and "agent is banned" in sigil_server.log


def test_evicted_agent_must_attest_again(sigil_server: RunningServer, agent: Agent) -> None:
    entry_id = _entry_for(sigil_server, agent.agent_id)
    agents = _agents(sigil_server)
    assert "Evicted agent" in _ok(_cli(sigil_server, "agent", "evict", "--id", agent.agent_id))
    code, details = _sync_code(agent)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not attested" in details
    assert _sign_code(agent, entry_id)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert _agents(sigil_server) == agents - 1
    assert "not found" in _error(_cli(sigil_server, "agent", "evict", "--id", agent.agent_id))
    fresh = _attest(sigil_server, _token(sigil_server)["token"])
    try:
        fresh.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(), timeout=10)
    finally:
        fresh.channel.close()


def test_banned_agent_cannot_attest_again(sigil_server: RunningServer) -> None:
    # Join-token agent IDs are per token, so put a banned record under the ID the
    # next token will give (as a stable-ID attestor would meet it).
    tok = _token(sigil_server)
    with _datastore(sigil_server) as ds:
        ds.put_node(NodeRecord(spiffe_id=SpiffeId.parse(tok["agent_id"]), attestor="join_token",
                               serial=1, expires_at=0, banned=True),
                    now=dt.datetime.now(dt.UTC))
    with _channel(sigil_server) as ch, pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.AgentStub(ch).AttestAgent(
            _attest_request(tok["token"], generate_private_key()), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == f"agent is banned: {tok['agent_id']}"
    # Nothing was written: the token was not consumed, so after eviction lifts the
    # ban the same token attests.
    _ok(_cli(sigil_server, "agent", "evict", "--id", tok["agent_id"]))
    a = _attest(sigil_server, tok["token"])
    a.channel.close()
    assert a.agent_id == tok["agent_id"]


def test_agent_purge(sigil_server: RunningServer, agent: Agent) -> None:
    td = TrustDomain(sigil_server.trust_domain)
    now = dt.datetime.now(dt.UTC)
    old = SpiffeId.from_segments(td, "sigil", "agent", "join_token", "gone")
    with _datastore(sigil_server) as ds:
        ds.put_node(NodeRecord(spiffe_id=old, attestor="join_token", serial=7,
                               expires_at=int((now - dt.timedelta(days=3)).timestamp()),
                               selectors=(Selector("join_token", "gone"),)), now=now)
    agents = _agents(sigil_server)
    dry = _json(_cli(sigil_server, "agent", "purge", "--dry-run", "--output", "json"))
    assert dry == {"ids": [str(old)], "dry_run": True}
    assert _agents(sigil_server) == agents
    assert _json(_cli(sigil_server, "agent", "purge", "--expired-for", "4d",
                                  "--output", "json")) == {"ids": [], "dry_run": False}
    assert "Removed 1 agent" in _ok(_cli(sigil_server, "agent", "purge"))
    assert _agents(sigil_server) == agents - 1
    listed = _json(_cli(sigil_server, "agent", "list", "--output", "json"))["agents"]  # type: ignore[index]
    assert agent.agent_id in [a["id"] for a in listed]  # type: ignore[attr-defined]
    assert str(old) not in [a["id"] for a in listed]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "--id", "nope"], "--id"),
        (["show", "--id", "spiffe://TD/web"], "is not an agent ID"),
        (["show", "--id", "spiffe://TD/sigil/agent/join_token/none"], "not found"),
        (["ban", "--id", "spiffe://TD/sigil/agent/join_token/none"], "not found"),
        (["purge", "--expired-for", "soon"], "--expired-for"),
        (["purge", "--expired-for", "5s"], "at least 60 seconds"),
    ],
)
def test_bad_agent_cli(sigil_server: RunningServer, args: list[str], message: str) -> None:
    argv = [a.replace("TD", sigil_server.trust_domain) for a in args]
    assert message in _error(_cli(sigil_server, "agent", *argv))


# ---- CSRs -------------------------------------------------------------------------


def _csr(key: object, *, uri: str | None = None, dns: tuple[str, ...] = ()) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "me")]))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    if uri:
        names.append(x509.UniformResourceIdentifier(uri))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)  # type: ignore[arg-type]


WEAK_KEYS = {
    "rsa-1024": lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
    "p-192": lambda: ec.generate_private_key(ec.SECP192R1()),
    "secp256k1": lambda: ec.generate_private_key(ec.SECP256K1()),
}


@pytest.mark.parametrize("kind", sorted(WEAK_KEYS))
def test_csr_with_weak_key(sigil_server: RunningServer, agent: Agent, kind: str) -> None:
    entry_id = _entry_for(sigil_server, agent.agent_id)
    csr = _csr(WEAK_KEYS[kind]())
    (result,) = agent.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
        agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=csr)]), timeout=10).results
    assert result.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "invalid CSR" in result.status.message and not result.svid.cert_chain
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.RenewAgent(agent_pb2.RenewAgentRequest(csr=csr), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The agent's record is unchanged: no renewed SVID was recorded.
    shown = _json(_cli(sigil_server, "agent", "show", "--id", agent.agent_id, "--output", "json"))
    assert shown["serial"] == format(  # type: ignore[index]
        x509.load_der_x509_certificate(agent.chain_der[0]).serial_number, "x")


@pytest.mark.parametrize("csr", [b"", b"garbage", b"\x30\x03\x02\x01\x00"])
def test_malformed_csr(agent: Agent, sigil_server: RunningServer, csr: bytes) -> None:
    entry_id = _entry_for(sigil_server, agent.agent_id)
    (result,) = agent.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
        agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=csr)]), timeout=10).results
    assert result.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.RenewAgent(agent_pb2.RenewAgentRequest(csr=csr), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_csr_asking_for_another_identity(sigil_server: RunningServer, agent: Agent) -> None:
    td = sigil_server.trust_domain
    entry_id = _entry_for(sigil_server, agent.agent_id)
    csr = _csr(generate_private_key(), uri=f"spiffe://{td}/admin",
               dns=("evil.example.test", "localhost"))
    (result,) = agent.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
        agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=csr)]), timeout=10).results
    assert result.status.code == 0
    leaf = x509.load_der_x509_certificate(result.svid.cert_chain[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{td}/web"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://{td}/web")]


def test_csr_for_unauthorized_entry(sigil_server: RunningServer, agent: Agent) -> None:
    other = _token(sigil_server)["agent_id"]
    entry_id = _entry_for(sigil_server, other)
    (result,) = agent.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
        agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=new_csr(generate_private_key()))
    ]), timeout=10).results
    assert result.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert not result.svid.cert_chain


def test_oversized_agent_message_is_refused(sigil_server: RunningServer, agent: Agent) -> None:
    refused = sigil_server.log.count("svid refused")
    params = [agent_pb2.NewX509SVIDParams(entry_id="x", csr=b"\0" * 1_000_000)] * 5
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=params),
                                    timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The connection and the agent are fine afterwards.
    agent.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(), timeout=10)
    assert sigil_server.log.count("svid refused") == refused  # never reached the servicer


# ---- minting ----------------------------------------------------------------------------


def _bundle(server: RunningServer) -> Bundle:
    return Bundle.from_jwks(TrustDomain(server.trust_domain),
                            _ok(_cli(server, "bundle", "show", "--format", "spiffe")))


def test_x509_mint_write_and_json(sigil_server: RunningServer, tmp_path: Path) -> None:
    td = sigil_server.trust_domain
    out = tmp_path / "svid"
    _ok(_cli(sigil_server, "x509", "mint", "--spiffe-id", f"spiffe://{td}/debug", "--ttl", "10m",
                         "--dns-name", "debug.example.test", "--write", str(out)))
    assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600
    proc = subprocess.run(["openssl", "verify", "-CAfile", str(out / "bundle.pem"),
                           str(out / "svid.pem")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    leaf = x509.load_pem_x509_certificate((out / "svid.pem").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{td}/debug"]
    assert san.get_values_for_type(x509.DNSName) == ["debug.example.test"]
    life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert 600 <= life <= 620
    doc = _json(_cli(sigil_server, "x509", "mint", "--spiffe-id", f"spiffe://{td}/debug",
                                 "--output", "json"))
    assert list(doc) == ["spiffe_id", "expires_at", "svid_pem", "key_pem", "bundle_pem"]  # type: ignore[arg-type]
    assert "PRIVATE KEY" in doc["key_pem"]  # type: ignore[index]
    assert doc["key_pem"].split("\n")[1] not in sigil_server.log  # type: ignore[index]


def test_jwt_mint(sigil_server: RunningServer) -> None:
    td = sigil_server.trust_domain
    doc = _json(_cli(sigil_server, "jwt", "mint", "--spiffe-id", f"spiffe://{td}/debug",
                                 "--audience", "db", "--ttl", "2m", "--output", "json"))
    svid = validate_jwt_svid(doc["token"], bundles=BundleSet([_bundle(sigil_server)]),  # type: ignore[index]
                             audience="db", now=dt.datetime.now(dt.UTC))
    assert str(svid.spiffe_id) == f"spiffe://{td}/debug"
    assert 100 <= (svid.expires_at - dt.datetime.now(dt.UTC)).total_seconds() <= 121
    assert doc["token"] not in sigil_server.log  # type: ignore[index]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x509", "mint", "--spiffe-id", "spiffe://elsewhere.test/x"], "not in the trust domain"),
        (["x509", "mint", "--spiffe-id", "spiffe://TD/sigil/agent/x"], "reserved"),
        (["x509", "mint", "--spiffe-id", "spiffe://TD/x", "--ttl", "9999d"], "ttl"),
        (["x509", "mint", "--spiffe-id", "spiffe://TD/x", "--dns-name", "a..b"], "host name"),
        (["x509", "mint", "--spiffe-id", "spiffe://TD/x", "--write", "/proc/nope"],
         "cannot write"),
        (["jwt", "mint", "--spiffe-id", "spiffe://TD/x"], "--audience"),
        (["jwt", "mint", "--spiffe-id", "nope", "--audience", "a"], "--spiffe-id"),
        (["jwt", "mint", "--spiffe-id", "spiffe://TD/x", "--audience", "a" * 300],
         "audience"),
    ],
)
def test_bad_mint_input(sigil_server: RunningServer, args: list[str], message: str) -> None:
    argv = [a.replace("TD", sigil_server.trust_domain) for a in args]
    assert message in _error(_cli(sigil_server, *argv))


# ---- the admin socket ---------------------------------------------------------------------


def test_admin_socket_refuses_other_users(sigil_server: RunningServer, before: int) -> None:
    require_root("to switch to another UID")
    pid = os.fork()
    if pid == 0:  # the child: become nobody and try to connect
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(sigil_server.socket_path))
                code = 3  # connected: the test fails
            except PermissionError as exc:
                code = 0 if exc.errno == errno.EACCES else 4
            except OSError:
                code = 5
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, f"child exit {os.WEXITSTATUS(status)}"
    # And nothing changed through it.
    assert _count(sigil_server) == before


@pytest.mark.parametrize("args", [
    ["entry", "create"], ["entry", "show"], ["entry", "update"], ["entry", "count"],
    ["agent", "list"], ["agent", "show"], ["agent", "ban"], ["agent", "evict"],
    ["agent", "count"], ["agent", "purge"], ["x509", "mint"], ["jwt", "mint"],
])
def test_help_has_examples(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Usage: sigil-server" in out and "Example" in out
