"""Relay accepted connections to an internal gRPC server, remembering who each caller is.

grpcio hides what attests a caller: a Unix peer's credentials (the agent's
Workload API) and a client certificate it did not require (the server's agent
API). So both fronts accept connections themselves, learn the peer's facts, and
relay the bytes to an internal gRPC server listening on a Unix socket in a
private directory. This module is the part they share:

1. :meth:`ConnectionRelay.prepare_private_dir` makes the private directory 0700:
   only the service's own user can enter it, so only the relay can reach the
   internal socket (and bind client sockets next to it).
2. :meth:`ConnectionRelay.relay` opens a client socket *bound to a per-connection
   address*, records ``address -> peer facts`` before connecting it to the
   internal socket, and pumps bytes both ways until either side closes; then it
   forgets the record. On Linux the address is a name the kernel picks in the
   abstract socket namespace (autobind: binding the empty address), unique while
   the socket lives and not one anybody can take first; there is no file to
   create and unlink, which under a burst of connections costs more than
   everything else a connection does. Elsewhere it is a path in the private
   directory, unlinked once connected (the kernel keeps the address on the
   connection). Either way the label proves nothing by itself: only processes
   that can enter the private directory can connect to the internal socket.
3. The servicer sees ``context.peer()``, ``"unix-abstract:<name>"`` or
   ``"unix:<bound path>"`` (checked with grpcio 1.85), and maps it back with
   :meth:`ConnectionRelay.lookup`. A connection that did not come through the
   relay has no record (an unbound client shows up as ``unix:`` with an empty
   path) and is refused by the servicer.

The front decides how to accept (plain Unix socket, TLS over TCP) and which facts
to record; the relay does not log, so each front reports in its own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Generic, TypeVar

PeerT = TypeVar("PeerT")

# More than a StreamReader can hold (twice its 64 KiB limit, plus one read of the
# transport's): reading this much empties it.
_TAKEOVER_READ = 4 * 1024 * 1024
ABSTRACT_ADDRESSES = sys.platform == "linux"
"""Bind relayed connections to abstract socket names (Linux only) rather than paths."""


class ConnectionRelay(Generic[PeerT]):
    """Per-connection bound client sockets to an internal server, and their peers.

    Args:
        internal_socket_name: the internal server's socket, inside the private dir.
        private_dir: the private directory; None creates a short random one under
            the system temp dir (keeping per-connection paths well inside the
            107-byte limit of a Unix socket address), removed again by
            :meth:`remove_private_dir`.
        prefix: the name prefix of a created private directory.
    """

    def __init__(
        self,
        *,
        internal_socket_name: str,
        private_dir: Path | None = None,
        prefix: str = "sigil-",
    ) -> None:
        self._own_private_dir = private_dir is None
        # mkdtemp creates the directory 0700.
        self.private_dir = (
            Path(tempfile.mkdtemp(prefix=prefix)) if private_dir is None else private_dir
        )
        self.internal_socket = self.private_dir / internal_socket_name
        self._peers: dict[str, PeerT] = {}
        self._counter = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_path(self, number: int) -> Path:
        """The path the ``number``-th connection's client socket is bound to.

        Used where abstract socket names are not available (not Linux).
        """
        return self.private_dir / f"c-{number}.sock"

    def _bind(self, sock: socket.socket) -> tuple[str, str]:
        """Bind ``sock`` to a fresh address: (the path bound or "", ``context.peer()``)."""
        if ABSTRACT_ADDRESSES:
            sock.bind("")  # autobind: the kernel picks an unused abstract name
            name = sock.getsockname()
            if isinstance(name, bytes):  # b"\0" + the name
                return "", "unix-abstract:" + name[1:].decode("ascii")
            raise OSError(f"autobind gave an unexpected address {name!r}")
        path = str(self.connection_path(next(self._counter)))
        sock.bind(path)
        return path, "unix:" + path

    def prepare_private_dir(self) -> None:
        """Create the private directory 0700 (before the internal server binds in it)."""
        self.private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask and ignored for an existing dir:
        # enforce it, since this directory is what keeps other users off the
        # internal socket.
        os.chmod(self.private_dir, 0o700)

    def remove_private_dir(self) -> None:
        """Remove the private directory if the relay created it."""
        if self._own_private_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)

    # Lookup ------------------------------------------------------------------

    def lookup(self, peer: str) -> PeerT | None:
        """The facts recorded for a connection to the internal server, by ``context.peer()``.

        Returns None for any peer the relay did not create.
        """
        return self._peers.get(peer)

    @property
    def connection_count(self) -> int:
        """How many connections are being relayed."""
        return len(self._peers)

    # Connections -------------------------------------------------------------

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Count the current task among the connections :meth:`cancel_all` ends."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    async def cancel_all(self) -> None:
        """Cancel every tracked connection task and wait for them to end."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerT, *,
        preface: bytes = b"", preface_timeout: float | None = None,
    ) -> None:
        """Connect to the internal server as ``peer`` and relay until either side closes.

        The client speaks first (an HTTP/2 client preface). Its first bytes are read
        before anything is opened upstream: a client that sends nothing within
        ``preface_timeout`` seconds, or whose first bytes are not ``preface``, is
        not relayed at all (the caller then closes it), so a silent connection never
        reaches the internal server. Then bytes are passed on in the transports' own
        callbacks (:class:`_Pipe`), not by tasks reading streams: no task wake-up,
        no stream buffer per chunk. Closing ``writer`` (the accepted connection) is
        left to the caller.

        Args:
            reader: the accepted connection's stream.
            writer: its writer, whose transport the relay takes over.
            peer: the facts :meth:`lookup` returns while the relay lasts.
            preface: what every client must send first (b"": anything).
            preface_timeout: seconds to wait for that (None: no limit).
        """
        client = writer.transport
        first = await _read_preface(reader, client, preface, preface_timeout)
        if first is None:
            return
        # Nothing more enters the stream (just emptied) until the pipe takes the
        # transport over: no byte is left behind in it.
        client.pause_reading()  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        done: asyncio.Future[None] = loop.create_future()
        down = _Pipe(done, client, previous=client.get_protocol())
        path, key = "", ""
        try:
            upstream.setblocking(False)
            path, key = self._bind(upstream)
            # Recorded before connecting, so the record exists before grpcio can
            # see the connection's first RPC.
            self._peers[key] = peer
            await loop.sock_connect(upstream, str(self.internal_socket))
            if path:
                # The kernel keeps the bound address on the connection; the file is
                # no longer needed, and removing it now leaves nothing on a crash.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            up_transport, up = await loop.create_unix_connection(
                lambda: _Pipe(done, client), sock=upstream)
        except BaseException:
            self._peers.pop(key, None)
            upstream.close()
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            raise
        down.other = up_transport
        try:
            # A client that closed while we connected: its pipe will see that
            # once reading resumes, and end the relay.
            if not client.is_closing():
                client.set_protocol(down)
                up_transport.write(first)
                client.resume_reading()  # type: ignore[attr-defined]
                # Either side closing ends the relay: gRPC has nothing to say
                # to a half-open HTTP/2 connection.
                await done
        finally:
            self._peers.pop(key, None)
            up_transport.close()
            if not up.closed:
                with contextlib.suppress(Exception):
                    await up.closed_event.wait()


async def _read_preface(reader: asyncio.StreamReader, client: asyncio.BaseTransport,
                        preface: bytes, timeout: float | None) -> bytes | None:
    """The client's first bytes, at least ``len(preface)`` of them and starting with
    it; None when it closes, half-closes, sends something else or takes too long.

    Each read asks for more than the stream can hold, so it empties the stream's
    buffer: after the last one nothing is left behind in it.
    """
    first = b""
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(_TAKEOVER_READ)
                first += chunk
                # Closed or half-closed: gRPC has nothing to say to a half-open
                # connection. Nobody to relay for.
                if not chunk or client.is_closing() or reader.at_eof():
                    return None
                if not first.startswith(preface[:len(first)]):
                    return None
                if len(first) >= len(preface):
                    return first
    except (TimeoutError, ConnectionError, ssl.SSLError):
        return None


class _Pipe(asyncio.Protocol):
    """One side of a relay: what its transport receives is written to the other's.

    Flow control follows the writing side: when the other transport's buffer
    fills (``pause_writing`` on its protocol) this side stops reading, and
    resumes with it. Either side closing, or sending EOF, ends the relay
    (``done``); the accepted connection's previous protocol (the stream the
    front handed us) is told of the close, so the front's ``wait_closed`` ends.
    """

    def __init__(self, done: asyncio.Future[None], other: asyncio.BaseTransport, *,
                 previous: asyncio.BaseProtocol | None = None) -> None:
        self.other = other
        self.closed = False
        self.closed_event = asyncio.Event()
        self._done = done
        self._previous = previous

    def data_received(self, data: bytes) -> None:
        other = self.other
        if not other.is_closing():
            other.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # close this side: the relay ends

    def pause_writing(self) -> None:
        # Our transport's send buffer is full: stop reading the side that fills it.
        self._peer_reading(pause=True)

    def resume_writing(self) -> None:
        self._peer_reading(pause=False)

    def _peer_reading(self, *, pause: bool) -> None:
        # The pipe whose data fills our transport reads from the *other* transport.
        source = self.other
        if source.is_closing():
            return
        if pause:
            source.pause_reading()  # type: ignore[attr-defined]
        else:
            source.resume_reading()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closed_event.set()
        if self._previous is not None:
            self._previous.connection_lost(exc)
        if not self.other.is_closing():
            # Buffered bytes are still sent first (except where the caller then
            # aborts the accepted connection, as the TLS front does).
            self.other.close()
        if not self._done.done():
            self._done.set_result(None)
