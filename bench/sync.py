"""Authorized-entry sync at scale: the entry index and SyncAuthorizedEntries' work.

Usage:
    python bench/sync.py [--agents 1000] [--per-agent 100] [--aliases 10]
                         [--database-url URL] [--repeat 200]

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
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import migrations  # noqa: E402
from api.protos.sigil.agent.v1 import agent_pb2  # noqa: E402
from api.protos.sigil.types.v1 import types_pb2  # noqa: E402
from bench.seed import NewEntry, insert_entries  # noqa: E402
from ca.api.sync import delta_pages, sync_delta  # noqa: E402
from ca.datastore import Datastore  # noqa: E402
from ca.datastore.feed import DatastoreFeed  # noqa: E402
from ca.entry_index import EntryIndex  # noqa: E402
from identity.clock import SystemClock  # noqa: E402
from identity.selectors import Selector  # noqa: E402
from identity.spiffeid import SpiffeId, TrustDomain  # noqa: E402

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


def timed(fn):  # type: ignore[no-untyped-def]
    # CPU time of this thread: the server's own work, unaffected by whatever else
    # the machine runs (a shared CI box); wall time is printed beside it.
    start, wall = time.thread_time(), time.perf_counter()
    result = fn()
    timed.wall = time.perf_counter() - wall  # type: ignore[attr-defined]
    return time.thread_time() - start, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--per-agent", type=int, default=100)
    ap.add_argument("--aliases", type=int, default=10, help="clusters, one node alias each")
    ap.add_argument("--database-url", default="")
    ap.add_argument("--repeat", type=int, default=200)
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

        bundle = {TD.name: types_pb2.Bundle(trust_domain=TD.name)}
        rng = random.Random(1)
        chosen = rng.sample(range(args.agents), min(args.repeat, args.agents))

        def server_sync(i: int, generation: str, revision: int
                        ) -> tuple[float, list[agent_pb2.SyncAuthorizedEntriesPage]]:
            request = agent_pb2.SyncAuthorizedRequest(
                known_generation=generation, known_revision=revision)
            # Parsed before the clock starts, as the servicer has them from the
            # node record that authentication loaded.
            agent, selectors = agent_id(i), node_selectors(i, args.aliases)

            def run() -> list[agent_pb2.SyncAuthorizedEntriesPage]:
                delta = sync_delta(index, request, agent_id=agent, node_selectors=selectors)
                pages = delta_pages(delta, bundle)
                for page in pages:
                    page.SerializeToString()
                return pages

            return timed(run)  # type: ignore[no-any-return]

        full_t, incr_t, idle_t, poll_t = [], [], [], []
        full_w, incr_w, poll_w = [], [], []
        sizes = []
        for i in chosen:
            t, pages = server_sync(i, "", 0)
            full_t.append(t)
            full_w.append(timed.wall)  # type: ignore[attr-defined]
            sizes.append(sum(len(p.entries) for p in pages))
            gen, rev = pages[-1].generation, pages[-1].revision
            t, pages = server_sync(i, gen, rev)
            idle_t.append(t)
            assert not pages[0].entries
            # One of this agent's entries changes (a new DNS name).
            target = rng.choice([e for e in datastore.list_entries(parent_id=agent_id(i))])
            datastore.update_entry(
                target.id, replace(target, dns_names=(f"w{rng.random():.6f}.example",)),
                expected_revision=target.revision, now=dt.datetime.now(dt.UTC))
            t, _ = timed(index.catch_up)
            poll_t.append(t)
            poll_w.append(timed.wall)  # type: ignore[attr-defined]
            t, pages = server_sync(i, gen, rev)
            incr_t.append(t)
            incr_w.append(timed.wall)  # type: ignore[attr-defined]
            assert [e.id for p in pages for e in p.entries] == [target.id], "delta is wrong"

        full = statistics.median(full_t)
        incr = statistics.median(incr_t)
        print("server CPU time (medians; wall time in brackets):")
        print(f"full sync, one agent:       {full * 1e3:8.3f} ms  "
              f"[{statistics.median(full_w) * 1e3:.3f}]  ({len(chosen)} agents, "
              f"{statistics.median(sizes):.0f} entries each, index + page encoding)")
        print(f"incremental, 1 entry:       {incr * 1e3:8.3f} ms  "
              f"[{statistics.median(incr_w) * 1e3:.3f}]  (p90 "
              f"{statistics.quantiles(incr_t, n=10)[-1] * 1e3:.3f} ms)")
        print(f"incremental, nothing new:   {statistics.median(idle_t) * 1e3:8.3f} ms")
        print(f"change-log poll per change: {statistics.median(poll_t) * 1e3:8.3f} ms  "
              f"[{statistics.median(poll_w) * 1e3:.3f}]  (once per change for all agents; "
              "datastore round trips)")
        print(f"server RSS:                 {rss_mib():8.1f} MiB")
        print(f"ratio incremental / full:   {incr / full:8.4f}   (goal < 0.01)")
        print(f"ratio incremental / 1 ms:   {incr / 1e-3:8.4f}   (goal < 1)")
        datastore.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
