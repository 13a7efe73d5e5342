"""Kubernetes end to end: k8s_psat, the k8s workload attestor and the controller.

A real ``sigil-server run`` (k8s_psat cluster ``demo`` and the registration
controller, both against the Kubernetes API test server) and a real ``sigil-agent
run`` attesting with a projected token the test API server issued, with the ``k8s``
workload attestor reading a fixture ``/proc`` root (the workload's real PID mapped
to a container of a pod) and the fake kubelet's ``/pods``. No entry is created by
hand: an IdentityTemplate does it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import _tool, psat_stack, wait_for
from tests.support.cgroups import write_proc
from tests.support.k8s_api import (
    ContainerSpec,
    FakeKubeApi,
    identity_template_object,
    namespace_object,
    pod_object,
)
from tests.support.kubelet import FakeKubelet

pytestmark = pytest.mark.slow

TD = "e2e.sigil.test"
NODE_UID = "5b1f7c1e-0e6f-4f55-9d0a-6a4f2f0c0001"
POD_UID = "7a6b5c4d-1111-4222-8333-944455556666"


@pytest.fixture
def root() -> Iterator[Path]:
    # Unix socket paths are limited to ~100 bytes, so keep the root short.
    path = Path(tempfile.mkdtemp(prefix="sk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_pod_gets_its_identity_from_a_template_and_loses_it_with_the_pod(root: Path) -> None:
    with FakeKubeApi(bookmark_interval=0.5) as kube, FakeKubelet() as kubelet:
        kube.put(namespace_object("payments", labels={"sigil.dev/identity": "enabled"}))
        kube.put(identity_template_object("default", {
            "namespaceSelector": {"matchLabels": {"sigil.dev/identity": "enabled"}}}))
        st = psat_stack(kube, root, trust_domain=TD, node_name="node-a", node_uid=NODE_UID,
                        server_config='\n[kubernetes.controller]\ncluster = "demo"\n')
        workload: subprocess.Popen[str] | None = None
        try:
            st.start_server()
            st.start_psat_agent(f"""
[workload_attestors.k8s]
kubelet_host = "127.0.0.1"
kubelet_read_only_port = {kubelet.port}
proc_root = "{root / 'proc'}"
""")
            agents = json.loads(st.server_cli("agent", "list", "--output", "json").stdout)["agents"]
            agent_id = f"spiffe://{TD}/sigil/agent/k8s_psat/demo/{NODE_UID}"
            assert [a["id"] for a in agents] == [agent_id], agents

            # The workload: waits for a line on stdin (so that its /proc fixture is in
            # place first), then streams its X.509-SVIDs from the agent.
            workload = subprocess.Popen(
                ["sh", "-c", 'read go; exec "$0" api watch --output json --socket-path "$1"',
                 _tool("sigil-agent"), str(st.agent_socket)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            container = ContainerSpec("app", "registry.example/app:1.0")
            pod = pod_object("api-7f9c", "payments", node_name="node-a", uid=POD_UID,
                             service_account="api", containers=[container])
            kubelet.pods = [pod]
            write_proc(root / "proc", workload.pid,
                       f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
                       f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{container.id}"
                       ".scope\n")
            kube.put(pod)

            # The controller makes the entry; no one registers anything by hand.
            def entries() -> list[dict[str, object]]:
                out = st.server_cli("entry", "show", "--output", "json").stdout
                return json.loads(out)["entries"]  # type: ignore[no-any-return]

            wait_for(lambda: len(entries()) == 1, timeout=30, what="the pod's entry")
            [entry] = entries()
            assert entry["spiffe_id"] == f"spiffe://{TD}/ns/payments/sa/api"
            assert entry["parent_id"] == agent_id
            assert entry["selectors"] == [{"type": "k8s", "value": f"pod-uid:{POD_UID}"}]

            assert workload.stdin is not None and workload.stdout is not None
            workload.stdin.write("go\n")
            workload.stdin.flush()
            first = json.loads(workload.stdout.readline() or "{}")
            assert [s["spiffe_id"] for s in first.get("svids", [])] == [
                f"spiffe://{TD}/ns/payments/sa/api"], (first, st.log("agent"))

            # The pod goes: the entry goes, and the workload's stream ends.
            kube.delete("pods", "api-7f9c", "payments")
            wait_for(lambda: entries() == [], timeout=30, what="the entry to go")
            try:
                rest, err = workload.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                workload.kill()
                raise AssertionError("the workload's stream did not end") from None
            assert (workload.returncode, err) == (
                1, "Error: FetchX509SVID stream ended: PERMISSION_DENIED: no identity issued\n")
            assert rest == ""
        finally:
            if workload is not None and workload.poll() is None:
                workload.kill()
                workload.wait()
            codes = {name: st.stop(name) for name in list(st.procs)}
        assert codes == {"server": 0, "agent": 0}, (st.log("server"), st.log("agent"))
        assert "Traceback" not in st.log("server"), st.log("server")
