"""The agent through server outages and its own restarts, against a real sigil-server.

One story, in order: the server goes down and the agent keeps serving; the agent
restarts while the server is still down and serves the SVIDs it persisted; the
server comes back on the same data directory and a new entry reaches the
workload, whose py-spiffe X509Source survived all of it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.state import WORKLOAD_CACHE_FILE
from tests.integration.conftest import RunningServer
from tests.integration.test_agent_server import AgentThread, _token, _wait_for_svid
from tests.support.require import require_module

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import WorkloadApiClient, X509Source  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def agent_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sgr-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fixed_port_server(server_root: Path) -> Iterator[RunningServer]:
    """A server on a fixed port, so it can come back where the agent expects it."""
    srv = RunningServer(
        trust_domain="it.sigil.test", data_dir=server_root / "data",
        socket_path=server_root / "admin" / "admin.sock",
        # click keeps the last value of a repeated option: this one wins over :0.
        extra_args=("--bind-address", f"127.0.0.1:{free_port()}"),
    )
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            assert srv.stop() == 0, srv.log


def serials(client: WorkloadApiClient) -> dict[str, int]:
    ctx = client.fetch_x509_context(timeout=5)
    return {str(s.spiffe_id): s.leaf.serial_number for s in ctx.x509_svids}


def test_outage_and_restarts(fixed_port_server: RunningServer, agent_root: Path) -> None:
    srv = fixed_port_server
    td = srv.trust_domain
    token = _token(srv)
    bundle = agent_root / "bundle.pem"
    bundle.write_text(srv.cli("bundle", "show", "--format", "pem").stdout)
    socket_path = agent_root / "public" / "api.sock"
    settings = dict(
        trust_domain=td, server_address=srv.address, data_dir=str(agent_root / "data"),
        socket_path=str(socket_path), trust_bundle_path=str(bundle),
        sync_interval="200ms", sync_backoff_max="1s",
    )
    web, api = f"spiffe://{td}/web", f"spiffe://{td}/api"
    uid = f"unix:uid:{os.getuid()}"
    assert srv.cli("entry", "create", "--spiffe-id", web, "--parent-id", token["agent_id"],
                   "--selector", uid).returncode == 0
    agent = AgentThread(**settings, join_token=token["token"])
    agent.start()
    address = f"unix://{socket_path}"
    client = WorkloadApiClient(address)
    source = None
    try:
        _wait_for_svid(client, web)
        source = X509Source(workload_api_client=WorkloadApiClient(address), timeout_in_seconds=30)
        before = serials(client)
        assert list(before) == [web]

        # 1. The server goes down: every fetch still answers, with the same SVID.
        assert srv.stop() == 0
        for _ in range(5):
            assert serials(client) == before
            time.sleep(0.3)

        # 2. The agent restarts while the server is down: it serves what it persisted.
        agent.stop()
        cache_file = agent_root / "data" / WORKLOAD_CACHE_FILE
        assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600
        assert web in json.dumps(json.loads(cache_file.read_bytes())["entries"])
        agent = AgentThread(**settings)
        agent.start()
        assert serials(client) == before
        assert agent.agent is not None and agent.agent.manager is not None
        # It is retrying, backing off (capped at 1 s here).
        deadline = time.monotonic() + 10
        while agent.agent.manager.backoff.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.agent.manager.backoff.failures >= 2

        # 3. The server returns on the same data dir; a new entry reaches the workload.
        srv.start()
        assert srv.cli("entry", "create", "--spiffe-id", api, "--parent-id",
                       token["agent_id"], "--selector", uid).returncode == 0
        _wait_for_svid(client, api, timeout=30)
        assert serials(client)[web] == before[web]
        # py-spiffe's X509Source reconnected through both agent restarts: it keeps
        # only the default SVID, which is now api's (identities sort by SPIFFE ID).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            default = str(source.get_x509_context().default_svid.spiffe_id)
            if default == api:
                break
            time.sleep(0.2)
        assert default == api
        assert agent.agent.manager.backoff.failures == 0
    finally:
        if source is not None:
            source.close()
        client.close()
        agent.stop()
