"""The agent API's TLS front under a flood of idle connections (issue 10, section 5).

An attacker opened thousands of TLS connections without a client certificate and
then said nothing: the front kept every one (each also relayed to the internal
server, three descriptors apiece), the process ran out of descriptors, real agents
and the admin CLI hung, and the log grew by a line per failure. Here the server
runs with a small open-file limit (so a few hundred connections are a flood) and
small caps and deadlines in its config file; the flood comes from other loopback
addresses than the real agent's (127.0.0.2 and 127.0.0.3; Linux routes all of
127.0.0.0/8 to the loopback interface).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from attestation.node.join_token import make_attestation
from identity.keys import generate_private_key, private_key_to_pem
from identity.x509svid import certificates_to_pem, new_csr
from tests.integration import conftest
from tests.integration.conftest import RunningServer

TARGET = "server.sigil.invalid"
OPEN_FILES = 400  # the server's limit: room for (400 - 400 / 4) / 3 = 100 connections
PER_IP = 16
TIMEOUT_SECONDS = 3
IDLE_TLS = 300  # from 127.0.0.2: completes the handshake, then sends nothing
SILENT_TCP = 20  # from 127.0.0.3: connects and never sends a ClientHello
CAP = 24
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4
LIFETIME = 4
FRONT_EVENTS = ("tls handshake failed", "agent connection", "agent listener error")


@contextlib.contextmanager
def _server(root: Path, config_text: str) -> Iterator[RunningServer]:
    config = root / "server.toml"
    config.write_text(config_text + f'agent_api_handshake_timeout = "{TIMEOUT_SECONDS}s"\n'
                      f'agent_api_preface_timeout = "{TIMEOUT_SECONDS}s"\n')
    srv = RunningServer(trust_domain="limits.sigil.test", data_dir=root / "data",
                        socket_path=root / "admin" / "admin.sock",
                        extra_args=("--config", str(config)))
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log}"
    assert "Traceback" not in srv.log, srv.log


@pytest.fixture
def limited_server(server_root: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> Iterator[RunningServer]:
    """A server with OPEN_FILES open files and PER_IP connections per address."""
    plain = conftest.server_command()
    monkeypatch.setattr(conftest, "server_command",
                        lambda: ["prlimit", f"--nofile={OPEN_FILES}:{OPEN_FILES}", *plain])
    with _server(server_root, f"agent_api_max_connections_per_ip = {PER_IP}\n") as srv:
        yield srv


@pytest.fixture
def lifetime_server(server_root: Path) -> Iterator[RunningServer]:
    """A server that closes a connection without a client certificate after LIFETIME s."""
    with _server(server_root, f'agent_api_unauthenticated_timeout = "{LIFETIME}s"\n') as srv:
        yield srv


@pytest.fixture
def capped_server(server_root: Path) -> Iterator[RunningServer]:
    """A server that holds at most CAP connections, without a per-address limit."""
    with _server(server_root, f"agent_api_max_connections = {CAP}\n"
                 "agent_api_max_connections_per_ip = 0\n") as srv:
        yield srv


class Flood:
    """Idle connections, opened and held by an event loop in a thread of its own."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.refused = 0

    async def _tls(self, source: str) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        try:
            conn = await asyncio.open_connection(
                "127.0.0.1", self.port, ssl=ctx, server_hostname=TARGET,
                local_addr=(source, 0), ssl_handshake_timeout=60)
        except (OSError, TimeoutError):
            self.refused += 1
            return
        self.held.append(conn)

    async def _tcp(self, source: str) -> None:
        self.held.append(await asyncio.open_connection("127.0.0.1", self.port,
                                                       local_addr=(source, 0)))

    def start(self, *, tls: int, tcp: int = 0) -> Future[list[None]]:
        """Open ``tls`` TLS connections from 127.0.0.2, ``tcp`` TCP ones from 127.0.0.3."""
        async def _all() -> list[None]:
            return await asyncio.gather(*(self._tls("127.0.0.2") for _ in range(tls)),
                                        *(self._tcp("127.0.0.3") for _ in range(tcp)))
        return asyncio.run_coroutine_threadsafe(_all(), self.loop)

    def still_open(self, within: float) -> int:
        """How many held connections the server has not closed within ``within`` s."""
        async def _closed(reader: asyncio.StreamReader) -> bool:
            try:
                return await asyncio.wait_for(reader.read(1), within) == b""
            except (OSError, TimeoutError):
                return isinstance(reader.exception(), OSError) or reader.at_eof()

        async def _all() -> list[bool]:
            return await asyncio.gather(*(_closed(r) for r, _w in self.held))
        closed = asyncio.run_coroutine_threadsafe(_all(), self.loop).result(within + 30)
        return sum(not c for c in closed)

    def close(self) -> None:
        async def _end() -> None:
            for _r, w in self.held:
                w.transport.abort()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(_end(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def _attest_and_sync(server: RunningServer) -> None:
    """What a real agent does first: a join token, AttestAgent, then mTLS sync.

    Each within a generous bound: the machine may be busy, the point is "served".
    """
    token = server.cli("token", "generate", "--output", "json", timeout=30)
    assert token.returncode == 0, token.stderr
    roots = server.cli("bundle", "show", "--format", "pem", timeout=30)
    assert roots.returncode == 0, roots.stderr
    key = generate_private_key()
    kind, payload = make_attestation(json.loads(token.stdout)["token"])
    opts = [("grpc.ssl_target_name_override", TARGET)]
    creds = grpc.ssl_channel_credentials(root_certificates=roots.stdout.encode())
    with grpc.secure_channel(server.address, creds, options=opts) as ch:
        resp = agent_pb2_grpc.AgentStub(ch).AttestAgent(agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type=kind, payload=payload),
            csr=new_csr(key)), timeout=60)
    chain = certificates_to_pem(x509.load_der_x509_certificate(d)
                                for d in resp.svid.cert_chain)
    mtls = grpc.ssl_channel_credentials(root_certificates=roots.stdout.encode(),
                                        private_key=private_key_to_pem(key),
                                        certificate_chain=chain)
    with grpc.secure_channel(server.address, mtls, options=opts) as ch:
        sync = agent_pb2_grpc.AgentStub(ch).SyncAuthorized(agent_pb2.SyncAuthorizedRequest(),
                                                           timeout=60)
    assert server.trust_domain in sync.bundles


def test_idle_flood_does_not_starve_agents(limited_server: RunningServer) -> None:
    flood = Flood(limited_server.port)
    try:
        flood.start(tls=IDLE_TLS, tcp=SILENT_TCP).result(60)
        # The admin CLI and a real agent, during the flood (each call within 60 s).
        _attest_and_sync(limited_server)
        # One address gets its share and no more; the rest are turned away at once.
        assert flood.refused >= IDLE_TLS - PER_IP
        # Idle after the handshake, or silent before it: cut at the deadline.
        assert flood.still_open(within=TIMEOUT_SECONDS + 30) == 0
    finally:
        flood.close()
    lines = [ln for ln in limited_server.log.splitlines()
             if any(e in ln for e in FRONT_EVENTS)]
    # A summary with a count, not a line per connection.
    assert any("agent connections refused" in ln and "count=" in ln for ln in lines), lines
    assert len(lines) <= 20, "\n".join(lines)


def _open_files(server: RunningServer) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def test_connection_cap_holds_and_agents_get_in_when_slots_free(
        capped_server: RunningServer) -> None:
    _attest_and_sync(capped_server)  # warm: the files a served agent costs are open
    before = _open_files(capped_server)
    flood = Flood(capped_server.port)
    try:
        pending = flood.start(tls=4 * CAP)
        # The flood is in: up to the cap accepted (their handshakes done), the rest
        # queued.
        until = time.monotonic() + 60
        while len(flood.held) < CAP and time.monotonic() < until:
            time.sleep(0.1)
        time.sleep(0.5)
        # At most CAP connections held, one descriptor each until they speak (not
        # three: they are not relayed); the rest wait in the kernel's backlog.
        grown = _open_files(capped_server) - before
        assert grown <= CAP + 8, grown
        # A real agent waits its turn behind the flood: slots free as the idle
        # connections reach their deadline, a few seconds each (each call within 60 s).
        _attest_and_sync(capped_server)
        pending.result(60)
    finally:
        flood.close()
    assert "agent connections deferred" in capped_server.log


async def _speak_http2_and_linger(port: int, seconds: float) -> float | None:
    """Connect without a client certificate, speak HTTP/2 correctly, make no call.

    Returns after how many seconds the server closed the connection, or None if it
    was still open after ``seconds``.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname=TARGET)
    started = asyncio.get_running_loop().time()
    # The preface, then an empty SETTINGS frame (RFC 9113 sections 3.4, 6.5).
    writer.write(HTTP2_PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    try:
        async with asyncio.timeout(seconds):
            while True:
                header = await reader.readexactly(9)
                length = int.from_bytes(header[:3], "big")
                kind, flags = header[3], header[4]
                payload = await reader.readexactly(length)
                if kind == 4 and not flags & 1:  # SETTINGS: acknowledge, as a peer must
                    writer.write(bytes([0, 0, 0, 4, 1, 0, 0, 0, 0]))
                elif kind == 6 and not flags & 1:  # PING: answer it
                    writer.write(bytes([0, 0, 8, 6, 1, 0, 0, 0, 0]) + payload)
    except TimeoutError:
        return None
    except (asyncio.IncompleteReadError, OSError):
        return asyncio.get_running_loop().time() - started
    finally:
        writer.transport.abort()


def test_a_connection_without_certificate_cannot_linger(
        lifetime_server: RunningServer) -> None:
    # It sent the preface and answers like a good HTTP/2 peer, so the preface
    # deadline does not apply; it never attests, so it must not hold a slot for ever.
    closed_after = asyncio.run(_speak_http2_and_linger(lifetime_server.port, LIFETIME + 30))
    assert closed_after is not None, "still open"
    assert closed_after >= LIFETIME - 1  # cut by its lifetime, not at once
