#!/usr/bin/env python3
"""Sigil's two front doors: ``python3 dev.py demo`` and ``python3 dev.py test``.

Both need nothing but Python 3.11+: they create ``.venv`` next to this file,
install Sigil with its test dependencies into it (again only when pyproject.toml
changed), and then run, inside that environment:

- ``demo``: a server and an agent on the embedded SQLite default, two workloads
  that get SVIDs over the Workload API and talk mutual TLS (deploy/demo.py).
- ``test``: the whole test suite (ruff, mypy and pytest, in parallel on all cores).

Extra arguments after ``test`` go to pytest, e.g. ``python3 dev.py test -k bundle``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".sigil-installed"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_environment() -> Path:
    """Create the virtual environment and install Sigil into it when needed."""
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py may run on an older python3)
        sys.exit(f"Sigil needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    py = venv_python()
    if py.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return py
    if not py.exists():
        print(f"==> creating a virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(VENV)
    print("==> installing Sigil and its test dependencies (first run only)", flush=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    for args in (["--upgrade", "pip"], ["-e", f"{ROOT}[test]"]):
        # Keep pip's chatter out of the way; show it only when it fails.
        done = subprocess.run([*pip, *args], capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            sys.exit(f"pip install {' '.join(args)} failed (exit {done.returncode})")
    STAMP.write_text(wanted + "\n")
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    py = ensure_environment()
    env = dict(os.environ)
    # The venv's bin first, so tests and the demo find sigil-server / sigil-agent.
    env["PATH"] = str(py.parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    if argv[0] == "demo":
        cmd = [str(py), str(ROOT / "deploy" / "demo.py"), *argv[1:]]
    else:
        cmd = [str(py), "-m", "tests.run", *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
