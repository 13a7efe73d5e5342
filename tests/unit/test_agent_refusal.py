"""A refused agent (banned, evicted) and SVID expiry between syncs, without a server.

The end-to-end side, against a real server, is tests/e2e/test_agent_ban_evict.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from agent.agent import Agent
from agent.cache import Cache
from agent.client import SignResult, SyncResult
from agent.config import load_config
from agent.errors import (
    AttestationRefusedError,
    BootstrapError,
    ServerCallError,
    TrustDomainMismatchError,
)
from agent.manager import Manager
from agent.state import AgentState
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.refusal import RefusalReason, reason_from_metadata
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid
from tests.unit.test_agent_cache import AGENT, CA, T0, TD, entry, svid
from tests.unit.test_agent_resilience import FakeServer, no_crashed_steps  # noqa: F401

BUNDLE = Bundle(trust_domain=TD, x509_authorities=(CA,))
BANNED = ServerCallError(
    f"SyncAuthorizedEntries failed: PERMISSION_DENIED: agent is banned: {AGENT}",
    code="PERMISSION_DENIED", reason=RefusalReason.AGENT_BANNED)
EVICTED = ServerCallError(
    f"SyncAuthorizedEntries failed: PERMISSION_DENIED: agent is not attested (or was "
    f"evicted): {AGENT}", code="PERMISSION_DENIED", reason=RefusalReason.AGENT_NOT_ATTESTED)


class CountingServer(FakeServer):
    """FakeServer that counts calls and remembers what each sync presented."""

    def __init__(self, clock: Any, entries: list[Any]) -> None:
        super().__init__(clock, entries)
        self.syncs: list[dict[str, object]] = []
        self.batches = 0

    async def sync(self, **known: object) -> SyncResult:
        self.syncs.append(known)
        return await super().sync(**known)

    async def batch_new_x509_svid(self, params: list[tuple[str, bytes]]) -> list[SignResult]:
        self.batches += 1
        return await super().batch_new_x509_svid(params)


def make(tmp_path: Path, clock: Any, n: int = 2) -> tuple[CountingServer, Cache, Manager]:
    server = CountingServer(clock, [entry(f"e{i}", f"spiffe://example.org/w{i}")
                                    for i in range(n)])
    state = AgentState(tmp_path / "data")
    state.prepare()

    async def mk() -> tuple[Cache, Manager]:
        cache = Cache(trust_domain=TD, clock=clock)
        manager = Manager(client=server, cache=cache, state=state,  # type: ignore[arg-type]
                          agent_svid=svid(str(AGENT), ttl=dt.timedelta(days=1)),
                          bundle=BUNDLE, clock=clock, sync_interval=dt.timedelta(seconds=1),
                          backoff_max=dt.timedelta(seconds=2))
        return cache, manager

    cache, manager = asyncio.run(mk())
    return server, cache, manager


@pytest.fixture
def agent_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    logging.getLogger("sigil.agent").propagate = True
    caplog.set_level(logging.INFO, logger="sigil.agent")
    return caplog


def messages(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


# Banned ----------------------------------------------------------------------------


def test_a_banned_agent_stops_the_tick_at_the_refusal(
    tmp_path: Path, agent_log: pytest.LogCaptureFixture
) -> None:
    server, cache, manager = make(tmp_path, FakeClock(T0))
    server.fail = BANNED
    for _ in range(3):
        assert asyncio.run(manager.sync_once()) is False
    # Sync refused: no signing call follows it (it would be refused too).
    assert len(server.syncs) == 3 and server.batches == 0
    assert manager.refused == "banned"
    assert len(messages(agent_log, "agent banned")) == 1
    assert messages(agent_log, "sync step failed") == []
    assert cache.snapshot().svids == {}


def test_a_banned_agent_keeps_its_svids_until_they_expire(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    server, cache, manager = make(tmp_path, clock)
    assert asyncio.run(manager.sync_once()) is True
    held = dict(cache.snapshot().svids)
    assert sorted(held) == ["e0", "e1"]
    server.fail = BANNED
    clock.advance(dt.timedelta(minutes=59))
    assert asyncio.run(manager.sync_once()) is False
    assert cache.snapshot().svids == held
    clock.advance(dt.timedelta(minutes=1))
    assert asyncio.run(manager.sync_once()) is False
    assert cache.snapshot().svids == {}


# The reason token decides, not the message --------------------------------------


@pytest.mark.parametrize("message", [
    f"SyncAuthorizedEntries failed: PERMISSION_DENIED: agent is banned: {AGENT}",
    f"SyncAuthorizedEntries failed: PERMISSION_DENIED: agent is not attested: {AGENT}",
])
def test_the_old_words_without_a_reason_are_only_a_failed_step(
    tmp_path: Path, agent_log: pytest.LogCaptureFixture, message: str
) -> None:
    server, _cache, manager = make(tmp_path, FakeClock(T0))
    reattests: list[int] = []

    async def reattest() -> X509Svid:
        reattests.append(1)
        raise AssertionError("not evicted")

    manager._reattest = reattest
    server.fail = ServerCallError(message, code="PERMISSION_DENIED")
    assert asyncio.run(manager.sync_once()) is False
    assert manager.refused is None and reattests == []
    assert messages(agent_log, "agent banned") == messages(agent_log, "agent evicted") == []
    assert len(messages(agent_log, "sync step failed")) == 1


@pytest.mark.parametrize(("reason", "refused"), [
    (RefusalReason.AGENT_BANNED, "banned"),
    (RefusalReason.AGENT_NOT_ATTESTED, "evicted"),
])
def test_the_reason_token_decides_whatever_the_message_says(
    tmp_path: Path, agent_log: pytest.LogCaptureFixture, reason: RefusalReason, refused: str
) -> None:
    server, _cache, manager = make(tmp_path, FakeClock(T0))
    server.fail = ServerCallError("SyncAuthorizedEntries failed: PERMISSION_DENIED: refused",
                                  code="PERMISSION_DENIED", reason=reason)
    assert asyncio.run(manager.sync_once()) is False
    assert manager.refused == refused
    assert server.batches == 0
    assert messages(agent_log, "sync step failed") == []


def test_a_refusal_for_a_replaced_svid_is_a_failed_step(
    tmp_path: Path, agent_log: pytest.LogCaptureFixture
) -> None:
    server, _cache, manager = make(tmp_path, FakeClock(T0))
    server.fail = ServerCallError("SyncAuthorizedEntries failed: PERMISSION_DENIED: not current",
                                  code="PERMISSION_DENIED",
                                  reason=RefusalReason.SVID_NOT_CURRENT)
    assert asyncio.run(manager.sync_once()) is False
    assert manager.refused is None
    assert len(messages(agent_log, "sync step failed")) == 1


# Expiry between ticks --------------------------------------------------------------


class WallClock:
    """Real time, shifted so that it reads T0 when made."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def now(self) -> dt.datetime:
        return T0 + dt.timedelta(seconds=time.monotonic() - self._start)


def test_an_svid_is_dropped_at_its_expiry_between_ticks(tmp_path: Path) -> None:
    clock = WallClock()
    _server, cache, manager = make(tmp_path, clock, n=1)

    async def go() -> float:
        cache.set_entries([entry("e0", "spiffe://example.org/w0")])
        cache.set_x509_svid("e0", svid("spiffe://example.org/w0", ttl=dt.timedelta(seconds=1)))
        version = cache.version
        stop = asyncio.Event()
        started = time.monotonic()
        # A long pause (a backoff) must not keep the expired SVID until its end.
        pause = asyncio.create_task(manager.pause(stop, dt.timedelta(seconds=60)))
        await asyncio.wait_for(cache.wait_for_change(version), 30)
        elapsed = time.monotonic() - started
        assert not pause.done()
        stop.set()
        await asyncio.wait_for(pause, 5)
        return elapsed

    elapsed = asyncio.run(go())
    assert cache.snapshot().svids == {}
    assert clock.now() >= T0 + dt.timedelta(seconds=1)
    assert elapsed < 30
    # Persisted without it, too.
    restored = AgentState(tmp_path / "data").load_workload_cache(TD, now=T0)
    assert restored is not None and restored.svids == {}


def test_pause_without_svids_waits_the_delay_or_stops(tmp_path: Path) -> None:
    _server, _cache, manager = make(tmp_path, FakeClock(T0))

    async def go() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # The whole delay: not a moment less (an upper bound would be a timing test).
        started = loop.time()
        await asyncio.wait_for(manager.pause(stop, dt.timedelta(milliseconds=50)), 10)
        assert loop.time() - started >= 0.05
        # An hour's pause ends when stop is set, not before.
        pause = asyncio.create_task(manager.pause(stop, dt.timedelta(hours=1)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not pause.done()
        stop.set()
        await asyncio.wait_for(pause, 10)
        # Once stopped, a pause returns at once.
        await asyncio.wait_for(manager.pause(stop, dt.timedelta(hours=1)), 10)

    asyncio.run(go())


# Evicted ---------------------------------------------------------------------------


def test_an_evicted_agent_that_cannot_attest_again_tries_once_a_tick_and_says_so_once(
    tmp_path: Path, agent_log: pytest.LogCaptureFixture
) -> None:
    server, _cache, manager = make(tmp_path, FakeClock(T0))
    calls: list[int] = []

    async def reattest() -> X509Svid:
        calls.append(1)
        raise BootstrapError("join token abcd is already used")

    manager._reattest = reattest
    server.fail = EVICTED
    for _ in range(3):
        assert asyncio.run(manager.sync_once()) is False
    assert calls == [1, 1, 1]  # once a tick, not once per step
    assert server.batches == 0
    assert manager.refused == "evicted"
    assert len(messages(agent_log, "agent evicted: attesting again failed")) == 1
    assert len(messages(agent_log, "agent evicted: attesting again")) == 2  # try + failed


def test_a_new_reason_for_failing_to_attest_again_is_logged(
    tmp_path: Path, agent_log: pytest.LogCaptureFixture
) -> None:
    server, _cache, manager = make(tmp_path, FakeClock(T0))
    reasons = iter(["server unreachable", "server unreachable", "token refused"])

    async def reattest() -> X509Svid:
        raise BootstrapError(next(reasons))

    manager._reattest = reattest
    server.fail = EVICTED
    for _ in range(3):
        asyncio.run(manager.sync_once())
    failed = [r for r in agent_log.records
              if r.getMessage().startswith("agent evicted: attesting again failed")]
    assert [r.fields["reason"] for r in failed] == [  # type: ignore[attr-defined]
        "server unreachable", "token refused"]


def test_after_attesting_again_the_tick_goes_on_and_the_next_sync_is_full(
    tmp_path: Path,
) -> None:
    server, cache, manager = make(tmp_path, FakeClock(T0))
    assert asyncio.run(manager.sync_once()) is True
    assert server.syncs[-1] == {"known_generation": "", "known_revision": 0,
                                "known_revocation_id": 0}
    manager._sync_generation, manager._sync_revision = "g", 7
    manager._revocation_id = 3
    new_svid = svid(str(SpiffeId.parse("spiffe://example.org/sigil/agent/k8s_psat/c/n")))

    async def reattest() -> X509Svid:
        server.fail = None
        return new_svid

    manager._reattest = reattest
    server.fail = EVICTED
    batches = server.batches
    cache.drop_expired(T0 + dt.timedelta(hours=2))  # so that the tick has SVIDs to sign
    asyncio.run(manager.sync_once())
    assert manager.agent_svid is new_svid and manager.refused is None
    # The rest of the tick ran with the new SVID: the SVIDs were signed.
    assert server.batches == batches + 1
    assert sorted(cache.snapshot().svids) == ["e0", "e1"]
    # The next sync starts from scratch (the node record is new).
    assert asyncio.run(manager.sync_once()) is True
    assert server.syncs[-1] == {"known_generation": "", "known_revision": 0,
                                "known_revocation_id": 0}


# The agent's re-attestation with a join token ---------------------------------------


class AttestingClient:
    """Stands in for the agent's ServerClient during attestation."""

    def __init__(self, fail: ServerCallError | None, trust_domain: TrustDomain = TD) -> None:
        self.fail = fail
        self.trust_domain = trust_domain
        self.attests = 0

    def configure(self, **_kw: object) -> None:
        pass

    async def server_trust_domain(self, **_kw: object) -> TrustDomain:
        return self.trust_domain

    async def attest(self, **_kw: object) -> object:
        self.attests += 1
        if self.fail is not None:
            raise self.fail
        raise AssertionError("not reached in these tests")


class StubManager:
    def __init__(self, agent_id: str) -> None:
        self.agent_svid = svid(agent_id)
        self.bundle = BUNDLE


def join_token_agent(tmp_path: Path, token: str | None, current_token_id: str,
                     fail: ServerCallError | None = None,
                     server_td: TrustDomain = TD) -> tuple[Agent, AttestingClient]:
    config = load_config(overrides={"trust_domain": "example.org", "server_address": "srv:8081",
                                    "data_dir": str(tmp_path / "ag"), "join_token": token})
    agent = Agent(config, clock=FakeClock(T0))
    client = AttestingClient(fail, server_td)
    agent.client = client  # type: ignore[assignment]
    agent.manager = StubManager(  # type: ignore[assignment]
        f"spiffe://example.org/sigil/agent/join_token/{current_token_id}")
    return agent, client


def test_the_join_token_the_agent_attested_with_is_not_presented_again(tmp_path: Path) -> None:
    agent, client = join_token_agent(tmp_path, "abcd.secret", "abcd")
    with pytest.raises(BootstrapError, match=r"join token abcd is already used \(join tokens "
                       r"are single use\): create a new one .* --join-token"):
        asyncio.run(agent._reattest())
    assert client.attests == 0


def test_a_join_token_the_server_refused_is_not_presented_again(tmp_path: Path) -> None:
    refused = ServerCallError("AttestAgent failed: PERMISSION_DENIED: join token ef01 was "
                              "already used", code="PERMISSION_DENIED")
    agent, client = join_token_agent(tmp_path, "ef01.secret", "abcd", fail=refused)
    with pytest.raises(AttestationRefusedError, match="was already used"):
        asyncio.run(agent._reattest())
    assert client.attests == 1
    with pytest.raises(BootstrapError, match="join token ef01 is already used"):
        asyncio.run(agent._reattest())
    assert client.attests == 1


def test_a_join_token_is_tried_again_after_the_server_was_unreachable(tmp_path: Path) -> None:
    down = ServerCallError("AttestAgent failed: UNAVAILABLE: connection refused",
                           code="UNAVAILABLE")
    agent, client = join_token_agent(tmp_path, "ef01.secret", "abcd", fail=down)
    for _ in range(2):
        with pytest.raises(BootstrapError, match="UNAVAILABLE") as err:
            asyncio.run(agent._reattest())
        assert not isinstance(err.value, AttestationRefusedError)
    assert client.attests == 2


@pytest.mark.parametrize(("token", "message"), [
    (None, "no join token to attest again with"),
    ("not-a-token", "join token: join token must have the form"),
])
def test_no_usable_join_token_says_what_to_do(
    tmp_path: Path, token: str | None, message: str
) -> None:
    agent, client = join_token_agent(tmp_path, token, "abcd")
    with pytest.raises(BootstrapError, match=message):
        asyncio.run(agent._reattest())
    assert client.attests == 0


@pytest.mark.parametrize(("metadata", "expected"), [
    ((("sigil-reason", "agent_banned"),), RefusalReason.AGENT_BANNED),
    ((("other", "x"), ("Sigil-Reason", b"agent_not_attested")), RefusalReason.AGENT_NOT_ATTESTED),
    ((("sigil-reason", "svid_not_current"),), RefusalReason.SVID_NOT_CURRENT),
    ((("sigil-reason", "agent banned"),), None),  # not a token
    ((("sigil-reason", "something_new"), ("sigil-reason", "agent_banned")),
     RefusalReason.AGENT_BANNED),
    ((("grpc-message", "agent is banned"),), None),
    ((), None),
    (None, None),
])
def test_reason_from_metadata(metadata: Any, expected: RefusalReason | None) -> None:
    assert reason_from_metadata(metadata) is expected


def test_the_server_of_another_trust_domain_gets_no_attestation(tmp_path: Path) -> None:
    agent, client = join_token_agent(tmp_path, "ef01.secret", "abcd",
                                     server_td=TrustDomain("other.org"))
    with pytest.raises(TrustDomainMismatchError,
                       match=r"^wrong trust domain: configured example.org; the server is "
                             r"other.org$"):
        asyncio.run(agent._reattest())
    assert client.attests == 0
    # Not a refusal of the token: it may be presented to the right server later.
    assert agent._refused_tokens == set()
