"""X.509-SVID issuance rate through the agent API, against the raw crypto limit.

Usage:
    python bench/issuance.py [--seconds 10] [--clients N] [--batch 100] [--workers 0]

1. Raw limit: one ECDSA P-256 sign plus one verify (SHA-256) per certificate, with
   ``cryptography``, on every core at once (one process per core), for the same
   duration. That is the least work a CA must do per SVID: verify the CSR's
   signature, sign the certificate.
2. Server: ``sigil-server run`` with ``worker_processes`` (default 0: one per core),
   rate limits off, on SQLite in a temporary directory. Each client process attests
   its own agent with a join token, gets an entry parented to it, pre-generates its
   CSRs, then sends ``BatchNewX509SVID`` batches over mTLS with the agent SVID as
   client certificate, exactly as the agent does, until the time is up.

Prints both rates and their ratio (goal: >= 0.5). Client and server share the
machine's cores, as they would not in production, so the ratio is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET = "server.sigil.invalid"
TD = "bench.sigil.test"


def _raw_worker(seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    # About the size of an SVID's to-be-signed part.
    data = os.urandom(400)
    algo = ec.ECDSA(hashes.SHA256())
    n = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            sig = key.sign(data, algo)
            pub.verify(sig, data, algo)
        n += 50
    out.put(n)


def raw_rate(seconds: float, procs: int) -> float:
    """Sign+verify pairs per second on ``procs`` processes."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ps = [ctx.Process(target=_raw_worker, args=(seconds, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    total = sum(out.get() for _ in ps)
    for p in ps:
        p.join()
    return total / seconds


def _cli(bin_dir: Path, sock: Path, *args: str) -> dict[str, object]:
    proc = subprocess.run([str(bin_dir / "sigil-server"), *args, "--socket-path", str(sock),
                           "--output", "json"], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _client(address: str, roots: bytes, token: str, entry_ready: multiprocessing.Queue,  # type: ignore[type-arg]
            entry_q: multiprocessing.Queue, batch: int, seconds: float,  # type: ignore[type-arg]
            start_at: multiprocessing.Event, out: multiprocessing.Queue,  # type: ignore[type-arg]
            connections: int) -> None:
    import grpc

    from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
    from attestation.node.join_token import make_attestation
    from identity.keys import generate_private_key, private_key_to_pem
    from identity.x509svid import new_csr

    key = generate_private_key()
    kind, payload = make_attestation(token)
    opts = [("grpc.ssl_target_name_override", TARGET)]
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=opts) as ch:
        resp = agent_pb2_grpc.AgentStub(ch).AttestAgent(agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type=kind, payload=payload), csr=new_csr(key)),
            timeout=30)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    chain_pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM)
                         for d in resp.svid.cert_chain)
    entry_ready.put(resp.svid.spiffe_id)
    entry_id = entry_q.get()
    # Pre-generated: the client's own key generation must not limit the measurement.
    csrs = [new_csr(generate_private_key()) for _ in range(16)]
    request = agent_pb2.BatchNewX509SVIDRequest(params=[
        agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=csrs[i % len(csrs)])
        for i in range(batch)])
    creds = grpc.ssl_channel_credentials(roots, private_key_to_pem(key), chain_pem)
    issued = failed = 0
    # Several connections, as several agents would open: the kernel spreads
    # connections (not calls) over the server's processes.
    channels = [grpc.secure_channel(address, creds,
                                    options=[*opts, ("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    stubs = [agent_pb2_grpc.AgentStub(ch) for ch in channels]
    for stub in stubs:
        stub.BatchNewX509SVID(request, timeout=60)  # warm up the connection
    start_at.wait()
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    # One call in flight per connection; a finished one is followed by the next.
    done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()

    def send(i: int) -> None:
        future = stubs[i].BatchNewX509SVID.future(request, timeout=60)
        future.add_done_callback(lambda f: done.put((i, f)))

    for i in range(len(stubs)):
        send(i)
    in_flight = len(stubs)
    while in_flight:
        i, future = done.get()
        in_flight -= 1
        for r in future.result().results:
            if r.status.code == 0:
                issued += 1
            else:
                failed += 1
        if time.perf_counter() < deadline:
            send(i)
            in_flight += 1
    cpu = time.process_time() - cpu
    for ch in channels:
        ch.close()
    out.put((issued, failed, cpu))


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ServerRun:
    rate: float
    """SVIDs issued per second."""
    server_cpu: float
    """CPU seconds the server's processes used during the measurement."""
    client_cpu: float
    """CPU seconds the client processes used during it."""
    processes: int


def server_rate(*, seconds: float, clients: int, batch: int, workers: int,
                connections: int) -> ServerRun:
    """SVIDs per second through a real server and ``clients`` agent processes."""
    bin_dir = Path(sys.executable).parent
    root = Path(tempfile.mkdtemp(prefix="sgb-", dir="/tmp"))
    sock = root / "admin" / "admin.sock"
    cfg = root / "server.toml"
    cfg.write_text(f"worker_processes = {workers}\nhealth_address = \"\"\n"
                   "rate_limit_attestation_per_second = 0\nrate_limit_signing_per_second = 0\n"
                   'log_level = "warning"\n')
    server = subprocess.Popen(
        [str(bin_dir / "sigil-server"), "run", "--config", str(cfg), "--trust-domain", TD,
         "--data-dir", str(root / "data"), "--bind-address", "127.0.0.1:0",
         "--socket-path", str(sock), "--log-level", "info"],
        stderr=subprocess.PIPE, text=True)
    address = ""
    listening = threading.Event()
    worker_pids: list[int] = []

    def read() -> None:
        nonlocal address
        assert server.stderr is not None
        for line in server.stderr:
            if "server listening" in line:
                address = line.split("agent_api=", 1)[1].split()[0]
                listening.set()
            if "worker listening" in line:
                worker_pids.append(int(line.split(" pid=", 1)[1].split()[0]))
            if "level=error" in line or line.startswith("error"):
                sys.stderr.write(line)
        listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not listening.wait(60) or not address:
            raise SystemExit("server did not start")
        extra = (workers or (os.cpu_count() or 1)) - 1
        deadline = time.monotonic() + 60
        while len(worker_pids) < extra:  # every worker listens before any client connects
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(worker_pids)} of {extra} workers started")
            time.sleep(0.1)
        roots = subprocess.run([str(bin_dir / "sigil-server"), "bundle", "show", "--format",
                                "pem", "--socket-path", str(sock)], capture_output=True,
                               check=True).stdout
        ctx = multiprocessing.get_context("spawn")
        ready, out, start_at = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = []
        for _ in range(clients):
            token = str(_cli(bin_dir, sock, "token", "generate")["token"])
            entry_q = ctx.Queue()
            p = ctx.Process(target=_client, args=(address, roots, token, ready, entry_q, batch,
                                                  seconds, start_at, out, connections))
            p.start()
            agent_id = ready.get(timeout=60)
            entry = _cli(bin_dir, sock, "entry", "create", "--spiffe-id",
                         f"spiffe://{TD}/w/{len(procs)}", "--parent-id", agent_id,
                         "--selector", "unix:uid:1")
            entry_q.put(entry["id"])
            procs.append(p)
        time.sleep(1.0)  # every client has warmed up its connections
        server_pids = [server.pid, *worker_pids]
        cpu = _cpu_seconds(server_pids)
        start_at.set()
        time.sleep(seconds)
        server_cpu = _cpu_seconds(server_pids) - cpu
        results = [out.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join()
        issued = sum(r[0] for r in results)
        failed = sum(r[1] for r in results)
        if failed:
            raise SystemExit(f"{failed} CSRs were refused")
        return ServerRun(issued / seconds, server_cpu, sum(r[2] for r in results),
                         len(server_pids))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=2 * cores)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--workers", type=int, default=0, help="worker_processes (0: per core)")
    ap.add_argument("--connections", type=int, default=4,
                    help="connections per client process, one call in flight on each")
    args = ap.parse_args()
    raw = raw_rate(args.seconds, cores)
    print(f"raw ECDSA P-256 sign+verify on {cores} cores: {raw:,.0f}/s")
    run = server_rate(seconds=args.seconds, clients=args.clients, batch=args.batch,
                      workers=args.workers, connections=args.connections)
    got = run.rate
    print(f"X.509-SVIDs issued via the agent API (worker_processes={args.workers}, "
          f"{args.clients} clients, batches of {args.batch}): {got:,.0f}/s")
    print(f"ratio: {got / raw:.3f} (goal >= 0.5)")
    # Where the cores went: the clients (TLS, gRPC, CSR batches) share them here,
    # as they would not in production.
    wall = args.seconds * cores
    print(f"CPU during the run: server {run.server_cpu:.1f} s in {run.processes} processes "
          f"({run.server_cpu / wall:.0%} of {cores} cores), clients {run.client_cpu:.1f} s "
          f"({run.client_cpu / wall:.0%})")
    if run.server_cpu > 0:
        per_core = got * args.seconds / run.server_cpu
        raw_core = raw / cores
        print(f"per CPU-second of the server: {per_core:,.0f} SVIDs vs raw {raw_core:,.0f} "
              f"sign+verify per core-second: ratio {per_core / raw_core:.3f}")


if __name__ == "__main__":
    main()
