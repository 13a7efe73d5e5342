"""[kubernetes.controller] and [kubernetes.bundle_configmap], and IdentityTemplate parsing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from attestation.kubeapi import KubeConnection
from ca.config.server import ServerConfig, load_config
from ca.errors import ConfigError
from ca.kubernetes.templates import (
    LabelSelector,
    PodFacts,
    RenderError,
    TemplateError,
    desired_entry,
    parse_label_selector,
    parse_template,
)
from identity.spiffeid import TrustDomain

PSAT = """
[node_attestors.k8s_psat.clusters.demo]
service_account_allow_list = ["sigil:sigil-agent"]
api_server = "https://10.0.0.1:6443"
token_path = "/run/token"
"""


def _load(tmp_path: Path, text: str) -> ServerConfig:
    path = tmp_path / "server.toml"
    path.write_text('trust_domain = "example.org"\n' + text)
    return load_config(path)


def test_off_by_default(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "")
    assert (cfg.kubernetes.controller, cfg.kubernetes.bundle_configmap) == (None, None)


def test_controller_reuses_the_psat_cluster_connection(tmp_path: Path) -> None:
    cfg = _load(tmp_path, PSAT + '[kubernetes.controller]\ncluster = "demo"\n')
    ctl = cfg.kubernetes.controller
    assert ctl is not None
    assert ctl.cluster == "demo"
    assert ctl.connection == KubeConnection(api_server="https://10.0.0.1:6443",
                                            token_path=Path("/run/token"))
    assert ctl.resync_interval == dt.timedelta(minutes=10)


def test_explicit_connection_and_disabled(tmp_path: Path) -> None:
    cfg = _load(tmp_path, """
[kubernetes.controller]
cluster = "other"
kube_config = "/etc/kube"
resync_interval = "30s"
[kubernetes.bundle_configmap]
namespaces = ["sigil", "apps", "sigil"]
""")
    ctl, cm = cfg.kubernetes.controller, cfg.kubernetes.bundle_configmap
    assert ctl is not None and cm is not None
    assert ctl.connection == KubeConnection(kube_config=Path("/etc/kube"))
    assert ctl.resync_interval == dt.timedelta(seconds=30)
    assert (cm.namespaces, cm.name, cm.connection) == (("sigil", "apps"), "sigil-bundle",
                                                       KubeConnection())
    off = _load(tmp_path, '[kubernetes.controller]\ncluster = "demo"\nenabled = false\n')
    assert off.kubernetes.controller is None


@pytest.mark.parametrize(("text", "message"), [
    ('kubernetes = "yes"\n', "kubernetes must be a table"),
    ("[kubernetes.registrar]\n", "unknown key 'kubernetes.registrar'"),
    ("[kubernetes.controller]\n", "kubernetes.controller.cluster is required"),
    ('[kubernetes.controller]\ncluster = "a/b"\n', "kubernetes.controller.cluster is required"),
    ('[kubernetes.controller]\ncluster = "demo"\nwatch = true\n',
     "unknown key 'kubernetes.controller.watch'"),
    ('[kubernetes.controller]\ncluster = "demo"\nenabled = "yes"\n',
     "kubernetes.controller.enabled must be true or false"),
    ('[kubernetes.controller]\ncluster = "demo"\nresync_interval = "soon"\n',
     "kubernetes.controller.resync_interval: "),
    ('[kubernetes.controller]\ncluster = "demo"\napi_server = "https://x"\n',
     "kubernetes.controller: api_server needs token_path"),
    ("[kubernetes.bundle_configmap]\n", "kubernetes.bundle_configmap.namespaces must be"),
    ('[kubernetes.bundle_configmap]\nnamespaces = ["Bad_NS"]\n',
     "kubernetes.bundle_configmap.namespaces must be"),
    ('[kubernetes.bundle_configmap]\nnamespaces = ["a"]\nname = "x/y"\n',
     "kubernetes.bundle_configmap.name 'x/y' is not a valid ConfigMap name"),
    ('[kubernetes.bundle_configmap]\nnamespaces = ["a"]\ntoken_path = ""\n',
     "kubernetes.bundle_configmap.token_path must be a non-empty string"),
])
def test_bad_settings(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert message in str(err.value)


# ---- templates ------------------------------------------------------------------------

TD = TrustDomain("example.org")
POD = PodFacts(namespace="payments", name="api-1", uid="u-1", service_account="api",
               node_name="node-a", phase="Running", labels={"app": "api", "tier": "web"})


@pytest.mark.parametrize(("selector", "selected"), [
    ({}, True),
    ({"matchLabels": {"app": "api"}}, True),
    ({"matchLabels": {"app": "web"}}, False),
    ({"matchExpressions": [{"key": "app", "operator": "In", "values": ["api", "x"]}]}, True),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["api"]}]}, False),
    ({"matchExpressions": [{"key": "gone", "operator": "NotIn", "values": ["a"]}]}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, True),
    ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, False),
    ({"matchLabels": {"app": "api"},
      "matchExpressions": [{"key": "gone", "operator": "Exists"}]}, False),
])
def test_label_selectors(selector: dict[str, object], selected: bool) -> None:
    assert parse_label_selector(selector, "s").matches(POD.labels) is selected


@pytest.mark.parametrize(("spec", "message"), [
    ({"spiffeIDTemplate": "spiffe://{trust_domain}/{pod}"}, "unknown placeholder {pod}"),
    ({"ttl": "soon"}, "spec.ttl"),
    ({"ttl": "48h"}, "spec.ttl"),
    ({"dnsNameTemplates": "x"}, "spec.dnsNameTemplates must be a list"),
    ({"federatesWith": ["not a domain"]}, "spec.federatesWith"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
     "operator 'Near' is not one of"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "In and NotIn need values"),
    ({"namespaceSelector": {"matchLabels": {"a": 1}}}, "matchLabels must map"),
    ({"extra": 1}, "unknown field spec.extra"),
])
def test_bad_templates(spec: dict[str, object], message: str) -> None:
    with pytest.raises(TemplateError) as err:
        parse_template({"metadata": {"name": "t"}, "spec": spec},
                       max_ttl=dt.timedelta(hours=24))
    assert message in str(err.value)
    assert "IdentityTemplate 't'" in str(err.value)


def test_defaults_and_render() -> None:
    t = parse_template({"metadata": {"name": "t"}, "spec": {}}, max_ttl=dt.timedelta(days=1))
    assert t.pod_selector == LabelSelector()
    entry = desired_entry(t, POD, cluster="demo", node_uid="n-1", trust_domain=TD)
    assert str(entry.spiffe_id) == "spiffe://example.org/ns/payments/sa/api"
    assert str(entry.parent_id) == "spiffe://example.org/sigil/agent/k8s_psat/demo/n-1"
    t = parse_template({"metadata": {"name": "t"}, "spec": {
        "spiffeIDTemplate": "spiffe://{trust_domain}/{node_name}/{pod_uid}/{label:tier}",
        "dnsNameTemplates": ["{pod_name}.{namespace}.svc", "API.{namespace}"]}},
        max_ttl=dt.timedelta(days=1))
    entry = desired_entry(t, POD, cluster="demo", node_uid="n-1", trust_domain=TD)
    assert str(entry.spiffe_id) == "spiffe://example.org/node-a/u-1/web"
    assert entry.dns_names == ("api-1.payments.svc", "api.payments")


@pytest.mark.parametrize(("id_template", "message"), [
    ("spiffe://{trust_domain}/{label:missing}", "has no label 'missing'"),
    ("spiffe://other.org/{pod_name}", "is not in the trust domain"),
    ("spiffe://{trust_domain}/sigil/x", "reserved"),
    ("spiffe://{trust_domain}", "must have a path"),
])
def test_render_errors(id_template: str, message: str) -> None:
    t = parse_template({"metadata": {"name": "t"}, "spec": {"spiffeIDTemplate": id_template}},
                       max_ttl=dt.timedelta(days=1))
    with pytest.raises(RenderError) as err:
        desired_entry(t, POD, cluster="demo", node_uid="n-1", trust_domain=TD)
    assert message in str(err.value)
