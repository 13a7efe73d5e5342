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
        csr_binding: for proofs bound to the agent's SVID key (x509pop, sshpop):
            the SHA-256 of the SubjectPublicKeyInfo the proof covers
            (:func:`attestation.node.pop.csr_binding`). AttestAgent must refuse a
            CSR whose key gives another value. None: the attestor binds none.
    """

    agent_id: SpiffeId
    selectors: Sequence[Selector]
    alias: SpiffeId | None = None
    csr_binding: bytes | None = None


NODE_ATTESTORS: tuple[str, ...] = ("join_token", "k8s_psat", "x509pop", "sshpop")
"""The node attestors the server knows, by name."""
