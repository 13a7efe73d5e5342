"""Whole stacks for end-to-end tests: a real ``sigil-server`` and ``sigil-agent``.

Both run as subprocesses of the installed console scripts, on real sockets (TCP
for the agent API, Unix sockets for the admin and Workload APIs), with SQLite in
a temporary data directory, exactly as an operator would start them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.k8s_api import FakeKubeApi, node_object, pod_object

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; run the tests through `python3 dev.py test`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Stack:
    """A running server and agent, and helpers to drive them from a test."""

    root: Path
    trust_domain: str
    port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agent_id: str = ""
    server_config: str = ""
    """TOML for ``sigil-server run --config`` (empty: no config file, flags only)."""
    agent_config: str = ""
    """More TOML for the agent's ``--config`` file (it always sets ``sync_interval``)."""

    @property
    def admin_socket(self) -> Path:
        return self.root / "srv" / "admin.sock"

    @property
    def agent_socket(self) -> Path:
        return self.root / "ag-sock" / "api.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.agent_socket}"

    def server_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [_tool("sigil-server"), *args, "--socket-path", str(self.admin_socket)],
            capture_output=True, text=True, timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"sigil-server {' '.join(args)} failed: {proc.stderr}")
        return proc

    def agent_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [_tool("sigil-agent"), *args, "--socket-path", str(self.agent_socket)],
            capture_output=True, text=True, timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"sigil-agent {' '.join(args)} failed: {proc.stderr}")
        return proc

    def create_entry(self, spiffe_id: str, *selectors: str, extra: tuple[str, ...] = ()) -> dict:  # type: ignore[type-arg]
        args = ["entry", "create", "--spiffe-id", spiffe_id, "--parent-id", self.agent_id]
        for sel in selectors:
            args += ["--selector", sel]
        out = self.server_cli(*args, *extra, "--output", "json").stdout
        return json.loads(out)  # type: ignore[no-any-return]

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def stop(self, name: str) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"{name} ignored SIGTERM for 15s") from None
        return proc.returncode

    def start_server(self) -> None:
        config: list[str] = []
        if self.server_config:
            (self.root / "server.toml").write_text(self.server_config)
            config = ["--config", str(self.root / "server.toml")]
        self.start("server", [
            _tool("sigil-server"), "run", *config, "--trust-domain", self.trust_domain,
            "--data-dir", str(self.root / "srv"), "--bind-address", f"127.0.0.1:{self.port}",
            "--socket-path", str(self.admin_socket), "--health-address", "127.0.0.1:0",
        ])
        wait_for(
            lambda: self.server_cli("healthcheck", check=False).returncode == 0
            or self.procs["server"].poll() is not None,
            timeout=30, what="server health",
        )
        assert self.procs["server"].poll() is None, self.log("server")

    def start_agent(self) -> None:
        token = json.loads(self.server_cli("token", "generate", "--output", "json").stdout)
        self.agent_id = token["agent_id"]
        (self.root / "bundle.pem").write_text(
            self.server_cli("bundle", "show", "--format", "pem").stdout
        )
        (self.root / "agent.toml").write_text('sync_interval = "1s"\n' + self.agent_config)
        self.run_agent(self.root / "agent.toml", "--join-token", token["token"],
                       "--trust-bundle", str(self.root / "bundle.pem"))

    def start_psat_agent(self, config: str = "") -> None:
        """Start an agent that attests with k8s_psat (see :func:`psat_stack`).

        ``config`` goes at the top of its agent.toml (keys, then tables).
        """
        (self.root / "bundle.pem").write_text(
            self.server_cli("bundle", "show", "--format", "pem").stdout)
        top, _, tables = config.partition("\n[")
        (self.root / "agent.toml").write_text(f"""
sync_interval = "1s"
{top}
trust_bundle_path = "{self.root / 'bundle.pem'}"

[node_attestor.k8s_psat]
cluster = "demo"
token_path = "{self.root / 'psat'}"
{"[" + tables if tables else ""}""")
        self.run_agent(self.root / "agent.toml")

    def run_agent(self, config: Path, *extra: str) -> None:
        """Start ``sigil-agent run`` with this config file and wait for its socket."""
        self.agent_socket.parent.mkdir(exist_ok=True)
        self.start("agent", [
            _tool("sigil-agent"), "run", "--config", str(config),
            "--trust-domain", self.trust_domain,
            "--server-address", f"127.0.0.1:{self.port}", "--data-dir", str(self.root / "ag"),
            "--socket-path", str(self.agent_socket), *extra,
        ])
        wait_for(
            lambda: self.agent_socket.exists() or self.procs["agent"].poll() is not None,
            timeout=30, what="agent socket",
        )
        assert self.procs["agent"].poll() is None, self.log("agent")


def psat_stack(kube: FakeKubeApi, root: Path, *, trust_domain: str, node_name: str,
               node_uid: str, server_config: str = "") -> Stack:
    """A stack whose server attests agents with k8s_psat against the fake API.

    Puts the node and the agent's pod, writes the server's API token to
    ``root/api-token`` and the agent's projected token to ``root/psat`` (cluster
    ``demo``, service account ``sigil:sigil-agent``). Not started yet.
    """
    node = kube.put(node_object(node_name, uid=node_uid))
    agent_pod = kube.put(pod_object(f"sigil-agent-{node_name}", "sigil", node_name=node_name,
                                    service_account="sigil-agent"))
    (root / "api-token").write_text(kube.token or "")
    (root / "psat").write_text(kube.issue_token(
        namespace="sigil", service_account="sigil-agent", pod=agent_pod, node=node))
    return Stack(root=root, trust_domain=trust_domain, port=free_port(), server_config=f"""
[node_attestors.k8s_psat.clusters.demo]
service_account_allow_list = ["sigil:sigil-agent"]
api_server = "{kube.url}"
token_path = "{root / 'api-token'}"
{server_config}""")


@contextlib.contextmanager
def running_stack(*, server_config: str = "", trust_domain: str = "e2e.sigil.test",
                  agent_config: str = "") -> Iterator[Stack]:
    """A started server and agent, stopped (and checked to exit 0) on the way out.

    Args:
        server_config: TOML for the server's ``--config`` file; empty for none.
        trust_domain: the stack's trust domain (federation tests run two).
        agent_config: TOML added to the agent's config file.
    """
    # Unix socket paths are limited to ~100 bytes, so keep the root short.
    root = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))
    st = Stack(root=root, trust_domain=trust_domain, port=free_port(),
               server_config=server_config, agent_config=agent_config)
    try:
        st.start_server()
        st.start_agent()
        yield st
    finally:
        codes = {name: st.stop(name) for name in list(st.procs)}
        shutil.rmtree(root, ignore_errors=True)
    # A clean shutdown on SIGTERM is part of the contract.
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture
def stack() -> Iterator[Stack]:
    with running_stack() as st:
        yield st


StackFactory = Callable[..., Stack]
"""``make_stack(trust_domain, *, server_config="")``: one more running stack."""


@pytest.fixture
def make_stack() -> Iterator[StackFactory]:
    """Start any number of stacks, each with its own trust domain, ports and
    directories; all are stopped (and checked to exit 0) when the test ends."""
    with contextlib.ExitStack() as stacks:
        def make(trust_domain: str, *, server_config: str = "") -> Stack:
            return stacks.enter_context(
                running_stack(server_config=server_config, trust_domain=trust_domain))

        yield make


@pytest.fixture
def uid_selector() -> str:
    return f"unix:uid:{os.getuid()}"
