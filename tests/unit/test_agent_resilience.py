"""The manager against a fake server: backoff, on-demand signing, refusal, persistence."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cache import Cache
from agent.client import SignResult, SyncResult
from agent.errors import ServerCallError
from agent.manager import Manager
from agent.state import WORKLOAD_CACHE_FILE, AgentState
from identity.bundle import Bundle
from identity.clock import FakeClock
from identity.refusal import RefusalReason
from identity.spiffeid import SpiffeId
from identity.x509svid import X509Svid, new_svid_certificate
from tests.unit.test_agent_cache import AGENT, CA, CA_KEY, T0, TD, entry, svid

BUNDLE = Bundle(trust_domain=TD, x509_authorities=(CA,))


class _CrashedSteps(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "sync step crashed":
            self.records.append(record)


@contextlib.contextmanager
def fail_on_crashed_steps() -> Iterator[None]:
    """Fail when a sync step crashed inside the block.

    ``Manager._step`` logs and swallows any exception, so that the sync loop
    never dies; an AssertionError a fake raises on an unexpected call would be
    swallowed with it. This turns each one back into a failure.
    """
    handler = _CrashedSteps()
    logger = logging.getLogger("sigil.agent")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    # A block nested in another reports its crashes once, not again at the outer one.
    crashed = [r for r in handler.records if not getattr(r, "reported", False)]
    for record in crashed:
        record.reported = True
    if crashed:
        details = "; ".join(
            f"{r.fields.get('step')}: {r.exc_info[1]!r}"  # type: ignore[attr-defined]
            if r.exc_info else str(r.fields.get("step"))  # type: ignore[attr-defined]
            for r in crashed)
        raise AssertionError(f"a sync step crashed (swallowed by the manager): {details}")


@pytest.fixture(autouse=True)
def no_crashed_steps() -> Iterator[None]:
    """Every test here (and in modules importing this fixture) fails on a crashed step."""
    with fail_on_crashed_steps():
        yield


class FakeServer:
    """Stands in for ServerClient: serves entries, signs CSRs, or fails on request."""

    def __init__(self, clock: FakeClock, entries: list[Any]) -> None:
        self.clock = clock
        self.entries = entries
        self.fail: ServerCallError | None = None
        self.signed: list[str] = []

    def configure(self, **_kw: object) -> None:
        pass

    async def renew(self, **_kw: object) -> X509Svid:
        raise AssertionError("not due in these tests")

    async def sync(self, **_known: object) -> SyncResult:
        if self.fail is not None:
            raise self.fail
        return SyncResult(tuple(self.entries), {TD: BUNDLE}, 1)

    async def batch_new_x509_svid(self, params: list[tuple[str, bytes]]) -> list[SignResult]:
        if self.fail is not None:
            raise self.fail
        from cryptography import x509

        out = []
        by_id = {e.id: e for e in self.entries}
        for entry_id, csr_der in params:
            csr = x509.load_der_x509_csr(csr_der)
            cert = new_svid_certificate(
                spiffe_id=by_id[entry_id].spiffe_id, public_key=csr.public_key(),  # type: ignore[arg-type]
                ca_cert=CA, ca_key=CA_KEY, not_before=self.clock.now(),
                not_after=self.clock.now() + dt.timedelta(hours=1),
            )
            self.signed.append(entry_id)
            out.append(SignResult(entry_id, chain=(cert,)))
        return out


def make(tmp_path: Path, n: int = 3, size: int = 1000):  # type: ignore[no-untyped-def]
    clock = FakeClock(T0)
    entries = [entry(f"e{i}", f"spiffe://example.org/w{i}") for i in range(n)]
    server = FakeServer(clock, entries)
    state = AgentState(tmp_path / "data")
    state.prepare()

    async def mk() -> tuple[Cache, Manager]:
        cache = Cache(trust_domain=TD, clock=clock, svid_cache_size=size)
        agent_svid = svid(str(AGENT), ttl=dt.timedelta(days=1))
        manager = Manager(client=server, cache=cache, state=state,  # type: ignore[arg-type]
                          agent_svid=agent_svid, bundle=BUNDLE, clock=clock,
                          sync_interval=dt.timedelta(seconds=5),
                          backoff_max=dt.timedelta(seconds=60))
        return cache, manager

    cache, manager = asyncio.run(mk())
    return clock, server, state, cache, manager


def test_backoff_after_failures_then_reset_on_success(tmp_path: Path) -> None:
    _clock, server, _state, _cache, manager = make(tmp_path)
    manager.backoff._uniform = lambda low, high: high  # no jitter: exact delays

    async def go() -> list[float]:
        delays = []
        server.fail = ServerCallError("SyncAuthorized failed: UNAVAILABLE: down",
                                      code="UNAVAILABLE")
        for _ in range(6):
            delays.append(manager.next_delay(await manager.sync_once()).total_seconds())
        server.fail = None
        delays.append(manager.next_delay(await manager.sync_once()).total_seconds())
        server.fail = ServerCallError("x", code="UNAVAILABLE")
        delays.append(manager.next_delay(await manager.sync_once()).total_seconds())
        return delays

    assert asyncio.run(go()) == [5, 10, 20, 40, 60, 60, 5, 5]


def test_cache_is_persisted_0600_and_restored_without_expired_svids(tmp_path: Path) -> None:
    clock, _server, state, cache, manager = make(tmp_path)
    assert asyncio.run(manager.sync_once()) is True
    path = state.data_dir / WORKLOAD_CACHE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    restored = state.load_workload_cache(TD, now=clock.now())
    assert restored is not None
    assert [e.id for e in restored.entries] == ["e0", "e1", "e2"]
    assert sorted(restored.svids) == ["e0", "e1", "e2"]
    assert restored.svids["e1"].chain_der() == cache.snapshot().svids["e1"].chain_der()
    assert restored.svids["e1"].key_der() == cache.snapshot().svids["e1"].key_der()
    assert restored.bundles[TD].x509_der() == BUNDLE.x509_der()
    later = state.load_workload_cache(TD, now=clock.now() + dt.timedelta(hours=1))
    assert later is not None and later.svids == {}


@pytest.mark.parametrize("content", [
    b"not json", b"{}", b'{"format": 99}',
    b'{"format": 1, "trust_domain": "other.org", "entries": [], "bundles": {}, "svids": {}}',
    b'{"format": 1, "trust_domain": "example.org", "entries": [{"id": 1}], "bundles": {},'
    b' "svids": {}}',
])
def test_unusable_persisted_cache_is_ignored_and_logged(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    state = AgentState(tmp_path)
    (tmp_path / WORKLOAD_CACHE_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="sigil.agent"):
        logging.getLogger("sigil.agent").propagate = True
        assert state.load_workload_cache(TD, now=T0) is None
    assert "persisted workload cache unusable" in caplog.text


def test_expired_svids_are_dropped_while_the_server_is_down(tmp_path: Path) -> None:
    clock, server, state, cache, manager = make(tmp_path)
    asyncio.run(manager.sync_once())
    server.fail = ServerCallError("down", code="UNAVAILABLE")
    clock.advance(dt.timedelta(minutes=59))
    assert asyncio.run(manager.sync_once()) is False
    assert sorted(cache.snapshot().svids) == ["e0", "e1", "e2"]  # still served
    clock.advance(dt.timedelta(minutes=1))
    asyncio.run(manager.sync_once())
    assert cache.snapshot().svids == {}
    doc = json.loads((state.data_dir / WORKLOAD_CACHE_FILE).read_bytes())
    assert doc["svids"] == {}


def test_a_workload_beyond_the_cache_size_gets_its_svid_on_demand(tmp_path: Path) -> None:
    _clock, server, _state, cache, manager = make(tmp_path, n=5, size=2)

    async def go() -> None:
        await manager.sync_once()
        assert sorted(cache.snapshot().svids) == ["e0", "e1"]
        version = cache.version
        cache.use("stream", ["e4"])
        await asyncio.wait_for(cache.wait_for_change(version), 5)
        assert manager._demand_task is not None
        await manager._demand_task

    asyncio.run(go())
    assert server.signed == ["e0", "e1", "e4"]
    assert "e4" in cache.snapshot().svids
    assert len(cache.snapshot().svids) == 2  # e4 is held; an unused one gave way


def test_a_banned_agent_says_why_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _clock, server, _state, _cache, manager = make(tmp_path)
    logging.getLogger("sigil.agent").propagate = True
    server.fail = ServerCallError(
        "SyncAuthorized failed: PERMISSION_DENIED: agent spiffe://example.org/sigil/agent/"
        "join_token/t is banned", code="PERMISSION_DENIED", reason=RefusalReason.AGENT_BANNED)
    with caplog.at_level(logging.INFO, logger="sigil.agent"):
        assert asyncio.run(manager.sync_once()) is False
        assert asyncio.run(manager.sync_once()) is False
    banned = [r for r in caplog.records if r.getMessage().startswith("agent banned")]
    assert len(banned) == 1
    assert manager.refused == "banned"
    server.fail = None
    with caplog.at_level(logging.INFO, logger="sigil.agent"):
        assert asyncio.run(manager.sync_once()) is True
    assert manager.refused is None


def test_an_evicted_agent_attests_again(tmp_path: Path) -> None:
    _clock, server, _state, _cache, manager = make(tmp_path)
    new_svid = svid(str(SpiffeId.parse("spiffe://example.org/sigil/agent/join_token/u")))
    calls: list[int] = []

    async def reattest() -> X509Svid:
        calls.append(1)
        server.fail = None
        return new_svid

    manager._reattest = reattest
    server.fail = ServerCallError(
        "SyncAuthorized failed: PERMISSION_DENIED: agent x is not attested",
        code="PERMISSION_DENIED", reason=RefusalReason.AGENT_NOT_ATTESTED)
    asyncio.run(manager.sync_once())
    assert calls == [1]
    assert manager.agent_svid is new_svid
    assert manager.refused is None


def test_an_evicted_agent_without_attestor_logs_what_it_needs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _clock, server, _state, _cache, manager = make(tmp_path)
    logging.getLogger("sigil.agent").propagate = True
    server.fail = ServerCallError("PERMISSION_DENIED: agent x is not attested",
                                  code="PERMISSION_DENIED",
                                  reason=RefusalReason.AGENT_NOT_ATTESTED)
    with caplog.at_level(logging.INFO, logger="sigil.agent"):
        asyncio.run(manager.sync_once())
    assert manager.refused == "evicted"
    assert "new join token" in caplog.text


def test_an_unexpected_call_on_a_fake_fails_the_test(tmp_path: Path) -> None:
    clock, _server, _state, _cache, manager = make(tmp_path, n=1)
    clock.advance(dt.timedelta(hours=20))  # the agent SVID is due: FakeServer.renew raises
    with pytest.raises(AssertionError, match=r"renew_agent_svid: AssertionError\('not due"):
        with fail_on_crashed_steps():
            assert asyncio.run(manager.sync_once()) is False


def test_keys_csrs_chain_checks_and_saving_run_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import agent.manager as manager_module
    from identity.keys import generate_private_key

    _clock, server, state, cache, manager = make(tmp_path, n=500)
    key = generate_private_key()
    key_threads: set[int] = set()
    verify_threads: set[int] = set()
    save_threads: set[int] = set()
    making, probed = threading.Event(), threading.Event()

    def key_factory() -> Any:
        key_threads.add(threading.get_ident())
        making.set()
        # The first key waits until a coroutine on the loop has run: made on the
        # loop itself, it would wait in vain (and the step would crash).
        if not probed.wait(60):
            raise AssertionError("the loop did not run while keys were being made")
        return key

    real_verify = manager_module.verify_chain

    def verify_chain(*args: Any, **kwargs: Any) -> Any:
        verify_threads.add(threading.get_ident())
        return real_verify(*args, **kwargs)

    real_save = state.save_workload_cache

    def save_workload_cache(snapshot: Any) -> None:
        save_threads.add(threading.get_ident())
        real_save(snapshot)

    monkeypatch.setattr(manager, "_new_key", key_factory)
    monkeypatch.setattr(manager_module, "verify_chain", verify_chain)
    monkeypatch.setattr(state, "save_workload_cache", save_workload_cache)

    async def probe() -> None:
        while not making.is_set():
            await asyncio.sleep(0.001)
        probed.set()

    async def go() -> tuple[bool, int]:
        task = asyncio.create_task(probe())
        ok = await manager.sync_once()
        await task
        return ok, threading.get_ident()

    ok, loop_thread = asyncio.run(go())
    assert ok
    assert len(server.signed) == 500 and len(cache.snapshot().svids) == 500
    assert key_threads and loop_thread not in key_threads
    assert verify_threads and loop_thread not in verify_threads
    # Persisting 500 keys is done off the loop too, and done by the end of the tick.
    assert save_threads and loop_thread not in save_threads
    restored = state.load_workload_cache(TD, now=T0)
    assert restored is not None and len(restored.svids) == 500
