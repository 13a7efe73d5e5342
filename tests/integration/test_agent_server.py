"""A real ``sigil-server`` subprocess and an in-process agent, end to end.

The agent attests with a join token, syncs, gets an SVID signed for a registered
entry, and py-spiffe fetches it from the Workload API socket. A restart reuses the
persisted SVID (the join token is single use).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.agent import Agent
from agent.config import load_config
from agent.errors import BootstrapError
from identity.bundle import Bundle
from identity.spiffeid import TrustDomain
from tests.integration.conftest import RunningServer
from tests.support.require import require_module

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import JwtSvid, SpiffeId, WorkloadApiClient  # noqa: E402

pytestmark = pytest.mark.slow


class AgentThread:
    """Runs :class:`Agent` on its own event loop in a background thread."""

    def __init__(self, **overrides: object) -> None:
        self.config = load_config(overrides=overrides)
        self.loop = asyncio.new_event_loop()
        self.agent: Agent | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def go() -> None:
            self.agent = Agent(self.config)
            await self.agent.run()

        try:
            self.loop.run_until_complete(go())
        except BaseException as exc:  # reported to the test thread
            self.error = exc

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            if self.agent is not None and self.agent.ready.is_set():
                return
            time.sleep(0.05)
        raise AssertionError("agent did not become ready")

    def stop(self) -> None:
        if self.agent is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.agent.stop)
        self._thread.join(timeout=20)
        assert not self._thread.is_alive(), "agent did not stop"


@pytest.fixture
def agent_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sga-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _token(server: RunningServer) -> dict[str, str]:
    out = server.cli("token", "generate", "--output", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _wait_for_svid(client: WorkloadApiClient, spiffe_id: str, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            ctx = client.fetch_x509_context(timeout=5)
            if any(str(s.spiffe_id) == spiffe_id for s in ctx.x509_svids):
                return ctx
        except Exception as exc:  # PermissionDenied until the entry syncs
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"no SVID for {spiffe_id} (last error: {last})")


def test_join_token_agent_serves_py_spiffe(sigil_server: RunningServer, agent_root: Path) -> None:
    td = sigil_server.trust_domain
    token = _token(sigil_server)
    bundle = agent_root / "bundle.pem"
    bundle.write_text(sigil_server.cli("bundle", "show", "--format", "pem").stdout)
    socket_path = agent_root / "public" / "api.sock"
    settings = dict(
        trust_domain=td, server_address=sigil_server.address,
        data_dir=str(agent_root / "data"), socket_path=str(socket_path),
        trust_bundle_path=str(bundle), sync_interval="200ms",
    )
    agent = AgentThread(**settings, join_token=token["token"])
    agent.start()
    try:
        data = agent_root / "data"
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "agent_svid.pem").stat().st_mode) == 0o600
        workload_id = f"spiffe://{td}/web"
        created = sigil_server.cli(
            "entry", "create", "--spiffe-id", workload_id, "--parent-id", token["agent_id"],
            "--selector", f"unix:uid:{os.getuid()}",
        )
        assert created.returncode == 0, created.stderr
        client = WorkloadApiClient(socket_path=f"unix://{socket_path}")
        try:
            ctx = _wait_for_svid(client, workload_id)
            assert str(ctx.default_svid.spiffe_id) == workload_id
            jwt = client.fetch_jwt_svid(audience={"db"}, subject=SpiffeId(workload_id))
            jwt_bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(
                ctx.default_svid.spiffe_id.trust_domain
            )
            assert jwt_bundle is not None
            assert str(JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"db"}).spiffe_id) == (
                workload_id
            )
        finally:
            client.close()
    finally:
        agent.stop()
    assert not socket_path.exists(), "the agent must remove its socket on shutdown"

    # A restart reuses the persisted SVID: no token, and the used one would be refused.
    again = AgentThread(**settings)
    again.start()
    again.stop()
    assert again.error is None


def test_reused_join_token_is_refused(sigil_server: RunningServer, agent_root: Path) -> None:
    token = _token(sigil_server)
    bundle = agent_root / "bundle.pem"
    bundle.write_text(sigil_server.cli("bundle", "show", "--format", "pem").stdout)
    common = dict(
        trust_domain=sigil_server.trust_domain, server_address=sigil_server.address,
        trust_bundle_path=str(bundle), join_token=token["token"],
    )
    first = AgentThread(**common, data_dir=str(agent_root / "a"),
                        socket_path=str(agent_root / "a.sock"))
    first.start()
    first.stop()
    second = AgentThread(**common, data_dir=str(agent_root / "b"),
                         socket_path=str(agent_root / "b.sock"))
    with pytest.raises(BootstrapError, match="PERMISSION_DENIED"):
        second.start()


def test_insecure_bootstrap_trusts_on_first_use(
    sigil_server: RunningServer, agent_root: Path
) -> None:
    """Without a bootstrap bundle, the agent keeps the bundle the server gave it: the
    server's CA and JWT keys exactly, and its own SVID chains to that CA."""
    token = _token(sigil_server)
    agent = AgentThread(
        trust_domain=sigil_server.trust_domain, server_address=sigil_server.address,
        data_dir=str(agent_root / "data"), socket_path=str(agent_root / "api.sock"),
        join_token=token["token"], insecure_bootstrap=True,
    )
    assert agent.config.trust_bundle_path is None
    agent.start()
    agent.stop()
    assert agent.error is None, repr(agent.error)

    td = TrustDomain(sigil_server.trust_domain)
    kept = Bundle.from_jwks(td, (agent_root / "data" / "bundle.json").read_bytes())
    shown = sigil_server.cli("bundle", "show", "--format", "spiffe")
    assert shown.returncode == 0, shown.stderr
    served = Bundle.from_jwks(td, shown.stdout)
    pem = sigil_server.cli("bundle", "show", "--format", "pem")
    assert pem.returncode == 0, pem.stderr
    ders = [c.public_bytes(Encoding.DER) for c in kept.x509_authorities]
    assert ders and ders == [c.public_bytes(Encoding.DER) for c in served.x509_authorities]
    assert ders == [c.public_bytes(Encoding.DER)
                    for c in x509.load_pem_x509_certificates(pem.stdout.encode())]
    assert kept.jwt_authorities and [
        (j.key_id, _spki(j.public_key)) for j in kept.jwt_authorities
    ] == [(j.key_id, _spki(j.public_key)) for j in served.jwt_authorities]

    agent_svid = x509.load_pem_x509_certificates(
        (agent_root / "data" / "agent_svid.pem").read_bytes())[0]
    assert str(agent_svid.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)[0]) == token["agent_id"]
    assert any(_issued_by(agent_svid, ca) for ca in kept.x509_authorities)


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def test_agent_serves_the_broker_api_when_configured(
    sigil_server: RunningServer, agent_root: Path
) -> None:
    # The wiring of [broker]: the agent opens the broker socket, and a broker whose
    # SPIFFE ID is authorized fetches another process's SVID by PID through it.
    import subprocess
    import sys

    td = sigil_server.trust_domain
    token = _token(sigil_server)
    bundle = agent_root / "bundle.pem"
    bundle.write_text(sigil_server.cli("bundle", "show", "--format", "pem").stdout)
    workload_id = f"spiffe://{td}/web"
    broker_socket = agent_root / "broker" / "broker.sock"
    agent = AgentThread(
        trust_domain=td, server_address=sigil_server.address,
        data_dir=str(agent_root / "data"), socket_path=str(agent_root / "public" / "api.sock"),
        trust_bundle_path=str(bundle), sync_interval="200ms", join_token=token["token"],
        broker={"socket_path": str(broker_socket), "authorized": [workload_id]},
    )
    agent.start()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert broker_socket.exists()
        created = sigil_server.cli(
            "entry", "create", "--spiffe-id", workload_id, "--parent-id", token["agent_id"],
            "--selector", f"unix:uid:{os.getuid()}",
        )
        assert created.returncode == 0, created.stderr
        client = Path(__file__).resolve().parents[1] / "support" / "broker_client.py"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        deadline = time.monotonic() + 30
        result: dict[str, object] = {}
        while time.monotonic() < deadline:
            out = subprocess.run(
                [sys.executable, str(client), str(broker_socket), "SubscribeToX509SVID",
                 "type.googleapis.com/spiffe.broker.WorkloadPIDReference", str(sleeper.pid)],
                env=env, capture_output=True, text=True, timeout=60, check=True)
            result = json.loads(out.stdout)
            if "ids" in result:  # PermissionDenied until the entry syncs
                break
            time.sleep(0.3)
        assert result == {"ids": [workload_id], "keys": True}
    finally:
        sleeper.kill()
        sleeper.wait()
        agent.stop()
    assert not broker_socket.exists(), "the agent must remove the broker socket on shutdown"


def test_agent_serves_the_broker_api_over_tcp_with_mtls(
    sigil_server: RunningServer, agent_root: Path
) -> None:
    # [broker] listen_address: the agent presents its own SVID (issued by the
    # server), and a broker presenting an X.509-SVID it got from this agent's
    # Workload API (py-spiffe) fetches another process's SVID by PID over TCP.
    import subprocess

    import grpc
    from cryptography.hazmat.primitives.serialization import (
        NoEncryption,
        PrivateFormat,
    )

    from api.protos import broker_pb2 as bpb
    from identity.x509svid import certificates_to_pem
    from tests.support.broker_tls import BrokerCredentials, TlsTunnel

    td = sigil_server.trust_domain
    token = _token(sigil_server)
    bundle = agent_root / "bundle.pem"
    bundle.write_text(sigil_server.cli("bundle", "show", "--format", "pem").stdout)
    broker_id = f"spiffe://{td}/broker"
    socket_path = agent_root / "public" / "api.sock"
    agent = AgentThread(
        trust_domain=td, server_address=sigil_server.address,
        data_dir=str(agent_root / "data"), socket_path=str(socket_path),
        trust_bundle_path=str(bundle), sync_interval="200ms", join_token=token["token"],
        broker={"listen_address": "127.0.0.1:0", "authorized": [broker_id]},
    )
    agent.start()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert agent.agent is not None and agent.agent.broker_api is not None
        port = agent.agent.broker_api.tcp_port
        assert port
        created = sigil_server.cli(
            "entry", "create", "--spiffe-id", broker_id, "--parent-id", token["agent_id"],
            "--selector", f"unix:uid:{os.getuid()}",
        )
        assert created.returncode == 0, created.stderr
        client = WorkloadApiClient(socket_path=f"unix://{socket_path}")
        try:
            ctx = _wait_for_svid(client, broker_id)
        finally:
            client.close()
        svid = ctx.default_svid
        roots = ctx.x509_bundle_set.get_bundle_for_trust_domain(
            svid.spiffe_id.trust_domain).x509_authorities
        files = agent_root / "broker"
        files.mkdir()
        (files / "svid.pem").write_bytes(certificates_to_pem(svid.cert_chain))
        (files / "svid.key").write_bytes(svid.private_key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        (files / "bundle.pem").write_bytes(certificates_to_pem(roots))
        creds = BrokerCredentials(bundle=files / "bundle.pem", server_id=token["agent_id"],
                                  chain=files / "svid.pem", key=files / "svid.key")
        reference = bpb.WorkloadReference()
        reference.reference.type_url = "type.googleapis.com/spiffe.broker.WorkloadPIDReference"
        reference.reference.value = bpb.WorkloadPIDReference(
            pid=sleeper.pid).SerializeToString()
        with TlsTunnel(("127.0.0.1", port), creds) as tunnel, \
                grpc.insecure_channel(tunnel.target) as channel:
            stream = channel.unary_stream(
                "/spiffe.broker.API/SubscribeToX509SVID",
                request_serializer=bpb.SubscribeToX509SVIDRequest.SerializeToString,
                response_deserializer=bpb.SubscribeToX509SVIDResponse.FromString)
            first = next(iter(stream(bpb.SubscribeToX509SVIDRequest(reference=reference),
                                     metadata=(("broker.spiffe.io", "true"),), timeout=30)))
            assert [s.spiffe_id for s in first.svids] == [broker_id]
            assert not tunnel.errors
    finally:
        sleeper.kill()
        sleeper.wait()
        agent.stop()
