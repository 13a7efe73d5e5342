"""The agent's [node_attestor.k8s_psat] and [workload_attestors.k8s] settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from attestation.node.k8s_psat import AgentAttestorConfig
from attestation.workload.k8s import K8sAttestorConfig

HEAD = 'trust_domain = "example.org"\nserver_address = "sigil-server:8081"\n'


def _load(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(HEAD + text)
    return load_config(path)


def test_off_by_default(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "")
    assert (cfg.k8s, cfg.k8s_psat) == (None, None)


def test_both_on(tmp_path: Path) -> None:
    cfg = _load(tmp_path, """
[node_attestor.k8s_psat]
cluster = "prod"

[workload_attestors.k8s]
kubelet_read_only_port = 10255
""")
    assert cfg.k8s_psat == AgentAttestorConfig(
        "prod", Path("/var/run/secrets/tokens/sigil-agent"))
    assert cfg.k8s == K8sAttestorConfig(kubelet_read_only_port=10255)


@pytest.mark.parametrize(("text", "message"), [
    ("[node_attestor.k8s_psat]\ntoken_path = \"/t\"\n",
     "node_attestor.k8s_psat.cluster is required: the cluster name the server knows"),
    ("[node_attestor.k8s_psat]\ncluster = \"p\"\naudience = \"x\"\n",
     "unknown key 'node_attestor.k8s_psat.audience'"),
    ("[node_attestor.tpm]\n",
     "node_attestor must hold one table of: [node_attestor.k8s_psat], [node_attestor.x509pop], "
     "[node_attestor.sshpop] (join_token needs none)"),
    ("[node_attestor.sshpop]\n[node_attestor.x509pop]\ncertificate_path = \"/c\"\n"
     "private_key_path = \"/k\"\n",
     "node_attestor must hold one table of: [node_attestor.k8s_psat], [node_attestor.x509pop], "
     "[node_attestor.sshpop] (join_token needs none)"),
    ("[workload_attestors.k8s]\nkubelet_secure_port = 70000\n",
     "workload_attestors.k8s.kubelet_secure_port must be a whole number from 1 to 65535, "
     "not 70000"),
])
def test_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert str(info.value).endswith(message)
