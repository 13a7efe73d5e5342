"""Server assembly: config -> datastore, CA, gRPC servers; start and stop.

Start-up follows DESIGN flow 1: migrate the datastore, load or create the CA,
publish the bundle, then serve the agent API (TLS on TCP) and the admin API (a
Unix socket, in a directory only we can enter).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

import migrations
from api.protos.sigil.admin.v1 import admin_pb2_grpc
from api.protos.sigil.agent.v1 import agent_pb2_grpc
from ca.api.admin import AdminServicer
from ca.api.agent import AgentServicer
from ca.api.deps import ApiDeps
from ca.authority import AuthorityConfig, CertificateAuthority
from ca.clock import Clock, SystemClock
from ca.config import ServerConfig
from ca.datastore import Datastore
from ca.errors import ConfigError
from ca.keys import DiskKeyManager, KeyManager
from ca.log import event
from identity.keys import generate_private_key, private_key_to_pem
from identity.x509svid import certificates_to_pem

MAX_RECEIVE_BYTES = 4 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.so_reuseport", 0),
]
SERVER_TLS_TTL = dt.timedelta(hours=1)
WORKERS = 16


class _TlsConfigFetcher:
    """Feeds grpcio's dynamic server credentials: a fresh TLS configuration when the
    bundle changes or the server certificate is past half its life, else None
    (grpcio keeps the previous one)."""

    def __init__(self, authority: CertificateAuthority, clock: Clock) -> None:
        self._authority = authority
        self._clock = clock
        self._lock = threading.Lock()
        self._sequence: int | None = None
        self._renew_at: dt.datetime | None = None

    def build(self) -> grpc.ServerCertificateConfiguration:
        """A configuration with a freshly signed server certificate."""
        key = generate_private_key()
        chain = self._authority.sign_server_tls(key.public_key(), ttl=SERVER_TLS_TTL)
        bundle = self._authority.bundle()
        roots = b"".join(c.public_bytes(Encoding.PEM) for c in bundle.x509_authorities)
        leaf = chain[0]
        life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        self._renew_at = leaf.not_valid_before_utc + life / 2
        self._sequence = bundle.sequence_number
        return grpc.ssl_server_certificate_configuration(
            [(private_key_to_pem(key), certificates_to_pem(chain))], root_certificates=roots
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                seq = self._authority.bundle().sequence_number
                if seq == self._sequence and self._renew_at and self._clock.now() < self._renew_at:
                    return None
                config = self.build()
                event("server tls certificate updated", bundle_sequence=seq)
                return config
            except Exception:  # grpcio would swallow it; keep serving the old config
                event("server tls update failed", level=40, exc_info=True)
                return None


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
        self.agent_address = ""

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

        fetcher = _TlsConfigFetcher(self.authority, self.clock)
        credentials = grpc.dynamic_ssl_server_credentials(
            fetcher.build(), fetcher, require_client_authentication=False
        )
        self._agent_server = grpc.server(
            ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="agent-api"),
            options=GRPC_OPTIONS,
        )
        agent_pb2_grpc.add_AgentServicer_to_server(AgentServicer(deps), self._agent_server)
        port = self._agent_server.add_secure_port(cfg.bind_address, credentials)
        if port == 0:
            raise ConfigError(f"cannot listen on bind_address {cfg.bind_address}")
        host = cfg.bind_address.rpartition(":")[0]
        self.agent_address = f"{host}:{port}"

        _prepare_socket(cfg.socket_path)
        self._admin_server = grpc.server(
            ThreadPoolExecutor(max_workers=4, thread_name_prefix="admin-api"),
            options=GRPC_OPTIONS,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(deps), self._admin_server)
        if self._admin_server.add_insecure_port(f"unix:{cfg.socket_path}") == 0:
            raise ConfigError(f"cannot listen on socket_path {cfg.socket_path}")

        self._agent_server.start()
        self._admin_server.start()
        os.chmod(cfg.socket_path, 0o770)
        event("server listening", agent_api=self.agent_address, admin_socket=cfg.socket_path,
              trust_domain=cfg.trust_domain)

    def stop(self, grace: float = 5.0) -> None:
        """Stop both servers (in-flight calls get ``grace`` seconds), close the datastore."""
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
