"""Operations on a real server: rate limits, /live, /ready, /metrics."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from identity.keys import generate_private_key
from identity.x509svid import new_csr
from tests.integration.conftest import RunningServer
from tests.integration.test_server_agent_api import (
    _attest,
    _attest_request,
    _channel,
    _entry,
    _token,
)


def _get(address: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


@pytest.fixture
def limited_server(server_root: Path) -> Iterator[RunningServer]:
    """A server with tiny limits that barely refill: 2 attestations, 3 CSRs per caller."""
    cfg = server_root / "server.toml"
    cfg.write_text("rate_limit_attestation_per_second = 0.001\n"
                   "rate_limit_attestation_burst = 2\n"
                   "rate_limit_signing_per_second = 0.001\n"
                   "rate_limit_signing_burst = 3\n")
    srv = RunningServer(trust_domain="it.sigil.test", data_dir=server_root / "data",
                        socket_path=server_root / "admin" / "admin.sock",
                        extra_args=("--config", str(cfg)))
    srv.start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0, srv.log


def test_attestation_rate_limit_by_peer_ip(limited_server: RunningServer) -> None:
    tokens = [_token(limited_server)["token"] for _ in range(3)]
    agents = [_attest(limited_server, t) for t in tokens[:2]]
    with _channel(limited_server) as ch, pytest.raises(grpc.RpcError) as err:
        agent_pb2_grpc.AgentStub(ch).AttestAgent(
            _attest_request(tokens[2], generate_private_key()), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.details().startswith(
        "too many attestations from 127.0.0.1: the limit is 0.001/s (burst 2); retry in ")
    # Refused before the token was looked at: it is still unused.
    shown = limited_server.cli("agent", "list", "--output", "json")
    assert tokens[2].split(".")[0] not in shown.stdout
    for a in agents:
        a.channel.close()


def test_signing_rate_limit_by_agent(limited_server: RunningServer) -> None:
    first = _attest(limited_server, _token(limited_server)["token"])
    second = _attest(limited_server, _token(limited_server)["token"])
    try:
        ids = {}
        for a in (first, second):
            ids[a.agent_id] = str(_entry(limited_server, f"spiffe://it.sigil.test/w{len(ids)}",
                                         a.agent_id, "--selector", "unix:uid:1")["id"])

        def batch(a: object, n: int) -> agent_pb2.BatchNewX509SVIDResponse:
            entry_id = ids[a.agent_id]  # type: ignore[attr-defined]
            req = agent_pb2.BatchNewX509SVIDRequest(params=[
                agent_pb2.NewX509SVIDParams(entry_id=entry_id,
                                            csr=new_csr(generate_private_key()))
                for _ in range(n)])
            return a.stub.BatchNewX509SVID(req, timeout=10)  # type: ignore[attr-defined, no-any-return]

        with pytest.raises(grpc.RpcError) as err:
            batch(first, 4)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details() == ("a batch of 4 CSRs exceeds the signing burst of 3; "
                                       "send smaller batches")
        assert [r.status.code for r in batch(first, 2).results] == [0, 0]
        with pytest.raises(grpc.RpcError) as err:
            batch(first, 2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.value.details().startswith(
            f"agent {first.agent_id} asked for too many signatures: the limit is "
            "0.001 CSRs/s (burst 3); retry in ")
        # The other agent has its own bucket.
        assert [r.status.code for r in batch(second, 3).results] == [0, 0, 0]
    finally:
        first.channel.close()
        second.channel.close()


def test_live_ready_and_bad_requests(sigil_server: RunningServer) -> None:
    addr = sigil_server.health_address
    assert addr.startswith("127.0.0.1:")
    assert _get(addr, "/live")[:1] == (200,)
    status, _, body = _get(addr, "/ready")
    assert (status, body) == (200, "ready\n")
    status, _, body = _get(addr, "/nope")
    assert (status, body) == (404, "not found: /nope\n")
    for method in ("POST", "PUT", "DELETE", "HEAD"):
        status, headers, _ = _get(addr, "/live", method)
        assert status == 405, method
        assert headers["Allow"] == "GET"


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics(sigil_server: RunningServer) -> None:
    tok = _token(sigil_server)
    agent = _attest(sigil_server, tok["token"])
    try:
        entry_id = str(_entry(sigil_server, "spiffe://it.sigil.test/web", agent.agent_id,
                              "--selector", "unix:uid:1")["id"])
        resp = agent.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
            agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=new_csr(generate_private_key()))
            for _ in range(3)]), timeout=10)
        assert [r.status.code for r in resp.results] == [0, 0, 0]
        agent.stub.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id=entry_id,
                                                          audience=["db"]), timeout=10)
        with _channel(sigil_server) as ch, pytest.raises(grpc.RpcError):
            agent_pb2_grpc.AgentStub(ch).AttestAgent(
                _attest_request(tok["token"], generate_private_key()), timeout=10)
    finally:
        agent.channel.close()
    status, headers, text = _get(sigil_server.health_address, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert _metric(text, 'sigil_svids_issued_total{type="x509"}') == 3.0
    assert _metric(text, 'sigil_svids_issued_total{type="jwt"}') == 1.0
    assert _metric(text, 'sigil_svids_issued_total{type="agent"}') == 1.0
    assert _metric(text, 'sigil_rpc_errors_total{api="agent",code="PERMISSION_DENIED",'
                         'method="AttestAgent"}') == 1.0
    assert _metric(text, "sigil_entries") == 1.0
    assert _metric(text, "sigil_agents") == 1.0
    expiry = _metric(text, 'sigil_ca_key_expiry_timestamp_seconds{kind="x509",status="active"}')
    jwt_expiry = _metric(text, 'sigil_ca_key_expiry_timestamp_seconds{kind="jwt",status="active"}')
    assert expiry is not None and jwt_expiry is not None and expiry > 1.7e9
    assert "# TYPE sigil_sync_seconds histogram" in text
