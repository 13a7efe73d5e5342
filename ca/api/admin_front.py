"""The admin socket's front: who is on the other end of each admin connection.

Scoped admins (``[admin]``, :mod:`ca.config.adminauth`) are Unix users, known only to the
kernel (``SO_PEERCRED``), which grpcio does not expose. So, as the agent's
Workload API does (DESIGN flow 4), the server accepts admin connections itself on
the admin socket, reads the peer's uid and gid, and relays each connection with
:class:`~attestation.relay.ConnectionRelay` to the internal admin gRPC server,
which listens in a private 0700 directory; :meth:`AdminSocketFront.lookup` maps
``context.peer()`` back to the credentials. A connection that did not come through
the front has no record and is refused (``ca.api.adminguard``).

The listening socket is made by the server (its name, mode and directory rules are
``ca.server``'s) and handed over, already listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading

from attestation.relay import ConnectionRelay
from ca.log import event

INTERNAL_SOCKET_NAME = "admin.sock"
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 section 3.4
PREFACE_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
_UCRED = struct.Struct("3i")


class AdminSocketFront:
    """Accepts admin connections, records (uid, gid), relays them to the internal server.

    Args:
        listener: the admin socket, bound and listening.
        max_connections: connections held at once; one more is closed at accept.
    """

    def __init__(self, listener: socket.socket, *,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self._listener = listener
        self._max = max_connections
        self._open = 0
        self._relay: ConnectionRelay[tuple[int, int]] = ConnectionRelay(
            internal_socket_name=INTERNAL_SOCKET_NAME, prefix="sigil-adm-")
        self._relay.prepare_private_dir()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="admin-front",
                                        daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def internal_socket(self) -> str:
        """Where the internal admin gRPC server must listen."""
        return str(self._relay.internal_socket)

    def lookup(self, peer: str) -> tuple[int, int] | None:
        """(uid, gid) of the admin caller behind a ``context.peer()``; None if unknown."""
        return self._relay.lookup(peer)

    def start(self) -> None:
        """Accept on the listener (the internal server must already be up)."""
        self._thread.start()

        async def begin() -> None:
            self._listener.setblocking(False)
            self._server = await asyncio.start_unix_server(self._handle, sock=self._listener)

        asyncio.run_coroutine_threadsafe(begin(), self._loop).result(timeout=30)

    def stop(self) -> None:
        """Stop accepting, end every relayed connection, remove the private directory."""
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            await self._relay.cancel_all()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._listener.close()
        self._loop.close()
        self._relay.remove_private_dir()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self._max:
            event("admin connection refused", level=logging.WARNING,
                  reason="connection limit", max_connections=self._max)
            writer.close()
            return
        self._open += 1
        try:
            sock: socket.socket = writer.get_extra_info("socket")
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            _pid, uid, gid = _UCRED.unpack(raw)
            with self._relay.tracked():
                await self._relay.relay(reader, writer, (uid, gid), preface=HTTP2_PREFACE,
                                        preface_timeout=PREFACE_TIMEOUT)
        except (asyncio.CancelledError, ConnectionError):
            pass
        except Exception:  # a bug: log it, keep serving others
            event("admin connection failed", level=logging.ERROR, exc_info=True)
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
