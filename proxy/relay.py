"""Copying bytes both ways between a plain socket and a TLS one, after the handshake.

Callback-based (asyncio protocols), so a socket stays registered with the event
loop for the whole connection and each chunk costs one ``recv`` and one
``send``; a coroutine per direction over ``sock_recv`` would register and
unregister the socket on every wait. TLS runs on the connection's own
:class:`ssl.SSLObject` (memory BIOs, see :mod:`proxy.tls`), which is what lets a
half-close pass through: when one side stops sending, the other gets EOF
(plain: ``shutdown(SHUT_WR)``; TLS: close_notify) and the opposite direction
goes on until it ends too.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

from proxy.tls import RECORD_READ, TlsStream

# Stop reading one side while the other has this much unsent.
HIGH_WATER = 1024 * 1024


class _Relay:
    def __init__(self, tls: TlsStream) -> None:
        self.obj = tls.obj
        self.incoming = tls.incoming
        self.outgoing = tls.outgoing
        self.plain: asyncio.Transport | None = None
        self.secure: asyncio.Transport | None = None
        self.plain_eof = False  # the plain side sent all it will send
        self.tls_eof = False  # the TLS side did
        self.closed = 0
        self.done = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None

    # -- plain -> TLS ------------------------------------------------------------------

    def from_plain(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush_tls()

    def plain_ended(self) -> None:
        self.plain_eof = True
        try:
            self.obj.unwrap()  # close_notify; reading goes on
        except ssl.SSLError:
            pass
        self._flush_tls()
        self._maybe_close()

    def _flush_tls(self) -> None:
        if self.outgoing.pending and self.secure is not None:
            self.secure.write(self.outgoing.read())

    # -- TLS -> plain ------------------------------------------------------------------

    def from_tls(self, data: bytes) -> None:
        self.incoming.write(data)
        self.drain_tls()

    def tls_transport_ended(self) -> None:
        self.incoming.write_eof()
        self.drain_tls()

    def drain_tls(self) -> None:
        if self.tls_eof or self.plain is None:
            # Until the plain side's transport exists, records wait in the BIO;
            # relay() drains them once it does.
            return
        chunks: list[bytes] = []
        ended = False
        while True:
            try:
                chunk = self.obj.read(RECORD_READ)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
                break
            except ssl.SSLError as exc:
                self.fail(exc)
                return
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        if chunks:
            self.plain.write(b"".join(chunks))
        self._flush_tls()  # e.g. the answer to a TLS 1.3 KeyUpdate
        if ended:
            self.tls_eof = True
            if self.plain.can_write_eof():
                self.plain.write_eof()
            self._maybe_close()

    # -- both ----------------------------------------------------------------------------

    def _maybe_close(self) -> None:
        if self.plain_eof and self.tls_eof:
            for transport in (self.plain, self.secure):
                if transport is not None:
                    transport.close()  # after what is buffered has been sent

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        for transport in (self.plain, self.secure):
            if transport is not None:
                transport.abort()

    def lost(self, exc: BaseException | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        self.closed += 1
        other_gone = self.closed >= 2
        if not (self.plain_eof and self.tls_eof):
            # One side went away before both had finished: nothing more can pass.
            for transport in (self.plain, self.secure):
                if transport is not None and not transport.is_closing():
                    transport.abort()
        if other_gone and not self.done.done():
            self.done.set_result(None)


class _Side(asyncio.Protocol):
    def __init__(self, relay: _Relay, *, secure: bool) -> None:
        self.relay = relay
        self.secure = secure
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if self.secure:
            self.relay.secure = transport
        else:
            self.relay.plain = transport

    def data_received(self, data: bytes) -> None:
        try:
            if self.secure:
                self.relay.from_tls(data)
            else:
                self.relay.from_plain(data)
        except (ssl.SSLError, OSError) as exc:
            self.relay.fail(exc)

    def eof_received(self) -> bool:
        try:
            if self.secure:
                self.relay.tls_transport_ended()
            else:
                self.relay.plain_ended()
        except (ssl.SSLError, OSError) as exc:
            self.relay.fail(exc)
        return True  # keep the transport open: the other direction may go on

    def _other(self) -> asyncio.Transport | None:
        return self.relay.plain if self.secure else self.relay.secure

    def pause_writing(self) -> None:
        other = self._other()
        if other is not None and not other.is_closing():
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self._other()
        if other is not None and not other.is_closing():
            other.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.relay.lost(exc)


async def relay(plain: socket.socket, tls: TlsStream) -> None:
    """Copy both ways until both sides have finished sending; half-close is passed on.

    The sockets belong to the relay's transports from here on and are closed by
    it.

    Raises:
        OSError, ssl.SSLError: either side failed (both are then closed).
    """
    loop = asyncio.get_running_loop()
    state = _Relay(tls)
    try:
        await loop.connect_accepted_socket(lambda: _Side(state, secure=True), tls.sock)
        await loop.connect_accepted_socket(lambda: _Side(state, secure=False), plain)
        # Data that came with the end of the handshake is already in the BIO.
        state.drain_tls()
        await state.done
    finally:
        if not state.done.done():
            for transport in (state.plain, state.secure):
                if transport is not None:
                    transport.abort()
    if state.error is not None and not isinstance(state.error, ConnectionResetError):
        raise state.error
