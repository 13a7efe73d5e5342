"""The agent's side of bundles by digest (ServerClient._bundle_messages).

The server names every bundle to hold by digest and sends only those the agent
does not hold in that version (tests/integration/test_bundle_admin.py shows the
server's side); here, what the agent holds after each answer.
"""

from __future__ import annotations

import pytest

from agent.client import MAX_KNOWN_BUNDLES, ServerClient
from api.protos.sigil.agent.v1 import agent_pb2
from ca.api.convert import bundle_to_proto
from ca.api.sync import MAX_KNOWN_BUNDLES as SERVER_LIMIT
from ca.api.sync import SyncBundle
from identity.errors import SigilError
from identity.spiffeid import TrustDomain
from tests.unit.test_agent_federated_bundles import bundle

OWN = TrustDomain("agent.test")
FED = TrustDomain("partner.test")


def message(td: TrustDomain, sequence: int) -> SyncBundle:
    return SyncBundle.of(bundle_to_proto(bundle(td, sequence=sequence)))


def page(named: dict[str, SyncBundle], sent: tuple[str, ...]
         ) -> agent_pb2.SyncAuthorizedEntriesPage:
    first = agent_pb2.SyncAuthorizedEntriesPage(last=True)
    for name, b in named.items():
        first.bundle_digests[name] = b.digest
    for name in sent:
        first.bundles[name].CopyFrom(named[name].message)
    return first


def test_kept_bundles_come_from_what_the_agent_holds() -> None:
    client = ServerClient(address="127.0.0.1:1", trust_domain=OWN)
    own1, fed1, fed2 = message(OWN, 1), message(FED, 1), message(FED, 2)
    held = client._bundle_messages(page({OWN.name: own1, FED.name: fed1}, (OWN.name, FED.name)))
    assert {n: h[0] for n, h in held.items()} == {OWN.name: own1.digest, FED.name: fed1.digest}
    client._held_bundles = held

    # Own unchanged (named, not sent), federated changed (sent).
    after = client._bundle_messages(page({OWN.name: own1, FED.name: fed2}, (FED.name,)))
    assert after[OWN.name] is held[OWN.name]  # neither re-sent nor parsed again
    fed = after[FED.name][2]
    assert fed is not None and fed.sequence_number == 2
    client._held_bundles = after

    # Not named any more: dropped.
    assert list(client._bundle_messages(page({OWN.name: own1}, ()))) == [OWN.name]


def test_a_kept_bundle_the_agent_does_not_hold_fails_the_sync_and_resets() -> None:
    client = ServerClient(address="127.0.0.1:1", trust_domain=OWN)
    own1, own2 = message(OWN, 1), message(OWN, 2)
    client._held_bundles = client._bundle_messages(page({OWN.name: own1}, (OWN.name,)))
    with pytest.raises(SigilError, match="does not hold that version"):
        client._bundle_messages(page({OWN.name: own2}, ()))
    assert client._held_bundles == {}  # the next request presents no digests


def test_an_older_server_sends_the_whole_set() -> None:
    client = ServerClient(address="127.0.0.1:1", trust_domain=OWN)
    legacy = agent_pb2.SyncAuthorizedEntriesPage(last=True)
    legacy.bundles[OWN.name].CopyFrom(message(OWN, 3).message)
    held = client._bundle_messages(legacy)
    assert held[OWN.name][0] == ""  # never presented as known
    parsed = held[OWN.name][2]
    assert parsed is not None and parsed.sequence_number == 3


def test_past_the_servers_limit_no_digests_are_presented() -> None:
    client = ServerClient(address="127.0.0.1:1", trust_domain=OWN)
    held = message(OWN, 1)
    client._held_bundles = {f"td{i}.test": (held.digest, held.message, None)
                            for i in range(MAX_KNOWN_BUNDLES)}
    assert len(client.known_bundle_digests()) == MAX_KNOWN_BUNDLES
    client._held_bundles["one-more.test"] = (held.digest, held.message, None)
    assert client.known_bundle_digests() == {}
    assert MAX_KNOWN_BUNDLES == SERVER_LIMIT  # the same limit on both sides
