"""What the servicers depend on, in one value."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from attestation.node import AttestationResult
from ca.authority import CertificateAuthority, server_id
from ca.config.server import ServerConfig
from ca.datastore import Datastore
from ca.federation.refresher import Refresher
from identity.clock import Clock
from identity.spiffeid import SpiffeId


@dataclass(frozen=True, slots=True)
class ApiDeps:
    """The servicers' dependencies."""

    config: ServerConfig
    datastore: Datastore
    authority: CertificateAuthority
    clock: Clock
    # Node attestors besides join_token (which needs the datastore transaction):
    # name -> verify(payload), which raises an AttestationError to refuse.
    node_verifiers: Mapping[str, Callable[[bytes], AttestationResult]] = field(
        default_factory=dict
    )
    # The federation refresher the server runs (None: the admin API makes its own).
    refresher: Refresher | None = None

    @property
    def server_id(self) -> SpiffeId:
        """The server's own SPIFFE ID."""
        return server_id(self.config.trust_domain)
