"""The agent renews its own SVID at a jittered point: 40-60 % of its lifetime.

The point comes from the same helper as workload SVIDs' (agent.rotation), seeded
by the SVID's serial number: fixed for one SVID, different between SVIDs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from cryptography import x509

from agent.cache import Cache
from agent.client import SyncResult
from agent.manager import Manager
from agent.rotation import rotation_time
from agent.state import AgentState
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.keys import generate_private_key
from identity.x509svid import X509Svid, new_svid_certificate
from tests.unit.test_agent_cache import AGENT, CA, CA_KEY, T0, TD
from tests.unit.test_agent_resilience import no_crashed_steps  # noqa: F401

BUNDLE = Bundle(trust_domain=TD, x509_authorities=(CA,))
LIFETIME = dt.timedelta(hours=1)
KEY = generate_private_key()  # one key for every SVID here: key generation is slow


def agent_svid(serial: int, start: dt.datetime = T0) -> X509Svid:
    cert = new_svid_certificate(
        spiffe_id=AGENT, public_key=KEY.public_key(), ca_cert=CA, ca_key=CA_KEY,
        not_before=start, not_after=start + LIFETIME, serial=serial,
    )
    return X509Svid(AGENT, (cert,), KEY)


class RenewingServer:
    """Stands in for ServerClient: no entries; RenewAgent signs a fresh SVID."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.renewed_at: list[dt.datetime] = []
        self.next_serial = 10_000

    def configure(self, **_kw: object) -> None:
        pass

    async def renew(self, *, csr: bytes, key: object) -> X509Svid:
        x509.load_der_x509_csr(csr)
        self.renewed_at.append(self.clock.now())
        self.next_serial += 1
        # Certificates hold whole seconds.
        return agent_svid(self.next_serial, start=self.clock.now().replace(microsecond=0))

    async def sync(self, **_known: object) -> SyncResult:
        return SyncResult((), {TD: BUNDLE}, 1)

    async def batch_new_x509_svid(self, params: object) -> list[object]:
        raise AssertionError("no entries, nothing to sign")


def make(tmp_path: Path, serial: int) -> tuple[FakeClock, RenewingServer, Manager]:
    clock = FakeClock(T0)
    server = RenewingServer(clock)
    state = AgentState(tmp_path / f"data-{serial}")
    state.prepare()

    async def mk() -> Manager:
        cache = Cache(trust_domain=TD, clock=clock)
        return Manager(client=server, cache=cache, state=state,  # type: ignore[arg-type]
                       agent_svid=agent_svid(serial), bundle=BUNDLE, clock=clock,
                       key_factory=lambda: KEY)

    return clock, server, asyncio.run(mk())


def fraction(svid: X509Svid, at: dt.datetime) -> float:
    start = svid.leaf.not_valid_before_utc
    return (at - start) / (svid.leaf.not_valid_after_utc - start)


async def tick_until_renewed(
    clock: FakeClock, server: RenewingServer, manager: Manager, step: dt.timedelta
) -> None:
    while not server.renewed_at:
        assert clock.now() < T0 + LIFETIME, "never renewed"
        assert await manager.sync_once() is True
        clock.advance(step)


def test_renewal_point_is_in_the_window_and_stable(tmp_path: Path) -> None:
    for serial in range(1, 41):
        _clock, _server, manager = make(tmp_path, serial)
        due = manager.agent_svid_renew_at
        assert 0.4 <= fraction(manager.agent_svid, due) <= 0.6, serial
        # Asked again (every tick asks): the same point, not a new draw.
        assert all(manager.agent_svid_renew_at == due for _ in range(5))
        assert due == rotation_time(manager.agent_svid)


def test_never_renewed_before_40_or_after_60_percent(tmp_path: Path) -> None:
    step = LIFETIME / 200  # a tick every 0.5 % of the lifetime
    for serial in (3, 17, 4242, 99_991, 2**100 + 7):
        clock, server, manager = make(tmp_path, serial)
        first = manager.agent_svid
        due = manager.agent_svid_renew_at

        asyncio.run(tick_until_renewed(clock, server, manager, step))
        [renewed] = server.renewed_at
        assert 0.4 <= fraction(first, renewed) <= 0.6, (serial, fraction(first, renewed))
        # The first tick at or after the point, not one before it.
        assert due <= renewed < due + step
        assert manager.agent_svid is not first


def test_two_agents_with_the_same_lifetime_renew_at_different_points(tmp_path: Path) -> None:
    points = {}
    for serial in range(100, 160):
        _clock, _server, manager = make(tmp_path, serial)
        points[serial] = fraction(manager.agent_svid, manager.agent_svid_renew_at)
    # Every pair differs, and the fleet spreads over the window instead of
    # clustering at one point.
    assert len(set(points.values())) == len(points)
    assert min(points.values()) < 0.45 and max(points.values()) > 0.55, points


def test_after_renewal_the_next_point_comes_from_the_new_svid(tmp_path: Path) -> None:
    clock, server, manager = make(tmp_path, 7)
    clock.advance(manager.agent_svid_renew_at - clock.now())
    assert asyncio.run(manager.sync_once()) is True
    [renewed] = server.renewed_at
    second = manager.agent_svid
    assert second.leaf.not_valid_before_utc == renewed.replace(microsecond=0)
    next_due = manager.agent_svid_renew_at
    assert next_due == rotation_time(second)
    assert 0.4 <= fraction(second, next_due) <= 0.6
    assert next_due > clock.now()

    # Nothing happens until the new point, then exactly one more renewal.
    clock.advance(next_due - clock.now() - dt.timedelta(seconds=1))
    assert asyncio.run(manager.sync_once()) is True
    assert len(server.renewed_at) == 1
    clock.advance(dt.timedelta(seconds=1))
    assert asyncio.run(manager.sync_once()) is True
    assert server.renewed_at == [renewed, next_due]
    assert manager.agent_svid_renew_at == rotation_time(manager.agent_svid)
    assert manager.agent_svid_renew_at > clock.now()
