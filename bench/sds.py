"""SDS push latency: from a CA activation to every SDS stream holding its new SVID.

    python bench/sds.py [--streams 100] [--rounds 5]

Two processes. The *agent* (this script with ``--agent``) runs the agent's
Workload API with SDS (front, servicer, SDS servicer) over an in-memory cache
with N entries for our uid, each with an SVID of the current CA. The *clients*
(this process, one asyncio loop) open N StreamSecrets streams on one channel, as
an Envoy does,
stream i asking for the SVID of entry i and ``ROOTCA``, acknowledging each
response.

Each round is a CA rotation as the agent sees it: the bundle gains the next CA
(prepare), then the agent installs N SVIDs signed by it, one after the other in
one pass as the sync loop does after a batch signing (activate). The SVIDs are
signed before the clock starts: signing is the server's work, not SDS's. We time,
per stream, from the start of that pass to the arrival of the response holding
the new SVID (``time.monotonic`` is one clock for both processes on Linux), and
print p50, p99 and max per round and overall. The goal: p99 < 2 s with 100 streams.

Results are in docs/benchmarks.md ("SDS").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryptography import x509  # noqa: E402

from agent.cache import Cache, CachedEntry  # noqa: E402
from agent.config import SdsSettings  # noqa: E402
from agent.workload_api.server import WorkloadApiServer  # noqa: E402
from attestation.workload.unix import UnixAttestor  # noqa: E402
from identity.bundle import Bundle  # noqa: E402
from identity.keys import generate_private_key  # noqa: E402
from identity.selectors import Selector  # noqa: E402
from identity.spiffeid import SpiffeId, TrustDomain  # noqa: E402
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate  # noqa: E402

TD = TrustDomain("example.org")
AGENT_ID = SpiffeId.parse("spiffe://example.org/sigil/agent/join_token/bench")


class _CA:
    def __init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self.key = generate_private_key()
        self.cert = new_ca_certificate(
            trust_domain=TD, public_key=self.key.public_key(), signer_key=self.key,
            not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(days=1))

    def svid(self, sid: SpiffeId) -> X509Svid:
        now = dt.datetime.now(dt.UTC)
        key = generate_private_key()
        cert = new_svid_certificate(
            spiffe_id=sid, public_key=key.public_key(), ca_cert=self.cert, ca_key=self.key,
            not_before=now - dt.timedelta(seconds=10), not_after=now + dt.timedelta(hours=1))
        return X509Svid(sid, (cert,), key)


def _spiffe_id(i: int) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://example.org/svc-{i:04d}")


async def _agent(socket_path: Path, streams: int) -> None:
    """The agent side: serve, then on each "round" line on stdin rotate the CA."""
    cache = Cache(trust_domain=TD, svid_cache_size=max(streams, 1))
    server = WorkloadApiServer(socket_path=socket_path, cache=cache,
                               attestors=[UnixAttestor()], sds=SdsSettings())
    ca = _CA()
    entries = [CachedEntry(id=f"e{i}", spiffe_id=_spiffe_id(i), parent_id=AGENT_ID,
                           selectors=frozenset({Selector("unix", f"uid:{os.getuid()}")}))
               for i in range(streams)]
    cache.set_bundles({TD: Bundle(TD, (ca.cert,))})
    cache.set_entries(entries)
    for e in entries:
        cache.set_x509_svid(e.id, ca.svid(e.spiffe_id))
    await server.start()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line.strip():
                return
            nxt = _CA()
            signed = {e.id: nxt.svid(e.spiffe_id) for e in entries}
            # Prepare: the next CA joins the bundle, well before it signs.
            cache.set_bundles({TD: Bundle(TD, (ca.cert, nxt.cert))})
            await asyncio.sleep(0.5)
            # Activate: the batch signed by the new CA arrives and is installed.
            started = time.monotonic()
            for entry_id, svid in signed.items():
                cache.set_x509_svid(entry_id, svid)
            print(f"activated {started!r} {nxt.cert.subject.rfc4514_string()}", flush=True)
            ca = nxt
    finally:
        await server.stop()


class _Clients:
    """N StreamSecrets streams on one grpc.aio channel, each in a task (one thread:
    a thousand client threads would measure the GIL, not the agent)."""

    def __init__(self, socket_path: Path, streams: int) -> None:
        self.socket_path = socket_path
        self.count = streams
        self.arrivals: queue.Queue[tuple[int, float, str]] = queue.Queue()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(timeout=60)

    async def _open(self) -> None:
        import grpc
        from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
        from envoy.service.discovery.v3 import discovery_pb2

        self._secret = secret_pb2.Secret
        self._request = discovery_pb2.DiscoveryRequest
        self.channel = grpc.aio.insecure_channel(f"unix:{self.socket_path}")
        method = self.channel.stream_stream(
            "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        self.tasks = [asyncio.ensure_future(self._follow(i, method())) for i in range(self.count)]

    async def _follow(self, i: int, call: object) -> None:
        names = [str(_spiffe_id(i)), "ROOTCA"]
        await call.write(self._request(resource_names=names))  # type: ignore[attr-defined]
        while True:
            response = await call.read()  # type: ignore[attr-defined]
            arrived = time.monotonic()
            await call.write(self._request(  # type: ignore[attr-defined]
                resource_names=names, version_info=response.version_info,
                response_nonce=response.nonce))
            for resource in response.resources:
                secret = self._secret()
                resource.Unpack(secret)
                if secret.name == names[0]:
                    leaf = x509.load_pem_x509_certificate(
                        secret.tls_certificate.certificate_chain.inline_bytes)
                    self.arrivals.put((i, arrived, leaf.issuer.rfc4514_string()))

    def close(self) -> None:
        async def stop() -> None:
            for task in self.tasks:
                task.cancel()
            await self.channel.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--agent", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent:
        asyncio.run(_agent(Path(args.agent), args.streams))
        return
    root = Path(tempfile.mkdtemp(prefix="sg-sds-", dir="/tmp"))
    socket_path = root / "api.sock"
    agent = subprocess.Popen(
        [sys.executable, __file__, "--agent", str(socket_path), "--streams", str(args.streams)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert agent.stdin is not None and agent.stdout is not None
    try:
        assert agent.stdout.readline().strip() == "ready"
        client = _Clients(socket_path, args.streams)
        first: dict[int, str] = {}
        while len(first) < args.streams:
            i, _, issuer = client.arrivals.get(timeout=120)
            first.setdefault(i, issuer)
        print(f"{args.streams} SDS streams open, each holding its SVID")
        everything: list[float] = []
        for r in range(args.rounds):
            agent.stdin.write("round\n")
            agent.stdin.flush()
            _, started_text, issuer = agent.stdout.readline().split(" ", 2)
            started, issuer = float(started_text), issuer.strip()
            latencies: dict[int, float] = {}
            while len(latencies) < args.streams:
                i, arrived, got = client.arrivals.get(timeout=120)
                if got == issuer and i not in latencies:
                    latencies[i] = arrived - started
            values = list(latencies.values())
            everything += values
            print(f"round {r + 1}: p50 {_percentile(values, 0.5) * 1000:.0f} ms, "
                  f"p99 {_percentile(values, 0.99) * 1000:.0f} ms, "
                  f"all {args.streams} streams {max(values) * 1000:.0f} ms")
            time.sleep(1.0)
        p99 = _percentile(everything, 0.99)
        print(f"overall ({len(everything)} pushes): p50 "
              f"{_percentile(everything, 0.5) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {max(everything) * 1000:.0f} ms; goal p99 < 2000 ms: "
              f"{'met' if p99 < 2.0 else 'NOT met'}")
        client.close()
    finally:
        agent.stdin.close()
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.kill()
        for p in root.iterdir():
            p.unlink()
        root.rmdir()


if __name__ == "__main__":
    main()
