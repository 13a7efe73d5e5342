"""k8s workload attestor: /proc/<pid>/cgroup -> pod UID and container ID, and its config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from attestation.workload import ProcessGoneError, ProcessInfo, WorkloadAttestationError
from attestation.workload.k8s import (
    K8sAttestor,
    K8sAttestorConfig,
    PodContainer,
    parse_cgroups,
    parse_config,
)
from tests.support.cgroups import CASES, CONTAINER_ID, POD_UID, write_proc


@pytest.mark.parametrize("case", sorted(CASES))
def test_parse_cgroups(case: str) -> None:
    text, pod_uid, container_id = CASES[case]
    expected = PodContainer(pod_uid, container_id) if pod_uid and container_id else None
    assert parse_cgroups(text) == expected


def test_two_containers_is_an_error() -> None:
    text = (f"4:memory:/kubepods/pod{POD_UID}/{CONTAINER_ID}\n"
            f"3:pids:/kubepods/pod{POD_UID}/{'b' * 64}\n")
    with pytest.raises(WorkloadAttestationError, match="cgroups name two containers"):
        parse_cgroups(text)


def test_not_in_a_pod_gets_no_selectors_and_asks_no_kubelet(tmp_path: Path) -> None:
    write_proc(tmp_path, 42, CASES["v2-user-session"][0])

    def no_kubelet() -> list[Any]:
        raise AssertionError("the kubelet must not be asked")

    attestor = K8sAttestor(proc_root=tmp_path, pods=no_kubelet)
    assert attestor.attest(ProcessInfo(42, 1000, 1000)) == []


def test_gone_process(tmp_path: Path) -> None:
    with pytest.raises(ProcessGoneError):
        K8sAttestor(proc_root=tmp_path, pods=list).attest(ProcessInfo(7, 0, 0))


def test_config_defaults_and_values() -> None:
    assert parse_config({}) == K8sAttestorConfig()
    cfg = parse_config({"kubelet_read_only_port": 10255, "poll_retry_interval": "500ms",
                        "max_poll_attempts": 3, "kubelet_ca_path": "/etc/kubelet-ca.pem"})
    assert (cfg.kubelet_read_only_port, cfg.poll_retry_interval, cfg.max_poll_attempts,
            cfg.kubelet_ca_path) == (10255, 0.5, 3, Path("/etc/kubelet-ca.pem"))


@pytest.mark.parametrize(("options", "message"), [
    ({"colour": 1}, "unknown key 'workload_attestors.k8s.colour'"),
    ({"kubelet_secure_port": 0},
     "workload_attestors.k8s.kubelet_secure_port must be a whole number from 1 to 65535, not 0"),
    ({"kubelet_read_only_port": "10255"},
     "workload_attestors.k8s.kubelet_read_only_port must be a whole number from 0 to 65535, "
     "not '10255'"),
    ({"max_poll_attempts": True},
     "workload_attestors.k8s.max_poll_attempts must be a whole number from 1 to 1000, not True"),
    ({"poll_retry_interval": "soon"},
     "workload_attestors.k8s.poll_retry_interval: duration 'soon' is invalid: "),
    ({"skip_kubelet_verification": "yes"},
     "workload_attestors.k8s.skip_kubelet_verification must be true or false"),
    ({"kubelet_host": "a/b"},
     "workload_attestors.k8s.kubelet_host must be a host name or address, not 'a/b'"),
])
def test_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_config(options)
    assert str(info.value).startswith(message)
