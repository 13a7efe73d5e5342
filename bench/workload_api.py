"""Workload API latency with the agent holding 10,000 SVIDs, its memory, and a floor.

    python bench/workload_api.py [--clients 1,100,1000] [--svids 10000]
                                 [--processes 4] [--users 4 | --no-users]

Processes:

- the agent's Workload API (peer-credential front, relay, servicer, unix attestor,
  pidfd check) over an in-memory cache holding ``--svids`` entries, each with its
  X.509-SVID (key included; the cache sized to keep them all), and one bundle.
  One entry per client user (``unix:uid:<uid>``); the others carry selectors no
  client has, so they are held but never served;
- the *floor*: a trivial grpc.aio servicer on the same kind of Unix socket
  returning canned responses of the same sizes;
- ``--processes`` client processes, each running as a different Unix user when
  it can: as root, bench users ``sigil-bench-1`` .. ``sigil-bench-<--users>`` are
  created if missing (``--no-users`` skips that and runs every client as us).
  Users differ, so the agent attests workloads of several users (its per-user
  name lookups are not all one warm entry) and serves each its own identity.

Both servers are warmed alike before anything is timed (a few calls of each
kind from every client process). For each client count N, spread over the
client processes, N fresh channels (one connection each) start at once; we time:

- x509: from opening the FetchX509SVID stream to its first response (includes
  the connection, the front's peer credentials and the attestation);
- jwt: FetchJWTSVID with the token already cached in the agent, N concurrent
  calls, ``--rounds`` rounds;

and print p50/p99 and the agent/floor ratio (goal: p99 <= 3x the floor at 1,000
clients). The memory figure is the same agent process's RSS, before and after
the run, beside the number of SVIDs it holds (goal: <= 150 MiB with 10,000).

Results are recorded in docs/benchmarks.md ("Workload API").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import pickle
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_der_private_key,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.cache import Cache, CachedEntry  # noqa: E402
from agent.workload_api.server import WorkloadApiServer  # noqa: E402
from api.protos import workload_pb2 as pb  # noqa: E402
from attestation.workload.unix import UnixAttestor  # noqa: E402
from identity.bundle import Bundle, JwtAuthority  # noqa: E402
from identity.jwtsvid import JwtSvid, parse_insecure, sign_jwt_svid  # noqa: E402
from identity.keys import generate_private_key, key_id  # noqa: E402
from identity.selectors import Selector  # noqa: E402
from identity.spiffeid import SpiffeId, TrustDomain  # noqa: E402
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate  # noqa: E402

TD = TrustDomain("example.org")
AGENT_ID = SpiffeId.parse("spiffe://example.org/sigil/agent/join_token/bench")
HEADER = (("workload.spiffe.io", "true"),)
AUDIENCE = ["spiffe://example.org/db"]
BENCH_USER = "sigil-bench-{}"
MAX_USERS = 8
FILLER_UID = 3_000_000  # filler entries select uids from here up: no process has them


class _CA:
    def __init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self.key = generate_private_key()
        self.cert = new_ca_certificate(
            trust_domain=TD, public_key=self.key.public_key(), signer_key=self.key,
            not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(days=1),
        )
        self.jwt_key = generate_private_key()
        self.kid = key_id(self.jwt_key.public_key())

    def bundle(self) -> Bundle:
        return Bundle(TD, (self.cert,), (JwtAuthority(self.kid, self.jwt_key.public_key()),))

    def svid_der(self, sid: SpiffeId) -> tuple[bytes, bytes]:
        """A key (PKCS#8 DER) and its X.509-SVID (DER), as an agent would hold them."""
        now = dt.datetime.now(dt.UTC)
        key = generate_private_key()
        cert = new_svid_certificate(
            spiffe_id=sid, public_key=key.public_key(), ca_cert=self.cert, ca_key=self.key,
            not_before=now - dt.timedelta(seconds=10), not_after=now + dt.timedelta(hours=1),
        )
        key_der = key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        return key_der, cert.public_bytes(Encoding.DER)

    def save(self, path: Path) -> None:
        """The CA's keys and certificate, for the agent process (its bundle, its JWTs)."""
        path.write_bytes(pickle.dumps((
            self.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()),
            self.cert.public_bytes(Encoding.DER),
            self.jwt_key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()))))

    @classmethod
    def load(cls, path: Path) -> _CA:
        key, cert, jwt_key = pickle.loads(path.read_bytes())
        ca = cls.__new__(cls)
        ca.key = load_der_private_key(key, None)  # type: ignore[assignment]
        ca.cert = x509.load_der_x509_certificate(cert)
        ca.jwt_key = load_der_private_key(jwt_key, None)  # type: ignore[assignment]
        ca.kid = key_id(ca.jwt_key.public_key())
        return ca

    async def sign_jwt(self, entry: CachedEntry, audience: Sequence[str]) -> JwtSvid:
        now = dt.datetime.now(dt.UTC)
        token = sign_jwt_svid(
            spiffe_id=entry.spiffe_id, audience=list(audience), key=self.jwt_key,
            key_id=self.kid, issued_at=now, expires_at=now + dt.timedelta(minutes=30),
        )
        return parse_insecure(token, audience=list(audience))


def _entry(i: int, name: str, selector: str) -> CachedEntry:
    return CachedEntry(
        id=f"e{i}", spiffe_id=SpiffeId.parse(f"spiffe://example.org/{name}"),
        parent_id=AGENT_ID, selectors=frozenset({Selector.parse(selector)}),
    )


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


# -- Servers (run in child processes) ----------------------------------------------------


def _entries(svids: int, uids: list[int]) -> list[CachedEntry]:
    # One entry per client user; the rest select uids no process has (held, never served).
    entries = [_entry(i, f"u/{uid}", f"unix:uid:{uid}") for i, uid in enumerate(uids)]
    entries += [_entry(i, f"w/{i}", f"unix:uid:{FILLER_UID + i}")
                for i in range(len(entries), svids)]
    return entries


def make_svids(workdir: Path, svids: int, uids: list[int]) -> None:
    """Sign every entry's SVID here, not in the agent: an agent receives its
    certificates as DER from the server, so signing's garbage is not its memory."""
    ca = _CA()
    ca.save(workdir / "ca.bin")
    with (workdir / "svids.bin").open("wb") as f:
        pickle.dump([ca.svid_der(e.spiffe_id) for e in _entries(svids, uids)], f)


async def _serve_agent(socket_path: Path, workdir: Path, svids: int, uids: list[int]) -> None:
    ca = _CA.load(workdir / "ca.bin")
    # Sized to keep every SVID (the agent's svid_cache_size), so all are held.
    cache = Cache(trust_domain=TD, jwt_signer=ca.sign_jwt, svid_cache_size=max(svids, 1))
    entries = _entries(svids, uids)
    cache.set_bundles({TD: ca.bundle()})
    cache.set_entries(entries)
    with (workdir / "svids.bin").open("rb") as f:
        signed = pickle.load(f)
    # As the agent holds what the server signed: its own key, the chain parsed from DER.
    for e, (key_der, cert_der) in zip(entries, signed, strict=True):
        key = load_der_private_key(key_der, None)
        cert = x509.load_der_x509_certificate(cert_der)
        cache.set_x509_svid(e.id, X509Svid(e.spiffe_id, (cert,), key))  # type: ignore[arg-type]
    del signed
    server = WorkloadApiServer(
        socket_path=socket_path, cache=cache, attestors=[UnixAttestor()],
        max_connections=4096,
    )
    await server.start()

    def state() -> str:
        gc.collect()
        snap = cache.snapshot()
        return f"entries={len(snap.entries)} held={len(snap.svids)} rss_mib={_rss_mib():.1f}"

    print(f"ready {state()}", flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(state(), flush=True)
    await server.stop(grace=0.1)


async def _serve_floor(socket_path: Path, x509_size: int, jwt_size: int) -> None:
    x509 = b"x" * x509_size
    jwt = b"j" * jwt_size

    async def fetch_x509(request: bytes, context: grpc.aio.ServicerContext) -> object:
        yield x509
        await asyncio.Event().wait()  # streams stay open, like the agent's

    async def fetch_jwt(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return jwt

    handler = grpc.method_handlers_generic_handler("SpiffeWorkloadAPI", {
        "FetchX509SVID": grpc.unary_stream_rpc_method_handler(fetch_x509),
        "FetchJWTSVID": grpc.unary_unary_rpc_method_handler(fetch_jwt),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    os.chmod(socket_path, 0o777)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0.1)


# -- Clients ---------------------------------------------------------------------------------


def _channel(path: Path) -> grpc.aio.Channel:
    # A channel of its own connection, as N separate workload processes would have.
    return grpc.aio.insecure_channel(
        f"unix:{path}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


async def _first_x509(path: Path) -> tuple[float, int]:
    async with _channel(path) as ch:
        start = time.perf_counter()
        call = ch.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID",
                               request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)(b"", metadata=HEADER)
        async for msg in call:
            elapsed = time.perf_counter() - start
            call.cancel()
            return elapsed, len(msg)
    raise RuntimeError("stream ended without a message")


async def _jwt_rounds(path: Path, n: int, rounds: int) -> list[float]:
    req = pb.JWTSVIDRequest(audience=AUDIENCE).SerializeToString()
    channels = [_channel(path) for _ in range(n)]
    calls = [ch.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID",
                            request_serializer=lambda b: b,
                            response_deserializer=lambda b: b) for ch in channels]

    async def one(call: grpc.aio.UnaryUnaryMultiCallable) -> float:
        start = time.perf_counter()
        await call(req, metadata=HEADER)
        return time.perf_counter() - start

    try:
        await asyncio.gather(*(one(c) for c in calls))  # warm: connect, fill the cache
        out: list[float] = []
        for _ in range(rounds):
            out += await asyncio.gather(*(one(c) for c in calls))
        return out
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


async def _x509_burst(path: Path, n: int) -> list[float]:
    return [t for t, _ in await asyncio.gather(*(_first_x509(path) for _ in range(n)))]


def _client_process(uid: int, gid: int, conn: Connection) -> None:
    """A client process: become the user, then run the bursts it is told to."""
    if os.getuid() != uid:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    while True:
        command = conn.recv()
        if command is None:
            return
        kind, path, n, rounds = command
        if n == 0:
            conn.send([])
        elif kind == "x509":
            conn.send(asyncio.run(_x509_burst(path, n)))
        else:
            conn.send(asyncio.run(_jwt_rounds(path, n, rounds)))


class Clients:
    """Client processes, each as one Unix user; bursts are split among them."""

    def __init__(self, users: list[tuple[int, int]], processes: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        for i in range(processes):
            uid, gid = users[i % len(users)]
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=_client_process, args=(uid, gid, theirs), daemon=True)
            p.start()
            self._conns.append(ours)
            self._procs.append(p)

    def run(self, kind: str, path: Path, n: int, rounds: int = 1) -> list[float]:
        """``n`` concurrent clients in all, split over the processes; every latency."""
        share = [n // len(self._conns) + (1 if i < n % len(self._conns) else 0)
                 for i in range(len(self._conns))]
        for conn, k in zip(self._conns, share, strict=True):
            conn.send((kind, path, k, rounds))
        out: list[float] = []
        for conn in self._conns:
            out += conn.recv()
        return out

    def close(self) -> None:
        for conn in self._conns:
            conn.send(None)
        for p in self._procs:
            p.join(timeout=30)


# -- Orchestration ---------------------------------------------------------------------------


def bench_users(count: int) -> list[tuple[int, int]]:
    """(uid, gid) of sigil-bench-1..count, created (as root) if missing."""
    users = []
    for i in range(1, min(count, MAX_USERS) + 1):
        name = BENCH_USER.format(i)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", name], check=True)
            entry = pwd.getpwnam(name)
            print(f"created bench user {name} (uid {entry.pw_uid})")
        users.append((entry.pw_uid, entry.pw_gid))
    return users


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _start(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.removeprefix("ready").strip()


def _ask(proc: subprocess.Popen[str]) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("state\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split())


async def _sizes(path: Path) -> tuple[int, int]:
    _, x509_size = await _first_x509(path)
    async with _channel(path) as ch:
        resp = await ch.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID",
                                    request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)(
            pb.JWTSVIDRequest(audience=AUDIENCE).SerializeToString(), metadata=HEADER)
    return x509_size, len(resp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,100,1000")
    parser.add_argument("--svids", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--users", type=int, default=4,
                        help=f"bench users sigil-bench-1..N (at most {MAX_USERS}), as root")
    parser.add_argument("--no-users", action="store_true",
                        help="create no users; every client runs as us")
    parser.add_argument("--rounds", type=int, default=5, help="jwt rounds per client count")
    parser.add_argument("--serve-agent", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--uids", default="", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="0,0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_agent:
        asyncio.run(_serve_agent(args.serve_agent, args.workdir, int(args.svids),
                                 [int(u) for u in args.uids.split(",")]))
        return
    if args.serve_floor:
        x, j = (int(v) for v in args.sizes.split(","))
        asyncio.run(_serve_floor(args.serve_floor, x, j))
        return

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    counts = [int(c) for c in args.clients.split(",")]
    if args.no_users or os.getuid() != 0:
        if not args.no_users:
            print("not root: every client runs as us (no bench users)")
        users = [(os.getuid(), os.getgid())]
    else:
        users = bench_users(args.users)
    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    agent_sock, floor_sock = tmp / "agent" / "agent.sock", tmp / "floor.sock"
    uids = sorted({os.getuid(), *(u for u, _ in users)})
    clients: Clients | None = None
    started = time.perf_counter()
    make_svids(tmp, args.svids, uids)
    signed = time.perf_counter()
    agent, line = _start(["--serve-agent", str(agent_sock), "--workdir", str(tmp),
                          "--svids", str(args.svids), "--uids", ",".join(map(str, uids))])
    before = _fields(line)
    try:
        print(f"{args.svids} SVIDs signed in {signed - started:.1f} s; agent ready in "
              f"{time.perf_counter() - signed:.1f} s: {before['entries']} "
              f"entries, {before['held']} X.509-SVIDs held, RSS {before['rss_mib']} MiB")
        x509_size, jwt_size = asyncio.run(_sizes(agent_sock))
        floor, _ = _start(["--serve-floor", str(floor_sock), "--sizes", f"{x509_size},{jwt_size}"])
        try:
            clients = Clients(users, args.processes)
            print(f"clients: {args.processes} processes as uids "
                  f"{sorted({users[i % len(users)][0] for i in range(args.processes)})}; "
                  f"response sizes: X509SVIDResponse {x509_size} B, "
                  f"JWTSVIDResponse {jwt_size} B")
            for path in (agent_sock, floor_sock):  # warm both alike
                clients.run("x509", path, 2 * args.processes)
                clients.run("jwt", path, args.processes, rounds=2)
            print(f"{'clients':>7} {'rpc':>5} {'agent p50':>10} {'p99':>8} "
                  f"{'floor p50':>10} {'p99':>8} {'p50 x':>6} {'p99 x':>6}")
            ratios: dict[tuple[int, str], float] = {}
            for n in counts:
                # Agent and floor alternate per client count, so both see the same machine.
                a = (clients.run("x509", agent_sock, n),
                     clients.run("jwt", agent_sock, n, args.rounds))
                f = (clients.run("x509", floor_sock, n),
                     clients.run("jwt", floor_sock, n, args.rounds))
                for label, av, fv in (("x509", a[0], f[0]), ("jwt", a[1], f[1])):
                    a50, a99, f50, f99 = (_pct(av, .5), _pct(av, .99), _pct(fv, .5), _pct(fv, .99))
                    ratios[n, label] = a99 / f99
                    print(f"{n:>7} {label:>5} {a50:>8.2f}ms {a99:>6.2f}ms {f50:>8.2f}ms "
                          f"{f99:>6.2f}ms {a50 / f50:>6.2f} {a99 / f99:>6.2f}", flush=True)
        finally:
            if clients is not None:
                clients.close()
            _stop(floor)
        after = _fields(_ask(agent))
    finally:
        _stop(agent)
        shutil.rmtree(tmp, ignore_errors=True)
    top = max(counts)
    print(f"p99 ratio at {top} clients with {before['held']} SVIDs held: "
          f"x509 {ratios[top, 'x509']:.2f}, jwt {ratios[top, 'jwt']:.2f} (goal <= 3)")
    print(f"agent memory: {after['held']} X.509-SVIDs held ({after['entries']} entries): "
          f"RSS {before['rss_mib']} MiB before the run, {after['rss_mib']} MiB after "
          f"(goal <= 150)")


if __name__ == "__main__":
    main()
