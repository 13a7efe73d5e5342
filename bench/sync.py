"""Authorized-entry sync at scale: the entry index and SyncAuthorizedEntries' work.

Usage:
    python bench/sync.py [--agents 1000] [--per-agent 100] [--aliases 10]
                         [--database-url URL] [--repeat 200]
                         [--rpc-agents 20] [--rpc-rounds 10] [--no-rpc]

Builds a datastore (SQLite in a temporary directory unless --database-url) with
``agents * per_agent`` entries parented to agents, plus node aliases (one per
cluster; every agent is in one of ``--aliases`` clusters) with 10 entries under
each, so every agent is also authorized through an alias. Then measures, in this
process, the server's work for a sync: the entry index's answer plus encoding the
pages exactly as the agent API sends them (``ca.api.sync``):

- index build time (every entry read from the datastore);
- a full sync for one agent (no known revision), median over ``--repeat`` agents;
- an incremental sync after one of that agent's entries changed (the change made
  through the repository, the index caught up from the change-event log first;
  that poll is timed on its own line, as it runs once per change for all agents);
- an incremental sync with nothing changed;
- the process's RSS.

And the ratios: incremental / full (goal < 1/100) and incremental / 1 ms (goal < 1).

Then, unless --no-rpc, the same end to end (:func:`rpc_figures`): a real
``sigil-server run`` (one process) with the same number of entries, ``--rpc-agents``
agents attested by join token calling SyncAuthorizedEntries over mTLS, each with
``--per-agent`` entries federating with three trust domains; full and incremental
syncs and an authenticated empty call, timed at the client, with the server's CPU
per call.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import migrations  # noqa: E402
from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
from bench.seed import NewEntry, insert_entries  # noqa: E402
from ca.api.convert import bundle_to_proto  # noqa: E402
from ca.api.sync import SyncBundle, delta_pages, sync_delta  # noqa: E402
from ca.datastore import Datastore  # noqa: E402
from ca.datastore.feed import DatastoreFeed  # noqa: E402
from ca.registry.entry_index import EntryIndex  # noqa: E402
from identity.bundle import Bundle, JwtAuthority  # noqa: E402
from identity.clock import SystemClock  # noqa: E402
from identity.keys import generate_private_key  # noqa: E402
from identity.selectors import Selector  # noqa: E402
from identity.spiffeid import SpiffeId, TrustDomain  # noqa: E402
from identity.x509svid import new_ca_certificate  # noqa: E402

TD = TrustDomain("bench.sigil.test")
SERVER = SpiffeId.from_segments(TD, "sigil", "server")
ALIAS_CHILDREN = 10


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def agent_id(i: int) -> SpiffeId:
    return SpiffeId.from_segments(TD, "sigil", "agent", "join_token", f"a{i}")


def node_selectors(i: int, clusters: int) -> tuple[Selector, ...]:
    return (Selector("join_token", f"a{i}"), Selector("spiffe_id", str(agent_id(i))),
            Selector("cluster", f"c{i % clusters}"))


def seed(datastore: Datastore, agents: int, per_agent: int, clusters: int) -> None:
    rows: list[NewEntry] = []
    for k in range(clusters):
        alias = SpiffeId.from_segments(TD, "cluster", f"c{k}")
        rows.append(NewEntry(alias, SERVER, (Selector("cluster", f"c{k}"),)))
        rows.extend(NewEntry(SpiffeId.from_segments(TD, "cluster", f"c{k}", "daemon", str(j)),
                             alias, (Selector("unix", f"uid:{j}"),))
                    for j in range(ALIAS_CHILDREN))
    for i in range(agents):
        parent = agent_id(i)
        rows.extend(
            NewEntry(SpiffeId.from_segments(TD, "ns", f"n{i}", "sa", f"w{j}"), parent,
                     (Selector("k8s", f"ns:n{i}"), Selector("k8s", f"sa:w{j}")))
            for j in range(per_agent))
    insert_entries(datastore.engine, rows)


def own_bundle() -> SyncBundle:
    """Our bundle as a server mid-rotation sends it: two CAs, two JWT keys."""
    now = dt.datetime.now(dt.UTC)
    cas, jwts = [], []
    for n in range(2):
        key = generate_private_key()
        cas.append(new_ca_certificate(trust_domain=TD, public_key=key.public_key(),
                                      signer_key=key, not_before=now,
                                      not_after=now + dt.timedelta(hours=24)))
        jwts.append(JwtAuthority(key_id=f"k{n}", public_key=generate_private_key().public_key(),
                                 expires_at=now + dt.timedelta(hours=24)))
    bundle = Bundle(TD, tuple(cas), tuple(jwts), sequence_number=3)
    return SyncBundle.of(bundle_to_proto(bundle))


T = TypeVar("T")
_wall: list[float] = [0.0]


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """CPU time of this thread running ``fn``, and its result; wall time in ``last_wall()``.

    CPU time is the server's own work, unaffected by whatever else the machine
    runs (a shared CI box); wall time is printed beside it.
    """
    start, wall = time.thread_time(), time.perf_counter()
    result = fn()
    _wall[0] = time.perf_counter() - wall
    return time.thread_time() - start, result


def last_wall() -> float:
    return _wall[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--per-agent", type=int, default=100)
    ap.add_argument("--aliases", type=int, default=10, help="clusters, one node alias each")
    ap.add_argument("--database-url", default="")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--rpc-agents", type=int, default=20,
                    help="agents measured end to end over mTLS (the rest only fill)")
    ap.add_argument("--rpc-rounds", type=int, default=10,
                    help="calls of each kind per measured agent, end to end")
    ap.add_argument("--no-rpc", action="store_true", help="skip the end-to-end figures")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sigil-bench-sync-"))
    url = args.database_url or f"sqlite:///{tmp / 'datastore.sqlite3'}"
    try:
        migrations.upgrade(url)
        datastore = Datastore(url)
        total = args.agents * args.per_agent + args.aliases * (1 + ALIAS_CHILDREN)
        seconds, _ = timed(lambda: seed(datastore, args.agents, args.per_agent, args.aliases))
        print(f"datastore: {url.split('://', 1)[0]}, {total} entries "
              f"({args.agents} agents x {args.per_agent}, {args.aliases} node aliases "
              f"x {ALIAS_CHILDREN}), inserted in {seconds:.1f} s")

        feed = DatastoreFeed(datastore)
        index = EntryIndex(feed, server_id=SERVER, clock=SystemClock(),
                           poll_interval=3600.0)  # polls only when we say so
        feed.on_local_change(index.notify_local_change)
        build, _ = timed(index.build)
        print(f"index build:                {build:8.3f} s   "
              f"({index.stats()['entries']} entries)")

        bundle = {TD.name: own_bundle()}
        rng = random.Random(1)
        # One agent is left out: the neighbour whose syncs run between measured ones.
        chosen = rng.sample(range(args.agents), min(args.repeat, args.agents - 1))

        def server_sync(i: int, generation: str, revision: int, digests: dict[str, str]
                        ) -> tuple[float, list[agent_pb2.SyncAuthorizedEntriesPage]]:
            request = agent_pb2.SyncAuthorizedRequest(
                known_generation=generation, known_revision=revision,
                known_bundle_digests=digests)
            # Parsed before the clock starts, as the servicer has them from the
            # node record that authentication loaded.
            agent, selectors = agent_id(i), node_selectors(i, args.aliases)

            def run() -> list[agent_pb2.SyncAuthorizedEntriesPage]:
                delta = sync_delta(index, request, agent_id=agent, node_selectors=selectors)
                pages = delta_pages(delta, bundle,
                                    known_digests=request.known_bundle_digests)
                for page in pages:
                    page.SerializeToString()
                return pages

            return timed(run)

        def change_one(i: int) -> str:
            """One of agent i's entries changes (a new DNS name); the index polls it."""
            target = rng.choice(datastore.list_entries(parent_id=agent_id(i)))
            datastore.update_entry(
                target.id, replace(target, dns_names=(f"w{rng.random():.6f}.example",)),
                expected_revision=target.revision, now=dt.datetime.now(dt.UTC))
            t, _ = timed(index.catch_up)
            poll_t.append(t)
            poll_w.append(last_wall())
            return target.id

        # A server with 1,000 agents syncing every 5 s answers 200 syncs a second:
        # before each measured sync, another agent's sync runs, as it would.
        neighbour = next(i for i in range(args.agents) if i not in set(chosen))
        _, pages = server_sync(neighbour, "", 0, {})
        near = [pages[-1].generation, pages[-1].revision, dict(pages[0].bundle_digests)]

        def busy() -> None:
            _, pages = server_sync(neighbour, near[0], near[1], near[2])  # type: ignore[arg-type]
            near[1] = pages[-1].revision

        full_t: list[float] = []
        incr_t: list[float] = []
        idle_t: list[float] = []
        poll_t: list[float] = []
        cold_t: list[float] = []
        full_w: list[float] = []
        incr_w: list[float] = []
        poll_w: list[float] = []
        sizes = []
        for i in chosen:
            busy()
            t, pages = server_sync(i, "", 0, {})
            full_t.append(t)
            full_w.append(last_wall())
            sizes.append(sum(len(p.entries) for p in pages))
            assert list(pages[0].bundles) == [TD.name]
            gen, rev = pages[-1].generation, pages[-1].revision
            digests = dict(pages[0].bundle_digests)
            busy()
            t, pages = server_sync(i, gen, rev, digests)
            idle_t.append(t)
            assert not pages[0].entries and not pages[0].bundles
            target = change_one(i)
            busy()
            t, pages = server_sync(i, gen, rev, digests)
            incr_t.append(t)
            incr_w.append(last_wall())
            assert [e.id for p in pages for e in p.entries] == [target], "delta is wrong"
            # And straight after the datastore write and poll, nothing in between:
            # the caches then hold SQLite's work, not the sync path.
            rev = pages[-1].revision
            target = change_one(i)
            t, pages = server_sync(i, gen, rev, digests)
            cold_t.append(t)
            assert [e.id for p in pages for e in p.entries] == [target], "delta is wrong"

        full = statistics.median(full_t)
        incr = statistics.median(incr_t)
        cold = statistics.median(cold_t)
        print("server CPU time (medians; wall time in brackets):")
        print(f"full sync, one agent:       {full * 1e3:8.3f} ms  "
              f"[{statistics.median(full_w) * 1e3:.3f}]  ({len(chosen)} agents, "
              f"{statistics.median(sizes):.0f} entries each, index + page encoding)")
        print(f"incremental, 1 entry:       {incr * 1e3:8.3f} ms  "
              f"[{statistics.median(incr_w) * 1e3:.3f}]  (p90 "
              f"{statistics.quantiles(incr_t, n=10)[-1] * 1e3:.3f} ms)")
        print(f"  the same, cold caches:    {cold * 1e3:8.3f} ms  (right after the "
              "datastore write and poll, no other sync in between)")
        print(f"incremental, nothing new:   {statistics.median(idle_t) * 1e3:8.3f} ms")
        print(f"change-log poll per change: {statistics.median(poll_t) * 1e3:8.3f} ms  "
              f"[{statistics.median(poll_w) * 1e3:.3f}]  (once per change for all agents; "
              "datastore round trips)")
        print(f"server RSS:                 {rss_mib():8.1f} MiB")
        print(f"ratio incremental / full:   {incr / full:8.4f}   (goal < 0.01; "
              f"cold caches {cold / full:.4f})")
        print(f"ratio incremental / 1 ms:   {incr / 1e-3:8.4f}   (goal < 1)")
        datastore.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_rpc:
        rpc_figures(args)
    return 0


# ---- end to end: SyncAuthorizedEntries over mTLS on a running server ---------------------

FEDERATED = tuple(TrustDomain(f"fed{k}.bench.test") for k in range(1, 4))


@dataclass
class _RpcAgent:
    """An attested agent with its own mTLS connection, and what it last synced."""

    agent_id: SpiffeId
    stub: Any
    channel: Any
    entry_ids: list[str]
    generation: str = ""
    revision: int = 0
    digests: dict[str, str] | None = None

    def sync(self, *, full: bool = False) -> tuple[float, list[Any]]:
        """One SyncAuthorizedEntries call (full: as a fresh agent); (wall, pages)."""
        request = agent_pb2.SyncAuthorizedRequest() if full else agent_pb2.SyncAuthorizedRequest(
            known_generation=self.generation, known_revision=self.revision,
            known_bundle_digests=self.digests or {})
        start = time.perf_counter()
        pages = list(self.stub.SyncAuthorizedEntries(request, timeout=60))
        wall = time.perf_counter() - start
        self.generation, self.revision = pages[-1].generation, pages[-1].revision
        if full:
            self.digests = dict(pages[0].bundle_digests)
        return wall, pages

    def empty_call(self) -> float:
        """An authenticated call that does nothing (BatchNewX509SVID, no CSR)."""
        start = time.perf_counter()
        self.stub.BatchNewX509SVID(agent_pb2.BatchNewX509SVIDRequest(), timeout=60)
        return time.perf_counter() - start


def _foreign_bundle(td: TrustDomain) -> bytes:
    now = dt.datetime.now(dt.UTC)
    key = generate_private_key()
    ca = new_ca_certificate(trust_domain=td, public_key=key.public_key(), signer_key=key,
                            not_before=now, not_after=now + dt.timedelta(days=1))
    jwt = generate_private_key().public_key()
    return Bundle(td, (ca,), (JwtAuthority(key_id=f"{td.name}-k", public_key=jwt),),
                  sequence_number=1).to_json()


def _attest_rpc(srv: Any, admin: Any, roots: bytes) -> tuple[SpiffeId, Any, Any]:
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from api.protos.sigil.admin.v1 import admin_pb2
    from attestation.node.join_token import make_attestation
    from bench.server import TARGET
    from identity.keys import private_key_to_pem
    from identity.x509svid import new_csr

    token = admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=30).token
    key = generate_private_key()
    kind, payload = make_attestation(token)
    opts = [("grpc.ssl_target_name_override", TARGET)]
    with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(roots),
                             options=opts) as ch:
        resp = agent_pb2_grpc.AgentStub(ch).AttestAgent(agent_pb2.AttestAgentRequest(  # type: ignore[no-untyped-call]
            data=agent_pb2.AttestationData(type=kind, payload=payload), csr=new_csr(key)),
            timeout=30)
    chain = b"".join(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM)
                     for d in resp.svid.cert_chain)
    channel = grpc.secure_channel(
        srv.address, grpc.ssl_channel_credentials(roots, private_key_to_pem(key), chain),
        options=[*opts, ("grpc.use_local_subchannel_pool", 1)])
    return (SpiffeId.parse(resp.svid.spiffe_id),
            agent_pb2_grpc.AgentStub(channel), channel)  # type: ignore[no-untyped-call]


def rpc_figures(args: argparse.Namespace) -> None:
    """SyncAuthorizedEntries end to end: a real server, real agents over mTLS."""
    from sqlalchemy import create_engine

    from api.protos.sigil.admin.v1 import admin_pb2
    from api.protos.sigil.types.v1 import types_pb2
    from bench.server import cpu_seconds, sigil_server

    measured = min(args.rpc_agents, args.agents)
    total = args.agents * args.per_agent + args.aliases * (1 + ALIAS_CHILDREN)
    with sigil_server(trust_domain=TD.name, workers=1,
                      config="rate_limit_attestation_per_second = 0\n") as srv:
        admin, admin_channel = srv.admin()
        roots = srv.roots()
        for td in FEDERATED:
            admin.SetBundle(admin_pb2.SetBundleRequest(
                trust_domain=td.name, format="spiffe", data=_foreign_bundle(td)), timeout=30)
        agents = []
        for _ in range(measured):
            agent, stub, channel = _attest_rpc(srv, admin, roots)
            agents.append(_RpcAgent(agent, stub, channel, []))
        # The other agents' entries (and the node aliases') fill the datastore to the
        # same size as in-process; then the measured agents' entries, each federating
        # with every foreign trust domain. Written last, so once the server shows
        # them, it has read the whole change log.
        filler = Datastore(srv.database_url)
        seed(filler, args.agents - measured, args.per_agent, args.aliases)
        filler.close()
        rows = [NewEntry(SpiffeId.from_segments(TD, "rpc", f"a{n}", f"w{j}"), a.agent_id,
                         (Selector("k8s", f"sa:w{j}"),), FEDERATED)
                for n, a in enumerate(agents) for j in range(args.per_agent)]
        ids = insert_entries(create_engine(srv.database_url), rows)
        for n, a in enumerate(agents):
            a.entry_ids = ids[n * args.per_agent:(n + 1) * args.per_agent]
        # The server reads other processes' writes on its poll interval.
        deadline = time.monotonic() + 300
        while sum(len(p.entries) for p in agents[-1].sync(full=True)[1]) < args.per_agent:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not see the seeded entries")
            time.sleep(0.5)
        print(f"\nend to end: sigil-server (worker_processes = 1, SQLite), {total} entries; "
              f"{measured} agents over mTLS with {args.per_agent} entries each, every entry "
              f"federating with {len(FEDERATED)} trust domains (4 bundles)")

        def batch(fn: Callable[[_RpcAgent], float], rounds: int
                  ) -> tuple[list[float], float]:
            """``rounds`` calls per agent: wall times, and server CPU per call."""
            for a in agents:
                fn(a)  # warm
            walls: list[float] = []
            cpu = cpu_seconds(srv.pids)
            for _ in range(rounds):
                walls += [fn(a) for a in agents]
            return walls, (cpu_seconds(srv.pids) - cpu) / len(walls)

        def full(a: _RpcAgent) -> float:
            wall, pages = a.sync(full=True)
            assert sum(len(p.entries) for p in pages) == args.per_agent
            assert len(pages[0].bundles) == 1 + len(FEDERATED), pages[0].bundles.keys()
            return wall

        def idle(a: _RpcAgent) -> float:
            wall, pages = a.sync()
            assert not pages[0].entries and not pages[0].bundles
            return wall

        results = {
            "full sync": batch(full, args.rpc_rounds),
            "incremental, nothing changed": batch(idle, 5 * args.rpc_rounds),
            "authenticated empty call": batch(_RpcAgent.empty_call, 5 * args.rpc_rounds),
        }
        # One of the agent's entries changes (admin API, in the server: its index
        # catches up at the next sync); another agent's sync takes that catch-up,
        # as on a busy server, then this agent's incremental sync is timed.
        changed: list[float] = []
        rng = random.Random(2)
        for _ in range(args.rpc_rounds):
            for n, a in enumerate(agents):
                target = rng.choice(a.entry_ids)
                admin.UpdateEntry(admin_pb2.UpdateEntryRequest(
                    entry=types_pb2.Entry(id=target, dns_names=[f"d{rng.random():.6f}.test"]),
                    fields=["dns_names"]), timeout=30)
                agents[(n + 1) % len(agents)].sync()
                wall, pages = a.sync()
                assert [e.id for p in pages for e in p.entries] == [target], "delta is wrong"
                assert not pages[0].bundles
                changed.append(wall)
        admin_channel.close()
        for a in agents:
            a.channel.close()

    def p(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1e3

    print(f"{'':32} {'wall p50':>9} {'p90':>8} {'server CPU/call':>16}")
    rows_out = [(k, w, c) for k, (w, c) in results.items()]
    rows_out.insert(1, ("incremental, one entry changed", changed, float("nan")))
    for label, walls, cpu in rows_out:
        cpu_text = "-" if cpu != cpu else f"{cpu * 1e3:.3f} ms"
        print(f"{label:32} {p(walls, .5):7.3f}ms {p(walls, .9):6.3f}ms {cpu_text:>16}")
    full_w = p(results["full sync"][0], .5)
    print(f"ratio incremental (one change) / full, wall p50: {p(changed, .5) / full_w:.3f}")
    print(f"ratio incremental (nothing) / full, server CPU: "
          f"{results['incremental, nothing changed'][1] / results['full sync'][1]:.3f}")
    print(f"ratio incremental (one change) / empty authenticated call, wall p50: "
          f"{p(changed, .5) / p(results['authenticated empty call'][0], .5):.2f}")


if __name__ == "__main__":
    sys.exit(main())
