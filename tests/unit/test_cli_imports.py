"""The CLIs start fast: importing them (``--help`` and every admin command) must not
load what only ``sigil-server run`` / ``sigil-agent run`` needs.

Each check runs in a fresh interpreter, since this test process has long imported
everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("sqlalchemy", "kubernetes", "apscheduler", "prometheus_client")


def _loaded_after(statement: str, modules: tuple[str, ...] = HEAVY) -> set[str]:
    code = (
        f"import json, sys\n{statement}\n"
        f"print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement",
                         ["import ca.cli", "import agent.cli", "import ca.config.server"])
def test_cli_imports_nothing_heavy(statement: str) -> None:
    assert _loaded_after(statement) == set()


def test_loading_the_server_config_does_not_open_the_datastore(tmp_path: Path) -> None:
    # Checking database_url parses it with SQLAlchemy's URL parser, but neither the
    # datastore (models, repository) nor the metrics are loaded before `run` needs them.
    statement = (
        "from ca.config.server import load_config\n"
        f"load_config(overrides={{'trust_domain': 'example.org', 'data_dir': {str(tmp_path)!r}}})"
    )
    modules = ("ca.datastore", "prometheus_client", "kubernetes", "apscheduler")
    assert _loaded_after(statement, modules) == set()
