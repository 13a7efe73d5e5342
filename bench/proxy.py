"""sigil-proxy against nginx ``stream`` doing the same job with the same certificates.

    python bench/proxy.py [--seconds 5] [--bulk-mib 128] [--round-trips 2000]

The chain is the same for both: a plain-TCP client -> an "outbound" proxy (plain
in, mTLS out, checks the server's certificate) -> an "inbound" proxy (mTLS in,
requires and checks a client certificate, plain out) -> a TCP echo server.

- Sigil: two ``sigil-proxy run`` processes (``python -m proxy``), each with its
  SVID from a Workload API: a small one in a process of this script that serves a
  static FetchX509SVID answer (two SVIDs and the bundle, made here with
  ``identity``) and keeps the stream open.
- Reference: two nginx processes (``worker_processes 1`` each, so one core's
  worth apiece like the Python proxies), ``stream`` module, with the same SVIDs and
  bundle as helper-mode files (``svid.pem``, ``svid.key``, ``bundle.pem``):
  ``ssl_verify_client on`` on the inbound one, ``proxy_ssl_verify on`` on the
  outbound one. nginx cannot check a SPIFFE ID: its outbound side checks a DNS
  SAN the server's SVID also carries, its inbound side the chain only;
  sigil-proxy checks the SPIFFE ID against an allow list on both sides.

Measured for both chains, in rounds that alternate them (median of the rounds;
the best for bulk):

1. new connections per second: C concurrent clients each connect, send 16
   bytes, read them back, close; every connection is a new mTLS handshake
   between the two proxies (sigil-proxy sends no session tickets; nginx is
   told ``proxy_ssl_session_reuse off``);
2. bulk throughput over one connection: N MiB sent and echoed back at once, in
   MiB/s of payload each way;
3. added p99 latency: 64-byte round trips over one kept connection, p99 minus
   the p99 of the same round trips straight to the echo server.

It prints each figure, the ratio sigil/nginx, and the goal (docs/benchmarks.md,
"Proxy"). Needs nginx with the stream module (Debian: libnginx-mod-stream).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from identity.bundle import Bundle  # noqa: E402
from identity.keys import generate_private_key  # noqa: E402
from identity.spiffeid import SpiffeId, TrustDomain  # noqa: E402
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate  # noqa: E402

NGINX = "/usr/sbin/nginx"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
TD = TrustDomain("bench.sigil.test")
CLIENT_ID = SpiffeId.parse("spiffe://bench.sigil.test/client")
SERVER_ID = SpiffeId.parse("spiffe://bench.sigil.test/server")
SERVER_DNS = "server.bench.sigil.test"


# -- certificates ---------------------------------------------------------------------


def make_svids() -> tuple[Bundle, X509Svid, X509Svid]:
    now = dt.datetime.now(dt.UTC)
    ca_key = generate_private_key()
    ca = new_ca_certificate(trust_domain=TD, public_key=ca_key.public_key(), signer_key=ca_key,
                            not_before=now - dt.timedelta(minutes=1),
                            not_after=now + dt.timedelta(days=1))

    def svid(sid: SpiffeId) -> X509Svid:
        key = generate_private_key()
        # nginx checks a name, not a SPIFFE ID: the server's SVID also carries a DNS
        # SAN that the reference's outbound side verifies (proxy_ssl_name).
        cert = new_svid_certificate(spiffe_id=sid, public_key=key.public_key(), ca_cert=ca,
                                    ca_key=ca_key, not_before=now - dt.timedelta(minutes=1),
                                    not_after=now + dt.timedelta(hours=6),
                                    dns_names=[SERVER_DNS] if sid == SERVER_ID else [])
        return X509Svid(sid, (cert,), key)

    return Bundle(TD, (ca,)), svid(CLIENT_ID), svid(SERVER_ID)


def write_helper_files(folder: Path, svid: X509Svid, bundle: Bundle) -> None:
    folder.mkdir(parents=True)
    (folder / "svid.pem").write_bytes(svid.chain_pem())
    key = folder / "svid.key"
    key.write_bytes(svid.key_pem())
    key.chmod(0o600)
    (folder / "bundle.pem").write_bytes(bundle.x509_pem())


# -- the Workload API the sigil-proxies read --------------------------------------------


def serve_workload_api(socket_path: str, svid_dir: str) -> None:
    """Child process: FetchX509SVID answers with both SVIDs, then holds the stream."""
    import grpc

    from api.protos import workload_pb2 as pb

    folder = Path(svid_dir)
    bundle = Bundle.from_x509_pem(TD, (folder / "bundle.pem").read_bytes())
    svids = []
    for name in ("client", "server"):
        svid = X509Svid.parse((folder / name / "svid.pem").read_bytes(),
                              (folder / name / "svid.key").read_bytes())
        svids.append(pb.X509SVID(spiffe_id=str(svid.spiffe_id), x509_svid=svid.chain_der(),
                                 x509_svid_key=svid.key_der(), bundle=bundle.x509_der()))
    response = pb.X509SVIDResponse(svids=svids)

    async def fetch(request: object, context: grpc.aio.ServicerContext) -> object:
        await context.write(response)
        await asyncio.Event().wait()  # keep the stream open, as an agent does
        return None

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler("SpiffeWorkloadAPI", {
            "FetchX509SVID": grpc.unary_stream_rpc_method_handler(
                fetch, request_deserializer=pb.X509SVIDRequest.FromString,
                response_serializer=pb.X509SVIDResponse.SerializeToString)})
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        print("READY", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


# -- echo backend -------------------------------------------------------------------------


def serve_echo(port_file: str) -> None:
    """Child process: a threaded TCP echo server (echoes until EOF, then half-closes)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    Path(port_file).write_text(str(listener.getsockname()[1]))

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(512 * 1024)
        view = memoryview(buf)
        with conn:
            try:
                while n := conn.recv_into(buf):
                    conn.sendall(view[:n])
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on {port} in 60 s")


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


NGINX_CONF = """\
{load}
daemon off;
master_process off;
worker_processes 1;
pid {root}/{name}.pid;
error_log {root}/{name}.error.log error;
events {{ worker_connections 4096; }}
stream {{
    server {{
        {server}
    }}
}}
"""

NGINX_INBOUND = """listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs}/svid.pem;
        ssl_certificate_key {certs}/svid.key;
        ssl_client_certificate {certs}/bundle.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_session_tickets off;
        ssl_session_cache off;
        proxy_half_close on;
        proxy_pass 127.0.0.1:{target};"""

NGINX_OUTBOUND = """listen 127.0.0.1:{port};
        proxy_half_close on;
        proxy_pass 127.0.0.1:{target};
        proxy_ssl on;
        proxy_ssl_certificate {certs}/svid.pem;
        proxy_ssl_certificate_key {certs}/svid.key;
        proxy_ssl_trusted_certificate {certs}/bundle.pem;
        proxy_ssl_verify on;
        proxy_ssl_name {name};
        proxy_ssl_verify_depth 3;
        proxy_ssl_session_reuse off;"""


def start_nginx(procs: list[subprocess.Popen[bytes]], root: Path, name: str,
                server: str) -> None:
    load = "" if _stream_builtin() else f"load_module {STREAM_MODULE};"
    conf = root / f"{name}.conf"
    conf.write_text(NGINX_CONF.format(load=load, root=root, name=name, server=server))
    log = root / f"{name}.log"
    procs.append(subprocess.Popen([NGINX, "-c", str(conf), "-e", str(root / f"{name}.err")],
                                  stdout=open(log, "wb"), stderr=subprocess.STDOUT))


def _stream_builtin() -> bool:
    out = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    return "--with-stream " in out + " " and "--with-stream=dynamic" not in out


def start_sigil(procs: list[subprocess.Popen[bytes]], root: Path, name: str,
                args: list[str], socket_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = root / f"{name}.log"
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--socket-path", str(socket_path),
         "--log-level", "warning", "--max-connections", "4096", *args],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO))


# -- measurements ----------------------------------------------------------------------------


async def _connections_per_second(port: int, seconds: float, concurrency: int) -> float:
    payload = b"0123456789abcdef"
    done = 0
    failed = 0
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.monotonic() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(payload)
                got = await reader.readexactly(len(payload))
                writer.close()
                await writer.wait_closed()
                if got == payload:
                    done += 1
                else:
                    failed += 1
            except (OSError, asyncio.IncompleteReadError):
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    if failed:
        print(f"   ({failed} connections failed)")
    return done / elapsed


def connections_per_second(port: int, seconds: float, concurrency: int) -> float:
    return asyncio.run(_connections_per_second(port, seconds, concurrency))


def bulk_mib_per_second(port: int, mib: int) -> float:
    chunk = os.urandom(1024 * 1024)
    total = mib * len(chunk)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        def send() -> None:
            for _ in range(mib):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)

        started = time.monotonic()
        sender = threading.Thread(target=send)
        sender.start()
        received = 0
        buf = bytearray(1024 * 1024)
        while n := sock.recv_into(buf):
            received += n
        sender.join()
        elapsed = time.monotonic() - started
    if received != total:
        sys.exit(f"bulk: sent {total} bytes, got {received} back")
    return mib / elapsed


def round_trip_p99s_ms(ports: list[int], count: int) -> list[float]:
    """p99 of 64-byte round trips over one kept connection per port, in ms.

    The ports take turns, one round trip each, so a busy machine weighs on all
    of them alike.
    """
    payload = b"x" * 64
    socks = [socket.create_connection(("127.0.0.1", port)) for port in ports]
    times: list[list[float]] = [[] for _ in ports]
    try:
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(count + 50):
            for sock, samples in zip(socks, times, strict=True):
                started = time.perf_counter()
                sock.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    got += sock.recv(4096)
                if i >= 50:  # warm-up
                    samples.append(time.perf_counter() - started)
    finally:
        for sock in socks:
            sock.close()
    return [sorted(t)[min(len(t) - 1, int(len(t) * 0.99))] * 1000 for t in times]


def measure(ports: dict[str, int], echo: int,
            args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each figure for each chain, in rounds that alternate the chains.

    A shared machine's load comes and goes; alternating short runs and taking
    the median (connections/s, latency) or the best (bulk) of the rounds lets
    both chains see the same conditions.
    """
    names = list(ports)
    samples: dict[str, dict[str, list[float]]] = {n: {"cps": [], "bulk": [], "p99": []}
                                                  for n in names}
    direct: list[float] = []
    for port in ports.values():
        connections_per_second(port, 0.5, args.concurrency)  # warm-up
    for round_no in range(1, args.rounds + 1):
        for name in names:
            samples[name]["cps"].append(connections_per_second(
                ports[name], args.seconds / args.rounds, args.concurrency))
        for name in names:
            samples[name]["bulk"].append(bulk_mib_per_second(ports[name], args.bulk_mib))
        p99s = round_trip_p99s_ms([echo, *ports.values()], args.round_trips)
        direct.append(p99s[0])
        for name, value in zip(names, p99s[1:], strict=True):
            samples[name]["p99"].append(value)
        print(f"round {round_no}: " + "; ".join(
            f"{n} {samples[n]['cps'][-1]:.0f} conn/s, {samples[n]['bulk'][-1]:.0f} MiB/s, "
            f"p99 {samples[n]['p99'][-1]:.3f} ms" for n in names)
            + f"; direct p99 {direct[-1]:.3f} ms", flush=True)
    base = statistics.median(direct)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        p99 = statistics.median(samples[name]["p99"])
        out[name] = {"cps": statistics.median(samples[name]["cps"]),
                     "bulk": max(samples[name]["bulk"]),
                     "p99": p99, "added_p99": max(p99 - base, 0.001)}
    print(f"\n{'':<12}{'conn/s':>10}{'MiB/s':>10}{'p99 ms':>10}{'added':>10}")
    for name in names:
        r = out[name]
        print(f"{name:<12}{r['cps']:>10.0f}{r['bulk']:>10.0f}{r['p99']:>10.3f}"
              f"{r['added_p99']:>10.3f}")
    print(f"{'direct':<12}{'':>10}{'':>10}{base:>10.3f}")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--workload-api":
        serve_workload_api(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--echo":
        serve_echo(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="connections/s: total seconds per chain, over the rounds")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds alternating the two chains (default 3)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bulk-mib", type=int, default=128)
    parser.add_argument("--round-trips", type=int, default=2000)
    args = parser.parse_args()
    if not Path(NGINX).exists() or not (
            _stream_builtin() or Path(STREAM_MODULE).exists()):
        sys.exit(f"needs nginx at {NGINX} with the stream module "
                 "(Debian: apt-get install nginx-light libnginx-mod-stream)")

    root = Path(tempfile.mkdtemp(prefix="sigil-bench-proxy-", dir="/tmp"))
    try:
        bundle, client, server = make_svids()
        write_helper_files(root / "client", client, bundle)
        write_helper_files(root / "server", server, bundle)
        (root / "bundle.pem").write_bytes(bundle.x509_pem())
        with processes() as procs:
            procs.append(subprocess.Popen([sys.executable, __file__, "--echo",
                                           str(root / "echo.port")]))
            api = root / "api.sock"
            wl = subprocess.Popen([sys.executable, __file__, "--workload-api", str(api),
                                   str(root)], stdout=subprocess.PIPE)
            procs.append(wl)  # type: ignore[arg-type]
            assert wl.stdout is not None
            if wl.stdout.readline().strip() != b"READY":
                sys.exit("the bench Workload API did not start")
            deadline = time.monotonic() + 30
            while not (root / "echo.port").exists() or not (root / "echo.port").read_text():
                if time.monotonic() > deadline:
                    sys.exit("the echo server did not start")
                time.sleep(0.05)
            echo = int((root / "echo.port").read_text())

            s_in, s_out, n_in, n_out = (free_port() for _ in range(4))
            start_sigil(procs, root, "sigil-in", [
                "--spiffe-id", str(SERVER_ID), "--inbound", f"127.0.0.1:{s_in}=127.0.0.1:{echo}",
                "--allow", str(CLIENT_ID)], api)
            start_sigil(procs, root, "sigil-out", [
                "--spiffe-id", str(CLIENT_ID),
                "--outbound", f"127.0.0.1:{s_out}=127.0.0.1:{s_in}", "--expect", str(SERVER_ID)],
                api)
            start_nginx(procs, root, "nginx-in", NGINX_INBOUND.format(
                port=n_in, certs=root / "server", target=echo))
            start_nginx(procs, root, "nginx-out", NGINX_OUTBOUND.format(
                port=n_out, certs=root / "client", target=n_in, name=SERVER_DNS))
            for port, proc, what in zip((s_in, s_out, n_in, n_out), procs[-4:],
                                        ("sigil-in", "sigil-out", "nginx-in", "nginx-out"),
                                        strict=True):
                wait_port(port, proc, what, root / f"{what}.log")
            print(f"cores: {os.cpu_count()}; load average now: "
                  f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
            results = measure({"nginx": n_out, "sigil-proxy": s_out}, echo, args)
            ref, ours = results["nginx"], results["sigil-proxy"]
        print("\nsigil-proxy / nginx:")
        cps, bulk = ours["cps"] / ref["cps"], ours["bulk"] / ref["bulk"]
        lat = ours["added_p99"] / ref["added_p99"]
        for what, ratio, goal, met in (
                ("new connections/s", cps, ">= 0.5", cps >= 0.5),
                ("bulk MiB/s", bulk, ">= 0.5", bulk >= 0.5),
                ("added p99 latency", lat, "<= 2", lat <= 2)):
            print(f"   {what:<19}{ratio:7.2f}  (goal {goal})  {'ok' if met else 'MISSED'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
