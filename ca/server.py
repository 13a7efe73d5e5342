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
from ca.authority import AuthorityConfig, CertificateAuthority
from ca.config import ServerConfig, parse_host_port
from ca.datastore import Datastore
from ca.errors import ConfigError
from ca.health import HealthServer, datastore_ready, read_state
from ca.keys import DiskKeyManager, KeyManager
from ca.log import event
from ca.metrics import StateCollector, build_registry
from identity.clock import Clock, SystemClock

MAX_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.so_reuseport", 0),
]
WORKERS = 16


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
        key_manager: KeyManager | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self._key_manager = key_manager
        self.datastore: Datastore | None = None
        self.authority: CertificateAuthority | None = None
        self._agent_server: grpc.Server | None = None
        self._admin_server: grpc.Server | None = None
        self._front: TlsFront | None = None
        self._health: HealthServer | None = None
        self.agent_address = ""
        self.health_address = ""

    def start(self) -> None:
        """Migrate, load the CA and start both gRPC servers."""
        cfg = self.config
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(cfg.data_dir, 0o700)
        migrations.upgrade(cfg.database_url)
        event("datastore ready", database=cfg.database_url.split("://", 1)[0])
        self.datastore = Datastore(cfg.database_url)
        self.authority = CertificateAuthority(AuthorityConfig(
            trust_domain=cfg.trust_domain, datastore=self.datastore,
            key_manager=self._key_manager or DiskKeyManager(cfg.key_dir), clock=self.clock,
            ca_ttl=cfg.ca_ttl, ca_key_type=cfg.ca_key_type, jwt_key_type=cfg.jwt_key_type,
        ))
        self.authority.load_or_create()
        deps = ApiDeps(config=cfg, datastore=self.datastore, authority=self.authority,
                       clock=self.clock)

        host, port = parse_host_port(cfg.bind_address)
        contexts = TlsContextSource(self.authority, self.clock, cfg.data_dir)
        contexts.current()  # fail now, not at the first handshake, if signing fails
        self._front = TlsFront(host=host.strip("[]"), port=port, contexts=contexts.current)
        self._agent_server = grpc.server(
            ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="agent-api"),
            options=GRPC_OPTIONS,
        )
        agent_pb2_grpc.add_AgentServicer_to_server(  # type: ignore[no-untyped-call]
            AgentServicer(deps, peer_certificate=self._front.peer_certificate,
                          peer_address=self._front.peer_address),
            self._agent_server,
        )
        if self._agent_server.add_insecure_port(f"unix:{self._front.internal_socket}") == 0:
            raise ConfigError("cannot listen on the internal agent API socket")

        _prepare_socket(cfg.socket_path)
        self._admin_server = grpc.server(
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin-api"),
            options=GRPC_OPTIONS,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(deps), self._admin_server)  # type: ignore[no-untyped-call]
        if self._admin_server.add_insecure_port(f"unix:{cfg.socket_path}") == 0:
            raise ConfigError(f"cannot listen on socket_path {cfg.socket_path}")

        self._start_health()
        self._agent_server.start()
        self._admin_server.start()
        try:
            self._front.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on bind_address {cfg.bind_address}: "
                              f"{exc.strerror}") from None
        self.agent_address = f"{host}:{self._front.bound_port}"
        # Group may connect (operators in the server's group); the 0700 directory
        # is what keeps everyone else out.
        os.chmod(cfg.socket_path, 0o770)  # noqa: S103
        event("server listening", agent_api=self.agent_address, admin_socket=cfg.socket_path,
              trust_domain=cfg.trust_domain)

    def _start_health(self) -> None:
        address = self.config.ops.health_address
        if not address:
            return
        datastore = self.datastore
        assert datastore is not None
        registry = build_registry(StateCollector(lambda: read_state(datastore)))
        self._health = HealthServer(
            address, ready=datastore_ready(lambda: self.datastore, lambda: self.authority),
            registry=lambda: registry,
        )
        self._health.start()
        self.health_address = self._health.bound_address

    def stop(self, grace: float = 5.0) -> None:
        """Stop both servers (in-flight calls get ``grace`` seconds), close the datastore."""
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
