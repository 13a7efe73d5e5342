"""Start-up refuses what it cannot do before it changes anything, and a server or
agent never takes over, or removes, a socket another one serves on."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.workload_api.front import PeerCredentialFront
from tests.integration.conftest import RunningServer, server_command


def _run(data_dir: Path, socket_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server_command(), "run", "--trust-domain", "it.sigil.test",
         "--data-dir", str(data_dir), "--bind-address", "127.0.0.1:0",
         "--socket-path", str(socket_path), *extra],
        capture_output=True, text=True, timeout=60)


def _only_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def _nothing_created(data_dir: Path) -> None:
    created = sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []
    assert created == [], f"start-up created {created} in {data_dir}"


def test_busy_health_port_fails_before_anything_is_created(server_root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data_dir = server_root / "data"
        proc = _run(data_dir, server_root / "admin" / "admin.sock",
                    "--health-address", f"127.0.0.1:{port}")
    assert proc.returncode == 2, proc.stderr
    assert _only_line(proc.stderr) == (
        f"Error: address 127.0.0.1:{port} is in use: choose another with --health-address")
    _nothing_created(data_dir)
    assert not (server_root / "admin" / "admin.sock").exists()


def test_busy_agent_api_port_names_its_flag(server_root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data_dir = server_root / "data"
        proc = _run(data_dir, server_root / "admin" / "admin.sock",
                    "--health-address", "127.0.0.1:0", "--bind-address", f"127.0.0.1:{port}")
    assert proc.returncode == 2, proc.stderr
    assert _only_line(proc.stderr) == (
        f"Error: address 127.0.0.1:{port} is in use: choose another with --bind-address")
    _nothing_created(data_dir)


def test_busy_bundle_endpoint_port_names_its_config_key(server_root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = server_root / "server.toml"
        config.write_text('[federation.bundle_endpoint]\nprofile = "https_spiffe"\n'
                          f'address = "127.0.0.1:{port}"\n')
        data_dir = server_root / "data"
        proc = _run(data_dir, server_root / "admin" / "admin.sock",
                    "--health-address", "127.0.0.1:0", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    assert _only_line(proc.stderr) == (
        f"Error: address 127.0.0.1:{port} is in use: choose another with "
        "federation.bundle_endpoint.address in the config file")
    _nothing_created(data_dir)


def test_second_server_refuses_a_live_admin_socket(sigil_server: RunningServer,
                                                   server_root: Path) -> None:
    second_data = server_root / "data2"
    proc = _run(second_data, sigil_server.socket_path, "--health-address", "127.0.0.1:0")
    assert proc.returncode == 2, proc.stderr
    assert _only_line(proc.stderr) == (
        f"Error: another server is serving on socket_path {sigil_server.socket_path}")
    _nothing_created(second_data)
    # The first one still answers on its socket.
    health = sigil_server.cli("healthcheck")
    assert health.returncode == 0, health.stderr


def test_server_removes_only_the_socket_it_bound(server_root: Path) -> None:
    sock = server_root / "admin" / "admin.sock"
    first = RunningServer(trust_domain="it.sigil.test", data_dir=server_root / "d1",
                          socket_path=sock)
    second = RunningServer(trust_domain="it.sigil.test", data_dir=server_root / "d2",
                           socket_path=sock)
    first.start()
    try:
        # Someone removes the first server's socket; a second server may then start.
        sock.unlink()
        second.start()
        assert first.stop() == 0, first.log
        # The first server's exit left the second server's socket alone.
        health = second.cli("healthcheck")
        assert health.returncode == 0, f"{health.stderr}\n{second.log}"
    finally:
        if first.proc is not None and first.proc.poll() is None:
            first.stop()
        if second.proc is not None:
            assert second.stop() == 0, second.log
    assert not sock.exists()
    assert "server stopped" in second.log


def test_stale_admin_socket_is_replaced(server_root: Path) -> None:
    sock = server_root / "admin" / "admin.sock"
    srv = RunningServer(trust_domain="it.sigil.test", data_dir=server_root / "d1",
                        socket_path=sock)
    srv.start()
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    assert sock.is_socket()  # left behind
    srv.start()
    assert srv.stop() == 0, srv.log


def test_second_agent_front_leaves_the_first_ones_socket(server_root: Path) -> None:
    path = server_root / "public" / "api.sock"

    async def scenario() -> None:
        first = PeerCredentialFront(path)
        await first.start()
        try:
            second = PeerCredentialFront(path)
            with pytest.raises(AgentError, match="another process is serving"):
                await second.start()
            await second.close()
            assert path.is_socket(), "the refused agent removed the first agent's socket"
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            finally:
                probe.close()
        finally:
            await first.close()
        assert not os.path.exists(path)

    asyncio.run(scenario())


def test_agent_front_never_takes_over_a_socket_bound_after_its_probe(
        server_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another agent binds the path between this one's probe and its bind."""
    from agent.workload_api import front as front_module

    path = server_root / "public" / "api.sock"
    path.parent.mkdir(mode=0o755)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen(1)
    other_id = (path.stat().st_dev, path.stat().st_ino)
    monkeypatch.setattr(front_module, "claim_socket_path", lambda _path: None)

    async def scenario() -> None:
        late = PeerCredentialFront(path)
        try:
            with pytest.raises(AgentError, match="another process is serving"):
                await late.start()
        finally:
            await late.close()

    try:
        asyncio.run(scenario())
        assert (path.stat().st_dev, path.stat().st_ino) == other_id
    finally:
        other.close()


def test_refused_admin_socket_releases_the_addresses_taken(server_root: Path) -> None:
    """In-process: a start that fails at the admin socket frees the ports it took."""
    from ca.config.server import load_config
    from ca.errors import ConfigError
    from ca.server import SigilServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = server_root / "admin" / "admin.sock"
    sock.parent.mkdir(mode=0o700)
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sock))
    live.listen(1)
    config = load_config(None, env={}, overrides={
        "trust_domain": "it.sigil.test", "data_dir": str(server_root / "data"),
        "bind_address": f"127.0.0.1:{port}", "health_address": "",
        "socket_path": str(sock)})
    server = SigilServer(config)
    try:
        with pytest.raises(ConfigError, match="another server is serving"):
            server.start()
        with socket.socket() as again:  # the agent API port is free again
            again.bind(("127.0.0.1", port))
        assert sock.is_socket()  # and the live socket is untouched
    finally:
        server.stop(0)
        live.close()
