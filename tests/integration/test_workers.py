"""worker_processes > 1: several agent API processes on one port, supervised."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.protos.sigil.agent.v1 import agent_pb2
from identity.keys import generate_private_key
from identity.x509svid import new_csr
from tests.integration.conftest import RunningServer
from tests.integration.test_operations import _get, _metric
from tests.integration.test_server_agent_api import _attest, _entry, _token

pytestmark = pytest.mark.slow


def _worker_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"worker listening agent_api=\S+ pid=(\d+)", log)]


def _wait(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def pooled_server(server_root: Path) -> Iterator[RunningServer]:
    srv = RunningServer(trust_domain="it.sigil.test", data_dir=server_root / "data",
                        socket_path=server_root / "admin" / "admin.sock",
                        extra_args=("--worker-processes", "3"))
    srv.start()
    try:
        _wait(lambda: len(_worker_pids(srv.log)) == 2, "two workers")
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log
    for pid in _worker_pids(srv.log):  # every worker ended with the main process
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_share_the_port_and_aggregate_metrics(pooled_server: RunningServer) -> None:
    srv = pooled_server
    agents = [_attest(srv, _token(srv)["token"]) for _ in range(6)]
    try:
        issued = 0
        for i, a in enumerate(agents):
            entry_id = str(_entry(srv, f"spiffe://it.sigil.test/w{i}", a.agent_id,
                                  "--selector", "unix:uid:1")["id"])
            resp = a.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
                agent_pb2.NewX509SVIDParams(entry_id=entry_id,
                                            csr=new_csr(generate_private_key()))
                for _ in range(i + 1)]), timeout=10)
            assert all(r.status.code == 0 for r in resp.results)
            issued += i + 1
    finally:
        for a in agents:
            a.channel.close()
    status, _, text = _get(srv.health_address, "/metrics")
    assert status == 200
    # Summed over the processes that served the connections, whichever they were.
    assert _metric(text, 'sigil_svids_issued_total{type="x509"}') == float(issued), srv.log
    assert _metric(text, 'sigil_svids_issued_total{type="agent"}') == 6.0
    assert _metric(text, "sigil_agents") == 6.0


def test_a_crashed_worker_is_restarted(pooled_server: RunningServer) -> None:
    srv = pooled_server
    victim = _worker_pids(srv.log)[0]
    os.kill(victim, signal.SIGKILL)
    _wait(lambda: len(_worker_pids(srv.log)) == 3, "the replacement worker")
    assert re.search(rf"worker exited, restarting worker=\d pid={victim} exit_code=-9\n",
                     srv.log), srv.log
    # Still serving: attest and sign through whichever process takes the connection.
    a = _attest(srv, _token(srv)["token"])
    a.channel.close()
    assert _get(srv.health_address, "/ready")[0] == 200
