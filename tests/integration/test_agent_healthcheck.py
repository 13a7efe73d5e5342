"""``sigil-agent healthcheck`` against a Workload API socket that also serves the
agent's health (agent/health.py), with a manager driven through each state by a
fake server: healthy, degraded, evicted, banned, and healthy again."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.errors import ServerCallError
from agent.health import health_handler
from agent.manager import Manager
from agent.workload_api.server import WorkloadApiServer
from attestation.workload.unix import UnixAttestor
from identity.clock import FakeClock
from tests.unit.test_agent_cache import T0
from tests.unit.test_agent_refusal import BANNED, EVICTED, CountingServer, make
from tests.unit.test_agent_resilience import no_crashed_steps  # noqa: F401

T = TypeVar("T")
DOWN = ServerCallError("SyncAuthorizedEntries failed: UNAVAILABLE: connection refused",
                       code="UNAVAILABLE")


@dataclass
class Running:
    server: CountingServer
    manager: Manager
    socket_path: Path
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def tick(self, fail: ServerCallError | None) -> None:
        self.server.fail = fail
        self.run(self.manager.sync_once())

    def healthcheck(self, *args: str) -> Any:
        return CliRunner().invoke(main, ["healthcheck", "--socket-path", str(self.socket_path),
                                         *args])


@pytest.fixture
def agent() -> Iterator[Running]:
    root = Path(tempfile.mkdtemp(prefix="sg-hc-", dir="/tmp"))
    server, cache, manager = make(root, FakeClock(T0))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = Running(server, manager, root / "public" / "api.sock", loop)

    async def start() -> WorkloadApiServer:
        api = WorkloadApiServer(socket_path=running.socket_path, cache=cache,
                                attestors=[UnixAttestor()],
                                extra_handlers=[health_handler(manager.health)])
        await api.start()
        return api

    api = running.run(start())
    try:
        yield running
    finally:
        running.run(api.stop(grace=0.1))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        shutil.rmtree(root, ignore_errors=True)


def test_each_state_has_its_exit_code_and_says_what_it_serves(agent: Running) -> None:
    agent.tick(None)
    healthy = agent.healthcheck()
    assert healthy.exit_code == 0, healthy.output
    assert healthy.output.startswith("agent is healthy")

    agent.tick(DOWN)
    degraded = agent.healthcheck()
    assert degraded.exit_code == 3, degraded.output
    assert degraded.output.startswith("agent is degraded: the last sync with the server failed; "
                                      "serving the SVIDs it holds until they expire (2 held")
    assert "connection refused" in degraded.output

    agent.tick(EVICTED)  # no attestor to attest again with
    evicted = agent.healthcheck()
    assert evicted.exit_code == 4, evicted.output
    assert evicted.output.startswith("agent is evicted: the server no longer knows it; "
                                     "serving the SVIDs it holds")
    assert "not attested" in evicted.output

    agent.tick(BANNED)
    banned = agent.healthcheck()
    assert banned.exit_code == 5, banned.output
    assert banned.output.startswith("agent is banned: the server refuses it; serving the SVIDs")
    assert "agent is banned: spiffe://" in banned.output

    agent.tick(None)
    again = agent.healthcheck()
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize(("fail", "state", "code"), [
    (None, "healthy", 0), (DOWN, "degraded", 3), (EVICTED, "evicted", 4), (BANNED, "banned", 5),
])
def test_json_output(agent: Running, fail: ServerCallError | None, state: str, code: int) -> None:
    agent.tick(None)  # SVIDs to hold, and a last successful sync
    if fail is not None:
        agent.tick(fail)
    result = agent.healthcheck("--output", "json")
    assert result.exit_code == code, result.output
    doc = json.loads(result.stdout)
    assert doc["healthy"] is (state == "healthy") and doc["state"] == state
    assert doc["svids"] == 2 and doc["next_expiry"] and doc["last_sync"] == T0.isoformat()
    assert doc["socket_path"] == str(agent.socket_path)
    assert (doc["reason"] == "") is (state == "healthy")


def test_before_the_first_sync_ends_an_agent_is_healthy(agent: Running) -> None:
    result = agent.healthcheck("--output", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["last_sync"], doc["svids"]) == ("healthy", "", 0)
