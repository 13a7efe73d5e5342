"""What the servicers depend on, in one value."""

from __future__ import annotations

from dataclasses import dataclass

from ca.authority import CertificateAuthority, server_id
from ca.config import ServerConfig
from ca.datastore import Datastore
from identity.clock import Clock
from identity.spiffeid import SpiffeId


@dataclass(frozen=True, slots=True)
class ApiDeps:
    """The servicers' dependencies."""

    config: ServerConfig
    datastore: Datastore
    authority: CertificateAuthority
    clock: Clock

    @property
    def server_id(self) -> SpiffeId:
        """The server's own SPIFFE ID."""
        return server_id(self.config.trust_domain)
