"""The agent API's signing gate: how many calls of one process sign X.509-SVIDs at once.

The servicer is driven in-process (no gRPC), on SQLite, with a signing step that
meets other calls at a barrier: a barrier that times out means the gate let fewer
calls in than it should; a count above the limit means it let in more.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import grpc
import pytest
from cryptography import x509

from api.protos.sigil.admin.v1 import admin_pb2
from api.protos.sigil.agent.v1 import agent_pb2
from api.protos.sigil.types.v1 import types_pb2
from attestation.node import AttestationResult
from ca.api.admin import AdminServicer
from ca.api.agent import AgentServicer
from ca.api.deps import ApiDeps
from ca.authority import CertificateAuthority
from ca.authority.setup import build_authority
from ca.config.server import load_config
from ca.datastore import Datastore
from ca.keys import MemoryKeyManager
from identity.clock import FakeClock
from identity.keys import PublicKey, generate_private_key
from identity.spiffeid import SpiffeId
from identity.x509svid import new_csr

TD = "gate.sigil.test"
AGENT = SpiffeId.parse(f"spiffe://{TD}/sigil/agent/test/node-1")
CALLS = 4


class _Context:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_trailing_metadata(self, _metadata: object) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise AssertionError(f"aborted: {code.name}: {details}")


class Harness:
    def __init__(self, tmp_path: Path, url: str, signing_threads: int) -> None:
        (tmp_path / "data").mkdir()
        config = load_config(None, env={}, overrides={
            "trust_domain": TD, "database_url": url, "data_dir": str(tmp_path / "data")})
        self.datastore = Datastore(url)
        self.authority = build_authority(config, self.datastore, FakeClock(),
                                         key_manager=MemoryKeyManager())
        deps = ApiDeps(config=config, datastore=self.datastore, authority=self.authority,
                       clock=FakeClock(), node_verifiers={
                           "test": lambda _p: AttestationResult(agent_id=AGENT, selectors=(),
                                                                alias=None)})
        self.cert: x509.Certificate | None = None
        self.agent = AgentServicer(deps, peer_certificate=lambda _p: (True, self.cert),
                                   signing_threads=signing_threads)
        resp = self.agent.AttestAgent(agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type="test", payload=b"x"),
            csr=new_csr(generate_private_key())), _Context())
        self.cert = x509.load_der_x509_certificate(resp.svid.cert_chain[0])
        entry = AdminServicer(deps).CreateEntry(admin_pb2.CreateEntryRequest(
            entry=types_pb2.Entry(spiffe_id=f"spiffe://{TD}/w", parent_id=str(AGENT),
                                  selectors=[types_pb2.Selector(type="unix", value="uid:1")])),
            _Context())
        self.entry_id = entry.id

    def batch(self) -> agent_pb2.BatchNewX509SVIDResponse:
        return self.agent.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
            agent_pb2.NewX509SVIDParams(entry_id=self.entry_id,
                                        csr=new_csr(generate_private_key()))]), _Context())


@pytest.fixture
def make(tmp_path: Path, database_url: str) -> Iterator[type[Harness]]:
    made: list[Harness] = []

    class Made(Harness):
        def __init__(self, signing_threads: int) -> None:
            super().__init__(tmp_path, database_url, signing_threads)
            made.append(self)

    yield Made
    for h in made:
        h.datastore.close()


def _run_concurrently(h: Harness, monkeypatch: pytest.MonkeyPatch, meet: int) -> int:
    """CALLS calls at once; signing waits at a barrier of ``meet``; the most seen at once."""
    barrier = threading.Barrier(meet, timeout=10)
    lock = threading.Lock()
    inside = [0, 0]  # now, most
    real = h.authority.sign_x509_svid

    def sign(spiffe_id: SpiffeId, public_key: PublicKey, **kw: object
             ) -> tuple[x509.Certificate, ...]:
        with lock:
            inside[0] += 1
            inside[1] = max(inside)
        try:
            barrier.wait()  # BrokenBarrierError: fewer than `meet` calls got in
            time.sleep(0.05)
            return real(spiffe_id, public_key, **kw)  # type: ignore[arg-type]
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(h.authority, "sign_x509_svid", sign)
    responses: list[agent_pb2.BatchNewX509SVIDResponse] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            responses.append(h.batch())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(CALLS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [r.results[0].status.code for r in responses] == [0] * CALLS
    return inside[1]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("limit", [1, 2])
def test_in_process_key_signs_in_at_most_the_gates_threads(
    make: type[Harness], monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    h = make(limit)
    assert h.authority.x509_key_in_process
    # `limit` calls meet inside (so the gate lets that many in), never more.
    assert _run_concurrently(h, monkeypatch, meet=limit) == limit


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_hsm_key_is_not_gated(make: type[Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    h = make(1)
    monkeypatch.setattr(CertificateAuthority, "x509_key_in_process", property(lambda _s: False))
    # All calls meet inside at once: signing with a device is a wait, not CPU.
    assert _run_concurrently(h, monkeypatch, meet=CALLS) == CALLS


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_default_gate_is_the_cores_each_process_has(
    make: type[Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ca.api.agent as module

    monkeypatch.setattr(module.os, "cpu_count", lambda: 8)
    h = make(1)
    deps = h.agent._d
    for workers, expected in ((1, 8), (2, 4), (3, 2), (8, 1), (16, 1)):
        config = dataclasses.replace(
            deps.config, ops=dataclasses.replace(deps.config.ops, worker_processes=workers))
        servicer = AgentServicer(dataclasses.replace(deps, config=config),
                                 peer_certificate=lambda _p: (True, None),
                                 entry_index=h.agent._index)
        assert servicer.signing_threads == expected
