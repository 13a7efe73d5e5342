"""The whole test suite in one command: lint, types, then pytest on every core.

Run it through ``python3 dev.py test`` (which installs what it needs first);
``.ci/run`` calls exactly that. Extra arguments go to pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(title: str, cmd: list[str]) -> int:
    print(f"==> {title}: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    failed: list[str] = []
    if not argv:
        if step("ruff", [sys.executable, "-m", "ruff", "check", "."]) != 0:
            failed.append("ruff")
        if step("mypy --strict", [sys.executable, "-m", "mypy"]) != 0:
            failed.append("mypy")
    workers = os.environ.get("SIGIL_TEST_WORKERS", "auto")
    rc = step("pytest", [sys.executable, "-m", "pytest", "-n", workers, *argv])
    if rc != 0:
        failed.append("pytest")
    if failed:
        print(f"==> FAILED: {', '.join(failed)}", flush=True)
        return 1
    print("==> all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
