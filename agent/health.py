"""The agent's own health, as ``sigil-agent healthcheck`` reads it.

The Workload API answering proves the agent runs, not that it still gets new
SVIDs: a banned or evicted agent, or one that cannot reach its server, keeps
serving the SVIDs it holds until they expire (docs/agent.md, "Offline
behaviour"). So the agent also answers one method of its own on the Workload API
socket, ``/sigil.agent.v1.AgentHealth/Check``: a JSON :class:`HealthReport`
(the request is empty). It needs no identity; it tells a local process no more
than the agent's logs do (its state and the reason for it), never a key.

The body is JSON rather than a protobuf message: only ``sigil-agent healthcheck``
reads it, and it is no part of the server's API, so it needs no message in
api/protos.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

SERVICE = "sigil.agent.v1.AgentHealth"
METHOD = f"/{SERVICE}/Check"


class HealthState(enum.StrEnum):
    """What the agent can do for its workloads now."""

    HEALTHY = "healthy"
    """The last sync with the server succeeded: SVIDs are renewed as they come due."""

    DEGRADED = "degraded"
    """The last sync failed (server unreachable, or a refusal other than a ban or
    an eviction): the agent serves the SVIDs it holds until they expire."""

    EVICTED = "evicted"
    """The server no longer knows the agent and it could not attest again (a
    join-token agent needs a new token): it serves what it holds until it expires."""

    BANNED = "banned"
    """The server refuses the agent: no new SVIDs; it serves what it holds until it
    expires."""


EXIT_CODES: dict[HealthState, int] = {
    HealthState.HEALTHY: 0,
    HealthState.DEGRADED: 3,
    HealthState.EVICTED: 4,
    HealthState.BANNED: 5,
}
"""``sigil-agent healthcheck``'s exit code per state (1 and 2 mean what they mean
for every command: the agent did not answer; bad input)."""


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The agent's state, why, and what it holds.

    Attributes:
        state: see :class:`HealthState`.
        reason: why it is not healthy (the server's message, or why attesting
            again failed); empty when healthy.
        last_sync: ISO 8601 time of the last successful sync; empty if none yet.
        svids: how many workload X.509-SVIDs the agent holds now.
        next_expiry: ISO 8601 time the first of them expires; empty if none.
    """

    state: HealthState
    reason: str = ""
    last_sync: str = ""
    svids: int = 0
    next_expiry: str = ""

    def to_json(self) -> bytes:
        """The report as the Check method sends it."""
        return json.dumps({
            "state": self.state.value, "reason": self.reason, "last_sync": self.last_sync,
            "svids": self.svids, "next_expiry": self.next_expiry,
        }).encode()

    @classmethod
    def from_json(cls, data: bytes) -> HealthReport:
        """Parse what the Check method sent.

        Raises:
            ValueError: not a report (not JSON, an unknown state, a wrong type).
        """
        doc: Any = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("the health report is not a JSON object")
        report = cls(
            state=HealthState(str(doc.get("state"))),
            reason=doc.get("reason", ""),
            last_sync=doc.get("last_sync", ""),
            svids=doc.get("svids", 0),
            next_expiry=doc.get("next_expiry", ""),
        )
        if not (isinstance(report.reason, str) and isinstance(report.last_sync, str)
                and isinstance(report.next_expiry, str) and type(report.svids) is int):
            raise ValueError("the health report has a field of the wrong type")
        return report


def health_handler(report: Callable[[], HealthReport]) -> grpc.GenericRpcHandler:
    """The generic handler serving :data:`METHOD` from ``report`` (on the loop)."""

    async def check(_request: bytes, _context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return report().to_json()

    return grpc.method_handlers_generic_handler(
        SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(check)})
