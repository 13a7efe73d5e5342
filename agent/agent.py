"""The running agent: bootstrap trust, attest (or reuse its SVID), sync, serve.

Start-up order (DESIGN flow 2):

1. trust: the ``--trust-bundle`` PEM, else the bundle persisted in the data dir,
   else (only with ``--insecure-bootstrap``) the server's self-signed CA, taken on
   first use with a loud warning;
2. identity: a persisted, unexpired agent SVID is reused (join tokens are single
   use, so a restart must not need a new one); otherwise attest with the join
   token, then persist the SVID, its key (0600) and the bundle;
3. the workloads' cache persisted in the data dir (entries, bundles, unexpired
   SVIDs) is loaded; if it held SVIDs the Workload API opens at once, so a
   restart while the server is down keeps serving them; otherwise a first sync
   runs before the socket opens;
4. the sync loop runs until :meth:`Agent.stop`. If the server has evicted the
   agent, it attests again: with k8s_psat, with a fresh projected token; with
   x509pop or sshpop, with a fresh challenge signed by the node's key; with a
   join token only if it has one it has not spent (the token named in its own
   agent ID was used by its first attestation, and one the server refused is
   not presented again), otherwise the log says it needs a new one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

from agent import log, metrics
from agent.cache import Cache
from agent.client import ServerClient, fetch_bootstrap_root, roots_pem
from agent.config import AgentConfig
from agent.errors import (
    AttestationRefusedError,
    BootstrapError,
    ServerCallError,
    TrustDomainMismatchError,
)
from agent.health import HealthState, health_handler
from agent.httpserver import HealthServer
from agent.manager import Manager
from agent.state import AgentState
from agent.workload_api.broker import BrokerApiServer
from agent.workload_api.server import WorkloadApiServer
from attestation.node import join_token, k8s_psat, sshpop, x509pop
from attestation.node.join_token import make_attestation
from attestation.workload import WorkloadAttestor
from attestation.workload.k8s import K8sAttestor
from attestation.workload.unix import UnixAttestor
from identity.bundle import Bundle
from identity.clock import Clock, SystemClock
from identity.errors import SigilError
from identity.keys import generate_private_key
from identity.spiffeid import SpiffeId
from identity.x509svid import X509Svid, new_csr


class Agent:
    """One agent process's worth of state and tasks.

    Args:
        config: the validated configuration.
        clock: injectable time.
    """

    def __init__(self, config: AgentConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self._clock = clock or SystemClock()
        self.state = AgentState(config.data_dir)
        self.cache = Cache(trust_domain=config.trust_domain, clock=self._clock,
                           svid_cache_size=config.svid_cache_size)
        self.client = ServerClient(
            address=config.server_address, trust_domain=config.trust_domain
        )
        self.workload_api: WorkloadApiServer | None = None
        self.broker_api: BrokerApiServer | None = None
        self.manager: Manager | None = None
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.health_address = ""
        """Where /live, /ready and /metrics listen, once started ("" when off)."""
        # Ids of join tokens the server refused: never presented again.
        self._refused_tokens: set[str] = set()

    def stop(self) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler on the loop)."""
        self._stop.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; clean up sockets and channels on the way out.

        Raises:
            BootstrapError: no way to trust the server, or attestation failed.
        """
        health = self._start_health_listener()
        try:
            await self._run()
        finally:
            if self.broker_api is not None:
                await self.broker_api.stop()
            if self.workload_api is not None:
                await self.workload_api.stop()
            await self.client.close()
            if health is not None:
                health.stop()

    def _start_health_listener(self) -> HealthServer | None:
        """``/live``, ``/ready`` and ``/metrics`` on ``health_address`` (off when ""):
        started first, so a probe sees the agent live while it attests."""
        if not self.config.health_address:
            return None
        server = HealthServer(self.config.health_address, ready=self._not_ready,
                              registry=metrics.registry(self._metrics_state))
        server.start()
        self.health_address = server.bound_address
        return server

    def _not_ready(self) -> str | None:
        if not self.ready.is_set() or self.manager is None:
            return "starting: the Workload API is not served yet"
        report = self.manager.health()
        if report.state is not HealthState.HEALTHY:
            return f"{report.state.value}: {report.reason or 'unknown'}"
        return None

    def _metrics_state(self) -> metrics.State:
        snap = self.cache.snapshot()
        svid = self.manager.agent_svid if self.manager is not None else None
        healthy = (self.manager is not None
                   and self.manager.health().state is HealthState.HEALTHY)
        return metrics.State(
            x509_svids=len(snap.svids), entries=len(snap.entries),
            agent_svid_expires_at=svid.expires_at.timestamp() if svid is not None else None,
            healthy=healthy)

    async def _run(self) -> None:
        self.state.prepare()
        bundle = await self._initial_bundle()
        svid, bundle = await self._identity(bundle)
        self.manager = Manager(
            client=self.client, cache=self.cache, state=self.state,
            agent_svid=svid, bundle=bundle, clock=self._clock,
            sync_interval=self.config.sync_interval,
            backoff_max=self.config.sync_backoff_max,
            reattest=self._reattest,
        )
        self.client.configure(roots_pem=roots_pem(bundle), svid=svid)
        self.cache.set_bundles({bundle.trust_domain: bundle})
        if not self._restore_cache():
            await self.manager.sync_once()
        attestors: list[WorkloadAttestor] = [UnixAttestor(self.config.unix)] + (
            [K8sAttestor(self.config.k8s)] if self.config.k8s is not None else []
        )
        self.workload_api = WorkloadApiServer(
            socket_path=self.config.socket_path,
            cache=self.cache,
            attestors=attestors,
            clock=self._clock,
            request_sync=self.manager.sync_soon,
            max_connections=self.config.max_connections,
            max_connections_per_uid=self.config.max_connections_per_uid,
            preface_timeout=self.config.connection_preface_timeout.total_seconds(),
            idle_timeout=self.config.connection_idle_timeout.total_seconds(),
            extra_handlers=[health_handler(self.manager.health)],
            sds=self.config.sds,
        )
        await self.workload_api.start()
        log.event("workload api listening", socket=self.config.socket_path)
        broker = self.config.broker
        if broker.enabled:
            manager = self.manager
            self.broker_api = BrokerApiServer(
                socket_path=broker.socket_path, listen_address=broker.listen_address,
                cache=self.cache, attestors=attestors, authorized=broker.authorized,
                clock=self._clock,
                # Read at every TLS handshake: a renewed agent SVID or a rotated CA
                # applies to new broker connections without a restart.
                agent_svid=lambda: manager.agent_svid,
                bundle=lambda: manager.bundle,
            )
            await self.broker_api.start()
            log.event("broker api listening", socket=broker.socket_path or "",
                      address=_tcp_address(broker.listen_address, self.broker_api.tcp_port),
                      authorized=",".join(str(i) for i in broker.authorized))
            if broker.listen_address is not None and not ipaddress.ip_address(
                    broker.listen_address[0]).is_loopback:
                # SPIFFE Broker Endpoint section 3: TCP only where the network
                # itself keeps other hosts out; and PID references name processes
                # of this node whoever sends them.
                log.event("broker api listens beyond this host", level=logging.WARNING,
                          address=broker.listen_address[0])
        self.ready.set()
        await self.manager.run(self._stop, self.config.sync_interval)
        log.event("agent stopping")

    def _restore_cache(self) -> bool:
        """Load the persisted workloads' cache; True when it has SVIDs to serve."""
        persisted = self.state.load_workload_cache(
            self.config.trust_domain, now=self._clock.now()
        )
        if persisted is None:
            return False
        bundles = dict(persisted.bundles)
        # The bundle we just verified the server with is at least as fresh.
        bundles.setdefault(self.config.trust_domain, self.cache.snapshot().bundles[
            self.config.trust_domain])
        self.cache.set_bundles(bundles)
        self.cache.set_entries(persisted.entries)
        for entry_id, svid in persisted.svids.items():
            self.cache.set_x509_svid(entry_id, svid)
        log.event("workload cache restored", entries=len(persisted.entries),
                  svids=len(persisted.svids))
        return bool(persisted.svids)

    async def _reattest(self) -> X509Svid:
        """Attest again after an eviction (the manager calls this).

        Raises:
            BootstrapError: it cannot (say, a spent join token), or attestation failed.
        """
        assert self.manager is not None
        token_id = None
        if self.config.uses_join_token:
            token_id = self._unspent_join_token_id(self.manager.agent_svid.spiffe_id)
        try:
            svid, _bundle = await self._attest(self.manager.bundle)
        except AttestationRefusedError:
            if token_id is not None:
                self._refused_tokens.add(token_id)
            raise
        return svid

    def _unspent_join_token_id(self, current: SpiffeId) -> str:
        """The id of the configured join token, if it may still attest.

        A join token is single use. The one this agent attested with is spent
        (its id is the last segment of the agent ID), and so is one the server
        refused; presenting either again would only be refused again.

        Raises:
            BootstrapError: no usable join token; the message says what to do.
        """
        if not self.config.join_token:
            raise BootstrapError(
                "no join token to attest again with: create one with `sigil-server token "
                "generate`, pass it with --join-token and restart the agent")
        try:
            token_id, _secret = join_token.split_token(self.config.join_token)
        except SigilError as exc:
            raise BootstrapError(f"join token: {exc}") from None
        if (token_id in self._refused_tokens
                or join_token.agent_id(self.config.trust_domain, token_id) == current):
            raise BootstrapError(
                f"join token {token_id} is already used (join tokens are single use): create "
                "a new one with `sigil-server token generate`, pass it with --join-token and "
                "restart the agent")
        return token_id

    async def _initial_bundle(self) -> Bundle:
        td = self.config.trust_domain
        if self.config.trust_bundle_path is not None:
            from agent.trustbundle import load_trust_bundle

            return load_trust_bundle(self.config.trust_bundle_path, td)
        persisted = self.state.load_bundle(td)
        if persisted is not None and persisted.x509_authorities:
            return persisted
        if not self.config.insecure_bootstrap:
            raise BootstrapError(
                "no trust bundle: pass the server's CA with --trust-bundle FILE (from "
                "`sigil-server bundle show --format pem`), or --insecure-bootstrap to trust "
                "it on first use"
            )
        root = await asyncio.to_thread(fetch_bootstrap_root, self.config.server_address)
        log.event(
            "insecure bootstrap: trusting the server's CA without verification",
            level=logging.WARNING,
            server_address=self.config.server_address,
            ca_subject=root.subject.rfc4514_string(),
        )
        return Bundle(trust_domain=td, x509_authorities=(root,))

    async def _identity(self, bundle: Bundle) -> tuple[X509Svid, Bundle]:
        svid = self.state.load_svid()
        now = self._clock.now()
        if svid is not None and svid.spiffe_id.is_member_of(self.config.trust_domain) and (
            svid.leaf.not_valid_after_utc > now
        ):
            log.event("agent svid reused", agent_id=svid.spiffe_id,
                      expires_at=svid.expires_at.isoformat())
            return svid, bundle
        return await self._attest(bundle)

    async def _attest(self, bundle: Bundle) -> tuple[X509Svid, Bundle]:
        prove = self._proof_of_possession()
        if prove is not None:
            return await self._attest_with(bundle, prove[0], prove[1])
        psat = self.config.k8s_psat
        if psat is not None:
            # A fresh projected token on every attestation: the kubelet rotates it.
            try:
                attestation_type, payload = k8s_psat.make_attestation(
                    psat.cluster, psat.token_path)
            except SigilError as exc:
                raise BootstrapError(str(exc)) from None
            return await self._attest_with(bundle, attestation_type, payload)
        if not self.config.join_token:
            raise BootstrapError(
                "the agent has no valid SVID and no join token: create one with "
                "`sigil-server token generate` and pass it with --join-token"
            )
        try:
            attestation_type, payload = make_attestation(self.config.join_token)
        except SigilError as exc:
            raise BootstrapError(f"join token: {exc}") from None
        return await self._attest_with(bundle, attestation_type, payload)

    def _proof_of_possession(self) -> tuple[str, Callable[[bytes, bytes], bytes]] | None:
        """x509pop / sshpop: the attestor's name and how to answer a nonce.

        The node's credentials are read now, so a missing or mismatched file stops
        the agent before it asks the server for anything, and again when answering
        (a renewed certificate is picked up on the next attestation).

        Raises:
            BootstrapError: the credentials cannot be used.
        """
        td = self.config.trust_domain
        x509_cfg, ssh_cfg = self.config.x509pop, self.config.sshpop
        try:
            if x509_cfg is not None:
                x509pop.load_credentials(x509_cfg)
                return x509pop.NAME, lambda nonce, csr: x509pop.make_attestation(
                    x509_cfg, trust_domain=td, nonce=nonce, csr=csr)[1]
            if ssh_cfg is not None:
                sshpop.load_credentials(ssh_cfg)
                return sshpop.NAME, lambda nonce, csr: sshpop.make_attestation(
                    ssh_cfg, trust_domain=td, nonce=nonce, csr=csr)[1]
        except SigilError as exc:
            raise BootstrapError(str(exc)) from None
        return None

    async def _attest_with(
        self, bundle: Bundle, attestation_type: str,
        payload: bytes | Callable[[bytes, bytes], bytes],
    ) -> tuple[X509Svid, Bundle]:
        roots = roots_pem(bundle)
        # Before any attestation data leaves: a join token sent to the server of
        # another trust domain would be spent there for nothing.
        path = str(self.config.trust_bundle_path) if self.config.trust_bundle_path else None
        actual = await self.client.server_trust_domain(roots_pem=roots, bundle_path=path)
        if actual != self.config.trust_domain:
            raise TrustDomainMismatchError(
                f"wrong trust domain: configured {self.config.trust_domain}; "
                f"the server is {actual}")
        self.client.configure(roots_pem=roots)
        key = generate_private_key()
        csr = new_csr(key)
        try:
            if callable(payload):
                # Challenge-response (x509pop, sshpop): sign a fresh server nonce,
                # bound to this CSR's key.
                nonce = await self.client.attestation_challenge(attestation_type)
                payload = payload(nonce, csr)
            result = await self.client.attest(
                attestation_type=attestation_type, payload=payload, csr=csr, key=key
            )
        except ServerCallError as exc:
            refused = exc.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT")
            raise (AttestationRefusedError if refused else BootstrapError)(
                f"node attestation failed: {exc}") from None
        except SigilError as exc:
            raise BootstrapError(f"node attestation failed: {exc}") from None
        self.state.save_svid(result.svid)
        self.state.save_bundle(result.bundle)
        log.event("agent attested", agent_id=result.svid.spiffe_id, attestor=attestation_type,
                  expires_at=result.svid.expires_at.isoformat())
        return result.svid, result.bundle


def _tcp_address(listen: tuple[str, int] | None, port: int | None) -> str:
    """``ip:port`` as bound (port 0 resolved), or "" without TCP."""
    if listen is None or port is None:
        return ""
    host = f"[{listen[0]}]" if ":" in listen[0] else listen[0]
    return f"{host}:{port}"
