"""agent/taint.py, Cache.rotation_plan and the Manager: SVIDs signed by a tainted CA
rotate early, the agent's own included."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.cache import Cache
from agent.client import SyncResult
from agent.manager import Manager
from agent.state import AgentState
from agent.taint import load_tainted, signed_by_tainted
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.keys import PrivateKey, generate_private_key
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate
from tests.unit.test_agent_cache import AGENT, T0, entry, make_cache
from tests.unit.test_agent_resilience import no_crashed_steps  # noqa: F401

TD = TrustDomain("example.org")


def _ca() -> tuple[object, object]:
    key = generate_private_key()
    cert = new_ca_certificate(trust_domain=TD, public_key=key.public_key(), signer_key=key,
                              not_before=T0 - dt.timedelta(hours=1),
                              not_after=T0 + dt.timedelta(days=1))
    return cert, key


def _svid(ca: tuple[object, object], sid: str) -> X509Svid:
    cert, key = ca
    leaf_key = generate_private_key()
    leaf = new_svid_certificate(spiffe_id=SpiffeId.parse(sid), public_key=leaf_key.public_key(),
                                ca_cert=cert, ca_key=key, not_before=T0,  # type: ignore[arg-type]
                                not_after=T0 + dt.timedelta(hours=1))
    return X509Svid(SpiffeId.parse(sid), (leaf,), leaf_key)


def test_signed_by_tainted_matches_signature_not_just_name() -> None:
    old, new = _ca(), _ca()
    svid = _svid(old, "spiffe://example.org/a")
    assert signed_by_tainted(svid, [old[0]])  # type: ignore[list-item]
    # Same subject name (every CA of a trust domain has it), other key: no match.
    assert not signed_by_tainted(svid, [new[0]])  # type: ignore[list-item]
    assert not signed_by_tainted(svid, [])


def test_load_tainted_ignores_garbage() -> None:
    cert, _ = _ca()
    der = cert.public_bytes(Encoding.DER)  # type: ignore[attr-defined]
    assert load_tainted([b"not a certificate", der]) == (cert,)


def test_rotation_plan_reissues_svids_of_a_tainted_ca_at_once() -> None:
    old, new = _ca(), _ca()
    cache = make_cache(FakeClock(T0))
    cache.set_entries([entry("a", "spiffe://example.org/a"), entry("b", "spiffe://example.org/b")])
    cache.set_x509_svid("a", _svid(old, "spiffe://example.org/a"))
    cache.set_x509_svid("b", _svid(new, "spiffe://example.org/b"))
    assert cache.rotation_plan(T0) == []  # fresh SVIDs: nothing due
    cache.set_tainted([old[0].public_bytes(Encoding.DER)])  # type: ignore[attr-defined]
    assert [e.id for e in cache.rotation_plan(T0)] == ["a"]
    cache.set_x509_svid("a", _svid(new, "spiffe://example.org/a"))
    assert cache.rotation_plan(T0) == []


class _RenewingServer:
    """Stands in for ServerClient: syncs nothing but the taint, renews with ``new``."""

    def __init__(self, new: tuple[object, object], tainted: tuple[bytes, ...]) -> None:
        self.new = new
        self.tainted = tainted
        self.renewed = 0

    def configure(self, **_kw: object) -> None:
        pass

    async def sync(self, **_known: object) -> SyncResult:
        return SyncResult((), {}, 1, tainted_x509=self.tainted)

    async def batch_new_x509_svid(self, params: list[object]) -> list[object]:
        assert params == []
        return []

    async def renew(self, *, csr: bytes, key: PrivateKey) -> X509Svid:
        cert, ca_key = self.new
        leaf = new_svid_certificate(
            spiffe_id=AGENT, public_key=key.public_key(), ca_cert=cert,  # type: ignore[arg-type]
            ca_key=ca_key, not_before=T0, not_after=T0 + dt.timedelta(hours=1))  # type: ignore[arg-type]
        self.renewed += 1
        return X509Svid(AGENT, (leaf,), key)


@pytest.mark.parametrize("taint_old", [True, False])
def test_agent_renews_its_own_svid_when_its_signer_is_tainted(
        tmp_path: Path, taint_old: bool) -> None:
    old, new = _ca(), _ca()
    agent_svid = _svid(old, str(AGENT))  # fresh: half-life is 30 min away
    tainted = (old[0].public_bytes(Encoding.DER),) if taint_old else ()  # type: ignore[attr-defined]
    server = _RenewingServer(new, tainted)
    state = AgentState(tmp_path / "data")
    state.prepare()

    async def run() -> Manager:
        clock = FakeClock(T0)
        bundle = Bundle(trust_domain=TD, x509_authorities=(old[0], new[0]))  # type: ignore[arg-type]
        manager = Manager(client=server, cache=Cache(trust_domain=TD, clock=clock),  # type: ignore[arg-type]
                          state=state, agent_svid=agent_svid, bundle=bundle, clock=clock)
        assert await manager.sync_once()  # learns of the taint
        assert await manager.sync_once()  # renews, if tainted
        assert await manager.sync_once()  # and only once
        return manager

    manager = asyncio.run(run())
    if taint_old:
        assert server.renewed == 1
        manager.agent_svid.leaf.verify_directly_issued_by(new[0])  # type: ignore[arg-type]
        saved = state.load_svid()
        assert saved is not None and saved.cert_chain == manager.agent_svid.cert_chain
    else:
        assert server.renewed == 0
        assert manager.agent_svid is agent_svid
