"""The server tells the agent why it refuses it with a token in the trailing
metadata (identity/refusal.py), and the agent's client reads it: the agent acts
on that token, never on the words of the message."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from agent.client import ServerClient
from agent.errors import ServerCallError
from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from identity.keys import generate_private_key
from identity.refusal import REASON_KEY, RefusalReason
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid, new_csr
from tests.integration.conftest import RunningServer
from tests.integration.test_admin_entries_agents import _cli, _roots, _token
from tests.integration.test_server_agent_api import Agent, _attest, _channel


@pytest.fixture(scope="module")
def sigil_server() -> Iterator[RunningServer]:
    """One server for the module: the tests each attest agents of their own."""
    root = Path(tempfile.mkdtemp(prefix="sgr-", dir="/tmp"))
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


@pytest.fixture
def agent(sigil_server: RunningServer) -> Iterator[Agent]:
    a = _attest(sigil_server, _token(sigil_server)["token"])
    yield a
    a.channel.close()


def _trailer_reason(a: Agent) -> tuple[grpc.StatusCode, str | None]:
    """The status of a sync with ``a``'s SVID and the reason in its trailers."""
    with pytest.raises(grpc.RpcError) as err:
        a.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(), timeout=10)
    trailers = dict(err.value.trailing_metadata() or ())  # type: ignore[attr-defined]
    return err.value.code(), trailers.get(REASON_KEY)


def _client_errors(server: RunningServer, a: Agent) -> list[ServerCallError]:
    """What the agent's own client raises for a sync and a signing call."""
    chain = tuple(x509.load_der_x509_certificate(d) for d in a.chain_der)
    svid = X509Svid(SpiffeId.parse(a.agent_id), chain, a.key)  # type: ignore[arg-type]

    async def go() -> list[ServerCallError]:
        client = ServerClient(address=server.address,
                              trust_domain=TrustDomain(server.trust_domain))
        client.configure(roots_pem=_roots(server), svid=svid)
        errors = []
        try:
            for call in (client.sync(),
                         client.batch_new_x509_svid([("x", new_csr(generate_private_key()))])):
                with pytest.raises(ServerCallError) as err:
                    await call
                errors.append(err.value)
        finally:
            await client.close()
        return errors

    return asyncio.run(go())


def _assert_refused(server: RunningServer, a: Agent, reason: RefusalReason) -> None:
    assert _trailer_reason(a) == (grpc.StatusCode.PERMISSION_DENIED, reason.value)
    for error in _client_errors(server, a):
        assert (error.code, error.reason) == ("PERMISSION_DENIED", reason)


def test_a_banned_agent_is_told_agent_banned(sigil_server: RunningServer, agent: Agent) -> None:
    assert _cli(sigil_server, "agent", "ban", "--id", agent.agent_id).returncode == 0
    _assert_refused(sigil_server, agent, RefusalReason.AGENT_BANNED)


def test_an_evicted_agent_is_told_agent_not_attested(
    sigil_server: RunningServer, agent: Agent
) -> None:
    assert _cli(sigil_server, "agent", "evict", "--id", agent.agent_id).returncode == 0
    _assert_refused(sigil_server, agent, RefusalReason.AGENT_NOT_ATTESTED)


def test_a_replaced_svid_is_told_svid_not_current(
    sigil_server: RunningServer, agent: Agent
) -> None:
    key = generate_private_key()
    resp = agent.stub.RenewAgent(agent_pb2.RenewAgentRequest(csr=new_csr(key)), timeout=10)
    # The first use of the new SVID makes it the current one.
    with _channel(sigil_server, key=key, chain=list(resp.svid.cert_chain)) as ch:
        agent_pb2_grpc.AgentStub(ch).SyncAuthorized(agent_pb2.SyncAuthorizedRequest(),
                                                     timeout=10)
    _assert_refused(sigil_server, agent, RefusalReason.SVID_NOT_CURRENT)


def test_other_refusals_carry_no_reason(sigil_server: RunningServer, agent: Agent) -> None:
    # An entry not authorized for the agent: refused, but not the agent itself.
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id="nope", audience=["a"]),
                              timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert REASON_KEY not in dict(err.value.trailing_metadata() or ())  # type: ignore[attr-defined]
