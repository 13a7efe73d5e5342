"""Time from ``sigil-server svid revoke`` to the agent acting on it.

Usage:
    python bench/revocation.py [--sync-interval 5] [--trials 5]

Starts a real ``sigil-server`` and ``sigil-agent`` (SQLite, join token) with the
given agent sync interval; this process is the workload (py-spiffe). Each trial:

1. X.509: revoke the serial of the workload's current X.509-SVID, then fetch until
   the agent serves another serial (it drops the revoked one at its next sync and
   signs a new one in the same tick).
2. JWT: revoke the ``jti`` of a fetched JWT-SVID, then call ValidateJWTSVID until
   the agent refuses it.

The clock starts when the revoke command has returned (the revocation is
committed). Prints each time, the median and the maximum, in seconds and in sync
intervals (goal: < 2 sync intervals). Fetch polls every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on sys.path, and bench/jwt.py would shadow PyJWT.
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]

import jwt  # noqa: E402
from spiffe import WorkloadApiClient  # noqa: E402
from spiffe.workloadapi.errors import FetchX509SvidError, ValidateJwtSvidError  # noqa: E402

from tests.e2e.conftest import Stack, free_port  # noqa: E402

TD = "bench.sigil.test"
WORKLOAD = f"spiffe://{TD}/bench"
AUDIENCE = f"spiffe://{TD}/verifier"
POLL = 0.05


def start(root: Path, interval: float) -> Stack:
    st = Stack(root=root, trust_domain=TD, port=free_port())
    st.start_server()
    token = json.loads(st.server_cli("token", "generate", "--output", "json").stdout)
    st.agent_id = token["agent_id"]
    (root / "bundle.pem").write_text(st.server_cli("bundle", "show", "--format", "pem").stdout)
    (root / "agent.toml").write_text(f'sync_interval = "{interval:g}s"\n')
    st.run_agent(root / "agent.toml", "--join-token", token["token"],
                 "--trust-bundle", str(root / "bundle.pem"))
    return st


def serial(client: WorkloadApiClient) -> int | None:
    try:
        [svid] = client.fetch_x509_context(timeout=10).x509_svids
    except FetchX509SvidError:
        return None
    return int(svid.leaf.serial_number)


def until(check: object, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(POLL)
    raise SystemExit(f"no effect within {timeout}s")


def x509_trial(st: Stack, client: WorkloadApiClient, interval: float) -> float:
    current = serial(client)
    assert current is not None
    st.server_cli("svid", "revoke", "--serial", format(current, "x"))
    return until(lambda: serial(client) not in (None, current), 10 * interval + 10)


def jwt_trial(st: Stack, client: WorkloadApiClient, interval: float) -> float:
    token = client.fetch_jwt_svid(audience={AUDIENCE}).token
    client.validate_jwt_svid(token, AUDIENCE)
    st.server_cli("svid", "revoke", "--jti",
                  jwt.decode(token, options={"verify_signature": False})["jti"])

    def refused() -> bool:
        try:
            client.validate_jwt_svid(token, AUDIENCE)
        except ValidateJwtSvidError:
            return True
        return False

    return until(refused, 10 * interval + 10)


def report(name: str, times: list[float], interval: float) -> None:
    cells = " ".join(f"{t:.2f}" for t in times)
    print(f"{name}: {cells} s; median {statistics.median(times):.2f} s, max {max(times):.2f} s"
          f" = {max(times) / interval:.2f} sync intervals")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync-interval", type=float, default=5.0)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sg-b-", dir="/tmp"))
    st = start(root, args.sync_interval)
    client = WorkloadApiClient(socket_path=st.endpoint)
    try:
        st.create_entry(WORKLOAD, f"unix:uid:{os.getuid()}")
        until(lambda: serial(client) is not None, 60)
        x509_times, jwt_times = [], []
        for _ in range(args.trials):
            x509_times.append(x509_trial(st, client, args.sync_interval))
            jwt_times.append(jwt_trial(st, client, args.sync_interval))
        print(f"sync_interval {args.sync_interval:g}s, {args.trials} trials")
        report("X.509 serial revoked -> new SVID served", x509_times, args.sync_interval)
        report("JWT jti revoked -> ValidateJWTSVID refuses", jwt_times, args.sync_interval)
    finally:
        client.close()
        for name in list(st.procs):
            st.stop(name)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
