"""An agent configured for another trust domain than the server's finds out from
the server's SVID during a TLS handshake, before it sends its join token: it
exits 2 with one line, and the token still attests a correctly configured agent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main as cli_main
from tests.integration.conftest import RunningServer
from tests.integration.test_agent_server import AgentThread, _token


@pytest.fixture
def agent_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="sgt-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _agent_command() -> list[str]:
    script = Path(sys.executable).parent / "sigil-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


@pytest.mark.parametrize("bootstrap", ["trust-bundle", "insecure-bootstrap"])
def test_wrong_trust_domain_exits_2_and_keeps_the_join_token(
    sigil_server: RunningServer, agent_root: Path, bootstrap: str
) -> None:
    token = _token(sigil_server)
    bundle = agent_root / "bundle.pem"
    bundle.write_text(sigil_server.cli("bundle", "show", "--format", "pem").stdout)
    trust = (["--trust-bundle", str(bundle)] if bootstrap == "trust-bundle"
             else ["--insecure-bootstrap"])
    proc = subprocess.run(
        [*_agent_command(), "run", "--trust-domain", "other.org",
         "--server-address", sigil_server.address, "--join-token", token["token"],
         "--data-dir", str(agent_root / "wrong"), "--socket-path", str(agent_root / "w.sock"),
         *trust],
        capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: wrong trust domain: configured other.org; the server is "
                      f"{sigil_server.trust_domain}"], proc.stderr
    assert not (agent_root / "wrong" / "agent_svid.pem").exists()
    assert "attested" not in sigil_server.log.replace("not attested", "")

    # The token was not spent: the right configuration attests with it.
    agent = AgentThread(trust_domain=sigil_server.trust_domain,
                        server_address=sigil_server.address, join_token=token["token"],
                        data_dir=str(agent_root / "right"),
                        socket_path=str(agent_root / "r.sock"), trust_bundle_path=str(bundle))
    agent.start()
    try:
        assert agent.agent is not None and agent.agent.manager is not None
        assert str(agent.agent.manager.agent_svid.spiffe_id) == token["agent_id"]
        # The running agent reports its state next to the Workload API.
        health = CliRunner().invoke(cli_main, ["healthcheck", "--output", "json",
                                               "--socket-path", str(agent_root / "r.sock")])
        assert health.exit_code == 0, health.output
        assert json.loads(health.stdout)["state"] == "healthy"
    finally:
        agent.stop()
    assert agent.error is None
