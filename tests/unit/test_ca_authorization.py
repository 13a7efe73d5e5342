"""ca.registry.authorization: which entries an agent may receive."""

from __future__ import annotations

from collections.abc import Iterable, Set

from ca.datastore import EntryRecord
from ca.registry.authorization import authorized_entries
from identity.selectors import Selector
from identity.spiffeid import SpiffeId

TD = "spiffe://example.org"
SERVER = SpiffeId.parse(f"{TD}/sigil/server")
AGENT = SpiffeId.parse(f"{TD}/sigil/agent/join_token/a")
NODE_SELECTORS = (Selector("join_token", "a"), Selector("spiffe_id", str(AGENT)),
                  Selector("k8s_psat", "cluster:c1"))


def e(eid: str, spiffe: str, parent: SpiffeId | str, *sels: str, expires_at: int = 0
      ) -> EntryRecord:
    return EntryRecord(
        id=eid, spiffe_id=SpiffeId.parse(f"{TD}{spiffe}"),
        parent_id=parent if isinstance(parent, SpiffeId) else SpiffeId.parse(f"{TD}{parent}"),
        selectors=tuple(Selector.parse(s) for s in (sels or ("unix:uid:1",))),
        expires_at=expires_at,
    )


def run(entries: Iterable[EntryRecord], *, now: int = 100) -> list[str]:
    entries = list(entries)

    def by_parent(parents: Set[SpiffeId]) -> list[EntryRecord]:
        return [x for x in entries if x.parent_id in parents]

    return sorted(x.id for x in authorized_entries(
        agent_id=AGENT, node_selectors=NODE_SELECTORS, server_id=SERVER,
        entries_by_parent=by_parent, now=now))


def test_direct_children_only() -> None:
    other = SpiffeId.parse(f"{TD}/sigil/agent/join_token/b")
    assert run([e("1", "/web", AGENT), e("2", "/db", other)]) == ["1"]


def test_alias_matching_all_selectors() -> None:
    entries = [
        e("alias", "/node/c1", SERVER, "k8s_psat:cluster:c1"),
        e("alias2", "/node/both", SERVER, "k8s_psat:cluster:c1", "join_token:a"),
        e("nomatch", "/node/c2", SERVER, "k8s_psat:cluster:c2"),
        e("partial", "/node/p", SERVER, "k8s_psat:cluster:c1", "k8s_psat:cluster:c2"),
        e("1", "/web", "/node/c1"),
        e("2", "/api", "/node/both"),
        e("3", "/x", "/node/c2"),
        e("4", "/y", "/node/p"),
    ]
    # The alias entries themselves are not handed out.
    assert run(entries) == ["1", "2"]


def test_join_token_alias_via_spiffe_id_selector() -> None:
    entries = [e("alias", "/node/web-1", SERVER, f"spiffe_id:{AGENT}"),
               e("1", "/svc", "/node/web-1")]
    assert run(entries) == ["1"]


def test_nesting_and_cycle() -> None:
    entries = [
        e("1", "/a", AGENT),
        e("2", "/b", "/a"),
        e("3", "/c", "/b"),
        e("4", "/a", "/c"),  # back to /a: a cycle
        e("5", "/unrelated", "/zzz"),
    ]
    assert run(entries) == ["1", "2", "3", "4"]


def test_server_children_not_inherited_by_nesting() -> None:
    # An entry whose SPIFFE ID equals the server ID must not open all aliases.
    entries = [e("1", "/sigil/server", AGENT), e("alias", "/node/x", SERVER, "other:1"),
               e("2", "/y", "/node/x")]
    assert run(entries) == ["1"]


def test_expired_entries_skipped() -> None:
    assert run([e("1", "/a", AGENT, expires_at=50), e("2", "/b", AGENT, expires_at=500)]) == ["2"]
