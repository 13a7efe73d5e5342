"""The proxy itself: listeners, the two directions, and the live SVID and policies.

Every connection takes, when it is accepted, the current TLS contexts and its
listener's current policy, and keeps them to its end: an SVID rotation, a bundle
change or a policy reload applies to new connections only, and never drops an
established one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import ipaddress
import logging
import os
import signal
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509

from identity.clock import Clock, SystemClock
from identity.errors import X509SvidError
from identity.spiffeid import SpiffeId
from identity.x509svid import spiffe_id_from_certificate, verify_chain
from proxy.broker import BrokerSource, BrokerWatcher
from proxy.config import Address, Listener, load_file
from proxy.errors import ConfigError, WatcherStopped, WorkloadApiError
from proxy.log import event
from proxy.metrics import Metrics
from proxy.policy import Policy
from proxy.relay import relay
from proxy.tls import TlsStream, client_context, peer_chain_der, server_context
from proxy.workload import WorkloadApiWatcher, X509State

Handler = Callable[[Listener, socket.socket, str], Awaitable[None]]
"""What serves one accepted connection of a listener: (listener, socket, peer address)."""

# Peer chains whose verification is remembered (a few hundred bytes each).
VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Settings:
    """How the proxy runs (the CLI fills it from flags and the config file).

    Attributes:
        socket_target: the Workload API, as a gRPC target (``unix:/path``).
        spiffe_id: which SVID to present; None for the default (first) one.
        listeners: what to listen on and forward to.
        config_path: the file whose policies are reloaded on change, if any.
        metrics_address: where to serve /metrics, if anywhere.
        handshake_timeout: seconds a TLS handshake may take.
        connect_timeout: seconds a connection to the target may take.
        max_connections: connections open at once, over all listeners; more are
            accepted and closed at once.
        reload_interval: seconds between two looks at the config file.
        clock: for SVID expiry and chain verification.
        broker: present the fronted program's SVID, fetched from the Broker API
            (proxy/broker.py), instead of the proxy's own from ``socket_target``.
    """

    socket_target: str
    spiffe_id: SpiffeId | None
    listeners: tuple[Listener, ...]
    config_path: Path | None = None
    metrics_address: Address | None = None
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_connections: int = 1024
    reload_interval: float = 1.0
    clock: Clock = field(default_factory=SystemClock)
    broker: BrokerSource | None = None


@dataclass(frozen=True)
class Identity:
    """One SVID/bundle state and the contexts built from it."""

    state: X509State
    server: ssl.SSLContext
    client: ssl.SSLContext


class Denied(Exception):
    """A connection refused: ``reason`` is the metric label, ``detail`` the why."""

    def __init__(self, reason: str, detail: str = "", peer_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.peer_id = peer_id


def _handshake_denial(exc: BaseException) -> Denied:
    if isinstance(exc, TimeoutError):
        return Denied("handshake_timeout", "the TLS handshake did not finish in time")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Denied("untrusted", exc.verify_message or str(exc))
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return Denied("no_client_cert", "the client sent no certificate")
        if "_ALERT_" in reason:  # SSLV3_ALERT_..., TLSV1_ALERT_..., TLSV13_ALERT_...
            # The peer refused *our* certificate, or our protocol choices.
            return Denied("peer_refused", reason.lower())
        return Denied("handshake_failed", reason.lower() or str(exc))
    return Denied("handshake_failed", str(exc) or type(exc).__name__)


class Proxy:
    """Runs the listeners of ``settings`` until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._identity: Identity | None = None
        # Chains already verified against the current bundles: peer chain DER ->
        # (SPIFFE ID, valid from, valid until). Cleared on every bundle change.
        self._verified: OrderedDict[bytes, tuple[SpiffeId, dt.datetime, dt.datetime]] = (
            OrderedDict())
        self._expired_logged = False
        self._policies = {lst.name: lst.policy for lst in settings.listeners}
        self._have_identity = asyncio.Event()
        self._stopping = asyncio.Event()
        self._active = 0
        self._cap_refused = 0
        self._cap_logged_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._listening: list[socket.socket] = []
        self._config_stamp = self._stamp()
        self.bound: dict[str, Address] = {}
        """Each listener's address once it listens (port 0 resolved)."""

    # -- identity -----------------------------------------------------------------

    def on_update(self, state: X509State) -> None:
        """A new SVID/bundle state from the Workload API: build contexts for it."""
        try:
            bundles = list(state.bundles)
            identity = Identity(state, server_context(state.svid, bundles),
                                client_context(state.svid, bundles))
        except (ssl.SSLError, OSError, ValueError) as exc:
            event("svid update not usable", level=logging.ERROR, reason=str(exc))
            return
        self._identity = identity
        self._verified.clear()
        self._expired_logged = False
        self.metrics.svid_updates.inc()
        self.metrics.svid_expiry.set(state.svid.expires_at.timestamp())
        event("svid updated", spiffe_id=state.svid.spiffe_id,
              expires_at=state.svid.expires_at.isoformat(),
              authority_id=_authority_id(state.svid.leaf),
              authorities=sum(len(b.x509_authorities) for b in bundles),
              trust_domains=",".join(b.trust_domain.name for b in bundles))
        self._have_identity.set()

    def on_lost(self, reason: str) -> None:
        """The Workload API says we have no identity any more: stop using it."""
        if self._identity is not None:
            event("svid withdrawn", level=logging.WARNING, reason=reason)
        self._identity = None

    def _current(self) -> Identity | None:
        identity = self._identity
        if identity is None:
            return None
        if identity.state.svid.expires_at <= self.settings.clock.now():
            if not self._expired_logged:
                event("svid expired", level=logging.ERROR,
                      spiffe_id=identity.state.svid.spiffe_id,
                      expired_at=identity.state.svid.expires_at.isoformat())
                self._expired_logged = True
            return None
        return identity

    # -- running ------------------------------------------------------------------

    async def run(self) -> None:
        """Watch the Workload API, listen once an SVID is held, serve until stopped."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        broker = self.settings.broker
        watcher: WorkloadApiWatcher
        if broker is not None:
            watcher = BrokerWatcher(broker.target, pid=broker.current_pid,
                                    want=self.settings.spiffe_id, on_update=self.on_update,
                                    on_lost=self.on_lost, fixed=broker.pidfile is None)
        else:
            watcher = WorkloadApiWatcher(self.settings.socket_target,
                                         want=self.settings.spiffe_id,
                                         on_update=self.on_update, on_lost=self.on_lost)
        watching = asyncio.create_task(watcher.run())
        background = [watching]
        try:
            if broker is not None:
                event("waiting for an svid", broker_socket=broker.target,
                      workload=broker.describe())
            else:
                event("waiting for an svid", socket=self.settings.socket_target)
            waiter = asyncio.create_task(self._have_identity.wait())
            stopper = asyncio.create_task(self._stopping.wait())
            await asyncio.wait({waiter, stopper, watching},
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if self._stopping.is_set():
                return
            if watching.done():
                self._watcher_died(watching, watcher.name)
            for listener in self.settings.listeners:
                background.append(asyncio.create_task(self._serve(listener, self._bind(listener))))
            background.append(asyncio.create_task(self._watch_expiry()))
            if self.settings.config_path is not None:
                background.append(asyncio.create_task(self._watch_config()))
            stopper = asyncio.create_task(self._stopping.wait())
            await asyncio.wait({stopper, watching}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not self._stopping.is_set() and watching.done():
                self._watcher_died(watching, watcher.name)
        finally:
            for task in background:
                task.cancel()
            for sock in self._listening:
                sock.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*background, *self._tasks, return_exceptions=True)
            event("stopped")

    def _watcher_died(self, task: asyncio.Task[None], name: str) -> NoReturn:
        """The watcher ended on its own: nothing would ever bring an SVID again.

        Raises:
            WatcherStopped: always, after logging why (one line).
        """
        self._identity = None
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, WorkloadApiError):
            reason = str(exc)
        elif exc is not None:
            reason = f"unexpected {type(exc).__name__}: {exc}"
        else:
            reason = "ended"
        event(f"{name} watcher stopped", level=logging.ERROR, reason=reason)
        raise WatcherStopped(f"{name} watcher stopped: {reason}") from exc

    async def _watch_expiry(self) -> None:
        # Say so when the SVID runs out (agent gone too long), not only at the next
        # connection.
        while True:
            await asyncio.sleep(1.0)
            self._current()

    def stop(self) -> None:
        """Stop accepting, close every connection, and return from :meth:`run`."""
        self._stopping.set()

    def _bind(self, listener: Listener) -> socket.socket:
        """A listening socket for ``listener``.

        Raises:
            ConfigError: the address cannot be resolved or bound (naming it).
        """
        try:
            infos = socket.getaddrinfo(listener.listen.host or None, listener.listen.port,
                                       type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listener.listen} (listener {listener.name}): "
                              f"{exc.strerror or exc}") from None
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {listener.listen} (listener {listener.name}): "
                              f"{exc.strerror or exc}") from None
        self._listening.append(sock)
        host, port = sock.getsockname()[:2]
        self.bound[listener.name] = Address(host, port)
        event("listening", listener=listener.name, mode=listener.mode,
              address=self.bound[listener.name], target=listener.target,
              allow=self._policies[listener.name].describe())
        return sock

    async def _serve(self, listener: Listener, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        handler = self._inbound if listener.mode == "inbound" else self._outbound
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as exc:
                # EMFILE and friends: say so, breathe, go on accepting.
                event("accept failed", level=logging.ERROR, listener=listener.name,
                      reason=str(exc))
                await asyncio.sleep(0.1)
                continue
            if self._active >= self.settings.max_connections:
                conn.close()
                self.metrics.denied.labels(listener.name, "connection_cap").inc()
                self._note_cap(listener.name)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Counted now, not when its task first runs: accepting from a full
            # backlog does not yield to the loop, so a burst would otherwise all
            # be accepted before any of it counted against the cap.
            self._active += 1
            self.metrics.active.labels(listener.name).inc()
            task = asyncio.create_task(self._connection(listener, handler, conn, addr))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, listener.name, conn))

    def _finished(self, listener: str, conn: socket.socket, task: asyncio.Task[None]) -> None:
        # A task cancelled before it ran (at shutdown) never reached its own cleanup.
        conn.close()
        self._tasks.discard(task)
        self._active -= 1
        self.metrics.active.labels(listener).dec()

    def _note_cap(self, listener: str) -> None:
        # One line per few seconds, not one per refused connection: a flood must not
        # also flood the log.
        self._cap_refused += 1
        now = time.monotonic()
        if now - self._cap_logged_at >= 5.0:
            event("connection denied", level=logging.WARNING, listener=listener,
                  reason="connection_cap", refused=self._cap_refused,
                  max_connections=self.settings.max_connections)
            self._cap_logged_at = now
            self._cap_refused = 0

    async def _connection(self, listener: Listener, handler: Handler, conn: socket.socket,
                          addr: object) -> None:
        peer = _format_peer(addr)
        try:
            await handler(listener, conn, peer)
        except Denied as denied:
            self.metrics.denied.labels(listener.name, denied.reason).inc()
            event("connection denied", level=logging.WARNING, listener=listener.name,
                  peer=peer, peer_id=denied.peer_id or "-", reason=denied.reason,
                  detail=denied.detail)
        except (OSError, ssl.SSLError, EOFError) as exc:
            event("connection ended with an error", level=logging.DEBUG,
                  listener=listener.name, peer=peer, reason=str(exc) or type(exc).__name__)
        except Exception:  # a bug: say so with the traceback; other connections go on
            event("connection failed", level=logging.ERROR, exc_info=True,
                  listener=listener.name, peer=peer)
        finally:
            conn.close()  # at once; the count is given back by _finished

    # -- the two directions ---------------------------------------------------------

    def _identity_or_deny(self) -> Identity:
        identity = self._current()
        if identity is None:
            raise Denied("no_svid", "the proxy holds no valid SVID (Workload API down too long?)")
        return identity

    async def _handshake(self, tls: TlsStream) -> None:
        try:
            await asyncio.wait_for(tls.handshake(), self.settings.handshake_timeout)
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            raise _handshake_denial(exc) from None

    def _check_peer(self, tls: TlsStream, identity: Identity, policy: Policy) -> SpiffeId:
        ders = peer_chain_der(tls.obj)
        if not ders:
            raise Denied("no_client_cert", "the peer sent no certificate")
        peer_id = self._verify(ders, identity)
        if not policy.allows(peer_id):
            raise Denied("not_allowed", f"not in the allow list ({policy.describe()})",
                         str(peer_id))
        return peer_id

    def _verify(self, ders: list[bytes], identity: Identity) -> SpiffeId:
        """The peer's SPIFFE ID, its chain verified against its trust domain's bundle.

        A peer making many connections shows the same chain each time: the result
        is kept (for the same bytes, the same bundles, and only within the chain's
        validity), since path validation costs as much as the handshake itself.
        """
        now = self.settings.clock.now()
        key = b"".join(len(d).to_bytes(4, "big") + d for d in ders)
        known = self._verified.get(key)
        if known is not None and identity is self._identity and known[1] <= now <= known[2]:
            self._verified.move_to_end(key)
            return known[0]
        try:
            chain = [x509.load_der_x509_certificate(d) for d in ders]
        except ValueError as exc:
            raise Denied("untrusted", f"unparsable certificate: {exc}") from None
        try:
            peer_id = verify_chain(chain, identity.state.bundles, now=now)
        except X509SvidError as exc:
            claimed = ""
            with contextlib.suppress(X509SvidError):
                claimed = str(spiffe_id_from_certificate(chain[0]))
            raise Denied("untrusted", str(exc), claimed) from None
        if identity is self._identity:
            valid_from = max(c.not_valid_before_utc for c in chain)
            valid_until = min(c.not_valid_after_utc for c in chain)
            self._verified[key] = (peer_id, valid_from, valid_until)
            if len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return peer_id

    async def _inbound(self, listener: Listener, conn: socket.socket, peer: str) -> None:
        identity = self._identity_or_deny()
        policy = self._policies[listener.name]
        tls = TlsStream(conn, identity.server, server_side=True)
        await self._handshake(tls)
        peer_id = self._check_peer(tls, identity, policy)
        upstream = await self._connect(listener, listener.target)
        if upstream is None:
            return
        with upstream:
            self.metrics.connections.labels(listener.name).inc()
            event("connection allowed", level=logging.DEBUG, listener=listener.name,
                  peer=peer, peer_id=peer_id)
            await relay(upstream, tls)

    async def _outbound(self, listener: Listener, conn: socket.socket, peer: str) -> None:
        identity = self._identity_or_deny()
        policy = self._policies[listener.name]
        upstream = await self._connect(listener, listener.target)
        if upstream is None:
            return
        with upstream:
            tls = TlsStream(upstream, identity.client, server_side=False,
                            server_hostname=_sni(listener.target.host))
            try:
                await self._handshake(tls)
                server_id = self._check_peer(tls, identity, policy)
            except Denied as denied:
                denied.detail = f"server {listener.target}: {denied.detail}"
                raise
            self.metrics.connections.labels(listener.name).inc()
            event("connection allowed", level=logging.DEBUG, listener=listener.name,
                  peer=peer, server_id=server_id)
            await relay(conn, tls)

    async def _connect(self, listener: Listener, target: Address) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        try:
            candidates: list[tuple[int, tuple[Any, ...]]]
            try:
                # An IP address needs no resolver (loop.getaddrinfo runs in a thread).
                ip = ipaddress.ip_address(target.host)
                candidates = [(socket.AF_INET, (target.host, target.port)) if ip.version == 4
                              else (socket.AF_INET6, (target.host, target.port, 0, 0))]
            except ValueError:
                infos = await loop.getaddrinfo(target.host, target.port,
                                               type=socket.SOCK_STREAM)
                candidates = [(info[0], info[4]) for info in infos]
            return await asyncio.wait_for(self._connect_first(candidates),
                                          self.settings.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self.metrics.upstream_failures.labels(listener.name).inc()
            event("target unreachable", level=logging.WARNING, listener=listener.name,
                  target=target, reason=str(exc) or type(exc).__name__)
            return None

    @staticmethod
    async def _connect_first(candidates: list[tuple[int, tuple[Any, ...]]]) -> socket.socket:
        """Connect to the first address that answers, in the resolver's order.

        Raises:
            OSError: the last address's error when none answers.
        """
        loop = asyncio.get_running_loop()
        error: OSError = OSError("no address to connect to")
        for family, sockaddr in candidates:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, sockaddr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error

    # -- policy reload --------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        path = self.settings.config_path
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            stamp = self._stamp()
            if stamp != self._config_stamp:
                self._config_stamp = stamp
                self.reload()

    def reload(self) -> bool:
        """Read the config file again and apply its allow lists to new connections.

        A bad file changes nothing: the previous policies stay, and the error (one
        line, naming the line of the file) is logged.
        """
        path = self.settings.config_path
        assert path is not None
        try:
            loaded = load_file(path)
        except ConfigError as exc:
            self.metrics.policy_reloads.labels("refused").inc()
            event("policy reload refused; the previous policy stays", level=logging.ERROR,
                  file=path, reason=str(exc))
            return False
        by_name = {lst.name: lst for lst in loaded.listeners}
        current = {lst.name: lst for lst in self.settings.listeners if lst.from_file}
        for name, old in current.items():
            new = by_name.get(name)
            if new is None or (new.mode, new.listen, new.target) != (
                    old.mode, old.listen, old.target):
                event("listener change needs a restart; its policy is kept",
                      level=logging.WARNING, listener=name)
                continue
            self._policies[name] = new.policy
        for name in sorted(set(by_name) - set(current)):
            event("new listener needs a restart", level=logging.WARNING, listener=name)
        self.metrics.policy_reloads.labels("ok").inc()
        event("policy reloaded", file=path, listeners=",".join(
            f"{name}={self._policies[name].describe()}" for name in current))
        return True


def _authority_id(cert: x509.Certificate) -> str:
    """The leaf's AKI in hex: which CA signed it (``localauthority`` calls it so)."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except (x509.ExtensionNotFound, ValueError):
        return "-"
    return aki.key_identifier.hex() if aki.key_identifier else "-"


def _sni(host: str) -> str | None:
    """The name to send as SNI: a DNS name, never an IP address (RFC 6066 §3)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _format_peer(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)

