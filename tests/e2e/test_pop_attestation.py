"""A VM fleet without join tokens: a real server and a real agent attest by x509pop
and by sshpop, a workload gets its SVID over the Workload API, the agent attests
again after a restart with its data dir cleared and after an eviction, and is
refused once its CA is no longer trusted (server restarted with the new CA
file). Every CA and certificate is made at run time (tests/support/pop.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from attestation.node import sshpop
from tests.e2e.conftest import Stack, _tool, free_port, wait_for
from tests.support.pop import (
    new_key,
    pem,
    sha1_hex,
    ssh_host_cert,
    ssh_public,
    write_ssh_node,
    write_x509_node,
    x509_ca,
    x509_leaf,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TD = "pop.sigil.test"
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sgp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _x509_node(root: Path) -> tuple[str, str, str, Callable[[], None]]:
    """Server and agent TOML, the agent ID, and how to distrust the node's CA."""
    ca = x509_ca("Fleet Node CA", now=NOW)
    (root / "node-ca.pem").write_bytes(pem(ca.cert))
    key = new_key("ec")
    leaf = x509_leaf(ca, key, now=NOW, cn="vm-1", dns=("vm-1.fleet.example",))
    node = write_x509_node(root / "node", [leaf], key)
    server = f'[node_attestors.x509pop]\nca_bundle_path = "{root / "node-ca.pem"}"\n'
    agent = ("[node_attestor.x509pop]\n"
             f'certificate_path = "{node.certificate_path}"\n'
             f'private_key_path = "{node.private_key_path}"\n')

    def distrust() -> None:  # the fleet moved to a new CA; this node's is gone
        (root / "node-ca.pem").write_bytes(pem(x509_ca("Fleet Node CA 2", now=NOW).cert))

    return server, agent, f"spiffe://{TD}/sigil/agent/x509pop/{sha1_hex(leaf)}", distrust


def _ssh_node(root: Path) -> tuple[str, str, str, Callable[[], None]]:
    ca = new_key("ed25519")
    (root / "ssh-cas.pub").write_bytes(ssh_public(ca) + b"\n")
    host_key = new_key("ed25519")
    cert = ssh_host_cert(ca, host_key, now=NOW, principals=("vm-2.fleet.example",))
    node = write_ssh_node(root / "node", cert, host_key)
    server = f'[node_attestors.sshpop]\ncert_authorities_path = "{root / "ssh-cas.pub"}"\n'
    agent = ("[node_attestor.sshpop]\n"
             f'host_key_path = "{node.host_key_path}"\n'
             f'host_cert_path = "{node.host_cert_path}"\n')

    def distrust() -> None:
        (root / "ssh-cas.pub").write_bytes(ssh_public(new_key("ed25519")) + b"\n")

    return (server, agent, f"spiffe://{TD}/sigil/agent/sshpop/{sshpop.fingerprint(cert)}",
            distrust)


def _fetch_svid(stack: Stack, expected: str) -> None:
    def fetched() -> bool:
        proc = stack.agent_cli("api", "fetch", "x509", "--output", "json", check=False)
        if proc.returncode != 0:
            return False
        svids = json.loads(proc.stdout)["svids"]
        return bool(svids and svids[0]["spiffe_id"] == expected)

    wait_for(fetched, timeout=30, what=f"the workload's X.509-SVID {expected}")


@pytest.mark.parametrize("node", [_x509_node, _ssh_node], ids=["x509pop", "sshpop"])
def test_fleet_node_attests_reattests_and_is_refused_when_distrusted(
        root: Path, node: Callable[[Path], tuple[str, str, str, Callable[[], None]]]) -> None:
    server_toml, agent_toml, agent_id, distrust = node(root)
    stack = Stack(root=root, trust_domain=TD, port=free_port(), server_config=server_toml)
    try:
        stack.start_server()
        (root / "bundle.pem").write_text(
            stack.server_cli("bundle", "show", "--format", "pem").stdout)
        (root / "agent.toml").write_text(
            f'sync_interval = "1s"\ntrust_bundle_path = "{root / "bundle.pem"}"\n' + agent_toml)
        stack.run_agent(root / "agent.toml")
        stack.agent_id = agent_id
        workload = f"spiffe://{TD}/fleet/web"
        stack.create_entry(workload, f"unix:uid:{os.getuid()}")
        _fetch_svid(stack, workload)
        agents = json.loads(stack.server_cli("agent", "list", "--output", "json").stdout)
        agents = agents if isinstance(agents, list) else agents["agents"]
        assert [a["id"] for a in agents] == [agent_id]

        # Restarted with its data dir cleared: it attests again, as the same agent.
        assert stack.stop("agent") == 0
        shutil.rmtree(root / "ag")
        stack.run_agent(root / "agent.toml")
        _fetch_svid(stack, workload)
        assert f"agent attested agent_id={agent_id}" in stack.log("agent")  # a new log
        assert stack.log("server").count(f"agent attested agent_id={agent_id}") == 2

        # Evicted: it attests again by itself (no token to spend), as the same agent.
        stack.server_cli("agent", "evict", "--id", agent_id)
        wait_for(lambda: stack.log("server").count(f"agent attested agent_id={agent_id}") == 3,
                 timeout=30, what="the evicted agent to attest again")
        _fetch_svid(stack, workload)

        # The node's CA is no longer trusted: the next attestation is refused.
        assert stack.stop("agent") == 0
        assert stack.stop("server") == 0
        distrust()
        stack.start_server()
        shutil.rmtree(root / "ag")
        stack.start("agent", [
            _tool("sigil-agent"), "run", "--config", str(root / "agent.toml"), "--trust-domain", TD,
            "--server-address", f"127.0.0.1:{stack.port}", "--data-dir", str(root / "ag"),
            "--socket-path", str(stack.agent_socket)])
        wait_for(lambda: stack.procs["agent"].poll() is not None, timeout=30,
                 what="the refused agent to exit")
        assert stack.stop("agent") != 0
        attestor = agent_id.split("/")[5]
        reason = ("does not chain to the configured CA bundle" if attestor == "x509pop"
                  else "which is not in cert_authorities_path")
        assert "PERMISSION_DENIED" in stack.log("agent"), stack.log("agent")
        assert reason in stack.log("agent")
        assert "request refused" in stack.log("server") and reason in stack.log("server")
        assert not (root / "ag" / "agent_svid.pem").exists()
    except BaseException:
        print("server log:\n" + stack.log("server"), "\nagent log:\n" + stack.log("agent"))
        raise
    finally:
        codes = {name: stack.stop(name) for name in list(stack.procs)}
    assert all(code == 0 for code in codes.values()), codes
