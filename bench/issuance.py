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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
            start_at: multiprocessing.Event, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
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
    with grpc.secure_channel(address, creds, options=opts) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        stub.BatchNewX509SVID(request, timeout=60)  # warm up the connection
        start_at.wait()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for r in stub.BatchNewX509SVID(request, timeout=60).results:
                if r.status.code == 0:
                    issued += 1
                else:
                    failed += 1
    out.put((issued, failed))


def server_rate(*, seconds: float, clients: int, batch: int, workers: int) -> float:
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

    def read() -> None:
        nonlocal address
        assert server.stderr is not None
        for line in server.stderr:
            if "server listening" in line:
                address = line.split("agent_api=", 1)[1].split()[0]
                listening.set()
            if "level=error" in line or line.startswith("error"):
                sys.stderr.write(line)
        listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not listening.wait(60) or not address:
            raise SystemExit("server did not start")
        time.sleep(2.0)  # let the workers listen too
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
                                                  seconds, start_at, out))
            p.start()
            agent_id = ready.get(timeout=60)
            entry = _cli(bin_dir, sock, "entry", "create", "--spiffe-id",
                         f"spiffe://{TD}/w/{len(procs)}", "--parent-id", agent_id,
                         "--selector", "unix:uid:1")
            entry_q.put(entry["id"])
            procs.append(p)
        time.sleep(1.0)  # every client has warmed up its connection
        start_at.set()
        results = [out.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join()
        issued = sum(r[0] for r in results)
        failed = sum(r[1] for r in results)
        if failed:
            raise SystemExit(f"{failed} CSRs were refused")
        return issued / seconds
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
    args = ap.parse_args()
    raw = raw_rate(args.seconds, cores)
    print(f"raw ECDSA P-256 sign+verify on {cores} cores: {raw:,.0f}/s")
    got = server_rate(seconds=args.seconds, clients=args.clients, batch=args.batch,
                      workers=args.workers)
    print(f"X.509-SVIDs issued via the agent API (worker_processes={args.workers}, "
          f"{args.clients} clients, batches of {args.batch}): {got:,.0f}/s")
    print(f"ratio: {got / raw:.3f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
