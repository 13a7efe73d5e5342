"""Every agent API process refuses a banned, evicted or superseded SVID at its next call.

Each process keeps the node records it authenticated (ca.api.node_cache); this
checks, with worker_processes = 3, that a ban, an eviction and a renewal made
through the main process's admin API (or promoted through another process) are
seen by every process at once: each process first accepts the agent on a
connection it serves, then refuses the very next call on that same connection.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from identity.keys import generate_private_key
from identity.x509svid import new_csr
from tests.integration.conftest import RunningServer
from tests.integration.test_server_agent_api import Agent, _attest, _entry, _token
from tests.integration.test_workers import PROCESSES, _pool, _Probe

pytestmark = pytest.mark.slow

ATTEMPTS = 200  # new connections tried to reach every process (the kernel picks)


def _sync(stub: agent_pb2_grpc.AgentStub) -> agent_pb2.SyncAuthorizedEntriesPage:
    pages: list[agent_pb2.SyncAuthorizedEntriesPage] = list(
        stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(), timeout=10))
    return pages[-1]


def _one_per_process(probe: _Probe, stack: contextlib.ExitStack
                     ) -> dict[str, agent_pb2_grpc.AgentStub]:
    """An open connection to each process (by its index generation), each used once."""
    stubs: dict[str, agent_pb2_grpc.AgentStub] = {}
    for _ in range(ATTEMPTS):
        connection = probe.connection()
        _cert, stub = connection.__enter__()
        generation = _sync(stub).generation
        if generation in stubs:
            connection.__exit__(None, None, None)
            continue
        stack.push(connection)
        stubs[generation] = stub
        if len(stubs) == PROCESSES:
            return stubs
    raise AssertionError(f"reached {len(stubs)} of {PROCESSES} processes")


def _refused(stub: agent_pb2_grpc.AgentStub) -> str:
    with pytest.raises(grpc.RpcError) as err:
        _sync(stub)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    return err.value.details() or ""


@pytest.fixture
def pool(server_root: Path) -> Iterator[RunningServer]:
    with _pool(server_root) as srv:
        yield srv


def test_every_process_refuses_at_the_next_call(pool: RunningServer, server_root: Path
                                                ) -> None:
    srv = pool
    banned, evicted, renewing = (_attest(srv, _token(srv)["token"]) for _ in range(3))
    for a in (banned, evicted, renewing):
        _entry(srv, f"spiffe://it.sigil.test/w/{a.agent_id.rsplit('/', 1)[1]}", a.agent_id,
               "--selector", "unix:uid:1")
    with contextlib.ExitStack() as stack:
        for a in (banned, evicted, renewing):
            stack.callback(a.channel.close)

        def held(a: Agent, name: str) -> dict[str, agent_pb2_grpc.AgentStub]:
            workdir = server_root / name
            workdir.mkdir()
            probe = _Probe(srv, a, workdir)
            stack.callback(probe.close)
            return _one_per_process(probe, stack)

        # Every process has authenticated each agent (and kept its record).
        ban_stubs = held(banned, "ban")
        evict_stubs = held(evicted, "evict")
        old_stubs = held(renewing, "renew")

        # The renewed SVID is first used on one process: that promotes it, and the
        # old SVID must stop working on every process, the others included.
        key = generate_private_key()
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        new_svid = renewing.stub.RenewAgent(agent_pb2.RenewAgentRequest(csr=new_csr(key)),
                                            timeout=10).svid
        for stub in old_stubs.values():  # both SVIDs are current until the new one is used
            _sync(stub)
        renewed = Agent(renewing.agent_id, key, list(new_svid.cert_chain), renewing.stub,
                        renewing.channel)
        (server_root / "renewed").mkdir()
        new_probe = _Probe(srv, renewed, server_root / "renewed")
        stack.callback(new_probe.close)
        with new_probe.connection() as (_cert, stub):
            _sync(stub)

        assert srv.cli("agent", "ban", "--id", banned.agent_id).returncode == 0
        assert srv.cli("agent", "evict", "--id", evicted.agent_id).returncode == 0

        for stub in ban_stubs.values():
            assert _refused(stub) == f"agent is banned: {banned.agent_id}"
        for stub in evict_stubs.values():
            assert "not attested" in _refused(stub)
        for stub in old_stubs.values():
            assert "not the current SVID" in _refused(stub)
