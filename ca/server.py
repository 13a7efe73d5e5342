"""Server assembly: config -> datastore, CA, gRPC servers; start and stop.

Start-up follows DESIGN flow 1: migrate the datastore, load or create the CA,
publish the bundle, then serve the agent API (TLS on TCP, terminated by
:class:`ca.api.tls_front.TlsFront` because grpcio cannot make a client certificate
optional) and the admin API (a Unix socket, in a directory only we can enter).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

import migrations
from api.protos.sigil.admin.v1 import admin_pb2_grpc
from api.protos.sigil.agent.v1 import agent_pb2_grpc
from ca.api.admin import AdminServicer
from ca.api.agent import AgentServicer
from ca.api.deps import ApiDeps
from ca.api.tls_front import TlsContextSource, TlsFront
from ca.authority import CertificateAuthority
from ca.authority.scheduler import RotationScheduler
from ca.authority.setup import build_authority
from ca.config import ServerConfig, parse_host_port
from ca.datastore import Datastore
from ca.errors import ConfigError
from ca.federation.server import FederationServices
from ca.health import HealthServer, ReadinessChecks, datastore_ready, read_state
from ca.keys import KeyManager
from ca.kubernetes.config import node_verifiers
from ca.kubernetes.service import KubernetesServices
from ca.log import event
from ca.metrics import StateCollector, build_registry, multiprocess_dir
from ca.policycheck import report_at_start
from ca.ratelimit import BucketTable, RateLimiter
from identity.clock import Clock, SystemClock

MAX_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.so_reuseport", 0),
]
WORKERS = 16

ROLE_ALL = "all"
"""Everything: migrations, CA, agent API, admin API, health (the main process)."""
ROLE_WORKER = "worker"
"""An extra agent API process (``worker_processes`` > 1, see :mod:`ca.workers`): it
shares the agent API port (SO_REUSEPORT) and the datastore, and serves nothing else."""


def _prepare_socket(path: Path) -> None:
    parent = path.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Only we may enter the directory: the socket's own mode is not enough on every
    # platform, the directory's is (DESIGN flow 1).
    os.chmod(parent, 0o700)
    if path.is_socket():
        path.unlink()
    elif path.exists():
        raise ConfigError(f"socket_path {path} exists and is not a socket")


class SigilServer:
    """The running server. Use as a context manager, or start()/stop()."""

    def __init__(
        self, config: ServerConfig, *, clock: Clock | None = None,
        key_manager: KeyManager | None = None, role: str = ROLE_ALL,
        rate_table: BucketTable | None = None,
    ) -> None:
        """Args:
            config: the validated configuration.
            clock: time for the CA and the APIs (default: the system clock).
            key_manager: where CA keys live (default: on disk under data_dir).
            role: :data:`ROLE_ALL` or :data:`ROLE_WORKER`.
            rate_table: rate-limit buckets shared with worker processes (default: own).
        """
        self.config = config
        self._role = role
        self._rate_table = rate_table
        self.clock = clock or SystemClock()
        self._key_manager = key_manager
        self.datastore: Datastore | None = None
        self.authority: CertificateAuthority | None = None
        self._rotation: RotationScheduler | None = None
        self._kubernetes: KubernetesServices | None = None
        self._federation: FederationServices | None = None
        self._agent_server: grpc.Server | None = None
        self._admin_server: grpc.Server | None = None
        self._front: TlsFront | None = None
        self._health: HealthServer | None = None
        # What /ready asks; a worker pool started later adds its own check.
        self.readiness = ReadinessChecks(
            datastore_ready(lambda: self.datastore, lambda: self.authority))
        self.agent_address = ""
        self.health_address = ""
        self.bundle_endpoint_address = ""
        self.oidc_discovery_address = ""

    def start(self) -> None:
        """Migrate, load the CA and start both gRPC servers."""
        cfg = self.config
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(cfg.data_dir, 0o700)
        if self._role != ROLE_WORKER:  # the main process migrated before starting workers
            migrations.upgrade(cfg.database_url)
        event("datastore ready", database=cfg.database_url.split("://", 1)[0])
        self.datastore = Datastore(cfg.database_url)
        # ca/authority/setup.py: key manager, upstream authority, instance id.
        self.authority = build_authority(cfg, self.datastore, self.clock,
                                         key_manager=self._key_manager,
                                         rotate=self._role != ROLE_WORKER)
        if self._role != ROLE_WORKER:  # stored entries against the issuance policy
            report_at_start(self.datastore, cfg.policy)
        self._rotation = RotationScheduler(self.authority, cfg.ca.rotation_interval)
        self._rotation.start()
        # ca/federation/server.py: bundle endpoint, refresher, OIDC discovery (main only).
        if self._role != ROLE_WORKER:
            self._federation = FederationServices(cfg, self.datastore, self.authority,
                                                  self.clock)
        deps = ApiDeps(config=cfg, datastore=self.datastore, authority=self.authority,
                       clock=self.clock,
                       node_verifiers=node_verifiers(cfg.kubernetes, cfg.trust_domain),
                       refresher=self._federation.refresher if self._federation else None)

        host, port = parse_host_port(cfg.bind_address)
        contexts = TlsContextSource(self.authority, self.clock, cfg.data_dir)
        contexts.current()  # fail now, not at the first handshake, if signing fails
        self._front = TlsFront(host=host.strip("[]"), port=port, contexts=contexts.current,
                               reuse_port=cfg.ops.workers > 1)
        limiter = RateLimiter(attestation=cfg.ops.attestation_limit,
                              signing=cfg.ops.signing_limit, table=self._rate_table)
        self._agent_server = grpc.server(
            ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="agent-api"),
            options=GRPC_OPTIONS,
        )
        agent_pb2_grpc.add_AgentServicer_to_server(  # type: ignore[no-untyped-call]
            AgentServicer(deps, peer_certificate=self._front.peer_certificate,
                          peer_address=self._front.peer_address, rate_limiter=limiter),
            self._agent_server,
        )
        if self._agent_server.add_insecure_port(f"unix:{self._front.internal_socket}") == 0:
            raise ConfigError("cannot listen on the internal agent API socket")

        if self._role == ROLE_WORKER:
            self._agent_server.start()
            self._start_front()
            event("worker listening", agent_api=self.agent_address, pid=os.getpid())
            return

        _prepare_socket(cfg.socket_path)
        self._admin_server = grpc.server(
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin-api"),
            options=GRPC_OPTIONS,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(deps), self._admin_server)  # type: ignore[no-untyped-call]
        if self._admin_server.add_insecure_port(f"unix:{cfg.socket_path}") == 0:
            raise ConfigError(f"cannot listen on socket_path {cfg.socket_path}")

        # ca/kubernetes/service.py: registration controller, bundle ConfigMaps.
        self._kubernetes = KubernetesServices(cfg, self.datastore, self.clock)
        self._start_health()
        self._agent_server.start()
        self._admin_server.start()
        self._start_front()
        # Group may connect (operators in the server's group); the 0700 directory
        # is what keeps everyone else out.
        os.chmod(cfg.socket_path, 0o770)  # noqa: S103
        self._kubernetes.start()
        if self._federation is not None:
            self._federation.start()
            self.bundle_endpoint_address = self._federation.bundle_endpoint_address
            self.oidc_discovery_address = self._federation.oidc_discovery_address
        event("server listening", agent_api=self.agent_address, admin_socket=cfg.socket_path,
              trust_domain=cfg.trust_domain)

    def _start_front(self) -> None:
        cfg = self.config
        assert self._front is not None
        host, _port = parse_host_port(cfg.bind_address)
        try:
            self._front.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on bind_address {cfg.bind_address}: "
                              f"{exc.strerror}") from None
        self.agent_address = f"{host}:{self._front.bound_port}"

    def _start_health(self) -> None:
        address = self.config.ops.health_address
        if not address:
            return
        datastore = self.datastore
        assert datastore is not None
        registry = build_registry(StateCollector(lambda: read_state(datastore)),
                                  multiprocess_dir=multiprocess_dir())
        self._health = HealthServer(
            address, ready=self.readiness,
            registry=lambda: registry,
        )
        self._health.start()
        self.health_address = self._health.bound_address

    def stop(self, grace: float = 5.0) -> None:
        """Stop both servers (in-flight calls get ``grace`` seconds), close the datastore."""
        if self._kubernetes is not None:
            self._kubernetes.stop()
            self._kubernetes = None
        if self._federation is not None:
            self._federation.stop()
            self._federation = None
        if self._rotation is not None:
            self._rotation.stop()
            self._rotation = None
        if self._health is not None:
            self._health.stop()
            self._health = None
        if self._front is not None:
            self._front.stop()
            self._front = None
        waits = [s.stop(grace) for s in (self._agent_server, self._admin_server) if s]
        for done in waits:
            done.wait()
        self._agent_server = self._admin_server = None
        if self.datastore is not None:
            self.datastore.close()
            self.datastore = None
        if self._role != ROLE_WORKER:  # the admin socket is the main process's
            try:
                self.config.socket_path.unlink()
            except FileNotFoundError:
                pass
        event("server stopped")

    def __enter__(self) -> SigilServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
