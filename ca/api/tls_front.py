"""TLS termination for the agent API, so a client certificate can be optional.

grpcio's server credentials either require a client certificate or never ask for
one (``require_client_auth=False`` means GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
checked with grpcio 1.85), but AttestAgent has no client certificate while every
other agent RPC needs one. So, as the agent's Workload API front does for peer
credentials (DESIGN flow 4), the server terminates TLS itself:

1. An asyncio server accepts TCP on the bind address and runs the TLS handshake
   with Python's ``ssl``: server certificate = the server SVID plus the CA
   certificate, client certificate *optional* but, when sent, verified against the
   current bundle (``CERT_OPTIONAL``), ALPN ``h2``.
2. It hands the connection and the client certificate (or None) to a
   :class:`~attestation.relay.ConnectionRelay`, which relays it to the internal
   gRPC server through a client socket bound to a per-connection path in a private
   0700 directory, remembering ``path -> client certificate`` while it lasts.
3. The servicer maps ``context.peer()`` (``unix:<path>``) back to the certificate
   with :meth:`TlsFront.peer_certificate`; a connection that did not come through
   the front is unknown and refused.

Each handshake uses the newest TLS context, rebuilt when the bundle changes or the
server certificate is past half its life, so bundle changes apply without restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.relay import ConnectionRelay
from ca.authority import CertificateAuthority
from ca.log import event
from identity.clock import Clock
from identity.keys import generate_private_key, private_key_to_pem
from identity.x509svid import certificates_to_pem

SERVER_TLS_TTL = dt.timedelta(hours=1)
HANDSHAKE_TIMEOUT = 15.0
INTERNAL_SOCKET_NAME = "agent-api.sock"


class TlsContextSource:
    """The current server-side SSLContext, rebuilt on bundle change or at half-life.

    Also when the active CA changes with the bundle as it was: a worker process
    (``worker_processes``) may read the bundle the main process published on an
    activation before it reloads the new active slot.
    """

    def __init__(self, authority: CertificateAuthority, clock: Clock, workdir: Path) -> None:
        self._authority = authority
        self._clock = clock
        self._workdir = workdir
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None
        self._sequence: int | None = None
        self._signer: x509.Certificate | None = None
        self._renew_at: dt.datetime | None = None

    def current(self) -> ssl.SSLContext:
        """The context for a new handshake."""
        with self._lock:
            seq = self._authority.bundle().sequence_number
            signer = self._authority.ca_certificate()
            fresh = (self._context is not None and seq == self._sequence
                     and signer == self._signer
                     and self._renew_at is not None and self._clock.now() < self._renew_at)
            if not fresh:
                self._context = self._build()
                self._sequence = seq
                self._signer = signer
                event("server tls certificate updated", bundle_sequence=seq)
            assert self._context is not None
            return self._context

    def _build(self) -> ssl.SSLContext:
        key = generate_private_key()
        chain = self._authority.sign_server_tls(key.public_key(), ttl=SERVER_TLS_TTL)
        leaf = chain[0]
        self._renew_at = leaf.not_valid_before_utc + (
            leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
        roots = "".join(c.public_bytes(Encoding.PEM).decode()
                        for c in self._authority.bundle().x509_authorities)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["h2"])
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=roots)
        # ssl only loads keys from files: write them in our 0700 directory, 0600, and
        # remove them as soon as they are loaded.
        fd, key_path = tempfile.mkstemp(dir=self._workdir, suffix=".pem")
        cert_path = key_path + ".crt"
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(private_key_to_pem(key))
            Path(cert_path).write_bytes(certificates_to_pem(chain))
            ctx.load_cert_chain(cert_path, key_path)
        finally:
            for p in (key_path, cert_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        return ctx


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """What the TLS handshake told us about an agent connection."""

    certificate: x509.Certificate | None  # None: the client sent no certificate
    address: str = ""  # the client's IP address (per-caller rate limits)


class TlsFront:
    """Accepts agent connections over TLS and relays them to the internal server."""

    def __init__(self, *, host: str, port: int, contexts: Callable[[], ssl.SSLContext],
                 reuse_port: bool = False) -> None:
        """Args:
            host, port: where to listen (port 0: any free port).
            contexts: the TLS context for each new handshake.
            reuse_port: share the port with other processes (SO_REUSEPORT), so the
                kernel spreads connections over the server's worker processes.
        """
        self._host = host
        self._reuse_port = reuse_port
        self._port = port
        self._contexts = contexts
        # Short, private paths: Unix socket paths are limited to ~100 bytes.
        self._relay: ConnectionRelay[TlsPeer] = ConnectionRelay(
            internal_socket_name=INTERNAL_SOCKET_NAME, prefix="sigil-srv-"
        )
        self._relay.prepare_private_dir()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self.bound_port = 0

    @property
    def private_dir(self) -> Path:
        """The 0700 directory of the internal socket and the per-connection sockets."""
        return self._relay.private_dir

    @property
    def internal_socket(self) -> Path:
        """Where the internal gRPC server listens."""
        return self._relay.internal_socket

    def peer_certificate(self, peer: str) -> tuple[bool, x509.Certificate | None]:
        """Look up a ``context.peer()``.

        Returns:
            (known, certificate): ``known`` is False for a connection that did not
            come through the front; ``certificate`` is None when the client sent none.
        """
        recorded = self._relay.lookup(peer)
        if recorded is None:
            return False, None
        return True, recorded.certificate

    def peer_address(self, peer: str) -> str | None:
        """The client IP address behind a ``context.peer()``; None if not via the front."""
        recorded = self._relay.lookup(peer)
        return None if recorded is None else recorded.address

    def _on_sni(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        try:
            sslobj.context = self._contexts()
        except Exception:  # keep the base context rather than fail the handshake
            event("server tls update failed", level=logging.ERROR, exc_info=True)

    def start(self) -> None:
        """Listen on host:port (port 0 picks one; see :attr:`bound_port`)."""
        base = self._contexts()
        # Each handshake switches to the newest context as soon as the ClientHello
        # names the server (agents always send SNI: server.sigil.invalid). Switching
        # later is impossible: asyncio's TLS starts reading at accept.
        base.sni_callback = self._on_sni
        self._loop.set_exception_handler(_log_loop_error)
        self._thread.start()
        fut: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self._host, self._port, reuse_address=True,
                                 reuse_port=self._reuse_port or None,
                                 ssl=base, ssl_handshake_timeout=HANDSHAKE_TIMEOUT),
            self._loop,
        )
        self._server = fut.result(timeout=30)
        self.bound_port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop accepting, drop relayed connections, remove the private directory."""
        async def _close() -> None:
            if self._server is not None:
                self._server.close()
            await self._relay.cancel_all()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop.close()
        self._relay.remove_private_dir()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with self._relay.tracked():
                await self._relay_connection(reader, writer)
        except (asyncio.CancelledError, ConnectionError, ssl.SSLError, TimeoutError):
            pass  # the peer went away or we are stopping: nothing to report
        except Exception:  # a bug: log it, keep serving others
            event("agent connection failed", level=logging.ERROR, exc_info=True)
        finally:
            # abort, not close: a graceful TLS close waits for the peer's close_notify.
            writer.transport.abort()

    async def _relay_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        ssl_obj: ssl.SSLObject | None = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        cert = x509.load_der_x509_certificate(der) if der else None
        peername = writer.get_extra_info("peername")
        address = str(peername[0]) if peername else ""
        await self._relay.relay(reader, writer, TlsPeer(certificate=cert, address=address))


def _log_loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    exc = context.get("exception")
    if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
        # A client that fails the handshake (no SNI match, bad certificate, port scan).
        event("tls handshake failed", level=logging.INFO, reason=str(exc) or type(exc).__name__)
        return
    event("agent listener error", level=logging.ERROR, reason=str(context.get("message")),
          error=repr(exc))
