"""Envoy's generated protos (xds-protos), ours and py-spiffe's share one process.

Each registers its files in protobuf's global descriptor pool, where a second
definition of a name fails the import (DESIGN.md, "The Workload API on the wire").
Run in fresh interpreters, in both orders, so an earlier import in this test
process cannot hide a clash.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.require import require_module

REPO = Path(__file__).resolve().parents[2]
OURS = """
from api.protos import workload_pb2
from api.protos.sigil.agent.v1 import agent_pb2
from api.protos.sigil.admin.v1 import admin_pb2
import agent.workload_api.sds
"""
ENVOY = """
from envoy.service.secret.v3 import sds_pb2, sds_pb2_grpc
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2, tls_spiffe_validator_config_pb2
"""
PY_SPIFFE = """
from spiffe._proto import workload_pb2 as spiffe_workload_pb2
"""


@pytest.mark.parametrize("order", [(OURS, ENVOY, PY_SPIFFE), (PY_SPIFFE, ENVOY, OURS),
                                   (ENVOY, PY_SPIFFE, OURS)], ids=["ours", "spiffe", "envoy"])
def test_imports_in_one_process(order: tuple[str, ...]) -> None:
    require_module("spiffe", "py-spiffe")
    code = "".join(order) + "\nprint('ok')\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("statement", ["import agent.cli", "import agent.workload_api.server",
                                       "import agent.agent"])
def test_envoys_protos_load_only_when_sds_is_served(statement: str) -> None:
    code = (f"import sys\n{statement}\n"
            "print(sorted(m for m in sys.modules if m.startswith('envoy')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
