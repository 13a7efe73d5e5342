"""The federation parts of a running server, started and stopped together.

- the relationships of the config file, applied to the datastore at start;
- the refresher (foreign bundles, always on: relationships may come from the CLI);
- the bundle endpoint, with ``[federation.bundle_endpoint]``;
- the OIDC discovery endpoint, with ``[oidc_discovery]``.
"""

from __future__ import annotations

from ca.authority import CertificateAuthority
from ca.config.server import ServerConfig
from ca.datastore import Datastore
from ca.federation.endpoint import BundleEndpoint
from ca.federation.oidc import OidcDiscovery
from ca.federation.refresher import Refresher
from ca.federation.service import FederationService
from identity.clock import Clock


class FederationServices:
    """Owns the refresher and the two optional HTTPS endpoints."""

    def __init__(self, config: ServerConfig, datastore: Datastore,
                 authority: CertificateAuthority, clock: Clock) -> None:
        fed = config.federation
        self._config = config
        self.refresher = Refresher(datastore, fed, clock)
        self._service = FederationService(datastore, config.trust_domain, clock,
                                          self.refresher)
        self._endpoint = (None if fed.bundle_endpoint is None
                          else BundleEndpoint(fed.bundle_endpoint, authority, clock))
        self._oidc = (None if fed.oidc_discovery is None
                      else OidcDiscovery(fed.oidc_discovery, authority))
        self.bundle_endpoint_address = ""
        self.oidc_discovery_address = ""

    def start(self) -> None:
        """Apply configured relationships, then serve and refresh.

        Raises:
            ConfigError: an endpoint's certificate or address is unusable.
        """
        self._service.apply_configured(self._config.federation.relationships)
        try:
            if self._endpoint is not None:
                self._endpoint.start()
                self.bundle_endpoint_address = self._endpoint.bound_address
            if self._oidc is not None:
                self._oidc.start()
                self.oidc_discovery_address = self._oidc.bound_address
        except Exception:
            self.stop()
            raise
        self.refresher.start()

    def stop(self) -> None:
        """Stop refreshing and serving."""
        self.refresher.stop()
        for part in (self._endpoint, self._oidc):
            if part is not None:
                part.stop()
