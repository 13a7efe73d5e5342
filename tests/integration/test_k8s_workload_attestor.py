"""k8s workload attestor: fixture /proc, fake kubelet over real HTTPS and HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from attestation.workload import ProcessInfo, WorkloadAttestationError
from attestation.workload.k8s import K8sAttestor, K8sAttestorConfig
from tests.support.cgroups import CASES, CONTAINER_ID, POD_UID, write_proc
from tests.support.k8s_api import ContainerSpec, pod_object
from tests.support.kubelet import FakeKubelet
from tests.support.tls import LocalCa, make_ca


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCa:
    return make_ca(tmp_path_factory.mktemp("kubelet-ca"))


def _pod(runtime: str = "containerd") -> dict[str, object]:
    return pod_object(
        "api-7d9f8-x2x", "payments", uid=POD_UID, node_name="node-a", service_account="api",
        labels={"app": "api", "tier": "backend"}, owner=("ReplicaSet", "api-7d9f8"),
        containers=[ContainerSpec("api", "registry.example/api:2.1", id=CONTAINER_ID,
                                  runtime=runtime, image_id="registry.example/api@sha256:ab"),
                    ContainerSpec("envoy", "envoyproxy/envoy:v1.31", runtime=runtime)],
    )


EXPECTED = [
    "k8s:ns:payments", "k8s:sa:api", "k8s:pod-name:api-7d9f8-x2x", f"k8s:pod-uid:{POD_UID}",
    "k8s:node-name:node-a", "k8s:pod-label:app:api", "k8s:pod-label:tier:backend",
    "k8s:pod-owner:ReplicaSet:api-7d9f8", "k8s:container-name:api",
    "k8s:container-image:registry.example/api:2.1",
]


@pytest.mark.parametrize(("case", "runtime"), [
    ("v2-systemd-containerd", "containerd"), ("v1-systemd-crio", "cri-o"),
    ("v1-cgroupfs-docker", "docker"),
])
def test_secure_port(tmp_path: Path, ca: LocalCa, case: str, runtime: str) -> None:
    write_proc(tmp_path / "proc", 4242, CASES[case][0])
    (tmp_path / "token").write_text("agent-sa-token\n")
    with FakeKubelet(tls=ca, tokens={"agent-sa-token"}) as kubelet:
        kubelet.pods = [pod_object("other", "default", node_name="node-a"), _pod(runtime)]
        attestor = K8sAttestor(K8sAttestorConfig(
            kubelet_secure_port=kubelet.port, kubelet_ca_path=ca.ca_path,
            token_path=tmp_path / "token"), proc_root=tmp_path / "proc")
        got = [str(s) for s in attestor.attest(ProcessInfo(4242, 0, 0))]
    assert got == EXPECTED


def test_read_only_port_and_retry_until_status_appears(tmp_path: Path) -> None:
    write_proc(tmp_path, 10, CASES["v2-cgroupfs-containerd"][0])
    sleeps: list[float] = []
    with FakeKubelet() as kubelet:
        kubelet.pods = [_pod()]
        kubelet.hide_statuses_for = 2
        attestor = K8sAttestor(K8sAttestorConfig(kubelet_read_only_port=kubelet.port,
                                                 poll_retry_interval=0.5),
                               proc_root=tmp_path, sleep=sleeps.append)
        got = [str(s) for s in attestor.attest(ProcessInfo(10, 0, 0))]
        assert kubelet.calls == 3
    assert got == EXPECTED
    assert sleeps == [0.5, 0.5]


def test_container_never_appears(tmp_path: Path) -> None:
    write_proc(tmp_path, 10, CASES["v2-cgroupfs-containerd"][0])
    with FakeKubelet() as kubelet:
        kubelet.pods = [_pod()]
        kubelet.hide_statuses_for = 100
        attestor = K8sAttestor(K8sAttestorConfig(kubelet_read_only_port=kubelet.port,
                                                 max_poll_attempts=3),
                               proc_root=tmp_path, sleep=lambda _s: None)
        with pytest.raises(WorkloadAttestationError) as info:
            attestor.attest(ProcessInfo(10, 0, 0))
        assert kubelet.calls == 3
    assert str(info.value) == (f"container {CONTAINER_ID[:12]} of pod {POD_UID} is not in "
                               "the kubelet's pod list after 3 attempts")


@pytest.mark.parametrize(("token", "ca_ok", "message"), [
    ("wrong-token", True, "the kubelet answered 401 for https://127.0.0.1:"),
    ("agent-sa-token", False, "cannot reach the kubelet at https://127.0.0.1:"),
])
def test_kubelet_refusals(tmp_path: Path, ca: LocalCa, token: str, ca_ok: bool,
                          message: str) -> None:
    write_proc(tmp_path / "proc", 10, CASES["v2-cgroupfs-containerd"][0])
    (tmp_path / "token").write_text(token)
    other_ca = make_ca(tmp_path / "other", name="other")
    with FakeKubelet(tls=ca, tokens={"agent-sa-token"}) as kubelet:
        kubelet.pods = [_pod()]
        attestor = K8sAttestor(K8sAttestorConfig(
            kubelet_secure_port=kubelet.port, token_path=tmp_path / "token",
            kubelet_ca_path=ca.ca_path if ca_ok else other_ca.ca_path),
            proc_root=tmp_path / "proc")
        with pytest.raises(WorkloadAttestationError) as info:
            attestor.attest(ProcessInfo(10, 0, 0))
    assert str(info.value).startswith(message)
    assert token not in str(info.value)
