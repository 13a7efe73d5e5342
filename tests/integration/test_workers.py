"""worker_processes > 1: several agent API processes on one port, supervised."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509

from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from identity.keys import generate_private_key, private_key_to_pem
from identity.x509svid import certificates_to_pem, new_csr
from tests.integration.conftest import RunningServer
from tests.integration.test_operations import _get, _metric
from tests.integration.test_server_agent_api import (
    TARGET,
    Agent,
    _attest,
    _entry,
    _roots,
    _token,
)

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


@contextlib.contextmanager
def _pool(server_root: Path, *extra: str) -> Iterator[RunningServer]:
    srv = RunningServer(trust_domain="it.sigil.test", data_dir=server_root / "data",
                        socket_path=server_root / "admin" / "admin.sock",
                        extra_args=("--worker-processes", "3", *extra))
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


@pytest.fixture
def pooled_server(server_root: Path) -> Iterator[RunningServer]:
    with _pool(server_root) as srv:
        yield srv


@pytest.fixture
def rotating_pool(server_root: Path) -> Iterator[RunningServer]:
    """Three processes that look at the CA slots every second (ca_rotation_interval)."""
    config = server_root / "server.toml"
    config.write_text('ca_rotation_interval = "1s"\n')
    with _pool(server_root, "--config", str(config)) as srv:
        yield srv


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


# ---- every process follows the CA the main process rotates ---------------------------

PROCESSES = 3  # the main process and two workers
FOLLOW_TIMEOUT = 60.0  # generous: each process looks every second (ca_rotation_interval)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(ConnectionError, ssl.SSLError, RuntimeError):
            dst.close()


class _Probe:
    """Agent API calls over connections the test opens itself, each to one process.

    SO_REUSEPORT hands every new connection to one of the processes, and the kernel
    does not say which. So the test makes the TLS connection itself (asyncio, with
    the agent's SVID as client certificate), which shows the server certificate that
    process presents, and relays it in clear to a local Unix socket for a grpc
    channel: every call on that channel reaches the same process. Processes are told
    apart by the generation their sync answers carry (one entry index each, with a
    random generation).
    """

    def __init__(self, srv: RunningServer, agent: Agent, workdir: Path) -> None:
        self._srv = srv
        self._workdir = workdir
        self._key = workdir / "agent-key.pem"
        self._chain = workdir / "agent-chain.pem"
        self._key.write_bytes(private_key_to_pem(agent.key))
        self._chain.write_bytes(certificates_to_pem(
            x509.load_der_x509_certificate(d) for d in agent.chain_der))
        self._count = 0
        self._roots = ""
        self.refresh_roots()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def refresh_roots(self) -> None:
        """Trust the current bundle (call after a prepare: its CA signs later)."""
        self._roots = _roots(self._srv).decode()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _open(self, path: Path) -> tuple[x509.Certificate, asyncio.Server,
                                               asyncio.StreamWriter]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=self._roots)
        ctx.load_cert_chain(self._chain, self._key)
        ctx.set_alpn_protocols(["h2"])
        host, _, port = self._srv.address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx,
                                                       server_hostname=TARGET)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await asyncio.gather(_pump(r, writer), _pump(reader, w))

        server = await asyncio.start_unix_server(relay, path)
        return x509.load_der_x509_certificate(der), server, writer

    @contextlib.contextmanager
    def connection(self) -> Iterator[tuple[x509.Certificate, agent_pb2_grpc.AgentStub]]:
        """A new connection: the server certificate it got, and a stub over it."""
        self._count += 1
        path = self._workdir / f"hop-{self._count}.sock"
        cert, server, writer = asyncio.run_coroutine_threadsafe(
            self._open(path), self._loop).result(30)
        channel = grpc.insecure_channel(f"unix:{path}")
        try:
            yield cert, agent_pb2_grpc.AgentStub(channel)
        finally:
            channel.close()

            async def shut() -> None:
                server.close()
                writer.close()

            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
            path.unlink(missing_ok=True)

    def every_process(self, check: Callable[[x509.Certificate, agent_pb2_grpc.AgentStub,
                                             agent_pb2.SyncAuthorizedEntriesPage], str | None],
                      what: str) -> None:
        """New connections until each process's latest answer passed ``check``.

        ``check`` returns None when the process is right, else what is wrong.
        """
        latest: dict[str, str | None] = {}
        deadline = time.monotonic() + FOLLOW_TIMEOUT
        while time.monotonic() < deadline:
            with self.connection() as (cert, stub):
                (page,) = stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(),
                                                      timeout=10)
                latest[page.generation] = check(cert, stub, page)
            assert len(latest) <= PROCESSES, latest
            if len(latest) == PROCESSES and all(v is None for v in latest.values()):
                return
        raise AssertionError(f"not every process {what} within {FOLLOW_TIMEOUT}s "
                             f"(generation -> problem): {latest}\n{self._srv.log}")


def _issuer_id(cert: x509.Certificate) -> str:
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier.hex()


def _ski(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def _authority(srv: RunningServer, kind: str, *step: str) -> str:
    proc = srv.cli("localauthority", kind, *step, "--output", "json")
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["authority_id"])


def _active(srv: RunningServer, kind: str) -> str:
    proc = srv.cli("localauthority", kind, "show", "--output", "json")
    assert proc.returncode == 0, proc.stderr
    (active,) = [a["authority_id"] for a in json.loads(proc.stdout)["authorities"]
                 if a["status"] == "active"]
    return str(active)


def _signs_with(entry_id: str, x509_ca: str, jwt_kid: str) -> Callable[
        [x509.Certificate, agent_pb2_grpc.AgentStub, agent_pb2.SyncAuthorizedEntriesPage],
        str | None]:
    def check(tls: x509.Certificate, stub: agent_pb2_grpc.AgentStub,
              _page: agent_pb2.SyncAuthorizedEntriesPage) -> str | None:
        (result,) = stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(params=[
            agent_pb2.NewX509SVIDParams(entry_id=entry_id,
                                        csr=new_csr(generate_private_key()))]),
            timeout=10).results
        assert result.status.code == 0, result.status
        signed = _issuer_id(x509.load_der_x509_certificate(result.svid.cert_chain[0]))
        token = stub.NewJWTSVID(agent_pb2.NewJWTSVIDRequest(entry_id=entry_id,
                                                            audience=["a"]), timeout=10).token
        kid = jwt.get_unverified_header(token)["kid"]
        wrong = [f"{name} by {got}" for name, got, want in (
            ("x509-svid", signed, x509_ca), ("jwt-svid", kid, jwt_kid),
            ("tls certificate", _issuer_id(tls), x509_ca)) if got != want]
        return ", ".join(wrong) or None

    return check


@pytest.fixture
def probe(rotating_pool: RunningServer, server_root: Path) -> Iterator[tuple[_Probe, str]]:
    """A probe for an attested agent, and the id of an entry it may sign."""
    srv = rotating_pool
    a = _attest(srv, _token(srv)["token"])
    entry_id = str(_entry(srv, "spiffe://it.sigil.test/web", a.agent_id,
                          "--selector", "unix:uid:1")["id"])
    p = _Probe(srv, a, server_root)
    try:
        yield p, entry_id
    finally:
        p.close()
        a.channel.close()


def test_workers_follow_prepare_and_activate(rotating_pool: RunningServer,
                                             probe: tuple[_Probe, str]) -> None:
    srv = rotating_pool
    p, entry_id = probe
    first_ca, first_kid = _active(srv, "x509"), _active(srv, "jwt")
    p.every_process(_signs_with(entry_id, first_ca, first_kid), "signs with the first CA")

    # Prepared through the main process's admin socket: in every process's bundle.
    next_ca = _authority(srv, "x509", "prepare")
    next_kid = _authority(srv, "jwt", "prepare")
    p.refresh_roots()

    def publishes_prepared(_tls: x509.Certificate, _stub: agent_pb2_grpc.AgentStub,
                           page: agent_pb2.SyncAuthorizedEntriesPage) -> str | None:
        bundle = page.bundles["it.sigil.test"]
        cas = {_ski(der) for der in bundle.x509_authorities}
        kids = {k.key_id for k in bundle.jwt_authorities}
        if {first_ca, next_ca} <= cas and {first_kid, next_kid} <= kids:
            return None
        return f"bundle has {sorted(cas)} and {sorted(kids)}"

    p.every_process(publishes_prepared, "publishes the prepared authorities")

    assert _authority(srv, "x509", "activate") == next_ca
    assert _authority(srv, "jwt", "activate") == next_kid
    p.every_process(_signs_with(entry_id, next_ca, next_kid),
                    "signs and presents its TLS certificate with the activated CA")


def test_workers_report_a_taint(rotating_pool: RunningServer,
                                probe: tuple[_Probe, str]) -> None:
    srv = rotating_pool
    p, entry_id = probe
    first_ca, first_kid = _active(srv, "x509"), _active(srv, "jwt")
    # Each step right after the last one: no process is given time in between.
    next_ca = _authority(srv, "x509", "prepare")
    next_kid = _authority(srv, "jwt", "prepare")
    _authority(srv, "x509", "activate")
    _authority(srv, "jwt", "activate")
    _authority(srv, "x509", "taint", "--authority-id", first_ca)
    _authority(srv, "jwt", "taint", "--authority-id", first_kid)  # a kid may start with "-"
    p.refresh_roots()

    def reports_taint(tls: x509.Certificate, stub: agent_pb2_grpc.AgentStub,
                      page: agent_pb2.SyncAuthorizedEntriesPage) -> str | None:
        bundle = page.bundles["it.sigil.test"]
        tainted = ({_ski(der) for der in bundle.tainted_x509_authorities},
                   set(bundle.tainted_jwt_key_ids))
        if tainted != ({first_ca}, {first_kid}):
            return f"tainted: {tainted}"
        # What agents re-issue after a taint comes from the new authorities.
        return _signs_with(entry_id, next_ca, next_kid)(tls, stub, page)

    p.every_process(reports_taint, "reports the taint")
