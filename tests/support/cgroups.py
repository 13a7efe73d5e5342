"""A fixture /proc: ``/proc/<pid>/cgroup`` files in the line formats real nodes produce.

Each case is what a container's process shows on a node with that cgroup version,
kubelet cgroup driver and container runtime (copied from such nodes, UIDs and IDs
replaced). ``write_proc`` lays them out as ``<root>/<pid>/cgroup`` (and ``stat``).
"""

from __future__ import annotations

from pathlib import Path

POD_UID = "2c48913c-b29f-11e7-9350-020968147796"
CONTAINER_ID = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
_U = POD_UID.replace("-", "_")
_C = CONTAINER_ID

V1_CONTROLLERS = ("cpuset", "cpu,cpuacct", "blkio", "memory", "devices", "freezer",
                  "net_cls,net_prio", "perf_event", "hugetlb", "pids", "rdma")


def _v1(path: str) -> str:
    lines = [f"{12 - i}:{c}:{path}" for i, c in enumerate(V1_CONTROLLERS)]
    lines.append(f"1:name=systemd:{path}")
    lines.append("0::/")
    return "\n".join(lines) + "\n"


# name -> (/proc/<pid>/cgroup contents, pod UID or None, container ID or None)
CASES: dict[str, tuple[str, str | None, str | None]] = {
    "v1-cgroupfs-docker": (_v1(f"/kubepods/burstable/pod{POD_UID}/{_C}"), POD_UID, _C),
    "v1-cgroupfs-containerd-guaranteed": (_v1(f"/kubepods/pod{POD_UID}/{_C}"), POD_UID, _C),
    "v1-systemd-containerd": (_v1(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{_U}.slice/"
        f"cri-containerd-{_C}.scope"), POD_UID, _C),
    "v1-systemd-crio": (_v1(
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{_U}.slice/"
        f"crio-{_C}.scope"), POD_UID, _C),
    "v1-systemd-docker": (_v1(
        f"/kubepods.slice/kubepods-pod{_U}.slice/docker-{_C}.scope"), POD_UID, _C),
    "v2-systemd-containerd": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{_U}.slice/"
        f"cri-containerd-{_C}.scope\n", POD_UID, _C),
    "v2-systemd-crio": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{_U}.slice/"
        f"crio-{_C}.scope\n", POD_UID, _C),
    "v2-systemd-docker": (
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{_U}.slice/"
        f"docker-{_C}.scope\n", POD_UID, _C),
    "v2-cgroupfs-containerd": (f"0::/kubepods/besteffort/pod{POD_UID}/{_C}\n", POD_UID, _C),
    "v2-cgroupfs-crio": (f"0::/kubepods/burstable/pod{POD_UID}/crio-{_C}\n", POD_UID, _C),
    # The agent in its own cgroup namespace sees paths relative to its cgroup.
    "v2-cgroupns-relative": (
        f"0::/../../kubepods-besteffort-pod{_U}.slice/cri-containerd-{_C}.scope\n",
        POD_UID, _C),
    # kind (the node itself a container, the kubelet's --cgroup-root /kubelet)
    # needs workload_attestors.k8s.cgroup_roots: see tests/unit/test_k8s_cgroups.py.
    # Not in a pod.
    "v2-user-session": ("0::/user.slice/user-1000.slice/session-3.scope\n", None, None),
    "v2-system-service": ("0::/system.slice/sigil-agent.service\n", None, None),
    "v1-host-process": (_v1("/user.slice/user-1000.slice/session-2.scope"), None, None),
    "v2-docker-not-k8s": (f"0::/system.slice/docker-{_C}.scope\n", None, None),
    # CRI-O's conmon runs in the pod slice but is no container.
    "v2-crio-conmon": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{_U}.slice/"
        f"crio-conmon-{_C}.scope\n", None, None),
}


def write_proc(root: Path, pid: int, cgroup: str) -> None:
    """Create ``<root>/<pid>/cgroup`` and a plausible ``stat``."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup").write_text(cgroup)
    (d / "stat").write_text(f"{pid} (app) S 1 {pid} {pid} 0 -1 4194560 " + "0 " * 13
                            + "12345 0\n")
    (d / "status").write_text("Name:\tapp\nGroups:\t\n")
