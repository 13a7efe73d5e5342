"""deploy/grafana/sigil.json: valid JSON, and every series its queries name is one
the server (ca/metrics.py) or the agent (agent/metrics.py) exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest

from agent import metrics as agent_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "sigil.json"
_SUFFIXES = {"Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count"),
             "GaugeMetricFamily": ("",)}


def server_series() -> set[str]:
    """Series names the server exports, from the metric definitions in ca/metrics.py."""
    text = (ROOT / "ca" / "metrics.py").read_text()
    found = re.findall(r"(Counter|Histogram|GaugeMetricFamily)\(\s*\"(sigil_[a-z0-9_]+)\"", text)
    assert len(found) >= 10, "ca/metrics.py changed shape: too few metrics found"
    return {name + suffix for kind, name in found for suffix in _SUFFIXES[kind]}


def agent_series() -> set[str]:
    """Series names the agent's /metrics shows, from a registry like the agent's."""
    agent_metrics.count_rotation("workload")
    agent_metrics.count_call("FetchX509SVID")
    agent_metrics.count_denial("no_identity")
    reg = agent_metrics.registry(lambda: agent_metrics.State(
        x509_svids=1, entries=1, agent_svid_expires_at=1.0, healthy=True))
    text = generate_latest(reg).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert names >= set(agent_metrics.METRIC_NAMES)
    return names


def queried_series() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    return {n for e in exprs for n in re.findall(r"\bsigil_[a-z0-9_]+", e)}


def test_every_queried_series_exists() -> None:
    unknown = queried_series() - server_series() - agent_series()
    assert unknown == set(), f"the dashboard queries series nothing exports: {unknown}"


def test_the_dashboard_covers_both_programs() -> None:
    queried = queried_series()
    assert queried & server_series() and queried & agent_series()
    assert {"sigil_agent_workload_api_denials_total", "sigil_agent_svids_held",
            "sigil_svids_issued_total"} <= queried
