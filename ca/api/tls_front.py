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

The front is the one part of the server anybody on the network can reach, so it
holds a bounded share of the process (:class:`~ca.config.operations.ConnectionLimits`):

- at most ``max_connections`` connections, handshakes included: at the cap it stops
  accepting (the kernel's backlog holds the rest) rather than accept sockets it
  cannot serve, and the cap is lowered at start to what the open-file limit holds
  with room to spare, so a flood cannot take the file descriptors the admin socket,
  the health listener or the datastore need;
- at most ``max_per_ip`` from one client address: more are closed at accept;
- a deadline for the TLS handshake, and one for the HTTP/2 connection preface after
  it: a connection that says nothing is closed, and is relayed (costing two more
  descriptors and a gRPC transport) only once it has spoken;
- a lifetime for a connection without a client certificate: it can only attest;
- refusals, timeouts and failed handshakes are counted and logged as one summary
  line per kind per :data:`LOG_INTERVAL`, so a flood cannot flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import logging
import os
import resource
import socket
import ssl
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.relay import ConnectionRelay
from ca.authority import CertificateAuthority
from ca.config.operations import ConnectionLimits
from ca.log import event
from identity.clock import Clock
from identity.keys import generate_private_key, private_key_to_pem
from identity.x509svid import certificates_to_pem

SERVER_TLS_TTL = dt.timedelta(hours=1)
INTERNAL_SOCKET_NAME = "agent-api.sock"
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4
FDS_PER_CONNECTION = 3  # the client's socket, the relay's, and the internal server's end
# Kept for everything else: the health listener (up to 264), the bundle and OIDC
# endpoints (64 each), the admin socket, the datastore, gRPC's own, log files;
# a quarter of a small open-file limit.
RESERVED_FDS = 512
LOG_INTERVAL = 60.0
ACCEPT_BATCH = 64  # accepts per wake-up of the listening socket
ACCEPT_RETRY_DELAY = 1.0  # after the process ran out of descriptors (EMFILE)
_READ_SIZE = 4 * 1024 * 1024  # more than a StreamReader holds (as the relay reads)
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


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
                 reuse_port: bool = False, limits: ConnectionLimits | None = None,
                 log_interval: float = LOG_INTERVAL) -> None:
        """Args:
            host, port: where to listen (port 0: any free port).
            contexts: the TLS context for each new handshake.
            reuse_port: share the port with other processes (SO_REUSEPORT), so the
                kernel spreads connections over the server's worker processes.
            limits: connection caps and deadlines (default: the documented defaults).
            log_interval: seconds between two summary lines of one kind.
        """
        self._host = host
        self._reuse_port = reuse_port
        self._port = port
        self._contexts = contexts
        # The newest context built (None: none yet), and the failures to build one
        # logged since (each kind once, until a build succeeds again).
        self._last_good: ssl.SSLContext | None = None
        self._update_failures: set[str] = set()
        self._limits = limits or ConnectionLimits()
        self._max_connections = self._limits.max_connections
        self._summary = _Summary(log_interval)
        self._listeners: list[socket.socket] = []
        self._accepting = False
        self._open = 0
        self._per_ip: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
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

    def _on_sni(self, sslobj: ssl.SSLObject, _name: str | None,
                _ctx: ssl.SSLContext) -> int | None:
        # Runs on the front's event loop thread only.
        try:
            context = self._contexts()
        except Exception as exc:
            # Never the context of server start (its bundle, its perhaps expired
            # certificate): the newest good one, or no handshake at all.
            kind = type(exc).__qualname__
            if kind not in self._update_failures:
                self._update_failures.add(kind)
                event("server tls update failed", level=logging.ERROR,
                      reason=f"{kind}: {exc}", serving="last good context"
                      if self._last_good is not None else "nothing (handshake refused)",
                      exc_info=True)
            if self._last_good is None:
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            sslobj.context = self._last_good
            return None
        if self._update_failures:
            self._update_failures.clear()
            event("server tls update recovered")
        self._last_good = context
        sslobj.context = context
        return None

    @property
    def max_connections(self) -> int:
        """The connection cap in force (after fitting it to the open-file limit)."""
        return self._max_connections

    @property
    def open_connections(self) -> int:
        """Connections held now, handshakes included."""
        return self._open

    def start(self) -> None:
        """Listen on host:port (port 0 picks one; see :attr:`bound_port`)."""
        base = self._contexts()
        # Each handshake switches to the newest context as soon as the ClientHello
        # names the server (agents always send SNI: server.sigil.invalid). Switching
        # later is impossible: asyncio's TLS starts reading at accept.
        base.sni_callback = self._on_sni
        self._base_context = base
        self._last_good = base
        self._max_connections = _fit_to_open_file_limit(self._limits.max_connections)
        self._listeners = _listen(self._host, self._port, reuse_port=self._reuse_port)
        self.bound_port = int(self._listeners[0].getsockname()[1])
        self._loop.set_exception_handler(self._log_loop_error)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._begin(), self._loop).result(timeout=30)

    async def _begin(self) -> None:
        self._resume_accepting()

    def stop(self) -> None:
        """Stop accepting, drop relayed connections, remove the private directory."""
        async def _close() -> None:
            self._pause_accepting()
            for sock in self._listeners:
                sock.close()
            for task in list(self._tasks):
                task.cancel()
            await self._relay.cancel_all()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            self._summary.flush()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        else:
            for sock in self._listeners:
                sock.close()
        self._loop.close()
        self._relay.remove_private_dir()

    # Accepting ---------------------------------------------------------------
    # Our own accept loop rather than asyncio's server: it can stop accepting at
    # the cap (asyncio's accepts whatever the kernel has queued) and refuse an
    # address over its share before any TLS work is done.

    def _resume_accepting(self) -> None:
        if self._accepting or not self._listeners or self._listeners[0].fileno() < 0:
            return
        self._accepting = True
        for sock in self._listeners:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _pause_accepting(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        for sock in self._listeners:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._open >= self._max_connections:
                # The cap: leave the rest in the kernel's backlog until one ends.
                self._summary.count("agent connections deferred", logging.WARNING,
                                    reason="connection limit",
                                    max_connections=self._max_connections)
                self._pause_accepting()
                return
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._summary.count("agent connection accept failed", logging.WARNING,
                                    reason=exc.strerror or type(exc).__name__)
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._pause_accepting()
                    self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                    return
                continue  # ECONNABORTED and the like: that one client is gone
            address = str(addr[0]) if addr else ""
            limit = self._limits.max_per_ip
            if limit and self._per_ip[address] >= limit:
                sock.close()
                self._summary.count("agent connections refused", logging.WARNING,
                                    reason="per-address limit", max_per_ip=limit)
                continue
            self._open += 1
            self._per_ip[address] += 1
            task = self._loop.create_task(self._serve(sock, address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, address: str) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            writer, reader = await self._handshake(sock)
            if writer is None or reader is None:
                return
            if not await self._await_preface(reader):
                return
            with self._relay.tracked():
                await self._relay_connection(reader, writer)
        except (asyncio.CancelledError, ConnectionError, ssl.SSLError, TimeoutError):
            pass  # the peer went away or we are stopping: nothing to report
        except Exception:  # a bug: log it, keep serving others
            event("agent connection failed", level=logging.ERROR, exc_info=True)
        finally:
            # abort, not close: a graceful TLS close waits for the peer's close_notify.
            if writer is not None:
                writer.transport.abort()
            sock.close()
            self._open -= 1
            self._per_ip[address] -= 1
            if self._per_ip[address] <= 0:
                del self._per_ip[address]
            if self._open < self._max_connections:
                self._resume_accepting()

    async def _handshake(
        self, sock: socket.socket
    ) -> tuple[asyncio.StreamWriter | None, asyncio.StreamReader | None]:
        loop = self._loop
        reader = asyncio.StreamReader(loop=loop)
        timeout = self._limits.handshake_timeout
        try:
            # asyncio enforces ssl_handshake_timeout itself; the outer bound also
            # covers what it does not (wrapping the socket), with room to spare.
            async with asyncio.timeout(timeout + 5):
                transport, protocol = await loop.connect_accepted_socket(
                    lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sock,
                    ssl=self._base_context, ssl_handshake_timeout=timeout)
        except OSError as exc:  # ssl.SSLError, ConnectionError, TimeoutError among them
            # asyncio's own handshake timeout aborts with "... is taking longer than".
            timed_out = isinstance(exc, TimeoutError) or "taking longer" in str(exc)
            self._summary.count("tls handshake failed", logging.INFO,
                                reason="timeout" if timed_out else _reason(exc))
            return None, None
        return asyncio.StreamWriter(transport, protocol, reader, loop), reader

    async def _await_preface(self, reader: asyncio.StreamReader) -> bool:
        """Wait for the HTTP/2 preface; put what was read back for the relay to read.

        Returns False (the connection is to be closed) when it does not come in
        time, the client closes, or it sent something else.
        """
        got = b""
        try:
            async with asyncio.timeout(self._limits.preface_timeout):
                while len(got) < len(HTTP2_PREFACE):
                    chunk = await reader.read(_READ_SIZE)
                    if not chunk:
                        return False  # closed before speaking: nothing to report
                    got += chunk
                    if not HTTP2_PREFACE.startswith(got[:len(HTTP2_PREFACE)]):
                        self._summary.count("agent connections closed", logging.INFO,
                                            reason="not HTTP/2")
                        return False
        except TimeoutError:
            self._summary.count("agent connections closed", logging.INFO,
                                reason="no HTTP/2 preface in time",
                                timeout_seconds=self._limits.preface_timeout)
            return False
        if reader.at_eof():
            return False  # said its piece and closed: gRPC cannot answer a closed peer
        # Every read above emptied the stream's buffer (reads are larger than it
        # holds), so feeding the bytes back puts them first, in order, for the relay.
        reader.feed_data(got)
        return True

    async def _relay_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        ssl_obj: ssl.SSLObject | None = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        cert = x509.load_der_x509_certificate(der) if der else None
        peername = writer.get_extra_info("peername")
        address = str(peername[0]) if peername else ""
        relay = self._relay.relay(reader, writer, TlsPeer(certificate=cert, address=address))
        if cert is not None:
            await relay
            return
        # Without a client certificate the only call that can succeed is AttestAgent
        # (the agent then reconnects with its SVID): such a connection has a lifetime,
        # or having sent the preface would buy a slot for ever.
        limit = self._limits.unauthenticated_timeout
        try:
            async with asyncio.timeout(limit):
                await relay
        except TimeoutError:
            self._summary.count("agent connections closed", logging.INFO,
                                reason="unauthenticated connection lifetime",
                                timeout_seconds=limit)

    def _log_loop_error(self, _loop: asyncio.AbstractEventLoop,
                        context: dict[str, object]) -> None:
        exc = context.get("exception")
        if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
            # A client that fails at the TLS layer: counted, not one line each.
            self._summary.count("tls handshake failed", logging.INFO, reason=_reason(exc))
            return
        event("agent listener error", level=logging.ERROR, reason=str(context.get("message")),
              error=repr(exc))

def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__


_Key = tuple[str, int, tuple[tuple[str, Any], ...]]


class _Summary:
    """Counts events by kind and fields; logs the first at once, the rest per interval.

    Lives on the front's event loop (not thread-safe): a kind's first event in an
    interval is logged at once with ``count=1``, later ones are counted and logged
    as one line with their ``count`` when the interval ends.
    """

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._pending: Counter[_Key] = Counter()
        self._quiet: set[_Key] = set()
        self._timer: asyncio.TimerHandle | None = None

    def count(self, what: str, level: int, **fields: Any) -> None:
        key = (what, level, tuple(sorted(fields.items())))
        if key in self._quiet:
            self._pending[key] += 1
            return
        self._quiet.add(key)
        event(what, level=level, count=1, **fields)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        had = bool(self._pending)
        self.flush()
        if had:  # keep quiet for another interval: the flood may go on
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)
        else:
            self._quiet.clear()

    def flush(self) -> None:
        """Log what was counted and not yet logged."""
        for (what, level, items), n in self._pending.items():
            fields: dict[str, Any] = dict(items)
            event(what, level=level, count=n, interval_seconds=self._interval, **fields)
        self._pending.clear()


def _fit_to_open_file_limit(wanted: int) -> int:
    """The connection cap the open-file limit can hold, raising the soft limit if needed.

    Like Go's runtime (and so SPIRE), the soft limit is raised towards the hard one;
    what still does not fit lowers the cap, so that accepting stops before the
    process runs out of descriptors rather than after.
    """
    need = wanted * FDS_PER_CONNECTION + RESERVED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    reserved = min(RESERVED_FDS, soft // 4)
    fitted = max(1, (soft - reserved) // FDS_PER_CONNECTION)
    event("agent api connection limit lowered", level=logging.WARNING,
          agent_api_max_connections=wanted, max_connections=fitted, open_file_limit=soft)
    return fitted


def _listen(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for host:port (one per address family)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    seen: set[tuple[object, ...]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # As asyncio does: the IPv4 socket of the same host serves IPv4.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out
