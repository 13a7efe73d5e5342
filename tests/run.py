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


SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")


def ensure_softhsm() -> None:
    """Install Debian's softhsm2 (the PKCS#11 module the key manager tests use).

    Only when it is missing, apt-get exists and we run as root; otherwise the
    PKCS#11 tests skip with a message (and fail in CI, where CI=true).
    """
    if SOFTHSM_MODULE.exists() or not Path("/usr/bin/apt-get").exists():
        return
    if os.geteuid() != 0:
        print("==> softhsm2 missing and not root: PKCS#11 tests will skip", flush=True)
        return
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("==> installing softhsm2 (apt-get)", flush=True)
    if (subprocess.run(["apt-get", "update", "-q"], env=env, check=False, **quiet).returncode
            or subprocess.run(["apt-get", "install", "-y", "-q", "softhsm2"], env=env,
                              check=False, **quiet).returncode):
        print("==> apt-get install softhsm2 failed: PKCS#11 tests will skip "
              "(fail in CI)", flush=True)


NGINX = Path("/usr/sbin/nginx")
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def _nginx_stream_missing() -> bool:
    """True when nginx lacks the stream module (bench/proxy.py's reference needs it)."""
    if STREAM_MODULE.exists():
        return False
    out = subprocess.run([str(NGINX), "-V"], capture_output=True, text=True, check=False).stderr
    return "--with-stream=dynamic" in out or "--with-stream" not in out


def ensure_nginx() -> list[str]:
    """Install Debian's nginx (light, else full) and its stream module.

    nginx is for the helper-mode mTLS test; the stream module for the reference
    proxy of bench/proxy.py. Only when missing, apt-get exists and we run as root.
    Returns what is still missing: in CI (CI=true) that fails the run loudly;
    elsewhere the test skips with a message.
    """
    if NGINX.exists() and not _nginx_stream_missing():
        return []
    from tests.support.require import in_ci as ci

    in_ci = ci()
    if Path("/usr/bin/apt-get").exists() and os.geteuid() == 0:
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT}
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print("==> installing nginx and its stream module (apt-get)", flush=True)
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, **quiet)
        for package in ("nginx-light", "nginx"):
            if NGINX.exists():
                break
            subprocess.run(["apt-get", "install", "-y", "-q", package], env=env,
                           check=False, **quiet)
        if NGINX.exists() and _nginx_stream_missing():
            subprocess.run(["apt-get", "install", "-y", "-q", "libnginx-mod-stream"], env=env,
                           check=False, **quiet)
        if NGINX.exists():
            if _nginx_stream_missing():
                print("==> WARNING: nginx has no stream module; bench/proxy.py cannot run its "
                      "reference", flush=True)
            return []
    why = f"nginx is not installed ({NGINX}) and could not be installed with apt-get as root"
    if in_ci:
        print(f"==> ERROR: CI requires it: {why}", flush=True)
        return ["nginx"]
    print(f"==> WARNING: {why}; the helper-mode nginx test will skip", flush=True)
    return []


def ensure_databases() -> list[str]:
    """Make PostgreSQL and MariaDB reachable, starting them with this machine's commands.

    Returns the servers still unreachable. In CI (CI=true) that is a failure, said
    loudly with what was tried; elsewhere their tests skip with a message.
    """
    from tests import databases

    missing = databases.ensure_servers()
    for why in missing.values():
        if databases.in_ci():
            print(f"==> ERROR: CI requires it: {why}", flush=True)
        else:
            print(f"==> WARNING: {why}; its tests will skip (see docs/development.md)",
                  flush=True)
    return list(missing) if databases.in_ci() else []


def main(argv: list[str]) -> int:
    failed: list[str] = []
    ensure_softhsm()
    failed += ensure_nginx()
    failed += [f"database {name}" for name in ensure_databases()]
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
