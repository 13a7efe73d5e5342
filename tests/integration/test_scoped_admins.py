"""Scoped admins (issue 12, part 3) against a real server: Unix users with roles
calling through the real ``sigil-server`` CLI as themselves, admin SVIDs over the
agent API's TLS port, and the audit log."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.types.v1 import types_pb2
from identity.keys import generate_private_key
from identity.x509svid import new_csr
from tests.integration.conftest import RunningServer, server_command
from tests.integration.test_admin_entries_agents import _attest, _channel
from tests.support.require import require_root

TD = "it.sigil.test"
TEAM = 65534  # nobody: entries under /team-a/
READER = 40001  # no passwd entry: shown as "uid 40001"
AGENTS = 40002
AUTHORITY = 40003
GROUP_MEMBER = 40004  # no grant of its own; its gid is daemon's (1)
OPS = f"spiffe://{TD}/ops/admin"  # an admin SVID with role agents
NO_GRANT = f"spiffe://{TD}/ops/nogrant"  # an admin entry nobody granted a role
PLAIN = f"spiffe://{TD}/ops/plain"  # an SVID of no admin entry
PARENT = f"spiffe://{TD}/nodes/n1"

CONFIG = f"""
[admin]
[[admin.grant]]
unix_user = {TEAM}
role = "entries"
paths = ["/team-a/"]
[[admin.grant]]
unix_user = {READER}
role = "read"
[[admin.grant]]
unix_user = {AGENTS}
role = "agents"
[[admin.grant]]
unix_user = {AUTHORITY}
role = "authority"
[[admin.grant]]
unix_group = "daemon"
role = "entries"
paths = ["/team-g/"]
[[admin.grant]]
spiffe_id = "{OPS}"
role = "agents"
"""


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    require_root("to run sigil-server's CLI as other users")
    root = Path(tempfile.mkdtemp(prefix="sgr-", dir="/tmp"))
    os.chmod(root, 0o755)  # other users must reach the admin socket's directory
    (root / "server.toml").write_text(CONFIG)
    srv = RunningServer(trust_domain=TD, data_dir=root / "data",
                        socket_path=root / "admin" / "admin.sock",
                        extra_args=("--config", str(root / "server.toml")))
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def as_user(srv: RunningServer, uid: int, *args: str,
            gid: int | None = None) -> subprocess.CompletedProcess[str]:
    """``sigil-server <args>`` run as ``uid`` (its group ``gid``, default the same number)."""
    return subprocess.run(
        [*server_command(), *args, "--socket-path", str(srv.socket_path)],
        capture_output=True, text=True, timeout=60, user=uid,
        group=uid if gid is None else gid, extra_groups=[],
        env={**os.environ, "HOME": "/"}, cwd="/",
    )


def entries(srv: RunningServer) -> dict[str, str]:
    """spiffe_id -> entry id, read as root."""
    out = srv.cli("entry", "show", "--output", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # A list, or wrapped as {"entries": [...]} (the JSON shapes are being unified).
    listed = doc["entries"] if isinstance(doc, dict) else doc
    return {e["spiffe_id"]: e["id"] for e in listed}


def audit(srv: RunningServer) -> list[dict[str, Any]]:
    path = srv.data_dir / "admin-audit.log"
    assert path.stat().st_mode & 0o777 == 0o600
    return [json.loads(line) for line in path.read_text().splitlines()]


def denied(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result
    assert result.stderr == f"Error: {message} (PERMISSION_DENIED)\n"


def test_socket_lets_granted_users_in(server: RunningServer) -> None:
    # Unix users have grants: anyone may connect (the kernel names them, the grants
    # decide), and the directory lets them pass without listing it.
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o777
    assert stat.S_IMODE(server.socket_path.parent.stat().st_mode) == 0o711


def test_team_admin_manages_only_its_own_path(server: RunningServer) -> None:
    ok = as_user(server, TEAM, "entry", "create", "--spiffe-id", f"spiffe://{TD}/team-a/web",
                 "--parent-id", PARENT, "--selector", "unix:uid:1000")
    assert ok.returncode == 0, ok.stderr
    before = entries(server)
    denied(as_user(server, TEAM, "entry", "create", "--spiffe-id", f"spiffe://{TD}/team-b/web",
                   "--parent-id", PARENT, "--selector", "unix:uid:1000"),
           'role "entries" for /team-b/web is required; nobody has entries for /team-a/')
    made = server.cli("entry", "create", "--spiffe-id", f"spiffe://{TD}/team-b/db",
                      "--parent-id", PARENT, "--selector", "unix:uid:1001")
    assert made.returncode == 0, made.stderr
    team_b = entries(server)[f"spiffe://{TD}/team-b/db"]
    team_a = before[f"spiffe://{TD}/team-a/web"]
    denied(as_user(server, TEAM, "entry", "delete", "--id", team_b),
           'role "entries" for /team-b/db is required; nobody has entries for /team-a/')
    denied(as_user(server, TEAM, "entry", "update", "--id", team_a,
                   "--spiffe-id", f"spiffe://{TD}/team-b/moved"),
           'role "entries" for /team-b/moved is required; nobody has entries for /team-a/')
    denied(as_user(server, TEAM, "entry", "update", "--id", team_a, "--admin"),
           'role "all" is required to set the admin flag of an entry; nobody has entries '
           'for /team-a/')
    denied(as_user(server, TEAM, "agent", "evict", "--id", f"spiffe://{TD}/sigil/agent/x/y"),
           'role "agents" is required for EvictAgent; nobody has entries for /team-a/')
    # Nothing the refused calls named was written or removed.
    after = entries(server)
    assert after == {**before, f"spiffe://{TD}/team-b/db": team_b}
    show = as_user(server, TEAM, "entry", "show", "--output", "json")
    assert show.returncode == 0, show.stderr
    assert as_user(server, TEAM, "entry", "delete", "--id", team_a).returncode == 0
    assert f"spiffe://{TD}/team-a/web" not in entries(server)


def test_read_agents_and_authority_roles(server: RunningServer) -> None:
    assert as_user(server, READER, "entry", "show").returncode == 0
    assert as_user(server, READER, "agent", "list").returncode == 0
    assert as_user(server, READER, "localauthority", "x509", "show").returncode == 0
    create = ("entry", "create", "--spiffe-id", f"spiffe://{TD}/team-a/r",
              "--parent-id", PARENT, "--selector", "unix:uid:7")
    denied(as_user(server, READER, *create),
           'role "entries" is required for CreateEntry; uid 40001 has read')
    denied(as_user(server, READER, "token", "generate"),
           'role "agents" is required for CreateJoinToken; uid 40001 has read')

    token = as_user(server, AGENTS, "token", "generate", "--output", "json")
    assert token.returncode == 0, token.stderr
    agent = _attest(server, json.loads(token.stdout)["token"])
    try:
        denied(as_user(server, READER, "agent", "ban", "--id", agent.agent_id),
               'role "agents" is required for BanAgent; uid 40001 has read')
        banned = as_user(server, AGENTS, "agent", "ban", "--id", agent.agent_id)
        assert banned.returncode == 0, banned.stderr
        shown = server.cli("agent", "show", "--id", agent.agent_id, "--output", "json")
        assert json.loads(shown.stdout)["banned"] is True
    finally:
        agent.channel.close()
    denied(as_user(server, AGENTS, *create),
           'role "entries" is required for CreateEntry; uid 40002 has agents')
    denied(as_user(server, AGENTS, "localauthority", "jwt", "prepare"),
           'role "authority" is required for PrepareLocalAuthority; uid 40002 has agents')

    prepared = as_user(server, AUTHORITY, "localauthority", "jwt", "prepare")
    assert prepared.returncode == 0, prepared.stderr
    denied(as_user(server, AUTHORITY, "token", "generate"),
           'role "agents" is required for CreateJoinToken; uid 40003 has authority')
    denied(as_user(server, AUTHORITY, *create),
           'role "entries" is required for CreateEntry; uid 40003 has authority')
    denied(as_user(server, AUTHORITY, "x509", "mint", "--spiffe-id", f"spiffe://{TD}/x"),
           'role "all" is required for MintX509SVID; uid 40003 has authority')
    # A uid without any grant is refused even what it could read before.
    denied(as_user(server, 40999, "entry", "count"),
           'role "read" is required for CountEntries; uid 40999 has no admin grant')


def test_audit_log_has_one_line_per_call_and_no_secret(server: RunningServer) -> None:
    start = len(audit(server))
    token = as_user(server, AGENTS, "token", "generate", "--spiffe-id",
                    f"spiffe://{TD}/nodes/audited", "--output", "json")
    assert token.returncode == 0, token.stderr
    issued = json.loads(token.stdout)
    token_id, secret = issued["token"].split(".", 1)
    as_user(server, READER, "token", "generate")
    lines = audit(server)[start:]
    assert len(lines) == 2, lines
    ok, refused = lines
    assert set(ok) == {"time", "transport", "uid", "user", "method", "role", "ids", "code"}
    assert ok["time"].endswith("Z")
    assert (ok["transport"], ok["uid"], ok["user"], ok["method"], ok["role"], ok["code"]) == (
        "unix", AGENTS, "", "CreateJoinToken", "agents", "OK")
    assert ok["ids"] == {"spiffe_id": f"spiffe://{TD}/nodes/audited",
                         "result": {"token_id": token_id, "agent_id": issued["agent_id"]}}
    assert (refused["uid"], refused["method"], refused["code"]) == (
        READER, "CreateJoinToken", "PERMISSION_DENIED")
    assert refused["message"] == ('role "agents" is required for CreateJoinToken; '
                                  'uid 40001 has read')
    assert secret not in (server.data_dir / "admin-audit.log").read_text()
    assert secret not in server.log


def _svid_channel(server: RunningServer, spiffe_id: str, *, admin_entry: bool) -> grpc.Channel:
    """A TLS channel to the agent API port with an X.509-SVID for ``spiffe_id``."""
    root = admin_pb2_grpc.AdminStub(  # type: ignore[no-untyped-call]
        grpc.insecure_channel(f"unix:{server.socket_path}"))
    if admin_entry:
        root.CreateEntry(admin_pb2.CreateEntryRequest(entry=types_pb2.Entry(
            spiffe_id=spiffe_id, parent_id=PARENT, admin=True,
            selectors=[types_pb2.Selector(type="unix", value="uid:1")])), timeout=10)
    key = generate_private_key()
    minted = root.MintX509SVID(admin_pb2.MintX509SVIDRequest(
        spiffe_id=spiffe_id, csr=new_csr(key)), timeout=10)
    return _channel(server, key=key, chain=list(minted.svid.cert_chain))


def test_admin_svid_over_tls(server: RunningServer) -> None:
    start = len(audit(server))
    with _svid_channel(server, OPS, admin_entry=True) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        token = stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=10)
        assert token.agent_id.startswith(f"spiffe://{TD}/sigil/agent/join_token/")
        assert stub.CountEntries(admin_pb2.CountEntriesRequest(), timeout=10).count >= 1
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=types_pb2.Entry(
                spiffe_id=f"spiffe://{TD}/ops/evil", parent_id=PARENT,
                selectors=[types_pb2.Selector(type="unix", value="uid:1")])), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == (f'role "entries" is required for CreateEntry; {OPS} '
                                       "has agents")
    assert f"spiffe://{TD}/ops/evil" not in entries(server)
    # Between root's calls on the socket that made the SVID (CreateEntry, MintX509SVID,
    # GetBundle), one line per call over TLS.
    lines = audit(server)[start:]
    assert [x["method"] for x in lines if x["transport"] == "unix"] == [
        "CreateEntry", "MintX509SVID", "GetBundle", "ListEntries"]
    lines = [x for x in lines if x["transport"] == "tls"]
    assert [(x["transport"], x.get("spiffe_id"), x["method"], x["code"]) for x in lines] == [
        ("tls", OPS, "CreateJoinToken", "OK"), ("tls", OPS, "CountEntries", "OK"),
        ("tls", OPS, "CreateEntry", "PERMISSION_DENIED")]

    for spiffe_id, admin_entry, message in [
        (PLAIN, False, f"{PLAIN} is not the SPIFFE ID of an admin entry"),
        (NO_GRANT, True, f'role "read" is required for CountEntries; {NO_GRANT} has no '
                         "admin grant"),
    ]:
        with _svid_channel(server, spiffe_id, admin_entry=admin_entry) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.RpcError) as err:
                stub.CountEntries(admin_pb2.CountEntriesRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == message

    # No client certificate at all (what an agent has before it attests).
    with _channel(server) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_revoked_admin_svid_is_refused_over_tls(server: RunningServer) -> None:
    """``svid revoke --serial`` of an admin SVID: its next call over TLS is refused
    (within the server's revocation poll, a second), and a new SVID of the same
    admin still works."""
    root = admin_pb2_grpc.AdminStub(  # type: ignore[no-untyped-call]
        grpc.insecure_channel(f"unix:{server.socket_path}"))
    admin_id = OPS
    try:  # the module's server may already hold it (test_admin_svid_over_tls)
        root.CreateEntry(admin_pb2.CreateEntryRequest(entry=types_pb2.Entry(
            spiffe_id=admin_id, parent_id=PARENT, admin=True,
            selectors=[types_pb2.Selector(type="unix", value="uid:1")])), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc

    def mint() -> tuple[grpc.Channel, int]:
        key = generate_private_key()
        minted = root.MintX509SVID(admin_pb2.MintX509SVIDRequest(
            spiffe_id=admin_id, csr=new_csr(key)), timeout=10)
        leaf = x509.load_der_x509_certificate(minted.svid.cert_chain[0])
        return _channel(server, key=key, chain=list(minted.svid.cert_chain)), leaf.serial_number

    channel, serial = mint()
    with channel:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        assert stub.CountEntries(admin_pb2.CountEntriesRequest(), timeout=10).count >= 1
        revoked = server.cli("svid", "revoke", "--serial", format(serial, "x"))
        assert revoked.returncode == 0, revoked.stderr
        code = details = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                stub.CountEntries(admin_pb2.CountEntriesRequest(), timeout=10)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
                break
            time.sleep(0.2)
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED,
                                   "the client certificate is revoked")
    fresh, _ = mint()
    with fresh:
        stub = admin_pb2_grpc.AdminStub(fresh)  # type: ignore[no-untyped-call]
        assert stub.CountEntries(admin_pb2.CountEntriesRequest(), timeout=10).count >= 1


def test_an_agent_svid_is_not_an_admin(server: RunningServer) -> None:
    token = server.cli("token", "generate", "--output", "json")
    agent = _attest(server, json.loads(token.stdout)["token"])
    try:
        stub = admin_pb2_grpc.AdminStub(agent.channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.ListAgents(admin_pb2.ListAgentsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == (f"{agent.agent_id} is not an admin workload ID of {TD}")
    finally:
        agent.channel.close()


def test_group_grant(server: RunningServer) -> None:
    made = as_user(server, GROUP_MEMBER, "entry", "create", "--spiffe-id",
                   f"spiffe://{TD}/team-g/job", "--parent-id", PARENT, "--selector",
                   "unix:uid:5", gid=1)
    assert made.returncode == 0, made.stderr
    denied(as_user(server, GROUP_MEMBER, "entry", "create", "--spiffe-id",
                   f"spiffe://{TD}/team-a/job", "--parent-id", PARENT, "--selector",
                   "unix:uid:5", gid=1),
           'role "entries" for /team-a/job is required; uid 40004 has entries for /team-g/')
    # The same uid in another group has no grant.
    denied(as_user(server, GROUP_MEMBER, "entry", "count"),
           'role "read" is required for CountEntries; uid 40004 has no admin grant')


def test_bad_admin_config_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[[admin.grant]]\nunix_user = "root"\nrole = "entries"\n')
    proc = subprocess.run(
        [*server_command(), "run", "--trust-domain", TD, "--data-dir", str(tmp_path / "data"),
         "--config", str(config), "--socket-path", str(tmp_path / "admin" / "admin.sock")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ('Error: admin.grant[0]: role "entries" needs paths, a non-empty '
                           'list of path prefixes like ["/team-a/"]\n')
    assert not (tmp_path / "data").exists()
