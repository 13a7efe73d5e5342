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
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jwt  # noqa: E402
from spiffe import WorkloadApiClient  # noqa: E402
from spiffe.workloadapi.errors import FetchX509SvidError, ValidateJwtSvidError  # noqa: E402

from bench.server import SigilProcess, sigil_agent, sigil_server  # noqa: E402

TD = "bench.sigil.test"
WORKLOAD = f"spiffe://{TD}/bench"
AUDIENCE = f"spiffe://{TD}/verifier"
POLL = 0.05


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


def x509_trial(srv: SigilProcess, client: WorkloadApiClient, interval: float) -> float:
    current = serial(client)
    assert current is not None
    srv.cli("svid", "revoke", "--serial", format(current, "x"))
    return until(lambda: serial(client) not in (None, current), 10 * interval + 10)


def jwt_trial(srv: SigilProcess, client: WorkloadApiClient, interval: float) -> float:
    token = client.fetch_jwt_svid(audience={AUDIENCE}).token
    client.validate_jwt_svid(token, AUDIENCE)
    srv.cli("svid", "revoke", "--jti",
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
    with (sigil_server(trust_domain=TD) as srv,
          sigil_agent(srv, trust_domain=TD,
                      config=f'sync_interval = "{args.sync_interval:g}s"\n') as agent):
        srv.cli("entry", "create", "--spiffe-id", WORKLOAD, "--parent-id", agent.agent_id,
                "--selector", f"unix:uid:{os.getuid()}")
        client = WorkloadApiClient(socket_path=agent.endpoint)
        try:
            until(lambda: serial(client) is not None, 60)
            x509_times, jwt_times = [], []
            for _ in range(args.trials):
                x509_times.append(x509_trial(srv, client, args.sync_interval))
                jwt_times.append(jwt_trial(srv, client, args.sync_interval))
        finally:
            client.close()
    print(f"sync_interval {args.sync_interval:g}s, {args.trials} trials")
    report("X.509 serial revoked -> new SVID served", x509_times, args.sync_interval)
    report("JWT jti revoked -> ValidateJWTSVID refuses", jwt_times, args.sync_interval)


if __name__ == "__main__":
    main()
