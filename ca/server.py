"""Server assembly: config -> datastore, CA, gRPC servers; start and stop.

Start-up follows DESIGN flow 1, after taking every address it will serve (so a
busy port or an unsafe admin socket fails before anything is created): migrate
the datastore, load or create the CA, publish the bundle, then serve the agent
API (TLS on TCP, terminated by :class:`ca.api.tls_front.TlsFront` because grpcio
cannot make a client certificate optional) and the admin API (a Unix socket, in
a directory only we can enter).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from api.protos.sigil.admin.v1 import admin_pb2_grpc
from api.protos.sigil.agent.v1 import agent_pb2_grpc
from attestation.socketdir import check_socket_directory
from ca.api.admin import AdminServicer
from ca.api.admin_front import AdminSocketFront
from ca.api.adminguard import AdminGuard, AuditLog, svid_caller, unix_caller
from ca.api.agent import AgentServicer
from ca.api.deps import ApiDeps
from ca.api.revocations import ServerRevocations
from ca.api.tls_front import TlsContextSource, TlsFront
from ca.authority import CertificateAuthority
from ca.authority.scheduler import RotationScheduler
from ca.authority.setup import build_authority
from ca.config.adminauth import AUDIT_LOG_FILE, Authorizer
from ca.config.kubernetes import node_verifiers
from ca.config.pop import pop_verifiers
from ca.config.server import ServerConfig, parse_host_port
from ca.datastore import Datastore, migrate
from ca.errors import ConfigError
from ca.federation.server import FederationServices
from ca.health import HealthServer, ReadinessChecks, datastore_ready, read_state
from ca.keys import KeyManager
from ca.kubernetes.service import KubernetesServices
from ca.log import event
from ca.metrics import StateCollector, build_registry, multiprocess_dir
from ca.ratelimit import BucketTable, RateLimiter
from ca.registry.policycheck import report_at_start
from identity.clock import Clock, SystemClock
from identity.errors import SigilError

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


def _prepare_socket_dir(path: Path, *, mode: int = 0o700) -> None:
    """Create the admin socket's directory ``mode``, refusing one another user controls."""
    parent = path.parent
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.stat(parent).st_uid == os.geteuid():
            # Only we may enter the directory: the socket's own mode is not enough on
            # every platform, the directory's is (DESIGN flow 1). With Unix users
            # granted admin roles ([admin]), they must reach the socket: 0711 lets
            # them pass without listing it, and their peer credentials decide.
            os.chmod(parent, mode)
        check_socket_directory(path, client=False)
    except SigilError as exc:
        raise ConfigError(f"socket_path: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"socket_path {path}: cannot prepare its directory: "
                          f"{exc.strerror}: choose another with --socket-path") from None


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket nobody serves on; refuse a live one, or anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"socket_path {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: left by a server that did not stop cleanly
        except OSError as exc:
            raise ConfigError(f"socket_path {path}: cannot probe it: {exc.strerror}") from None
        else:
            raise ConfigError(f"another server is serving on socket_path {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _socket_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


_LISTENER_FLAGS = {
    "bind_address": "--bind-address",
    "health_address": "--health-address",
    "federation.bundle_endpoint.address": "federation.bundle_endpoint.address in the config file",
    "oidc_discovery.address": "oidc_discovery.address in the config file",
}


def _reserve(key: str, address: str) -> socket.socket | None:
    """Bind ``address`` now, so a busy port fails start-up before anything is created.

    The component that serves there binds it again right after this socket is
    closed (both set SO_REUSEADDR). Port 0 cannot be busy: nothing is reserved.
    """
    host, port = parse_host_port(address, key=key)
    if port == 0:
        return None
    flag = _LISTENER_FLAGS[key]
    try:
        family, kind, proto, _name, sockaddr = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}: "
                          f"choose another with {flag}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"address {address} is in use: choose another with {flag}") from None
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}: "
                          f"choose another with {flag}") from None
    return sock


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
        self._admin_listener: socket.socket | None = None
        self._admin_front: AdminSocketFront | None = None
        self._audit: AuditLog | None = None
        self._front: TlsFront | None = None
        self._health: HealthServer | None = None
        # What /ready asks; a worker pool started later adds its own check.
        self.readiness = ReadinessChecks(
            datastore_ready(lambda: self.datastore, lambda: self.authority))
        self.agent_address = ""
        self.health_address = ""
        self.bundle_endpoint_address = ""
        self.oidc_discovery_address = ""
        self._reserved: dict[str, socket.socket] = {}
        self._admin_socket_id: tuple[int, int] | None = None
        self._started = False

    def start(self) -> None:
        """Bind every listener, then migrate, load the CA and start serving.

        Listeners come first: a busy port or a socket directory another user
        controls stops start-up before a database or a CA key is created.
        """
        cfg = self.config
        if self._role != ROLE_WORKER:
            self._reserve_listeners()
            try:
                self._bind_admin_socket()
            except BaseException:
                self._release_all()
                self._remove_admin_socket()
                raise
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(cfg.data_dir, 0o700)
        if self._role != ROLE_WORKER:  # the main process migrated before starting workers
            migrate.upgrade(cfg.database_url)
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
                       node_verifiers={
                           **node_verifiers(cfg.kubernetes, cfg.trust_domain),
                           **pop_verifiers(cfg.node_pop, cfg.trust_domain, self.datastore,
                                           self.clock)},
                       refresher=self._federation.refresher if self._federation else None)

        host, port = parse_host_port(cfg.bind_address)
        contexts = TlsContextSource(self.authority, self.clock, cfg.data_dir)
        contexts.current()  # fail now, not at the first handshake, if signing fails
        self._front = TlsFront(host=host.strip("[]"), port=port, contexts=contexts.current,
                               reuse_port=cfg.ops.workers > 1,
                               limits=cfg.ops.agent_api_limits)
        limiter = RateLimiter(attestation=cfg.ops.attestation_limit,
                              signing=cfg.ops.signing_limit, table=self._rate_table)
        # Every admin call, on the admin socket or over TLS, is authorized by the
        # [admin] grants and written to the audit log (ca/config/adminauth.py).
        self._audit = AuditLog(cfg.admin.audit_log or cfg.data_dir / AUDIT_LOG_FILE)
        authorizer = Authorizer(cfg.admin, cfg.trust_domain)
        tls_guard = AdminGuard(
            identify=svid_caller(self._front.peer_certificate, self.datastore,
                                 cfg.trust_domain, self.clock,
                                 revocations=ServerRevocations(deps).current),
            authorizer=authorizer, audit=self._audit, datastore=self.datastore,
            clock=self.clock, worker=self._role == ROLE_WORKER)
        self._agent_server = grpc.server(
            ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="agent-api"),
            options=GRPC_OPTIONS, interceptors=[tls_guard],
        )
        agent_pb2_grpc.add_AgentServicer_to_server(  # type: ignore[no-untyped-call]
            AgentServicer(deps, peer_certificate=self._front.peer_certificate,
                          peer_address=self._front.peer_address, rate_limiter=limiter),
            self._agent_server,
        )
        # Workloads with an admin entry's SVID may call the admin service on this
        # port too; the guard refuses every other caller of it.
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(deps), self._agent_server)  # type: ignore[no-untyped-call]
        if self._agent_server.add_insecure_port(f"unix:{self._front.internal_socket}") == 0:
            raise ConfigError("cannot listen on the internal agent API socket")

        if self._role == ROLE_WORKER:
            self._agent_server.start()
            self._start_front()
            self._started = True
            event("worker listening", agent_api=self.agent_address, pid=os.getpid())
            return

        assert self._admin_listener is not None
        self._admin_front = AdminSocketFront(self._admin_listener)
        self._admin_listener = None  # the front owns it now
        self._admin_server = grpc.server(
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin-api"),
            options=GRPC_OPTIONS,
            interceptors=[AdminGuard(identify=unix_caller(self._admin_front.lookup),
                                     authorizer=authorizer, audit=self._audit,
                                     datastore=self.datastore, clock=self.clock)],
        )
        if self._admin_server.add_insecure_port(f"unix:{self._admin_front.internal_socket}") == 0:
            raise ConfigError("cannot listen on the internal admin socket")
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(deps), self._admin_server)  # type: ignore[no-untyped-call]

        # ca/kubernetes/service.py: registration controller, bundle ConfigMaps.
        self._kubernetes = KubernetesServices(cfg, self.datastore, self.clock)
        self._start_health()
        self._agent_server.start()
        self._admin_server.start()
        self._admin_front.start()
        self._start_front()
        self._kubernetes.start()
        if self._federation is not None:
            self._release("federation.bundle_endpoint.address")
            self._release("oidc_discovery.address")
            self._federation.start()
            self.bundle_endpoint_address = self._federation.bundle_endpoint_address
            self.oidc_discovery_address = self._federation.oidc_discovery_address
        self._started = True
        event("server listening", agent_api=self.agent_address, admin_socket=cfg.socket_path,
              trust_domain=cfg.trust_domain)

    def _reserve_listeners(self) -> None:
        """Bind each TCP address the main process serves (see :func:`_reserve`)."""
        cfg = self.config
        wanted = {"bind_address": cfg.bind_address, "health_address": cfg.ops.health_address}
        if cfg.federation.bundle_endpoint is not None:
            wanted["federation.bundle_endpoint.address"] = cfg.federation.bundle_endpoint.address
        if cfg.federation.oidc_discovery is not None:
            wanted["oidc_discovery.address"] = cfg.federation.oidc_discovery.address
        try:
            for key, address in wanted.items():
                sock = _reserve(key, address) if address else None
                if sock is not None:
                    self._reserved[key] = sock
        except ConfigError:
            self._release_all()
            raise

    def _release(self, key: str) -> None:
        sock = self._reserved.pop(key, None)
        if sock is not None:
            sock.close()

    def _release_all(self) -> None:
        for key in list(self._reserved):
            self._release(key)

    def _bind_admin_socket(self) -> None:
        """Listen on socket_path, in a directory only we control, never over a live socket.

        The socket binds a name of its own and gets its public name by link(2),
        which fails if the name exists: of two servers starting at once, one gets
        it. The private name goes at once; stop() removes the public one only
        while it is still this socket. The admin front (ca/api/admin_front.py)
        accepts on it, so that the caller's uid is known.
        """
        path = self.config.socket_path
        unix_admins = self.config.admin.unix_grants
        _prepare_socket_dir(path, mode=0o711 if unix_admins else 0o700)
        _remove_stale_socket(path)
        bound = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            bound.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(bound))
            # Group may connect (operators in the server's group); the 0700
            # directory is what keeps everyone else out. With Unix users granted
            # roles, anyone may connect: the kernel says who they are, and a
            # caller without a grant is refused every call.
            os.chmod(bound, 0o777 if unix_admins else 0o770)
            os.link(bound, path)
            listener.listen(socket.SOMAXCONN)
        except FileExistsError:
            listener.close()
            raise ConfigError(f"another server is serving on socket_path {path}") from None
        except OSError as exc:
            listener.close()
            raise ConfigError(f"cannot listen on socket_path {path}: {exc.strerror}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                bound.unlink()
        self._admin_listener = listener
        self._admin_socket_id = _socket_id(path)

    def _start_front(self) -> None:
        cfg = self.config
        assert self._front is not None
        host, _port = parse_host_port(cfg.bind_address)
        self._release("bind_address")
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
        self._release("health_address")
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
        if self._admin_front is not None:
            self._admin_front.stop()
            self._admin_front = None
        if self._admin_listener is not None:
            self._admin_listener.close()
            self._admin_listener = None
        waits = [s.stop(grace) for s in (self._agent_server, self._admin_server) if s]
        for done in waits:
            done.wait()
        self._agent_server = self._admin_server = None
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        if self.datastore is not None:
            self.datastore.close()
            self.datastore = None
        self._release_all()
        self._remove_admin_socket()
        if self._started:
            self._started = False
            event("server stopped")

    def _remove_admin_socket(self) -> None:
        """Unlink the admin socket if it is still the one we bound."""
        path = self.config.socket_path
        if self._admin_socket_id is not None and _socket_id(path) == self._admin_socket_id:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._admin_socket_id = None

    def __enter__(self) -> SigilServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
