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


_U = POD_UID.replace("-", "_")
_C = CONTAINER_ID
_POD_SCOPE = (f"kubepods-besteffort.slice/kubepods-besteffort-pod{_U}.slice/"
              f"cri-containerd-{_C}.scope")


# Paths that name a real pod's UID and container ID but are not where the kubelet
# puts containers: a user with a delegated cgroup subtree (systemd Delegate=yes)
# can create any of them under its own subtree and move itself there.
@pytest.mark.parametrize("path", [
    # The attack as reproduced: the victim's pod and container under a user's subtree.
    f"/user.slice/user-1000.slice/user@1000.service/app.slice/{_POD_SCOPE}",
    f"/user.slice/user-1000.slice/user@1000.service/kubepods.slice/{_POD_SCOPE}",
    f"/system.slice/evil.service/kubepods.slice/{_POD_SCOPE}",
    f"/user.slice/user-1000.slice/user@1000.service/kubepods/besteffort/pod{POD_UID}/{_C}",
    # Under the real root, but with extra nesting in between or below.
    f"/kubepods.slice/extra/{_POD_SCOPE}",
    f"/kubepods.slice/kubepods-besteffort.slice/extra/kubepods-besteffort-pod{_U}.slice/"
    f"cri-containerd-{_C}.scope",
    f"/kubepods.slice/{_POD_SCOPE}/nested",
    f"/kubepods/besteffort/extra/pod{POD_UID}/{_C}",
    f"/kubepods/besteffort/pod{POD_UID}/{_C}/nested",
    # Names that do not fit their place: a QoS slice that does not match the pod's,
    # a cgroupfs name under the systemd root, a QoS class the kubelet does not have.
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{_U}.slice/"
    f"cri-containerd-{_C}.scope",
    f"/kubepods.slice/pod{POD_UID}/{_C}",
    f"/kubepods/guaranteed/pod{POD_UID}/{_C}",
    # Relative to the agent's cgroup namespace: only '..' may come before the
    # kubelet's structure, never a directory someone could create.
    f"/../../user.slice/{_POD_SCOPE}",
    f"/../x/kubepods-besteffort-pod{_U}.slice/cri-containerd-{_C}.scope",
])
def test_pod_names_outside_the_kubelet_root_are_refused(path: str) -> None:
    for text in (f"0::{path}\n", f"4:memory:{path}\n0::/\n"):
        with pytest.raises(WorkloadAttestationError, match="not where the kubelet"):
            parse_cgroups(text)


def test_a_nested_pod_path_is_refused_by_the_attestor(tmp_path: Path) -> None:
    write_proc(tmp_path, 42, f"0::/user.slice/user-1000.slice/user@1000.service/{_POD_SCOPE}\n")

    def no_kubelet() -> list[Any]:
        raise AssertionError("the kubelet must not be asked")

    with pytest.raises(WorkloadAttestationError, match="not where the kubelet"):
        K8sAttestor(proc_root=tmp_path, pods=no_kubelet).attest(ProcessInfo(42, 1000, 1000))


@pytest.mark.parametrize(("roots", "path", "found"), [
    # kind: the kubelet's --cgroup-root is /kubelet, so its pods live under
    # kubelet.slice/kubelet-kubepods.slice, inside the node container's cgroup.
    (["/system.slice/docker-x.scope/kubelet.slice/kubelet-kubepods.slice"],
     f"/system.slice/docker-x.scope/kubelet.slice/kubelet-kubepods.slice/"
     f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{_U}.slice/"
     f"cri-containerd-{_C}.scope", True),
    (["/kubelet.slice/kubelet-kubepods.slice"],
     f"/../../kubelet-kubepods-besteffort-pod{_U}.slice/cri-containerd-{_C}.scope", True),
    (["/custom/kubepods"], f"/custom/kubepods/pod{POD_UID}/{_C}", True),
    # Another root configured: the default one is no longer trusted.
    (["/custom/kubepods"], f"/kubepods/pod{POD_UID}/{_C}", False),
    (["/kubelet.slice/kubelet-kubepods.slice"], f"/kubepods.slice/{_POD_SCOPE}", False),
])
def test_configured_roots(roots: list[str], path: str, found: bool) -> None:
    cfg = parse_config({"cgroup_roots": roots})
    if found:
        assert parse_cgroups(f"0::{path}\n", roots=cfg.cgroup_roots) == PodContainer(
            POD_UID, CONTAINER_ID)
    else:
        with pytest.raises(WorkloadAttestationError, match="not where the kubelet"):
            parse_cgroups(f"0::{path}\n", roots=cfg.cgroup_roots)


@pytest.mark.parametrize(("roots", "message"), [
    ("/kubepods", "workload_attestors.k8s.cgroup_roots must be a list of absolute cgroup paths"),
    ([], "workload_attestors.k8s.cgroup_roots must be a list of absolute cgroup paths"),
    (["kubepods"], "workload_attestors.k8s.cgroup_roots: 'kubepods' is not an absolute"),
    (["/a/../kubepods"],
     "workload_attestors.k8s.cgroup_roots: '/a/../kubepods' is not an absolute"),
    (["/"], "workload_attestors.k8s.cgroup_roots: '/' is not an absolute"),
])
def test_cgroup_roots_errors(roots: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_config({"cgroup_roots": roots})
    assert str(info.value).startswith(message)
