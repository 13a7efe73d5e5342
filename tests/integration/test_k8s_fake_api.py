"""The Kubernetes API test server and fake kubelet, through the real ``kubernetes`` client."""

from __future__ import annotations

import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from tests.support.k8s_api import FakeKubeApi, node_object, pod_object
from tests.support.kubelet import FakeKubelet
from tests.support.tls import LocalCa, make_ca


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCa:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def api(ca: LocalCa) -> Iterator[FakeKubeApi]:
    with FakeKubeApi(tls=ca, bookmark_interval=0.1) as server:
        yield server


def _client(api: FakeKubeApi, ca: LocalCa, token: str = "test-api-token") -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = api.url
    cfg.ssl_ca_cert = str(ca.ca_path)
    cfg.api_key = {"authorization": f"Bearer {token}"}
    return client.ApiClient(cfg)


def test_get_and_list_pods_and_nodes(api: FakeKubeApi, ca: LocalCa) -> None:
    node = api.put(node_object("node-a", labels={"zone": "z1"}))
    pod = api.put(pod_object("web-1", "shop", node_name="node-a", service_account="web"))
    core = client.CoreV1Api(_client(api, ca))
    got = core.read_namespaced_pod("web-1", "shop")
    assert got.metadata.uid == pod["metadata"]["uid"]
    assert got.spec.node_name == "node-a"
    assert got.spec.service_account_name == "web"
    assert core.read_node("node-a").metadata.labels["zone"] == "z1"
    assert core.read_node("node-a").metadata.uid == node["metadata"]["uid"]
    pods = core.list_pod_for_all_namespaces()
    assert [p.metadata.name for p in pods.items] == ["web-1"]
    assert pods.metadata.resource_version == str(api.resource_version)
    assert core.list_namespaced_pod("other").items == []


def test_errors_are_status_objects(api: FakeKubeApi, ca: LocalCa) -> None:
    core = client.CoreV1Api(_client(api, ca))
    with pytest.raises(client.ApiException) as info:
        core.read_namespaced_pod("missing", "shop")
    assert info.value.status == 404
    assert json.loads(info.value.body) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "missing" not found', "reason": "NotFound", "code": 404,
        "details": {"name": "missing", "kind": "pods"},
    }
    with pytest.raises(client.ApiException) as info:
        client.CoreV1Api(_client(api, ca, token="wrong")).read_node("x")
    assert info.value.status == 401
    assert json.loads(info.value.body)["reason"] == "Unauthorized"


def test_token_review(api: FakeKubeApi, ca: LocalCa) -> None:
    node = api.put(node_object("node-a"))
    pod = api.put(pod_object("agent-x", "sigil", node_name="node-a"))
    token = api.issue_token(namespace="sigil", service_account="sigil-agent", pod=pod, node=node)
    auth = client.AuthenticationV1Api(_client(api, ca))

    def review(tok: str, audiences: list[str]) -> Any:
        return auth.create_token_review(client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=tok, audiences=audiences))).status

    ok = review(token, ["sigil-server"])
    assert ok.authenticated is True
    assert ok.audiences == ["sigil-server"]
    assert ok.user.username == "system:serviceaccount:sigil:sigil-agent"
    assert ok.user.extra == {
        "authentication.kubernetes.io/pod-name": ["agent-x"],
        "authentication.kubernetes.io/pod-uid": [pod["metadata"]["uid"]],
        "authentication.kubernetes.io/node-name": ["node-a"],
        "authentication.kubernetes.io/node-uid": [node["metadata"]["uid"]],
    }
    wrong = review(token, ["other"])
    assert (wrong.authenticated, wrong.error) == (False, (
        '[invalid bearer token, token audiences ["sigil-server"] is invalid for the target '
        'audiences ["other"]]'))
    expired = api.issue_token(namespace="sigil", service_account="sigil-agent", pod=pod,
                              expires_in=-1)
    assert review(expired, ["sigil-server"]).error == (
        "[invalid bearer token, service account token has expired]")
    assert review("garbage", ["sigil-server"]).authenticated is False


def test_watch_events_bookmarks_and_410(api: FakeKubeApi, ca: LocalCa) -> None:
    core = client.CoreV1Api(_client(api, ca))
    api.put(pod_object("a", "ns", node_name="n"))
    start = core.list_pod_for_all_namespaces().metadata.resource_version

    def mutate() -> None:
        api.put(pod_object("b", "ns", node_name="n"))
        modified = api.get("pods", "b", "ns")
        assert modified is not None
        modified["metadata"]["labels"] = {"v": "2"}
        api.put(modified)
        api.delete("pods", "a", "ns")

    seen: list[tuple[str, str]] = []
    w = watch.Watch()
    threading.Timer(0.05, mutate).start()
    for ev in w.stream(core.list_pod_for_all_namespaces, resource_version=start,
                       allow_watch_bookmarks=True, timeout_seconds=5):
        if ev["type"] == "BOOKMARK":
            seen.append(("BOOKMARK", ""))
            w.stop()
        else:
            seen.append((ev["type"], ev["object"].metadata.name))
    assert seen == [("ADDED", "b"), ("MODIFIED", "b"), ("DELETED", "a"), ("BOOKMARK", "")]

    api.compact()
    with pytest.raises(client.ApiException) as info:
        for _ in watch.Watch().stream(core.list_pod_for_all_namespaces,
                                      resource_version=start, timeout_seconds=5):
            pass
    assert info.value.status == 410


def test_drop_watches_ends_the_stream(api: FakeKubeApi, ca: LocalCa) -> None:
    co = client.CustomObjectsApi(_client(api, ca))
    api.put({"kind": "IdentityTemplate", "metadata": {"name": "default"}, "spec": {}})
    threading.Timer(0.2, api.drop_watches).start()
    events = [ev["type"] for ev in watch.Watch().stream(
        co.list_cluster_custom_object, "sigil.dev", "v1alpha1", "identitytemplates",
        timeout_seconds=10)]
    assert events == ["ADDED"]


def test_configmap_create_replace_conflict(api: FakeKubeApi, ca: LocalCa) -> None:
    core = client.CoreV1Api(_client(api, ca))
    made = core.create_namespaced_config_map("app", client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="sigil-bundle"), data={"k": "1"}))
    with pytest.raises(client.ApiException) as info:
        core.create_namespaced_config_map("app", client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="sigil-bundle"), data={"k": "1"}))
    assert (info.value.status, json.loads(info.value.body)["reason"]) == (409, "AlreadyExists")
    made.data = {"k": "2"}
    assert core.replace_namespaced_config_map("sigil-bundle", "app", made).data == {"k": "2"}
    made.data = {"k": "3"}  # made still carries the old resourceVersion
    with pytest.raises(client.ApiException) as info:
        core.replace_namespaced_config_map("sigil-bundle", "app", made)
    assert (info.value.status, json.loads(info.value.body)["reason"]) == (409, "Conflict")
    assert core.read_namespaced_config_map("sigil-bundle", "app").data == {"k": "2"}


def _get(url: str, *, ca_path: Path | None = None, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ssl.create_default_context(cafile=str(ca_path)) if ca_path else None
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_kubelet_secure_and_read_only(ca: LocalCa) -> None:
    pod = pod_object("web-1", "shop", node_name="node-a")
    with FakeKubelet(tls=ca, tokens={"agent-token"}) as secure, FakeKubelet() as read_only:
        secure.pods = read_only.pods = [pod]
        url = f"https://127.0.0.1:{secure.port}/pods"
        assert _get(url, ca_path=ca.ca_path) == (401, b"Unauthorized")
        assert _get(url, ca_path=ca.ca_path, token="other") == (401, b"Unauthorized")
        code, body = _get(url, ca_path=ca.ca_path, token="agent-token")
        assert code == 200
        assert json.loads(body)["items"][0]["metadata"]["uid"] == pod["metadata"]["uid"]
        code, body = _get(f"http://127.0.0.1:{read_only.port}/pods")
        assert (code, json.loads(body)["kind"]) == (200, "PodList")
        assert _get(f"http://127.0.0.1:{read_only.port}/stats")[0] == 404
