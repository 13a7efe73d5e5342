"""Workload API latency and memory, against a floor measured in the same run.

    python bench/workload_api.py [--clients 1,100,1000] [--svids 10000]

Three processes: the agent's Workload API (front + servicer over an in-memory
cache holding one identity for our uid), a *floor* (a trivial grpc.aio servicer
on the same kind of Unix socket, returning canned responses of the same sizes),
and this one, the clients. For each client count N, N fresh channels (one
connection each) start at once; we time:

- x509: from opening the FetchX509SVID stream to its first response (includes
  the connection, the front's peer credentials and the attestation);
- jwt: FetchJWTSVID with the token already cached in the agent, N concurrent
  calls, 5 rounds.

and print p50/p99 and the agent/floor ratio. Then a separate agent process fills
its cache with --svids entries and SVIDs and prints its RSS.

Results are recorded in docs/benchmarks.md ("Workload API").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

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

    def svid(self, sid: SpiffeId) -> X509Svid:
        now = dt.datetime.now(dt.UTC)
        key = generate_private_key()
        cert = new_svid_certificate(
            spiffe_id=sid, public_key=key.public_key(), ca_cert=self.cert, ca_key=self.key,
            not_before=now - dt.timedelta(seconds=10), not_after=now + dt.timedelta(hours=1),
        )
        return X509Svid(sid, (cert,), key)

    async def sign_jwt(self, entry: CachedEntry, audience: Sequence[str]) -> JwtSvid:
        now = dt.datetime.now(dt.UTC)
        token = sign_jwt_svid(
            spiffe_id=entry.spiffe_id, audience=list(audience), key=self.jwt_key,
            key_id=self.kid, issued_at=now, expires_at=now + dt.timedelta(minutes=30),
        )
        return parse_insecure(token, audience=list(audience))


def _entry(i: int, selector: str) -> CachedEntry:
    return CachedEntry(
        id=f"e{i}", spiffe_id=SpiffeId.parse(f"spiffe://example.org/w/{i}"),
        parent_id=AGENT_ID, selectors=frozenset({Selector.parse(selector)}),
    )


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


# -- Servers (run in child processes) ----------------------------------------------------


async def _serve_agent(socket_path: Path, svids: int) -> None:
    ca = _CA()
    cache = Cache(trust_domain=TD, jwt_signer=ca.sign_jwt)
    # Entry 0 is ours; the others need a selector nobody has (cached, never served).
    entries = [_entry(0, f"unix:uid:{os.getuid()}")]
    entries += [_entry(i, "unix:uid:4294967294") for i in range(1, svids)]
    cache.set_bundles({TD: ca.bundle()})
    cache.set_entries(entries)
    for e in entries:
        cache.set_x509_svid(e.id, ca.svid(e.spiffe_id))
    server = WorkloadApiServer(
        socket_path=socket_path, cache=cache, attestors=[UnixAttestor()],
        max_connections=4096,
    )
    await server.start()
    gc.collect()
    print(f"ready rss_mib={_rss_mib():.1f}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(grace=0.1)


async def _serve_floor(socket_path: Path, x509_size: int, jwt_size: int) -> None:
    x509 = b"x" * x509_size
    jwt = b"j" * jwt_size

    async def fetch_x509(request: bytes, context: grpc.aio.ServicerContext) -> object:  # type: ignore[type-arg]
        yield x509
        await asyncio.Event().wait()  # streams stay open, like the agent's

    async def fetch_jwt(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
        return jwt

    handler = grpc.method_handlers_generic_handler("SpiffeWorkloadAPI", {
        "FetchX509SVID": grpc.unary_stream_rpc_method_handler(fetch_x509),
        "FetchJWTSVID": grpc.unary_unary_rpc_method_handler(fetch_jwt),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
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

    async def one(call: grpc.aio.UnaryUnaryMultiCallable) -> float:  # type: ignore[type-arg]
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
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _measure(path: Path, counts: list[int]) -> dict[int, tuple[list[float], list[float]]]:
    out = {}
    for n in counts:
        x509 = [t for t, _ in await asyncio.gather(*(_first_x509(path) for _ in range(n)))]
        jwt = await _jwt_rounds(path, n, rounds=5)
        out[n] = (x509, jwt)
    return out


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
    parser.add_argument("--serve-agent", type=Path)
    parser.add_argument("--serve-floor", type=Path)
    parser.add_argument("--sizes", default="0,0")
    args = parser.parse_args()
    if args.serve_agent:
        asyncio.run(_serve_agent(args.serve_agent, int(args.svids)))
        return
    if args.serve_floor:
        x, j = (int(v) for v in args.sizes.split(","))
        asyncio.run(_serve_floor(args.serve_floor, x, j))
        return

    import resource
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    counts = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="sg-bench-", dir="/tmp"))
    agent_sock, floor_sock = tmp / "agent.sock", tmp / "floor.sock"
    agent, _ = _start(["--serve-agent", str(agent_sock), "--svids", "1"])
    try:
        x509_size, jwt_size = asyncio.run(_sizes(agent_sock))
        floor, _ = _start(["--serve-floor", str(floor_sock), "--sizes", f"{x509_size},{jwt_size}"])
        try:
            print(f"response sizes: X509SVIDResponse {x509_size} B, JWTSVIDResponse {jwt_size} B")
            # Alternate agent and floor per client count, so both see the same machine.
            print(f"{'clients':>7} {'rpc':>5} {'agent p50':>10} {'p99':>8} "
                  f"{'floor p50':>10} {'p99':>8} {'p50 x':>6} {'p99 x':>6}")
            for n in counts:
                a = asyncio.run(_measure(agent_sock, [n]))[n]
                f = asyncio.run(_measure(floor_sock, [n]))[n]
                for label, av, fv in (("x509", a[0], f[0]), ("jwt", a[1], f[1])):
                    a50, a99, f50, f99 = (_pct(av, .5), _pct(av, .99), _pct(fv, .5), _pct(fv, .99))
                    print(f"{n:>7} {label:>5} {a50:>8.2f}ms {a99:>6.2f}ms {f50:>8.2f}ms "
                          f"{f99:>6.2f}ms {a50 / f50:>6.2f} {a99 / f99:>6.2f}", flush=True)
        finally:
            _stop(floor)
    finally:
        _stop(agent)
    big, line = _start(["--serve-agent", str(tmp / "big.sock"), "--svids", str(args.svids)])
    _stop(big)
    print(f"agent with {args.svids} cached SVIDs: {line.split('=')[1]} MiB RSS (goal < 150)")


if __name__ == "__main__":
    main()
