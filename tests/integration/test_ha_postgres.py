"""Two ``sigil-server run`` processes on one PostgreSQL database behave as one service.

Each has its own data directory and CA key; both CAs end up in the one bundle; an
agent attached to server B, with an SVID signed by B, gets an entry created
through server A and an SVID for it, signed by B.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from ca.authority.setup import INSTANCE_ID_FILE
from tests.integration.conftest import RunningServer
from tests.integration.test_agent_server import AgentThread, _token, _wait_for_svid, agent_root
from tests.support.require import require_module

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import WorkloadApiClient  # noqa: E402

pytestmark = pytest.mark.slow
__all__ = ["agent_root"]  # the fixture, imported so pytest finds it here


def _bundle_roots(srv: RunningServer) -> set[bytes]:
    out = srv.cli("bundle", "show", "--format", "pem")
    assert out.returncode == 0, out.stderr
    return {c.tbs_certificate_bytes for c in x509.load_pem_x509_certificates(out.stdout.encode())}


@dataclass(frozen=True)
class _Ca:
    authority_id: str
    cert: x509.Certificate


def _authorities(srv: RunningServer) -> list[dict[str, Any]]:
    out = srv.cli("localauthority", "x509", "show", "--output", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["authorities"]  # type: ignore[no-any-return]


def _ski(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def _own_active_ca(srv: RunningServer, listed: list[dict[str, Any]]) -> _Ca:
    """The active X.509 authority owned by ``srv`` (its data directory's instance id),
    with its certificate from the bundle ``srv`` publishes."""
    owner = (srv.data_dir / INSTANCE_ID_FILE).read_text().strip()
    mine = [x for x in listed if x["owner"] == owner and x["status"] == "active"]
    assert len(mine) == 1, (owner, listed)
    out = srv.cli("bundle", "show", "--format", "pem")
    assert out.returncode == 0, out.stderr
    certs = [c for c in x509.load_pem_x509_certificates(out.stdout.encode())
             if _ski(c) == mine[0]["authority_id"]]
    assert len(certs) == 1, f"authority {mine[0]['authority_id']} not in the bundle once"
    return _Ca(mine[0]["authority_id"], certs[0])


def _assert_signed_by(leaf: x509.Certificate, ca: _Ca, what: str) -> None:
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    named = (aki.key_identifier or b"").hex()
    assert named == ca.authority_id, f"{what} names authority {named}, not {ca.authority_id}"
    assert leaf.issuer == ca.cert.subject
    leaf.verify_directly_issued_by(ca.cert)  # raises unless ca's key made the signature


def _wait(check: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_servers_one_database(database_url: str, server_root: Path,
                                  agent_root: Path) -> None:
    servers = []
    for name in ("a", "b"):
        srv = RunningServer(
            trust_domain="ha.sigil.test", data_dir=server_root / name / "data",
            socket_path=server_root / name / "admin" / "admin.sock",
            extra_args=("--database-url", database_url),
        )
        srv.start()
        servers.append(srv)
    a, b = servers
    try:
        # Each server has its own CA; both are in the bundle, as each server sees it.
        shown = json.loads(a.cli("localauthority", "x509", "show", "--output", "json").stdout)
        owners = {x["owner"] for x in shown["authorities"]}
        assert len(owners) == 2
        _wait(lambda: len(_bundle_roots(a)) == 2 and _bundle_roots(a) == _bundle_roots(b),
              "both servers to publish and re-read the shared bundle")

        token = _token(b)
        bundle = agent_root / "bundle.pem"
        bundle.write_text(b.cli("bundle", "show", "--format", "pem").stdout)
        socket_path = agent_root / "public" / "api.sock"
        agent = AgentThread(
            trust_domain=a.trust_domain, server_address=b.address,
            data_dir=str(agent_root / "data"), socket_path=str(socket_path),
            trust_bundle_path=str(bundle), sync_interval="500ms", join_token=token["token"])
        agent.start()
        try:
            workload_id = f"spiffe://{a.trust_domain}/through-a"
            created = a.cli("entry", "create", "--spiffe-id", workload_id,
                            "--parent-id", token["agent_id"],
                            "--selector", f"unix:uid:{os.getuid()}")
            assert created.returncode == 0, created.stderr
            client = WorkloadApiClient(socket_path=f"unix://{socket_path}")
            try:
                ctx = _wait_for_svid(client, workload_id)
                assert str(ctx.default_svid.spiffe_id) == workload_id
                # Signed by B's own active CA (the agent talks to B), not by A's,
                # though both are in the bundle and both servers list both.
                b_listed = _authorities(b)
                b_ca = _own_active_ca(b, b_listed)
                a_ca = _own_active_ca(a, _authorities(a))
                assert b_ca.authority_id != a_ca.authority_id
                assert {x["authority_id"] for x in b_listed} >= {b_ca.authority_id,
                                                                 a_ca.authority_id}
                _assert_signed_by(ctx.default_svid.leaf, b_ca, "the workload SVID")
                # The agent's own SVID was signed by B too, at attestation.
                agent_svid = x509.load_pem_x509_certificates(
                    (agent_root / "data" / "agent_svid.pem").read_bytes())[0]
                _assert_signed_by(agent_svid, b_ca, "the agent SVID")
            finally:
                client.close()
        finally:
            agent.stop()
    finally:
        for srv in servers:
            assert srv.stop() == 0, srv.log
