"""AttestAgent against real databases: watermark steps and racing attestations.

The servicer runs in-process on SQLite, PostgreSQL and MariaDB with a fake clock,
so the CA's ``signed_until`` watermark can be made to move on demand.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from cryptography import x509
from sqlalchemy import func, select
from sqlalchemy.orm.attributes import set_committed_value

from api.protos.sigil.agent.v1 import agent_pb2
from attestation.node import AttestationResult, join_token
from ca.api.agent import AgentServicer
from ca.api.deps import ApiDeps
from ca.authority import WATERMARK_STEP
from ca.authority.setup import build_authority
from ca.config.server import load_config
from ca.datastore import Datastore
from ca.datastore import models as m
from ca.datastore.records import NodeRecord
from ca.datastore.repository import Transaction, _node_record
from ca.keys import MemoryKeyManager
from identity.clock import FakeClock
from identity.keys import generate_private_key
from identity.refusal import REASON_KEY, RefusalReason
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import new_csr

TD = TrustDomain("attest.sigil.test")
RACE_NODE = SpiffeId.parse("spiffe://attest.sigil.test/sigil/agent/test_psat/c1/node-1")
RACE_ALIAS = SpiffeId.parse("spiffe://attest.sigil.test/node/node-1")


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _Context:
    """The part of grpc.ServicerContext the servicer uses."""

    def __init__(self) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailers = metadata

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)


def _psat_style(_payload: bytes) -> AttestationResult:
    # What k8s_psat yields for one node: the same agent ID and alias every time.
    return AttestationResult(agent_id=RACE_NODE,
                             selectors=(Selector("test_psat", "node-name:node-1"),),
                             alias=RACE_ALIAS)


class Harness:
    def __init__(self, tmp_path: Path, url: str, *, agent_svid_ttl: str) -> None:
        conf = tmp_path / "server.toml"
        (tmp_path / "data").mkdir()
        conf.write_text(f'trust_domain = "{TD.name}"\n'
                        f'data_dir = "{tmp_path / "data"}"\n'
                        f'agent_svid_ttl = "{agent_svid_ttl}"\n')
        self.config = load_config(conf, env={}, overrides={"database_url": url})
        self.clock = FakeClock()
        self.datastore = Datastore(url)
        self.authority = build_authority(self.config, self.datastore, self.clock,
                                         key_manager=MemoryKeyManager())
        deps = ApiDeps(config=self.config, datastore=self.datastore,
                       authority=self.authority, clock=self.clock,
                       node_verifiers={"test_psat": _psat_style})
        self.servicer = AgentServicer(deps, peer_certificate=lambda _p: (True, None))

    def token(self) -> str:
        token_id, token = join_token.new_token()
        _, secret = join_token.split_token(token)
        self.datastore.create_join_token(
            token_id=token_id, secret_sha256=join_token.secret_sha256(secret), alias=None,
            expires_at=self.clock.now() + dt.timedelta(hours=1), now=self.clock.now())
        return token

    def attest(self, attestor: str, payload: bytes) -> agent_pb2.AttestAgentResponse:
        request = agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type=attestor, payload=payload),
            csr=new_csr(generate_private_key()))
        response: agent_pb2.AttestAgentResponse = self.servicer.AttestAgent(
            request, _Context())
        return response

    def count(self, model: Any) -> int:
        with self.datastore.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def harness(tmp_path: Path, database_url: str, request: pytest.FixtureRequest
            ) -> Iterator[Harness]:
    ttl = getattr(request, "param", "1h")
    h = Harness(tmp_path, database_url, agent_svid_ttl=ttl)
    try:
        yield h
    finally:
        h.datastore.close()


@pytest.mark.parametrize("harness", ["1h", "2h"], indirect=True)
def test_attestations_across_watermark_steps(harness: Harness) -> None:
    # Every attestation past a watermark step makes the CA write signed_until;
    # the attestation must not wait on (or deadlock with) its own transaction.
    serials = set()
    for _ in range(4):
        payload = join_token.make_attestation(harness.token())[1]
        resp = harness.attest(join_token.NAME, payload)
        serials.add(resp.svid.cert_chain[0])
        harness.clock.advance(WATERMARK_STEP + dt.timedelta(seconds=1))
    assert len(serials) == 4
    assert harness.count(m.AttestedNode) == 4
    # The watermark covers every SVID signed.
    with harness.datastore.engine.connect() as conn:
        marks = list(conn.scalars(select(m.CaKey.signed_until).where(
            m.CaKey.kind == "x509", m.CaKey.status == "active")))
    ttl = harness.config.agent_svid_ttl
    assert marks and marks[0] >= int((harness.clock.now() - WATERMARK_STEP
                                      + ttl).timestamp()) - 1


def test_refused_attestations_write_nothing(harness: Harness) -> None:
    # A used token, a banned agent: refused, and no row changes (token not consumed
    # twice, no node, no entry).
    token = harness.token()
    payload = join_token.make_attestation(token)[1]
    harness.attest(join_token.NAME, payload)
    harness.clock.advance(WATERMARK_STEP * 2)
    with pytest.raises(Aborted) as used:
        harness.attest(join_token.NAME, payload)
    assert used.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert harness.count(m.AttestedNode) == 1

    harness.attest("test_psat", b"x")
    harness.datastore.set_node_banned(RACE_NODE, True, now=harness.clock.now())
    before = (harness.count(m.AttestedNode), harness.count(m.RegistrationEntry),
              harness.count(m.ChangeEvent))
    harness.clock.advance(WATERMARK_STEP * 2)
    with pytest.raises(Aborted) as banned:
        harness.attest("test_psat", b"x")
    assert banned.value.code is grpc.StatusCode.PERMISSION_DENIED
    node = harness.datastore.get_node(RACE_NODE)
    assert node is not None and node.banned
    assert (harness.count(m.AttestedNode), harness.count(m.RegistrationEntry),
            harness.count(m.ChangeEvent)) == before

    # A bad CSR consumes no join token.
    fresh = harness.token()
    bad = agent_pb2.AttestAgentRequest(
        data=agent_pb2.AttestationData(type=join_token.NAME,
                                       payload=join_token.make_attestation(fresh)[1]),
        csr=b"not a csr")
    with pytest.raises(Aborted) as invalid:
        harness.servicer.AttestAgent(bad, _Context())
    assert invalid.value.code is grpc.StatusCode.INVALID_ARGUMENT
    harness.attest(join_token.NAME, join_token.make_attestation(fresh)[1])


def test_same_node_attesting_twice_at_once(harness: Harness, database_url: str) -> None:
    # Two attestations of one node race to insert the same node row and the same
    # alias entry. Both must succeed; one alias entry, one node.
    racers = 2
    barrier = threading.Barrier(racers, timeout=5)
    sqlite = database_url.startswith("sqlite")

    def before_flush(session: Any, _ctx: object, _instances: object) -> None:
        # Hold both transactions between their "does it exist?" reads and their
        # inserts, so both insert. (SQLite serializes writers at BEGIN: nothing to hold.)
        if not sqlite and any(isinstance(o, m.AttestedNode) for o in session.new):
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass

    harness.datastore.listen_session_event("before_flush", before_flush)
    results: list[object] = [None] * racers

    def run(i: int) -> None:
        try:
            results[i] = harness.attest("test_psat", b"x")
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, agent_pb2.AttestAgentResponse) for r in results), results
    assert harness.count(m.AttestedNode) == 1
    entries = harness.datastore.list_entries(spiffe_id=RACE_ALIAS)
    assert len(entries) == 1
    assert harness.count(m.ChangeEvent) == 1
    node = harness.datastore.get_node(RACE_NODE)
    assert node is not None
    served = set()
    for r in results:
        assert isinstance(r, agent_pb2.AttestAgentResponse)
        served.add(x509.load_der_x509_certificate(r.svid.cert_chain[0]).serial_number)
    assert node.serial in served


def test_a_token_the_transaction_would_refuse_costs_no_signature(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # The SVID is signed before the transaction that consumes the token; an unknown,
    # wrong, used or expired token must be refused before that signature, else anyone
    # reaching the port makes the CA sign (and move its watermark) for nothing.
    signed: list[object] = []
    real_sign = harness.authority.sign_agent_svid

    def counting_sign(*args: Any, **kwargs: Any) -> Any:
        signed.append(args[0])
        return real_sign(*args, **kwargs)

    monkeypatch.setattr(harness.authority, "sign_agent_svid", counting_sign)
    used = harness.token()
    harness.attest(join_token.NAME, join_token.make_attestation(used)[1])
    assert len(signed) == 1
    token_id, _secret = join_token.split_token(harness.token())
    expired = harness.token()
    harness.clock.advance(dt.timedelta(hours=2))
    refused = [
        join_token.make_attestation(used)[1],                      # already used
        join_token.make_attestation(f"{token_id}.wrong-secret")[1],  # wrong secret
        join_token.make_attestation("abcdef0123.secret")[1],      # unknown
        join_token.make_attestation(expired)[1],                   # expired
    ]
    for payload in refused:
        with pytest.raises(Aborted) as caught:
            harness.attest(join_token.NAME, payload)
        assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert len(signed) == 1


def test_a_ban_committed_during_attestation_is_not_overwritten(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # Under READ COMMITTED (PostgreSQL, MariaDB) `agent ban` may commit after
    # AttestAgent's two banned checks read the node and before put_node locks its
    # row. Made deterministic: the ban is committed first, and both checks are made
    # to see the node as it was before it (the transaction's own copy of the row
    # too, as its earlier read would have left it). put_node's locked read must
    # see the ban, refuse, and leave the node banned.
    harness.attest("test_psat", b"x")
    harness.datastore.set_node_banned(RACE_NODE, True, now=harness.clock.now())
    harness.clock.advance(WATERMARK_STEP * 2)

    read = Datastore.get_node

    def stale_read(self: Datastore, spiffe_id: SpiffeId) -> NodeRecord | None:
        node = read(self, spiffe_id)
        return None if node is None else dataclasses.replace(node, banned=False)

    def stale_tx_read(self: Transaction, spiffe_id: SpiffeId) -> NodeRecord | None:
        row = self._session.get(m.AttestedNode, str(spiffe_id))
        if row is None:
            return None
        set_committed_value(row, "banned", False)  # read before the ban committed
        return _node_record(row)

    monkeypatch.setattr(Datastore, "get_node", stale_read)
    monkeypatch.setattr(Transaction, "get_node", stale_tx_read)
    context = _Context()
    request = agent_pb2.AttestAgentRequest(
        data=agent_pb2.AttestationData(type="test_psat", payload=b"x"),
        csr=new_csr(generate_private_key()))
    with pytest.raises(Aborted) as refused:
        harness.servicer.AttestAgent(request, context)
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert context.trailers == ((REASON_KEY, RefusalReason.AGENT_BANNED.value),)
    monkeypatch.undo()
    node = harness.datastore.get_node(RACE_NODE)
    assert node is not None and node.banned
