"""Start and stop the server's Kubernetes background parts from its configuration.

:class:`ca.server.SigilServer` owns one :class:`KubernetesServices`: the
registration controller (``[kubernetes.controller]``) and the bundle ConfigMap
notifier (``[kubernetes.bundle_configmap]``), each only when configured.
"""

from __future__ import annotations

from attestation.kubeapi import KubeApi, KubeApiError, KubeConnection
from ca.config.server import ServerConfig
from ca.datastore import Datastore
from ca.errors import ConfigError
from ca.kubernetes.bundle_configmap import BundleConfigMapNotifier
from ca.kubernetes.controller import ControllerSettings, RegistrationController
from identity.clock import Clock


class KubernetesServices:
    """The configured Kubernetes parts; start() then stop()."""

    def __init__(self, config: ServerConfig, datastore: Datastore, clock: Clock) -> None:
        """Build the API clients.

        Raises:
            ConfigError: a client's settings cannot be loaded.
        """
        k8s = config.kubernetes
        self._apis: list[KubeApi] = []
        self.controller: RegistrationController | None = None
        self.notifier: BundleConfigMapNotifier | None = None
        if k8s.controller is not None:
            ctl = k8s.controller
            api = self._api(ctl.connection, "kubernetes.controller")
            self.controller = RegistrationController(
                api, datastore,
                ControllerSettings(trust_domain=config.trust_domain, cluster=ctl.cluster,
                                   max_ttl=config.ca_ttl,
                                   resync_interval=ctl.resync_interval,
                                   policy=config.policy),
                clock=clock)
        if k8s.bundle_configmap is not None:
            cm = k8s.bundle_configmap
            self.notifier = BundleConfigMapNotifier(
                self._api(cm.connection, "kubernetes.bundle_configmap"), datastore,
                config.trust_domain, namespaces=cm.namespaces, name=cm.name,
                resync_interval=cm.resync_interval.total_seconds())

    def _api(self, connection: KubeConnection, where: str) -> KubeApi:
        try:
            api = KubeApi(connection)
        except KubeApiError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        self._apis.append(api)
        return api

    def start(self) -> None:
        """Start what is configured."""
        if self.controller is not None:
            self.controller.start()
        if self.notifier is not None:
            self.notifier.start()

    def stop(self) -> None:
        """Stop everything and close the API clients."""
        if self.controller is not None:
            self.controller.stop()
        if self.notifier is not None:
            self.notifier.stop()
        for api in self._apis:
            api.close()
        self._apis.clear()
