"""The registration controller against the Kubernetes API test server (real client, real HTTP)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from prometheus_client import REGISTRY

import migrations
from attestation.kubeapi import KubeApi, KubeConnection
from ca.datastore import Datastore, EntryRecord
from ca.kubernetes.controller import ControllerSettings, RegistrationController
from identity.clock import SystemClock
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from tests.support.k8s_api import (
    FakeKubeApi,
    identity_template_object,
    namespace_object,
    node_object,
    pod_object,
)

TD = TrustDomain("example.org")
CLUSTER = "demo"
NODE_UID = "9d0c0a44-3f3c-4c5e-9b59-1d2f1f1a0001"
AGENT = f"spiffe://example.org/sigil/agent/k8s_psat/{CLUSTER}/{NODE_UID}"


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    with FakeKubeApi(bookmark_interval=0.2) as api:
        api.put(node_object("node-a", uid=NODE_UID))
        api.put(namespace_object("payments", labels={"sigil.dev/identity": "enabled"}))
        api.put(namespace_object("other"))
        yield api


def _datastore_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'datastore.sqlite3'}"
    migrations.upgrade(url)
    return url


@pytest.fixture
def datastore(tmp_path: Path) -> Iterator[Datastore]:
    with Datastore(_datastore_url(tmp_path)) as ds:
        yield ds


def _api(kube: FakeKubeApi, tmp_path: Path) -> KubeApi:
    token = tmp_path / "api-token"
    token.write_text(kube.token or "")
    return KubeApi(KubeConnection(api_server=kube.url, token_path=token))


@pytest.fixture
def make_controller(kube: FakeKubeApi, tmp_path: Path
                    ) -> Iterator[Callable[[Datastore], RegistrationController]]:
    started: list[tuple[RegistrationController, KubeApi]] = []

    def make(ds: Datastore) -> RegistrationController:
        api = _api(kube, tmp_path)
        ctl = RegistrationController(api, ds, ControllerSettings(
            trust_domain=TD, cluster=CLUSTER, max_ttl=dt.timedelta(hours=24),
            retry_delay=0.1), clock=SystemClock())
        ctl.start()
        started.append((ctl, api))
        return ctl

    yield make
    for ctl, api in started:
        ctl.stop()
        api.close()


def _owned(ds: Datastore) -> list[EntryRecord]:
    return ds.list_owned_entries("k8s/")


def _wait(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    assert check()


def _settle(ctl: RegistrationController) -> None:
    assert ctl.wait_idle(15.0)


def _pod(name: str, ns: str = "payments", *, uid: str, sa: str = "api",
         labels: dict[str, str] | None = None, phase: str = "Running",
         node: str = "node-a") -> dict[str, object]:
    return pod_object(name, ns, node_name=node, uid=uid, service_account=sa,
                      labels=labels or {"app": "api"}, phase=phase)


DEFAULT_TEMPLATE = identity_template_object("default", {
    "namespaceSelector": {"matchLabels": {"sigil.dev/identity": "enabled"}},
})


def test_running_pod_gets_one_entry_and_loses_it_when_deleted(
    kube: FakeKubeApi, datastore: Datastore,
    make_controller: Callable[[Datastore], RegistrationController],
) -> None:
    kube.put(DEFAULT_TEMPLATE)
    kube.put(_pod("api-1", uid="uid-1"))
    ctl = make_controller(datastore)
    _wait(lambda: len(_owned(datastore)) == 1)
    [entry] = _owned(datastore)
    assert entry.spiffe_id == SpiffeId.parse("spiffe://example.org/ns/payments/sa/api")
    assert str(entry.parent_id) == AGENT
    assert entry.selectors == (Selector("k8s", "pod-uid:uid-1"),)
    assert entry.owner == "k8s/demo/uid-1/default"

    kube.put(_pod("api-2", uid="uid-2"))
    _wait(lambda: len(_owned(datastore)) == 2)
    kube.delete("pods", "api-1", "payments")
    _wait(lambda: [e.owner for e in _owned(datastore)] == ["k8s/demo/uid-2/default"])
    _settle(ctl)
    assert datastore.count_entries() == 1


def test_pod_changes_and_template_changes_update_entries(
    kube: FakeKubeApi, datastore: Datastore,
    make_controller: Callable[[Datastore], RegistrationController],
) -> None:
    kube.put(identity_template_object("by-app", {
        "spiffeIDTemplate": "spiffe://{trust_domain}/app/{label:app}",
        "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]},
        "ttl": "30m", "dnsNameTemplates": ["{pod_name}.{namespace}.svc"],
        "federatesWith": ["partner.example"], "hint": "external",
    }))
    kube.put(_pod("api-1", uid="uid-1", labels={"app": "api"}))
    ctl = make_controller(datastore)
    _wait(lambda: len(_owned(datastore)) == 1)
    [entry] = _owned(datastore)
    assert str(entry.spiffe_id) == "spiffe://example.org/app/api"
    assert entry.x509_svid_ttl == 1800
    assert entry.dns_names == ("api-1.payments.svc",)
    assert [td.name for td in entry.federates_with] == ["partner.example"]
    assert entry.hint == "external"

    # The pod's label changes: same entry (same owner), new SPIFFE ID.
    kube.put(_pod("api-1", uid="uid-1", labels={"app": "web"}))
    _wait(lambda: [str(e.spiffe_id) for e in _owned(datastore)]
          == ["spiffe://example.org/app/web"])
    assert _owned(datastore)[0].id == entry.id
    # The label goes away: the selector no longer selects the pod.
    kube.put(_pod("api-1", uid="uid-1", labels={"tier": "x"}))
    _wait(lambda: _owned(datastore) == [])
    # The template changes: the pod is selected again, with the new template.
    kube.put(_pod("api-1", uid="uid-1", labels={"app": "web"}))
    _wait(lambda: len(_owned(datastore)) == 1)
    kube.put(identity_template_object("by-app", {
        "spiffeIDTemplate": "spiffe://{trust_domain}/pods/{pod_name}",
    }))
    _wait(lambda: [str(e.spiffe_id) for e in _owned(datastore)]
          == ["spiffe://example.org/pods/api-1"])
    [entry] = _owned(datastore)
    assert (entry.x509_svid_ttl, entry.dns_names, entry.federates_with, entry.hint) == (
        0, (), (), "")
    # The template is deleted: its entries go.
    kube.delete("identitytemplates", "by-app")
    _wait(lambda: _owned(datastore) == [])
    _settle(ctl)


def test_namespace_labels_select_and_unselect(
    kube: FakeKubeApi, datastore: Datastore,
    make_controller: Callable[[Datastore], RegistrationController],
) -> None:
    kube.put(DEFAULT_TEMPLATE)
    kube.put(_pod("api-1", uid="uid-1"))
    kube.put(_pod("batch-1", "other", uid="uid-9", sa="batch"))
    ctl = make_controller(datastore)
    _wait(lambda: [e.owner for e in _owned(datastore)] == ["k8s/demo/uid-1/default"])
    kube.put(namespace_object("other", labels={"sigil.dev/identity": "enabled"}))
    _wait(lambda: len(_owned(datastore)) == 2)
    kube.put(namespace_object("payments"))
    _wait(lambda: [e.owner for e in _owned(datastore)] == ["k8s/demo/uid-9/default"])
    _settle(ctl)


def test_pods_not_running_and_nodes_without_agents(
    kube: FakeKubeApi, datastore: Datastore,
    make_controller: Callable[[Datastore], RegistrationController],
) -> None:
    kube.put(DEFAULT_TEMPLATE)
    kube.put(_pod("pending", uid="uid-p", phase="Pending"))
    kube.put(_pod("done", uid="uid-d", phase="Succeeded"))
    kube.put(_pod("failed", uid="uid-f", phase="Failed"))
    kube.put(_pod("unscheduled", uid="uid-u", node=""))
    kube.put(_pod("ghost-node", uid="uid-g", node="node-gone"))
    # node-b exists, but no agent has attested on it: the entry is made anyway, for
    # that node's (future) agent only.
    node_b = kube.put(node_object("node-b"))
    kube.put(_pod("on-b", uid="uid-b", node="node-b"))
    ctl = make_controller(datastore)
    _settle(ctl)
    owned = _owned(datastore)
    assert [(e.owner, str(e.parent_id)) for e in owned] == [
        ("k8s/demo/uid-b/default",
         f"spiffe://example.org/sigil/agent/k8s_psat/demo/{node_b['metadata']['uid']}")]
    assert datastore.get_node(owned[0].parent_id) is None
    # The pending pod starts running: now it gets its entry; it finishes: it loses it.
    kube.put(_pod("pending", uid="uid-p"))
    _wait(lambda: len(_owned(datastore)) == 2)
    kube.put(_pod("pending", uid="uid-p", phase="Succeeded"))
    _wait(lambda: len(_owned(datastore)) == 1)
    _settle(ctl)


def test_cut_streams_resume_and_410_relists(
    kube: FakeKubeApi, datastore: Datastore,
    make_controller: Callable[[Datastore], RegistrationController],
) -> None:
    kube.put(DEFAULT_TEMPLATE)
    ctl = make_controller(datastore)
    _settle(ctl)
    lists_before = sum(1 for m, p in kube.requests if m == "GET" and "watch" not in p
                       and p.startswith("/api/v1/pods"))
    kube.drop_watches()
    kube.put(_pod("api-1", uid="uid-1"))
    _wait(lambda: len(_owned(datastore)) == 1)
    # Resumed from its resourceVersion: no new list.
    _settle(ctl)
    assert sum(1 for m, p in kube.requests if m == "GET" and "watch" not in p
               and p.startswith("/api/v1/pods")) == lists_before

    # Compaction, a cut, and a change the watch can no longer deliver: 410 -> relist.
    kube.drop_watches()
    kube.delete("pods", "api-1", "payments")
    kube.put(_pod("api-2", uid="uid-2"))
    kube.compact()
    _wait(lambda: [e.owner for e in _owned(datastore)] == ["k8s/demo/uid-2/default"])
    _settle(ctl)
    assert sum(1 for m, p in kube.requests if m == "GET" and "watch" not in p
               and p.startswith("/api/v1/pods")) > lists_before


def test_restart_and_two_controllers_make_no_duplicates(
    kube: FakeKubeApi, database_url: str,
    make_controller: Callable[[Datastore], RegistrationController],
) -> None:
    kube.put(DEFAULT_TEMPLATE)
    for i in range(5):
        kube.put(_pod(f"api-{i}", uid=f"uid-{i}"))
    with Datastore(database_url) as ds:
        first = make_controller(ds)
        _wait(lambda: len(_owned(ds)) == 5)
        ids = sorted(e.id for e in _owned(ds))
        first.stop()
        # While it is down: one pod goes, one comes.
        kube.delete("pods", "api-0", "payments")
        kube.put(_pod("api-5", uid="uid-5"))
        # Restarted, plus a second server's controller on the same database.
        a, b = make_controller(ds), make_controller(ds)
        _wait(lambda: sorted(e.owner for e in _owned(ds))
              == [f"k8s/demo/uid-{i}/default" for i in range(1, 6)])
        _settle(a)
        _settle(b)
        a.request_resync()
        _settle(a)
        owned = _owned(ds)
        assert ds.count_entries() == 5
        assert sorted(e.id for e in owned if e.owner != "k8s/demo/uid-5/default") == sorted(
            i for i in ids if i in {e.id for e in owned})
        assert len({e.id for e in owned} & set(ids)) == 4


def test_bad_templates_and_conflicts_are_skipped(
    kube: FakeKubeApi, datastore: Datastore,
    make_controller: Callable[[Datastore], RegistrationController],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sigil.server")
    kube.put(identity_template_object("unknown-placeholder", {
        "spiffeIDTemplate": "spiffe://{trust_domain}/{nonsense}"}))
    kube.put(identity_template_object("other-domain", {
        "spiffeIDTemplate": "spiffe://elsewhere.example/{pod_name}"}))
    kube.put(identity_template_object("reserved", {
        "spiffeIDTemplate": "spiffe://{trust_domain}/sigil/agent/{pod_name}"}))
    kube.put(identity_template_object("default", {}))
    kube.put(identity_template_object("same-id", {}))  # the same identity again
    kube.put(_pod("api-1", uid="uid-1"))
    ctl = make_controller(datastore)
    _settle(ctl)
    owned = _owned(datastore)
    assert len(owned) == 1
    assert owned[0].owner in ("k8s/demo/uid-1/default", "k8s/demo/uid-1/same-id")
    assert str(owned[0].spiffe_id) == "spiffe://example.org/ns/payments/sa/api"
    # An operator's entries are never touched.
    manual = datastore.create_entry(EntryRecord(
        spiffe_id=SpiffeId.parse("spiffe://example.org/manual"),
        parent_id=SpiffeId.parse(AGENT), selectors=(Selector("k8s", "pod-uid:uid-1"),)),
        now=dt.datetime.now(dt.UTC))
    ctl.request_resync()
    _settle(ctl)
    assert datastore.get_entry(manual.id).owner == ""
    assert datastore.count_entries() == 2

    # A standing conflict is logged once, not at every resync; it is counted each pass.
    def conflicts() -> int:
        return sum("entry not reconciled" in r.getMessage() for r in caplog.records)

    def counted(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    skipped = counted("sigil_kubernetes_entry_changes_total", change="skipped")
    passes = counted("sigil_kubernetes_reconciles_total", scope="all")
    assert conflicts() == 1
    for _ in range(3):
        ctl.request_resync()
        _settle(ctl)
    assert conflicts() == 1
    assert counted("sigil_kubernetes_reconciles_total", scope="all") >= passes + 3
    assert counted("sigil_kubernetes_entry_changes_total", change="skipped") >= skipped + 3
    assert counted("sigil_kubernetes_entry_changes_total", change="created") >= 1
    # The refused template goes (the problem is gone, never resolved by a write:
    # a full pass forgets it), then comes back: said again.
    [winner] = _owned(datastore)
    loser = {"k8s/demo/uid-1/default": "same-id",
             "k8s/demo/uid-1/same-id": "default"}[winner.owner]
    kube.delete("identitytemplates", loser)
    _wait(lambda: f"k8s/demo/uid-1/{loser}" not in ctl.desired())
    _settle(ctl)
    kube.put(identity_template_object(loser, {}))
    _wait(lambda: conflicts() == 2)


def _verbs_used(requests: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """(resource, RBAC verb) of each request the fake API server saw."""
    out: set[tuple[str, str]] = set()
    for method, target in requests:
        parts = urlsplit(target)
        path = [p for p in parts.path.split("/") if p]
        path = path[2:] if path[0] == "api" else path[3:]
        if path[0] == "namespaces" and len(path) >= 3:
            path = path[2:]
        named = len(path) == 2
        verb = {"POST": "create", "PUT": "update", "DELETE": "delete"}.get(method)
        if verb is None:
            verb = ("get" if named else
                    "watch" if "watch" in parse_qs(parts.query) else "list")
        out.add((path[0], verb))
    return out


def test_the_controller_needs_exactly_what_rbac_grants(
    kube: FakeKubeApi, datastore: Datastore,
    make_controller: Callable[[Datastore], RegistrationController],
) -> None:
    kube.put(DEFAULT_TEMPLATE)
    kube.put(_pod("api-1", uid="uid-1"))
    kube.requests.clear()
    ctl = make_controller(datastore)
    _wait(lambda: len(_owned(datastore)) == 1)
    kube.drop_watches()
    kube.put(_pod("api-2", uid="uid-2"))
    _wait(lambda: len(_owned(datastore)) == 2)
    _settle(ctl)
    rbac = Path(__file__).resolve().parents[2] / "deploy/kubernetes/base/server-rbac.yaml"
    [role] = [d for d in yaml.safe_load_all(rbac.read_text())
              if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "sigil-server"]
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"]
               for v in rule["verbs"]}
    # k8s_psat's own needs (docs/kubernetes.md): everything else is the controller's.
    psat_only = {("tokenreviews", "create"), ("pods", "get")}
    assert _verbs_used(kube.requests) == granted - psat_only
