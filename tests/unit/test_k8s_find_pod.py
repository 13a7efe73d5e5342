"""The k8s attestor's pod lookup for the Broker API's Kubernetes object references."""

from __future__ import annotations

from typing import Any

from attestation.workload.k8s import K8sAttestor, pod_object_selectors
from identity.selectors import Selector


def _pod(name: str, uid: str, phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "uid": uid},
            "spec": {"serviceAccountName": "api", "nodeName": "n1",
                     "containers": [{"name": "main", "image": "img:1"}]},
            "status": {"phase": phase}}


PODS = [_pod("a", "uid-a"), _pod("b", "uid-b", phase="Succeeded")]
ATTESTOR = K8sAttestor(pods=lambda: PODS)


def test_by_uid_by_name_and_by_both() -> None:
    assert ATTESTOR.find_pod(namespace=None, name=None, uid="uid-a") is PODS[0]
    assert ATTESTOR.find_pod(namespace="shop", name="a", uid=None) is PODS[0]
    assert ATTESTOR.find_pod(namespace="shop", name="a", uid="uid-a") is PODS[0]


def test_mismatches_and_finished_pods_are_not_found() -> None:
    assert ATTESTOR.find_pod(namespace="shop", name="a", uid="uid-b") is None
    assert ATTESTOR.find_pod(namespace="other", name="a", uid=None) is None
    assert ATTESTOR.find_pod(namespace="shop", name="b", uid=None) is None  # Succeeded


def test_pod_object_selectors_have_no_container_selectors() -> None:
    got = pod_object_selectors(PODS[0])
    assert Selector("k8s", "sa:api") in got and Selector("k8s", "ns:shop") in got
    assert [s for s in got if s.value.startswith("container-")] == []
