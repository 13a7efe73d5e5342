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
   forgets the record. On Linux the address is a name in the abstract socket
   namespace (random per relay, numbered per connection): no file to create and
   unlink, which under a burst of connections costs more than everything else a
   connection does. Elsewhere it is a path in the private directory, unlinked
   once connected (the kernel keeps the address on the connection). Either way
   the label proves nothing by itself: only processes that can enter the private
   directory can connect to the internal socket at all.
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
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Generic, TypeVar

PeerT = TypeVar("PeerT")

_RELAY_CHUNK = 64 * 1024
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
        # Unguessable, so no other process can take a name before we bind it.
        self._abstract_prefix = f"{prefix}{secrets.token_hex(8)}-"
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_path(self, number: int) -> Path:
        """The path the ``number``-th connection's client socket is bound to.

        Used where abstract socket names are not available (not Linux).
        """
        return self.private_dir / f"c-{number}.sock"

    def _address(self, number: int) -> tuple[str, str]:
        """(address to bind, ``context.peer()`` of the resulting connection)."""
        if ABSTRACT_ADDRESSES:
            name = f"{self._abstract_prefix}{number}"
            return "\0" + name, "unix-abstract:" + name
        path = str(self.connection_path(number))
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
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerT
    ) -> None:
        """Connect to the internal server as ``peer`` and relay until either side closes.

        Closing ``writer`` (the accepted connection) is left to the caller.
        """
        address, key = self._address(next(self._counter))
        on_disk = not address.startswith("\0")
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.setblocking(False)
            upstream.bind(address)
            # Recorded before connecting, so the record exists before grpcio can
            # see the connection's first RPC.
            self._peers[key] = peer
            await asyncio.get_running_loop().sock_connect(upstream, str(self.internal_socket))
            if on_disk:
                # The kernel keeps the bound address on the connection; the file is
                # no longer needed, and removing it now leaves nothing on a crash.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address)
            up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
        except BaseException:
            self._peers.pop(key, None)
            upstream.close()
            if on_disk:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address)
            raise
        try:
            pumps = [
                asyncio.create_task(_pump(reader, up_writer)),
                asyncio.create_task(_pump(up_reader, writer)),
            ]
            try:
                # Either side closing ends the relay: gRPC has nothing to say to a
                # half-open HTTP/2 connection.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._peers.pop(key, None)
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    # ssl.SSLError: a TLS peer that goes away without close_notify.
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await src.read(_RELAY_CHUNK):
            dst.write(data)
            await dst.drain()
