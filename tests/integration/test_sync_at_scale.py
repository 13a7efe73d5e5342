"""SyncAuthorizedEntries against a real server: 50,000 entries under grpc's default
4 MiB message limit, then only what changed, and a full resync after a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from sqlalchemy import create_engine

from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
from bench.seed import NewEntry, insert_entries
from identity.selectors import Selector
from identity.spiffeid import SpiffeId
from tests.integration.conftest import RunningServer
from tests.integration.test_server_agent_api import Agent, _attest, _channel, _entry, _token

DEFAULT_LIMIT = 4 * 1024 * 1024
# The server reads other processes' writes (here: the test's bulk insert) on its
# poll interval, 1 s; this only bounds how long we wait for them.
SEEN_WITHIN = 60.0


@pytest.fixture
def agent(sigil_server: RunningServer) -> Iterator[Agent]:
    a = _attest(sigil_server, _token(sigil_server)["token"])
    yield a
    a.channel.close()


def sync(agent: Agent, generation: str = "", revision: int = 0
         ) -> list[agent_pb2.SyncAuthorizedEntriesPage]:
    # The agent's channel has grpc's default receive limit (4 MiB).
    return list(agent.stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(
        known_generation=generation, known_revision=revision), timeout=120))


def entry_ids(pages: list[agent_pb2.SyncAuthorizedEntriesPage]) -> list[str]:
    return [e.id for p in pages for e in p.entries]


def wait_for_count(agent: Agent, count: int) -> list[agent_pb2.SyncAuthorizedEntriesPage]:
    deadline = time.monotonic() + SEEN_WITHIN
    while True:
        pages = sync(agent)
        if len(entry_ids(pages)) >= count or time.monotonic() > deadline:
            return pages
        time.sleep(0.5)


@pytest.mark.slow
def test_50000_entries_in_pages_then_only_changes(
    sigil_server: RunningServer, agent: Agent
) -> None:
    td = sigil_server.trust_domain
    parent = SpiffeId.parse(agent.agent_id)
    engine = create_engine(f"sqlite:///{sigil_server.data_dir / 'datastore.sqlite3'}")
    ids = insert_entries(engine, [
        NewEntry(SpiffeId.parse(f"spiffe://{td}/workload/{i}"), parent,
                 (Selector("unix", f"uid:{i}"), Selector("k8s", "ns:payments")))
        for i in range(50_000)])
    engine.dispose()

    pages = wait_for_count(agent, 50_000)
    got = entry_ids(pages)
    assert len(got) == 50_000 and set(got) == set(ids)  # each exactly once
    assert pages[0].full_resync
    assert len(pages) > 2
    assert all(p.ByteSize() < DEFAULT_LIMIT for p in pages)
    assert [p.last for p in pages] == [False] * (len(pages) - 1) + [True]
    assert len({(p.generation, p.revision) for p in pages}) == 1
    assert td in pages[0].bundles and all(not p.bundles for p in pages[1:])
    generation, revision = pages[-1].generation, pages[-1].revision

    # The same sync as one message does not fit the default limit: why we page.
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.SyncAuthorized(agent_pb2.SyncAuthorizedRequest(), timeout=120)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Nothing changed: nothing is sent again.
    again = sync(agent, generation, revision)
    assert len(again) == 1
    assert (again[0].full_resync, list(again[0].entries), list(again[0].removed_entry_ids),
            again[0].revision, again[0].last) == (False, [], [], revision, True)

    # One entry deleted, one created, through the admin API: exactly those two.
    assert sigil_server.cli("entry", "delete", "--id", ids[7]).returncode == 0
    created = _entry(sigil_server, f"spiffe://{td}/new", agent.agent_id,
                     "--selector", "unix:uid:7")
    delta = sync(agent, generation, revision)
    assert len(delta) == 1 and not delta[0].full_resync
    assert entry_ids(delta) == [created["id"]]
    assert list(delta[0].removed_entry_ids) == [ids[7]]
    assert delta[0].revision > revision

    # A restarted server has a new index generation: the agent gets everything again.
    sigil_server.restart()
    agent.channel.close()
    agent.channel = _channel(sigil_server, key=agent.key, chain=agent.chain_der)
    agent.stub = agent_pb2_grpc.AgentStub(agent.channel)  # type: ignore[no-untyped-call]
    pages = sync(agent, generation, delta[0].revision)
    assert pages[0].full_resync and pages[-1].generation != generation
    assert len(entry_ids(pages)) == 50_000


def test_unchanged_entry_is_never_sent_twice(sigil_server: RunningServer, agent: Agent) -> None:
    td = sigil_server.trust_domain
    first = _entry(sigil_server, f"spiffe://{td}/a", agent.agent_id, "--selector", "unix:uid:1")
    pages = sync(agent)
    assert entry_ids(pages) == [first["id"]] and pages[0].full_resync
    second = _entry(sigil_server, f"spiffe://{td}/b", agent.agent_id, "--selector", "unix:uid:2")
    delta = sync(agent, pages[-1].generation, pages[-1].revision)
    assert entry_ids(delta) == [second["id"]] and not delta[0].full_resync


@pytest.mark.parametrize(
    ("generation", "revision", "detail"),
    [("", -1, "known_revision must not be negative"),
     ("x" * 65, 0, "known_generation is at most 64 characters")],
)
def test_bad_known_revision_is_invalid_argument(
    sigil_server: RunningServer, agent: Agent, generation: str, revision: int, detail: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        sync(agent, generation, revision)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (err.value.details() or "")


@pytest.mark.parametrize(
    ("known", "detail"),
    [({f"td{i}.test": "0" * 32 for i in range(1025)}, "at most 1024 entries"),
     ({"td.test": "short"}, "32-character digests"),
     ({"": "0" * 32}, "trust domain names"),
     ({"x" * 256: "0" * 32}, "trust domain names")],
    ids=["too-many", "bad-digest", "empty-name", "long-name"],
)
def test_bad_known_bundle_digests_are_invalid_argument(
    sigil_server: RunningServer, agent: Agent, known: dict[str, str], detail: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(agent.stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(
            known_bundle_digests=known), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (err.value.details() or "")
    # Nothing changed: a plain sync still answers with the whole bundle.
    pages = sync(agent)
    assert list(pages[0].bundles) == [sigil_server.trust_domain]


def test_sync_without_client_certificate_is_unauthenticated(
    sigil_server: RunningServer,
) -> None:
    with _channel(sigil_server) as ch, pytest.raises(grpc.RpcError) as err:
        stub = agent_pb2_grpc.AgentStub(ch)  # type: ignore[no-untyped-call]
        list(stub.SyncAuthorizedEntries(agent_pb2.SyncAuthorizedRequest(), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
