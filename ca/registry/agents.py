"""Attested agent (node) management behind the admin API.

- ban: the node record stays, marked banned; the agent API refuses the agent's
  SVID at its next call and refuses re-attestation under the same ID.
- evict: the node record is deleted; the agent's SVID stops authenticating at once
  and the agent must attest again (a ban is lifted this way too, as in SPIRE).
- purge: evicts agents whose SVIDs expired more than a given time ago.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ca.datastore import Datastore, NodeRecord
from ca.errors import InvalidArgumentError, NotFoundError
from ca.log import event
from ca.registry.entries import decode_cursor, encode_cursor, page_size
from identity.clock import Clock
from identity.spiffeid import SpiffeId

DEFAULT_PURGE_EXPIRED_FOR = dt.timedelta(hours=24)
# Purging agents whose SVIDs are still valid, or only just expired, would evict
# live agents: a minimum keeps the command from doing that by accident.
MIN_PURGE_EXPIRED_FOR = dt.timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class AgentService:
    """Agent operations on the datastore, with their log events."""

    datastore: Datastore
    clock: Clock

    def list_page(self, *, size: int, page_token: str) -> tuple[list[NodeRecord], str]:
        """One page of agents ordered by ID, and the next page's token ("" at the end)."""
        limit = page_size(size)
        after = decode_cursor(page_token, 1)[0] if page_token else None
        rows = self.datastore.list_nodes_page(limit=limit + 1, after=after)
        if len(rows) <= limit:
            return rows, ""
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1].spiffe_id)

    def get(self, agent_id: SpiffeId) -> NodeRecord:
        """One agent (NotFoundError if it has not attested or was evicted)."""
        node = self.datastore.get_node(agent_id)
        if node is None:
            raise NotFoundError(f"agent {agent_id} not found")
        return node

    def ban(self, agent_id: SpiffeId) -> NodeRecord:
        """Ban an agent: refused at its next sync, signing call and re-attestation."""
        self.datastore.set_node_banned(agent_id, True, now=self.clock.now())
        event("agent banned", agent_id=agent_id)
        return self.get(agent_id)

    def evict(self, agent_id: SpiffeId) -> NodeRecord:
        """Delete the agent's record: it must attest again."""
        node = self.datastore.delete_node(agent_id)
        event("agent evicted", agent_id=agent_id)
        return node

    def count(self) -> int:
        """How many attested agents there are."""
        return self.datastore.count_nodes()

    def purge(self, *, expired_for: dt.timedelta, dry_run: bool = False) -> list[SpiffeId]:
        """Evict every agent whose SVID expired more than ``expired_for`` ago."""
        if expired_for < MIN_PURGE_EXPIRED_FOR:
            raise InvalidArgumentError(
                f"expired_for must be at least {int(MIN_PURGE_EXPIRED_FOR.total_seconds())} "
                "seconds"
            )
        cutoff = int((self.clock.now() - expired_for).timestamp())
        ids = self.datastore.purge_nodes(expired_before=cutoff, dry_run=dry_run)
        event("agents purged", count=len(ids), dry_run=dry_run,
              expired_for=int(expired_for.total_seconds()))
        return ids
