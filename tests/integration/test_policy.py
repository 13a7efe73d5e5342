"""The issuance policy against real databases (SQLite, PostgreSQL, MariaDB): the
admin API refuses entries that break it and writes nothing; batches refuse only the
bad ones; the agent API refuses SVIDs of entries that break it (written before the
policy, or reached through an alias) and clamps default TTLs; stored violations are
reported at start; the Kubernetes controller does not create what the policy refuses.

The servicers run in-process with a fake clock, as in test_attest_agent_datastore.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from cryptography import x509
from sqlalchemy import func, select

from api.protos.sigil.admin.v1 import admin_pb2
from api.protos.sigil.agent.v1 import agent_pb2
from api.protos.sigil.types.v1 import types_pb2
from attestation.kubeapi import KubeApi, KubeConnection
from attestation.node import AttestationResult
from ca.api.admin import AdminServicer
from ca.api.agent import AgentServicer
from ca.api.deps import ApiDeps
from ca.authority.setup import build_authority
from ca.config.server import ServerConfig, load_config
from ca.config.tomllines import KeyLines
from ca.datastore import Datastore, EntryRecord
from ca.datastore import models as m
from ca.keys import MemoryKeyManager
from ca.kubernetes.controller import ControllerSettings, RegistrationController
from ca.registry.policycheck import find_violations, report_at_start
from identity.clock import FakeClock, SystemClock
from identity.keys import generate_private_key, public_key_der
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import new_csr
from tests.support.k8s_api import (
    FakeKubeApi,
    identity_template_object,
    namespace_object,
    node_object,
    pod_object,
)

TD = TrustDomain("policy.sigil.test")
AGENT = SpiffeId.parse("spiffe://policy.sigil.test/sigil/agent/test_psat/prod/node-1")
SERVER = SpiffeId.parse("spiffe://policy.sigil.test/sigil/server")
NODE_SELECTORS = (Selector("test_psat", "cluster:prod"), Selector("test_psat", "node-name:node-1"))

POLICY = """\
trust_domain = "policy.sigil.test"

[[policy.rule]]
name = "prod-only"
parent_selectors = ["test_psat:cluster:prod"]
allow_paths = ["/ns/prod"]

[[policy.rule]]
name = "zone"
allow_dns = ["*.example.com"]

[[policy.rule]]
name = "payments"
paths = ["/ns/prod/payments"]
max_x509_svid_ttl = "10m"
max_jwt_svid_ttl = "1m"
"""


def _line_of(rule: int) -> int:
    line = KeyLines(POLICY).line(("policy", "rule", rule))
    assert line is not None
    return line


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _Context:
    """The part of grpc.ServicerContext the servicers use."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_trailing_metadata(self, _metadata: object) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)


def _verifier(_payload: bytes) -> AttestationResult:
    return AttestationResult(agent_id=AGENT, selectors=NODE_SELECTORS, alias=None)


class Harness:
    def __init__(self, tmp_path: Path, url: str) -> None:
        conf = tmp_path / "server.toml"
        (tmp_path / "data").mkdir()
        conf.write_text(POLICY)
        self.config: ServerConfig = load_config(
            conf, env={}, overrides={"database_url": url, "data_dir": str(tmp_path / "data")})
        self.clock = FakeClock()
        self.datastore = Datastore(url)
        self.authority = build_authority(self.config, self.datastore, self.clock,
                                         key_manager=MemoryKeyManager())
        deps = ApiDeps(config=self.config, datastore=self.datastore,
                       authority=self.authority, clock=self.clock,
                       node_verifiers={"test_psat": _verifier})
        self.cert: x509.Certificate | None = None
        self.admin = AdminServicer(deps)
        self.agent = AgentServicer(deps, peer_certificate=lambda _p: (True, self.cert))

    def attest(self) -> None:
        resp = self.agent.AttestAgent(agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type="test_psat", payload=b"x"),
            csr=new_csr(generate_private_key())), _Context())
        self.cert = x509.load_der_x509_certificate(resp.svid.cert_chain[0])

    def counts(self) -> tuple[int, int]:
        with self.datastore.engine.connect() as conn:
            return (int(conn.scalar(select(func.count()).select_from(m.RegistrationEntry))
                        or 0),
                    int(conn.scalar(select(func.count()).select_from(m.ChangeEvent)) or 0))

    def create(self, **fields: Any) -> types_pb2.Entry:
        result: types_pb2.Entry = self.admin.CreateEntry(
            admin_pb2.CreateEntryRequest(entry=_msg(**fields)), _Context())
        return result


def _msg(path: str, *, parent: SpiffeId = AGENT, selectors: tuple[str, ...] = ("k8s:sa:api",),
         **fields: Any) -> types_pb2.Entry:
    return types_pb2.Entry(
        spiffe_id=f"spiffe://policy.sigil.test{path}", parent_id=str(parent),
        selectors=[types_pb2.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1])
                   for s in selectors], **fields)


@pytest.fixture
def harness(tmp_path: Path, database_url: str) -> Iterator[Harness]:
    h = Harness(tmp_path, database_url)
    h.attest()
    try:
        yield h
    finally:
        h.datastore.close()


def _refused(h: Harness, details: str, **fields: Any) -> None:
    before = h.counts()
    with pytest.raises(Aborted) as err:
        h.create(**fields)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details == details
    assert h.counts() == before


def test_create_that_breaks_the_policy_is_refused_and_writes_nothing(harness: Harness) -> None:
    h = harness
    _refused(h, f'policy rule "prod-only" (server.toml line {_line_of(0)}): '
                "spiffe://policy.sigil.test/ns/dev/x is not under /ns/prod/ for parents "
                "matching test_psat:cluster:prod", path="/ns/dev/x")
    # /ns/prod is a prefix at segment boundaries only.
    _refused(h, f'policy rule "prod-only" (server.toml line {_line_of(0)}): '
                "spiffe://policy.sigil.test/ns/production/x is not under /ns/prod/ for "
                "parents matching test_psat:cluster:prod", path="/ns/production/x")
    _refused(h, f'policy rule "zone" (server.toml line {_line_of(1)}): DNS name '
                "badexample.com is not allowed (allowed: *.example.com)",
             path="/ns/prod/web", dns_names=["www.example.com", "badexample.com"])
    _refused(h, f'policy rule "payments" (server.toml line {_line_of(2)}): x509_svid_ttl '
                "3600s of spiffe://policy.sigil.test/ns/prod/payments/api is above the "
                "maximum 600s for SPIFFE IDs under /ns/prod/payments/",
             path="/ns/prod/payments/api", x509_svid_ttl=3600)
    _refused(h, f'policy rule "payments" (server.toml line {_line_of(2)}): jwt_svid_ttl '
                "61s of spiffe://policy.sigil.test/ns/prod/payments/api is above the "
                "maximum 60s for SPIFFE IDs under /ns/prod/payments/",
             path="/ns/prod/payments/api", jwt_svid_ttl=61)
    # What the policy allows is created as before.
    before = h.counts()
    created = h.create(path="/ns/prod/web", dns_names=["www.example.com"], x509_svid_ttl=600)
    assert created.id and h.counts()[0] == before[0] + 1
    # A parent not known to carry the selectors: the rule does not apply at create.
    other = SpiffeId.parse("spiffe://policy.sigil.test/nodes/unknown")
    assert h.create(path="/ns/dev/elsewhere", parent=other).id


def test_update_that_breaks_the_policy_is_refused_and_writes_nothing(harness: Harness) -> None:
    h = harness
    entry = h.create(path="/ns/prod/api")
    before = h.counts()
    for patch, fields in [
        (types_pb2.Entry(id=entry.id, spiffe_id="spiffe://policy.sigil.test/ns/dev/api"),
         ["spiffe_id"]),
        (types_pb2.Entry(id=entry.id, dns_names=["mail.other.org"]), ["dns_names"]),
        (types_pb2.Entry(id=entry.id, spiffe_id="spiffe://policy.sigil.test/ns/prod/payments/a",
                         x509_svid_ttl=601), ["spiffe_id", "x509_svid_ttl"]),
    ]:
        with pytest.raises(Aborted) as err:
            h.admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=patch, fields=fields),
                                _Context())
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details.startswith("policy rule ")
    stored = h.datastore.get_entry(entry.id)
    assert str(stored.spiffe_id) == "spiffe://policy.sigil.test/ns/prod/api"
    assert stored.revision == entry.revision and stored.dns_names == ()
    assert h.counts() == before
    # An allowed update goes through.
    updated = h.admin.UpdateEntry(admin_pb2.UpdateEntryRequest(
        entry=types_pb2.Entry(id=entry.id, dns_names=["api.example.com"]),
        fields=["dns_names"]), _Context())
    assert updated.revision == entry.revision + 1


def test_batch_refuses_only_the_entries_that_break_the_policy(harness: Harness) -> None:
    h = harness
    before = h.counts()
    resp = h.admin.BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=[
        _msg("/ns/prod/a"), _msg("/ns/dev/b"), _msg("/ns/prod/c", dns_names=["c.example.com"]),
        _msg("/ns/prod/d", dns_names=["d.example.org"]),
    ]), _Context())
    codes = [r.status.code for r in resp.results]
    ok, invalid = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert codes == [ok, invalid, ok, invalid]
    assert resp.results[1].status.message.startswith('policy rule "prod-only"')
    assert resp.results[3].status.message.startswith('policy rule "zone"')
    assert h.counts()[0] == before[0] + 2
    assert sorted(str(e.spiffe_id) for e in h.datastore.list_entries(parent_id=AGENT)) == [
        "spiffe://policy.sigil.test/ns/prod/a", "spiffe://policy.sigil.test/ns/prod/c"]


def _sign(h: Harness, *entry_ids: str) -> list[agent_pb2.BatchNewX509SVIDResult]:
    resp = h.agent.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
        agent_pb2.NewX509SVIDParams(entry_id=i, csr=new_csr(generate_private_key()))
        for i in entry_ids]), _Context())
    return list(resp.results)


def test_signing_refuses_entries_that_break_the_policy_and_clamps_defaults(
    harness: Harness,
) -> None:
    h = harness
    now = h.clock.now()
    # Written before the policy (straight to the datastore): it breaks prod-only.
    old = h.datastore.create_entry(EntryRecord(
        spiffe_id=SpiffeId.parse("spiffe://policy.sigil.test/ns/dev/legacy"),
        parent_id=AGENT, selectors=(Selector("k8s", "sa:legacy"),)), now=now)
    # Reached through an alias whose selectors do not name the cluster: create
    # cannot know, signing does (the agent carries test_psat:cluster:prod).
    h.create(path="/nodes/node-1", parent=SERVER, selectors=("test_psat:node-name:node-1",))
    nested = h.create(path="/ns/dev/nested",
                      parent=SpiffeId.parse("spiffe://policy.sigil.test/nodes/node-1"))
    good = h.create(path="/ns/prod/payments/api")
    plain = h.create(path="/ns/prod/web")
    results = _sign(h, old.id, nested.id, good.id, plain.id)
    denied = grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert [r.status.code for r in results] == [denied, denied, 0, 0]
    assert results[0].status.message == (
        f'policy rule "prod-only" (server.toml line {_line_of(0)}): '
        "spiffe://policy.sigil.test/ns/dev/legacy is not under /ns/prod/ for parents "
        "matching test_psat:cluster:prod")
    assert results[1].status.message.startswith('policy rule "prod-only"')
    assert not results[0].HasField("svid") and not results[1].HasField("svid")

    def lifetime(result: agent_pb2.BatchNewX509SVIDResult) -> int:
        cert = x509.load_der_x509_certificate(result.svid.cert_chain[0])
        return int((cert.not_valid_after_utc - h.clock.now()).total_seconds())

    # The default (1h) is clamped to the path's maximum (10m); elsewhere it stays.
    assert lifetime(results[2]) == 600
    assert lifetime(results[3]) == 3600

    with pytest.raises(Aborted) as err:
        h.agent.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id=old.id, audience=["db"]),
                           _Context())
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details.startswith('policy rule "prod-only"')
    jwt = h.agent.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id=good.id, audience=["db"]),
                             _Context())
    assert jwt.expires_at - jwt.issued_at == 60
    # NewWITSVID follows the same rules (and the same TTL clamp) as NewJWTSVID.
    wit_key = public_key_der(generate_private_key().public_key())
    with pytest.raises(Aborted) as err:
        h.agent.NewWITSVID(agent_pb2.NewWITSVIDRequest(entry_id=old.id, public_key=wit_key),
                           _Context())
    assert err.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details.startswith('policy rule "prod-only"')
    wit = h.agent.NewWITSVID(agent_pb2.NewWITSVIDRequest(entry_id=good.id, public_key=wit_key),
                             _Context())
    assert wit.expires_at - wit.issued_at == 60

    # Fixed (moved under /ns/prod): the new revision is signed.
    h.admin.UpdateEntry(admin_pb2.UpdateEntryRequest(
        entry=types_pb2.Entry(id=old.id, spiffe_id="spiffe://policy.sigil.test/ns/prod/legacy"),
        fields=["spiffe_id"]), _Context())
    assert [r.status.code for r in _sign(h, old.id)] == [0]


def test_stored_violations_are_reported_at_start(
    harness: Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    h = harness
    now = h.clock.now()
    bad = [h.datastore.create_entry(EntryRecord(
        spiffe_id=SpiffeId.parse(f"spiffe://policy.sigil.test{path}"), parent_id=AGENT,
        selectors=(Selector("k8s", f"sa:{i}"),), dns_names=dns), now=now)
        for i, (path, dns) in enumerate([("/ns/dev/a", ()), ("/ns/prod/b", ("b.other.org",))])]
    h.create(path="/ns/prod/fine")
    found = find_violations(h.datastore, h.config.policy)
    # Same creation time (a fake clock): the order among them is the id's.
    assert sorted((v.violation.rule, v.entry.id) for v in found) == [
        ("prod-only", bad[0].id), ("zone", bad[1].id)]
    caplog.set_level(logging.INFO, logger="sigil.server")
    assert report_at_start(h.datastore, h.config.policy) == 2
    each = [_fields(r) for r in caplog.records if r.getMessage() == "entry violates policy"]
    assert sorted((f["rule"], f["entry_id"]) for f in each) == [("prod-only", bad[0].id),
                                                                ("zone", bad[1].id)]
    assert {f["reason"] for f in each} == {v.violation.message for v in found}
    [summary] = [_fields(r) for r in caplog.records if r.getMessage() == "policy checked"]
    assert summary == {"rules": 3, "violations": 2}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = getattr(record, "fields", {})
    return fields


def test_operator_mints_follow_the_rules_without_a_parent_scope(harness: Harness) -> None:
    h = harness
    sid = "spiffe://policy.sigil.test/ns/prod/payments/debug"
    with pytest.raises(Aborted) as err:
        h.admin.MintJWTSVID(admin_pb2.MintJWTSVIDRequest(spiffe_id=sid, audience=["db"],
                                                         ttl=61), _Context())
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith('policy rule "payments"')
    jwt = h.admin.MintJWTSVID(admin_pb2.MintJWTSVIDRequest(spiffe_id=sid, audience=["db"]),
                              _Context())
    assert jwt.expires_at - jwt.issued_at == 60   # the default 5m, clamped
    with pytest.raises(Aborted) as err:
        h.admin.MintX509SVID(admin_pb2.MintX509SVIDRequest(
            spiffe_id=sid, csr=new_csr(generate_private_key()), dns_names=["x.other.org"]),
            _Context())
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith('policy rule "zone"')
    # prod-only names parents: an operator's mint has none, so it does not apply.
    minted = h.admin.MintX509SVID(admin_pb2.MintX509SVIDRequest(
        spiffe_id="spiffe://policy.sigil.test/ns/dev/debug",
        csr=new_csr(generate_private_key())), _Context())
    assert minted.svid.spiffe_id == "spiffe://policy.sigil.test/ns/dev/debug"


# ---- the Kubernetes registration controller ------------------------------------------

CLUSTER = "prod"
NODE_UID = "9d0c0a44-3f3c-4c5e-9b59-1d2f1f1a0002"


@pytest.mark.parametrize(("scope", "parents"), [
    ('parent_ids = ["/sigil/agent/k8s_psat/prod/*"]', "/sigil/agent/k8s_psat/prod/*"),
    # No agent has attested: the cluster is known from the agent ID the entry names.
    ('parent_selectors = ["k8s_psat:cluster:prod"]', "k8s_psat:cluster:prod"),
])
def test_controller_does_not_create_entries_the_policy_refuses(
    tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture, scope: str,
    parents: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="sigil.server")
    conf = tmp_path / "server.toml"
    conf.write_text('trust_domain = "policy.sigil.test"\n\n[[policy.rule]]\nname = "prod-ns"\n'
                    f'{scope}\nallow_paths = ["/ns/prod"]\n')
    policy = load_config(conf, env={}).policy
    with FakeKubeApi(bookmark_interval=0.2) as kube, Datastore(database_url) as ds:
        kube.put(node_object("node-a", uid=NODE_UID))
        for ns in ("prod", "dev"):
            kube.put(namespace_object(ns))
        kube.put(identity_template_object("default", {}))
        for name, ns, uid in [("api", "prod", "uid-1"), ("api", "dev", "uid-2")]:
            kube.put(pod_object(name, ns, node_name="node-a", uid=uid, service_account="api",
                                labels={"app": "api"}, phase="Running"))
        token = tmp_path / "api-token"
        token.write_text(kube.token or "")
        api = KubeApi(KubeConnection(api_server=kube.url, token_path=token))
        ctl = RegistrationController(api, ds, ControllerSettings(
            trust_domain=TD, cluster=CLUSTER, max_ttl=dt.timedelta(hours=24), retry_delay=0.1,
            policy=policy), clock=SystemClock())
        ctl.start()
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not ds.list_owned_entries("k8s/"):
                time.sleep(0.05)
            assert ctl.wait_idle(15.0)
            for _ in range(3):  # a standing refusal is logged once, not every pass
                ctl.request_resync()
                assert ctl.wait_idle(15.0)
        finally:
            ctl.stop()
            api.close()
        owned = ds.list_owned_entries("k8s/")
        assert [str(e.spiffe_id) for e in owned] == ["spiffe://policy.sigil.test/ns/prod/sa/api"]
        refusals = [_fields(r) for r in caplog.records
                    if r.getMessage() == "entry not reconciled"]
        assert len(refusals) == 1, refusals
        assert refusals[0]["owner"] == "k8s/prod/uid-2/default"
        assert refusals[0]["reason"] == (
            'policy rule "prod-ns" (server.toml line 3): spiffe://policy.sigil.test/ns/dev/sa/'
            f"api is not under /ns/prod/ for parents matching {parents}")
