"""ca.config.adminauth: the role table, [admin] validation, and who may call what."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
from pathlib import Path

import grpc
import pytest

from api.protos.sigil.admin.v1 import admin_pb2
from api.protos.sigil.types.v1 import types_pb2
from ca.api.adminguard import AdminGuard, AuditLog, audited_ids, unix_caller
from ca.config import adminauth
from ca.config.adminauth import METHOD_ROLES, AdminConfig, Authorizer, Caller, EntryTarget, Grant
from ca.config.server import load_config
from ca.errors import ConfigError, PermissionDeniedError
from identity.clock import FakeClock
from identity.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("td.test")
ALICE = 40001
BOB = 40002
TEAM_GID = 40100


def test_every_admin_rpc_has_a_role() -> None:
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    methods = {m.name for m in service.methods}
    assert methods == set(METHOD_ROLES), (methods ^ set(METHOD_ROLES))
    assert set(METHOD_ROLES.values()) <= set(adminauth.ROLES)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'trust_domain = "td.test"\ndata_dir = "{tmp_path}/data"\n{text}')
    return path


def test_no_admin_table_keeps_the_old_behaviour(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, ""))
    assert cfg.admin == AdminConfig(audit_log=(tmp_path / "data" / "admin-audit.log").absolute())
    auth = Authorizer(cfg.admin, TD, owner_uids=(0,))
    assert auth.check("MintX509SVID", Caller(transport="unix", uid=ALICE)) == "all"
    with pytest.raises(PermissionDeniedError, match="has no admin grant"):
        auth.check("ListEntries", Caller.svid(SpiffeId.parse("spiffe://td.test/ops")))


def test_grants_load(tmp_path: Path) -> None:
    root_group = "root"
    cfg = load_config(_config(tmp_path, f"""
[admin]
audit_log = "{tmp_path}/audit.jsonl"
[[admin.grant]]
unix_user = "root"
role = "entries"
paths = ["/team-a/", "/shared"]
[[admin.grant]]
unix_group = "{root_group}"
role = "read"
[[admin.grant]]
unix_user = {ALICE}
role = "agents"
[[admin.grant]]
spiffe_id = "spiffe://td.test/ops/admin"
role = "authority"
"""))
    assert cfg.admin.enabled
    assert cfg.admin.audit_log == tmp_path / "audit.jsonl"
    assert cfg.admin.grants == (
        Grant(role="entries", paths=("/team-a/", "/shared"), uid=0),
        Grant(role="read", gid=0),
        Grant(role="agents", uid=ALICE),
        Grant(role="authority", spiffe_id=SpiffeId.parse("spiffe://td.test/ops/admin")),
    )
    assert cfg.admin.unix_grants


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[admin]\nfoo = 1", "admin: unknown key 'foo'"),
        ("admin = 3", r"admin must be a table \(\[admin\]\)"),
        ("[admin]\naudit_log = 5", "admin.audit_log must be a file path"),
        ("[admin]\ngrant = 5", r"admin.grant must be an array of tables"),
        ("[[admin.grant]]\nrole = \"read\"",
         r"admin.grant\[0\]: give exactly one of unix_user, unix_group, spiffe_id \(got none\)"),
        ("[[admin.grant]]\nunix_user = \"root\"\nunix_group = \"root\"\nrole = \"read\"",
         r"admin.grant\[0\]: give exactly one .* \(got unix_user, unix_group\)"),
        ("[[admin.grant]]\nunix_user = \"root\"\nrole = \"god\"",
         r"admin.grant\[0\]: role 'god' is not one of: read, entries, agents, authority, all"),
        ("[[admin.grant]]\nunix_user = \"root\"\nrole = \"entries\"",
         r"admin.grant\[0\]: role \"entries\" needs paths"),
        ("[[admin.grant]]\nunix_user = \"root\"\nrole = \"entries\"\npaths = [\"team-a/\"]",
         r"path 'team-a/' must be an absolute path prefix"),
        ("[[admin.grant]]\nunix_user = \"root\"\nrole = \"entries\"\npaths = [\"/\"]",
         r"path '/' must be an absolute path prefix with at least one segment"),
        ("[[admin.grant]]\nunix_user = \"root\"\nrole = \"entries\"\npaths = [\"/a/../b\"]",
         r"path '/a/../b' must be"),
        ("[[admin.grant]]\nunix_user = \"root\"\nrole = \"read\"\npaths = [\"/a/\"]",
         r"paths apply only to role \"entries\" \(role is 'read'\)"),
        ("[[admin.grant]]\nunix_user = \"no-such-user-xyz\"\nrole = \"read\"",
         r"unix_user 'no-such-user-xyz': no such user on this machine"),
        ("[[admin.grant]]\nunix_group = \"no-such-group-xyz\"\nrole = \"read\"",
         r"unix_group 'no-such-group-xyz': no such group on this machine"),
        ("[[admin.grant]]\nunix_user = -1\nrole = \"read\"", "must be a name or a number"),
        ("[[admin.grant]]\nspiffe_id = \"spiffe://other.test/ops\"\nrole = \"read\"",
         r"spiffe_id 'spiffe://other.test/ops' must be a workload ID of td.test"),
        ("[[admin.grant]]\nspiffe_id = \"spiffe://td.test/sigil/agent/x\"\nrole = \"all\"",
         r"is under /sigil/"),
        ("[[admin.grant]]\nspiffe_id = \"not an id\"\nrole = \"all\"",
         r"admin.grant\[0\]: spiffe_id:"),
        ("[[admin.grant]]\nunix_user = \"root\"\nrole = \"read\"\nwho = 1",
         r"admin.grant\[0\]: unknown key 'who'"),
    ],
)
def test_bad_admin_config(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, text))


def _authorizer(*grants: Grant) -> Authorizer:
    return Authorizer(AdminConfig(enabled=True, grants=grants), TD, owner_uids=(0, 999))


def _entry(spiffe_id: str, *, admin: bool = False) -> EntryTarget:
    return EntryTarget((spiffe_id,), sets_admin=admin)


def test_owner_keeps_all_and_strangers_get_nothing() -> None:
    auth = _authorizer(Grant(role="read", uid=ALICE))
    for uid in (0, 999):
        assert auth.check("MintJWTSVID", Caller(transport="unix", uid=uid)) == "all"
    with pytest.raises(PermissionDeniedError,
                       match=r'^role "read" is required for ListEntries; uid 40002 has no '
                             r'admin grant$'):
        auth.check("ListEntries", Caller(transport="unix", uid=BOB))


def test_read_can_list_but_not_create() -> None:
    auth = _authorizer(Grant(role="read", uid=ALICE))
    alice = Caller(transport="unix", uid=ALICE, user="alice")
    for method in [m for m, r in METHOD_ROLES.items() if r == "read"]:
        assert auth.check(method, alice) == "read"
    for method in [m for m, r in METHOD_ROLES.items() if r != "read"]:
        with pytest.raises(PermissionDeniedError,
                           match=rf"is required for {method}; alice has read$"):
            auth.check(method, alice, lambda: _entry("spiffe://td.test/x"))


def test_entries_only_under_its_paths() -> None:
    auth = _authorizer(Grant(role="entries", paths=("/team-a/",), uid=ALICE))
    alice = Caller(transport="unix", uid=ALICE, user="alice")
    assert auth.check("CreateEntry", alice, lambda: _entry("spiffe://td.test/team-a/web")) == \
        "entries"
    assert auth.check("ListEntries", alice) == "read"
    with pytest.raises(PermissionDeniedError,
                       match=r'^role "entries" for /team-b/web is required; alice has entries '
                             r'for /team-a/$'):
        auth.check("CreateEntry", alice, lambda: _entry("spiffe://td.test/team-b/web"))
    # A prefix is a whole path segment: /team-a/ does not cover /team-ab.
    with pytest.raises(PermissionDeniedError, match="for /team-ab is required"):
        auth.check("DeleteEntry", alice, lambda: _entry("spiffe://td.test/team-ab"))
    with pytest.raises(PermissionDeniedError, match=r"for spiffe://other\.test/team-a/x is"):
        auth.check("CreateEntry", alice, lambda: _entry("spiffe://other.test/team-a/x"))
    with pytest.raises(PermissionDeniedError,
                       match='role "all" is required to set the admin flag of an entry'):
        auth.check("CreateEntry", alice,
                   lambda: _entry("spiffe://td.test/team-a/root", admin=True))
    # A batch with one entry outside: the whole batch is refused.
    with pytest.raises(PermissionDeniedError, match="for /team-b/x is required"):
        auth.check("BatchCreateEntry", alice, lambda: EntryTarget(
            ("spiffe://td.test/team-a/x", "spiffe://td.test/team-b/x")))
    with pytest.raises(PermissionDeniedError, match='role "agents" is required for BanAgent'):
        auth.check("BanAgent", alice)


def test_groups_agents_authority_and_svids() -> None:
    ops = SpiffeId.parse("spiffe://td.test/ops/admin")
    auth = _authorizer(Grant(role="agents", gid=TEAM_GID),
                       Grant(role="authority", spiffe_id=ops))
    member = Caller(transport="unix", uid=BOB, groups=frozenset({TEAM_GID}))
    assert auth.check("BanAgent", member) == "agents"
    assert auth.check("CreateJoinToken", member) == "agents"
    with pytest.raises(PermissionDeniedError, match=r'role "entries" is required for CreateEntry; '
                       r'uid 40002 has agents$'):
        auth.check("CreateEntry", member, lambda: _entry("spiffe://td.test/x"))
    svid = Caller.svid(ops)
    assert auth.check("PrepareLocalAuthority", svid) == "authority"
    assert auth.check("SetBundle", svid) == "authority"
    assert auth.check("GetAgent", svid) == "read"
    for method in ("BanAgent", "MintX509SVID", "CreateJoinToken"):
        with pytest.raises(PermissionDeniedError,
                           match=f"is required for {method}; spiffe://td.test/ops/admin has "
                                 "authority$"):
            auth.check(method, svid)
    # The same SPIFFE ID as a Unix user's name means nothing: transports differ.
    assert auth.grants_for(Caller(transport="unix", uid=BOB)) == []


def test_unix_caller_groups_come_from_the_user_database() -> None:
    root = Caller.unix(0, 0)
    assert root.user == pwd.getpwuid(0).pw_name
    assert 0 in root.groups
    stranger = Caller.unix(4_000_000, 4_000_000)
    assert stranger.user == "" and stranger.groups == frozenset({4_000_000})
    assert stranger.name == "uid 4000000"


def test_audited_ids_keep_names_not_secrets() -> None:
    token = "0123456789abcdef.SECRETSECRETSECRET"
    ids = audited_ids(admin_pb2.CreateJoinTokenRequest(spiffe_id="spiffe://td.test/n", ttl=60),
                      admin_pb2.JoinToken(token=token, agent_id="spiffe://td.test/a"))
    assert ids == {"spiffe_id": "spiffe://td.test/n",
                   "result": {"token_id": "0123456789abcdef", "agent_id": "spiffe://td.test/a"}}
    ids = audited_ids(admin_pb2.CreateEntryRequest(entry=types_pb2.Entry(
        spiffe_id="spiffe://td.test/w", parent_id="spiffe://td.test/p")),
        types_pb2.Entry(id="e1"))
    assert ids == {"entry.spiffe_id": "spiffe://td.test/w",
                   "entry.parent_id": "spiffe://td.test/p", "result": {"id": "e1"}}
    mint = audited_ids(admin_pb2.MintJWTSVIDRequest(spiffe_id="spiffe://td.test/w"),
                       admin_pb2.MintJWTSVIDResponse(token="eyJ.secret.sig"))
    assert "eyJ" not in repr(mint)


def test_audit_log_is_0600_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "admin-audit.log"
    path.parent.mkdir()
    path.write_text("")
    os.chmod(path, 0o644)
    log = AuditLog(path)
    log.write({"method": "A", "code": "OK"})
    log.write({"method": "B", "code": "PERMISSION_DENIED"})
    log.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == ('{"method":"A","code":"OK"}\n'
                                '{"method":"B","code":"PERMISSION_DENIED"}\n')


class _Aborted(Exception):
    pass


class _Context:
    """The parts of grpc.ServicerContext the guard uses."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self._code: grpc.StatusCode | None = None

    def peer(self) -> str:
        return "unix-abstract:test"

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        self._code = code
        raise _Aborted(details)

    def code(self) -> grpc.StatusCode | None:
        return self._code


def _guard(tmp_path: Path, *, worker: bool = False) -> tuple[AdminGuard, list[str]]:
    ran: list[str] = []
    guard = AdminGuard(
        identify=unix_caller(lambda peer: (ALICE, ALICE) if peer == "unix-abstract:test"
                             else None),
        authorizer=_authorizer(Grant(role="authority", uid=ALICE)),
        audit=AuditLog(tmp_path / "audit.log"), datastore=None,  # type: ignore[arg-type]
        clock=FakeClock(), worker=worker)
    return guard, ran


def _run(guard: AdminGuard, ran: list[str], method: str, request: object,
         response: object) -> _Context:
    def inner(req: object, ctx: object) -> object:
        ran.append(method)
        return response

    call = guard._guarded(method, inner)
    context = _Context()
    with contextlib.suppress(_Aborted):
        assert call(request, context) is response
    return context


def test_guard_runs_only_allowed_calls_and_audits_each(tmp_path: Path) -> None:
    guard, ran = _guard(tmp_path)
    req = admin_pb2.LocalAuthorityRequest(kind="x509")
    ok = _run(guard, ran, "PrepareLocalAuthority", req, admin_pb2.LocalAuthority())
    assert ok.aborted is None
    refused = _run(guard, ran, "BanAgent", admin_pb2.BanAgentRequest(id="spiffe://td.test/a"),
                   admin_pb2.Agent())
    assert refused.aborted == (grpc.StatusCode.PERMISSION_DENIED,
                               'role "agents" is required for BanAgent; uid 40001 has authority')
    assert ran == ["PrepareLocalAuthority"]  # the refused method never ran
    lines = [json.loads(x) for x in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(x["method"], x["role"], x["code"], x["ids"]) for x in lines] == [
        ("PrepareLocalAuthority", "authority", "OK", {"kind": "x509"}),
        ("BanAgent", "agents", "PERMISSION_DENIED", {"id": "spiffe://td.test/a"})]


def test_worker_refuses_localauthority_steps(tmp_path: Path) -> None:
    guard, ran = _guard(tmp_path, worker=True)
    context = _run(guard, ran, "ActivateLocalAuthority",
                   admin_pb2.LocalAuthorityRequest(kind="jwt"), admin_pb2.LocalAuthority())
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert "main process only" in context.aborted[1]
    assert ran == []
    listed = _run(guard, ran, "ListLocalAuthorities",
                  admin_pb2.LocalAuthorityRequest(kind="jwt"), admin_pb2.LocalAuthorities())
    assert listed.aborted is None and ran == ["ListLocalAuthorities"]
