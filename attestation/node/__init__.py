"""Node attestors, and the registry of their server halves by name.

A node attestor's server half is a callable ``verify(payload, context) ->
AttestationResult``; :data:`SERVER_VERIFIERS` maps the attestor's name (the
``AttestationData.type`` on the wire) to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from identity.selectors import Selector
from identity.spiffeid import SpiffeId


@dataclass(frozen=True, slots=True)
class AttestationResult:
    """What a verified node attestation yields.

    Attributes:
        agent_id: the SPIFFE ID the agent gets.
        selectors: the node's selectors.
        alias: an extra SPIFFE ID the agent should be known by (a node-alias entry),
            or None.
    """

    agent_id: SpiffeId
    selectors: Sequence[Selector]
    alias: SpiffeId | None = None


NODE_ATTESTORS: tuple[str, ...] = ("join_token",)
"""The node attestors the server knows, by name."""
