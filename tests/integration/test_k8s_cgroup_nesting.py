"""k8s workload attestor on real cgroups: a delegated subtree cannot pose as a pod.

A user to whom systemd delegates a cgroup v2 subtree (``Delegate=yes``) may create
any cgroup below it and move its own processes there. Such a user creating
``.../kubepods-besteffort-pod<victim uid>.slice/cri-containerd-<victim id>.scope``
under its subtree must not be attested as the victim's container; a process the
kubelet's own hierarchy holds still is. Needs root (to delegate a subtree to an
unprivileged user and to create the kubelet-like hierarchy); in CI that is required.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from attestation.workload import ProcessInfo, WorkloadAttestationError
from attestation.workload.k8s import K8sAttestor
from tests.support.k8s_api import ContainerSpec, pod_object
from tests.support.require import require, require_root

NOBODY = 65534


def _cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype == "cgroup2":
                return Path(fields[4])
    return None


def _require_root_and_cgroup2() -> Path:
    require_root("(delegates a cgroup subtree, creates kubelet-like cgroups)")
    mount = _cgroup2_mount()
    require(mount is not None, "needs a cgroup v2 hierarchy")
    assert mount is not None
    return mount


@pytest.fixture
def cgroup2() -> Iterator[tuple[Path, list[Path]]]:
    """The cgroup v2 mount, and a list the test appends created cgroups to (removed
    afterwards, deepest first, once their processes are gone)."""
    mount = _require_root_and_cgroup2()
    created: list[Path] = []
    yield mount, created
    for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # shared parents another test may use
            path.rmdir()


def _mkdirs(mount: Path, relative: str, created: list[Path]) -> Path:
    path = mount
    for part in relative.strip("/").split("/"):
        path = path / part
        if not path.exists():
            path.mkdir()
            created.append(path)
    return path


def _victim(pod_uid: str, container_id: str) -> list[Mapping[str, Any]]:
    return [pod_object(
        "payments-api", "payments", uid=pod_uid, node_name="node-a", service_account="api",
        containers=[ContainerSpec("api", "registry.example/api:1", id=container_id,
                                  runtime="containerd")],
    )]


def _pod_path(pod_uid: str, container_id: str) -> str:
    u = pod_uid.replace("-", "_")
    return (f"kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/"
            f"cri-containerd-{container_id}.scope")


# Runs as the unprivileged user, in the cgroup delegated to it: creates the
# victim's pod and container cgroups below it and moves itself there.
_IMPOSTOR = r"""
import os, sys, time
base, nested = sys.argv[1], sys.argv[2]
path = base
for part in nested.split("/"):
    path = os.path.join(path, part)
    os.mkdir(path)
with open(os.path.join(path, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
print("moved", flush=True)
time.sleep(60)
"""


def _enter_as_nobody(cgroup: Path) -> None:
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_pod_cgroups_under_a_delegated_subtree_are_refused(
    cgroup2: tuple[Path, list[Path]],
) -> None:
    mount, created = cgroup2
    pod_uid, container_id = str(uuid.uuid4()), uuid.uuid4().hex * 2
    # What systemd does for user@1000.service with Delegate=yes: a cgroup owned by
    # the user, with its own processes moved in by root.
    delegated = _mkdirs(
        mount, f"sigil-test-{uuid.uuid4().hex[:8]}/user.slice/user@{NOBODY}.service", created)
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(delegated / name if name else delegated, NOBODY, NOBODY)
    impostor = subprocess.Popen(
        [sys.executable, "-c", _IMPOSTOR, str(delegated), _pod_path(pod_uid, container_id)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        # Moved into the delegated cgroup by root, then the user's own.
        preexec_fn=lambda: _enter_as_nobody(delegated),
    )
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline() == "moved\n"
        created.extend(delegated / "/".join(_pod_path(pod_uid, container_id).split("/")[:i])
                       for i in (1, 2, 3))
        cgroup = Path(f"/proc/{impostor.pid}/cgroup").read_text()
        assert f"cri-containerd-{container_id}.scope" in cgroup  # it is really there
        attestor = K8sAttestor(pods=lambda: _victim(pod_uid, container_id))
        with pytest.raises(WorkloadAttestationError, match="not where the kubelet"):
            attestor.attest(ProcessInfo(impostor.pid, NOBODY, NOBODY))
    finally:
        impostor.kill()
        impostor.wait()


def test_a_process_in_the_kubelet_hierarchy_is_attested(
    cgroup2: tuple[Path, list[Path]],
) -> None:
    mount, created = cgroup2
    pod_uid, container_id = str(uuid.uuid4()), uuid.uuid4().hex * 2
    container = _mkdirs(mount, "kubepods.slice/" + _pod_path(pod_uid, container_id), created)
    workload = subprocess.Popen(
        ["sleep", "60"],
        preexec_fn=lambda: (container / "cgroup.procs").write_text(str(os.getpid())),
    )
    try:
        attestor = K8sAttestor(pods=lambda: _victim(pod_uid, container_id))
        selectors = {str(s) for s in attestor.attest(ProcessInfo(workload.pid, 0, 0))}
        assert {f"k8s:pod-uid:{pod_uid}", "k8s:ns:payments", "k8s:sa:api",
                "k8s:container-name:api"} <= selectors
    finally:
        workload.kill()
        workload.wait()
