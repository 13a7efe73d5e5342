"""The server's [node_attestors.k8s_psat] settings, loaded through ca.config.server."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca.config.server import load_config
from ca.errors import ConfigError


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "server.toml"
    path.write_text('trust_domain = "example.org"\n' + text)
    return load_config(path)


def test_clusters_load(tmp_path: Path) -> None:
    cfg = _load(tmp_path, """
[node_attestors.k8s_psat.clusters.prod]
service_account_allow_list = ["sigil:sigil-agent"]
kube_config = "/etc/kube/config"
""")
    [(cluster, conn)] = cfg.kubernetes.psat_clusters  # type: ignore[attr-defined]
    assert (cluster.name, cluster.service_account_allow_list, cluster.audience) == (
        "prod", frozenset({"sigil:sigil-agent"}), ("sigil-server",))
    assert conn.kube_config == Path("/etc/kube/config")


def test_default_is_off(tmp_path: Path) -> None:
    assert _load(tmp_path, "").kubernetes.psat_clusters == ()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("text", "message"), [
    ("[node_attestors.tpm]\n",
     "unknown key 'node_attestors.tpm' (configurable node attestors: k8s_psat, x509pop, "
     "sshpop; join_token is always on)"),
    ("[node_attestors.x509pop]\n",
     "node_attestors.x509pop.ca_bundle_path is required: a PEM file of the CA certificates "
     "that issue node certificates"),
    ("[node_attestors.sshpop]\ncert_authorities_path = \"/nonexistent/cas\"\n",
     "node_attestors.sshpop.cert_authorities_path /nonexistent/cas: cannot read: "
     "No such file or directory"),
    ('node_attestors = "k8s_psat"\n', "node_attestors must be a table"),
    ("[node_attestors.k8s_psat.clusters.prod]\nservice_account_allow_list = []\n",
     "node_attestors.k8s_psat.clusters.prod.service_account_allow_list must be a non-empty "
     "list of \"namespace:name\" strings, not []"),
])
def test_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert str(info.value) == message
