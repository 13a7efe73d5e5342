"""A real server whose JWT key is ML-DSA-65 and an in-process agent: the agent
receives the AKP key at sync, hands out ML-DSA-65 JWT-SVIDs on the Workload API,
validates them (ValidateJWTSVID), and keeps the key across its own restart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import jwt
import pytest

from agent.workload_api.client import WorkloadApiClient
from identity.bundle import Bundle
from identity.spiffeid import TrustDomain
from tests.integration.conftest import RunningServer
from tests.integration.test_agent_server import AgentThread, _token, agent_root  # noqa: F401

pytestmark = pytest.mark.slow


def _jwt_svid(client: WorkloadApiClient, spiffe_id: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return str(client.fetch_jwt_svid(["db"], spiffe_id).svids[0].svid)
        except grpc.RpcError as exc:  # PermissionDenied until the entry syncs
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"no JWT-SVID for {spiffe_id} (last error: {last})")


def test_agent_serves_ml_dsa_jwt_svids(sigil_server: RunningServer, agent_root: Path,  # noqa: F811
                                       tmp_path: Path) -> None:
    srv = sigil_server
    config = tmp_path / "server.toml"
    config.write_text(f'trust_domain = "{srv.trust_domain}"\njwt_key_type = "ml-dsa-65"\n')
    srv.extra_args = ("--config", str(config))
    srv.restart()
    assert srv.cli("localauthority", "jwt", "prepare").returncode == 0
    assert srv.cli("localauthority", "jwt", "activate").returncode == 0

    td = srv.trust_domain
    token = _token(srv)
    bundle = agent_root / "bundle.pem"
    bundle.write_text(srv.cli("bundle", "show", "--format", "pem").stdout)
    socket_path = agent_root / "public" / "api.sock"
    settings = dict(trust_domain=td, server_address=srv.address,
                    data_dir=str(agent_root / "data"), socket_path=str(socket_path),
                    trust_bundle_path=str(bundle), sync_interval="200ms")
    workload_id = f"spiffe://{td}/web"
    created = srv.cli("entry", "create", "--spiffe-id", workload_id, "--parent-id",
                      token["agent_id"], "--selector", f"unix:uid:{os.getuid()}")
    assert created.returncode == 0, created.stderr

    def check() -> None:
        with WorkloadApiClient(socket_path) as client:
            svid = _jwt_svid(client, workload_id)
            assert jwt.get_unverified_header(svid)["alg"] == "ML-DSA-65"
            resp = client.validate_jwt_svid(svid, "db")
            assert resp.spiffe_id == workload_id
            jwks = json.loads(client.fetch_jwt_bundles().bundles[f"spiffe://{td}"])
            kinds = sorted(k["kty"] for k in jwks["keys"])
            assert kinds == ["AKP", "EC"]  # the active ML-DSA key and the old EC one
            held = Bundle.from_jwt_jwks(TrustDomain(td), json.dumps(jwks))
            assert jwt.get_unverified_header(svid)["kid"] in {
                a.key_id for a in held.jwt_authorities}

    agent = AgentThread(**settings, join_token=token["token"])
    agent.start()
    try:
        check()
    finally:
        agent.stop()
    # The agent restarts from its persisted state: the ML-DSA key comes back with it.
    again = AgentThread(**settings)
    again.start()
    try:
        check()
    finally:
        again.stop()
