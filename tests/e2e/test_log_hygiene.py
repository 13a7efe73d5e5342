"""No key or token in any log line, at debug level, over a whole flow; JSON logs parse.

Server and agent run as processes with ``log_level = debug`` and ``log_format =
json``; the flow covers join token generation, node attestation, entry creation,
X.509-SVID issuance and a JWT-SVID minted for a workload. Then every line both
processes wrote is checked: valid JSON, one event per line, and none carries the
join token's secret, a PEM private key marker, or the JWT-SVID.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack, _tool, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

AUDIENCE = "spiffe://logs.sigil.test/db"


class DebugStack(Stack):
    """The e2e stack with both processes at debug level, logging JSON."""

    token: str = ""

    def start_server(self) -> None:
        self.start("server", [
            _tool("sigil-server"), "run", "--trust-domain", self.trust_domain,
            "--data-dir", str(self.root / "srv"), "--bind-address", f"127.0.0.1:{self.port}",
            "--socket-path", str(self.admin_socket), "--health-address", "127.0.0.1:0",
            "--log-level", "debug", "--log-format", "json",
        ])
        wait_for(lambda: self.server_cli("healthcheck", check=False).returncode == 0
                 or self.procs["server"].poll() is not None, timeout=30, what="server health")
        assert self.procs["server"].poll() is None, self.log("server")

    def start_agent(self) -> None:
        token = json.loads(self.server_cli("token", "generate", "--output", "json").stdout)
        self.agent_id, self.token = token["agent_id"], token["token"]
        (self.root / "bundle.pem").write_text(
            self.server_cli("bundle", "show", "--format", "pem").stdout)
        (self.root / "agent.toml").write_text(
            'sync_interval = "1s"\nlog_level = "debug"\nlog_format = "json"\n')
        self.agent_socket.parent.mkdir(exist_ok=True)
        self.start("agent", [
            _tool("sigil-agent"), "run", "--config", str(self.root / "agent.toml"),
            "--trust-domain", self.trust_domain,
            "--server-address", f"127.0.0.1:{self.port}", "--data-dir", str(self.root / "ag"),
            "--socket-path", str(self.agent_socket), "--join-token", self.token,
            "--trust-bundle", str(self.root / "bundle.pem"),
        ])
        wait_for(lambda: self.agent_socket.exists() or self.procs["agent"].poll() is not None,
                 timeout=30, what="agent socket")
        assert self.procs["agent"].poll() is None, self.log("agent")


def test_no_secret_in_any_log_line_and_json_lines_parse() -> None:
    root = Path(tempfile.mkdtemp(prefix="sgl-", dir="/tmp"))
    st = DebugStack(root=root, trust_domain="logs.sigil.test", port=free_port())
    try:
        st.start_server()
        st.start_agent()
        st.create_entry("spiffe://logs.sigil.test/web", f"unix:uid:{os.getuid()}")

        def fetched() -> bool:
            return st.agent_cli("api", "fetch", "x509", "--write", str(root / "svid"),
                                check=False).returncode == 0

        wait_for(fetched, timeout=30, what="the workload's X.509-SVID")
        key_pem = (root / "svid" / "svid.key").read_text()
        assert "PRIVATE KEY" in key_pem
        jwt_token = st.agent_cli("api", "fetch", "jwt", "--audience", AUDIENCE).stdout.strip()
        assert jwt_token.count(".") == 2
        codes = {name: st.stop(name) for name in ("agent", "server")}
        assert codes == {"agent": 0, "server": 0}

        secret = st.token.split(".", 1)[1]
        key_body = "".join(key_pem.splitlines()[1:-1])
        jwt_signature = jwt_token.rsplit(".", 1)[1]
        checked = 0
        for name in ("server", "agent"):
            lines = st.log(name).splitlines()
            assert lines, f"{name} logged nothing"
            for line in lines:
                doc = json.loads(line)  # one JSON event per line, nothing else
                assert isinstance(doc, dict) and {"level", "event"} <= doc.keys(), line
                for needle in (st.token, secret, "PRIVATE KEY", key_body[:40], jwt_token,
                               jwt_signature):
                    assert needle not in line, f"{name} logged a secret: {line}"
                checked += 1
        events = [json.loads(ln)["event"] for ln in st.log("server").splitlines()]
        assert "agent attested" in events  # the flow really went through the server
        assert checked == len(st.log("server").splitlines()) + len(st.log("agent").splitlines())
    finally:
        for name in list(st.procs):
            st.stop(name)
        shutil.rmtree(root, ignore_errors=True)
