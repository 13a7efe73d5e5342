"""Issue 14: the agent's health and metrics listener, against a real server and a
real ``sigil-agent run`` process: /live, /ready, /metrics with SVIDs held,
rotations, Workload API calls and denials by reason."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from agent.metrics import METRIC_NAMES
from tests.integration.conftest import RunningServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening (yet)


def _wait(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _value(metrics: str, series: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_agent_health_and_metrics(sigil_server: RunningServer, tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    agent_bin, server_cli = str(bindir / "sigil-agent"), sigil_server.cli
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(server_cli("bundle", "show", "--format", "pem").stdout)
    token = server_cli("token", "generate").stdout.strip()
    health = f"127.0.0.1:{_free_port()}"
    sock = tmp_path / "s" / "api.sock"
    proc = subprocess.Popen(
        [agent_bin, "run", "--trust-domain", sigil_server.trust_domain, "--server-address",
         sigil_server.address, "--join-token", token, "--trust-bundle", str(bundle),
         "--data-dir", str(tmp_path / "data"), "--socket-path", str(sock),
         "--health-address", health],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://{health}"
        _wait(lambda: _get(base + "/live")[0] == 200, "/live")
        _wait(lambda: _get(base + "/ready")[0] == 200, "/ready")
        agent_id = f"spiffe://{sigil_server.trust_domain}/sigil/agent/join_token/" \
                   f"{token.split('.')[0]}"

        def fetch() -> subprocess.CompletedProcess[str]:
            return subprocess.run([agent_bin, "api", "fetch", "x509", "--output", "json",
                                   "--socket-path", str(sock)],
                                  capture_output=True, text=True, timeout=60)

        denied = fetch()  # no entry for this uid yet
        assert denied.returncode == 1
        _, metrics = _get(base + "/metrics")
        assert _value(metrics, 'sigil_agent_workload_api_denials_total{reason="no_identity"}') \
            >= 1
        created = server_cli("entry", "create", "--spiffe-id",
                             f"spiffe://{sigil_server.trust_domain}/metrics", "--parent-id",
                             agent_id, "--selector", f"unix:uid:{os.getuid()}")
        assert created.returncode == 0, created.stderr
        _wait(lambda: fetch().returncode == 0, "the workload's SVID")
        status, metrics = _get(base + "/metrics")
        assert status == 200
        names = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines()
                 if line and not line.startswith("#")}
        assert names >= {n for n in METRIC_NAMES if not n.endswith("_created")}, names
        assert _value(metrics, "sigil_agent_svids_held") == 1
        assert _value(metrics, "sigil_agent_healthy") == 1
        assert _value(metrics, 'sigil_agent_svid_rotations_total{type="workload"}') >= 1
        assert _value(metrics,
                      'sigil_agent_workload_api_calls_total{method="FetchX509SVID"}') >= 2
        assert _get(base + "/nope")[0] == 404
        assert json.loads(server_cli("entry", "show", "--output", "json").stdout)["entries"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"health listening health_address={health}" in err
    assert token.split(".")[1] not in err
