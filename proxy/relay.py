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
        # The C object's methods, bound once: ssl.SSLObject.read and .write are
        # Python wrappers around them, one more call per record.
        sslobj = getattr(self.obj, "_sslobj", self.obj)
        self._read = sslobj.read
        self._write = sslobj.write
        self._pending = sslobj.pending
        self.plain: asyncio.Transport | None = None
        self.secure: asyncio.Transport | None = None
        self.plain_eof = False  # the plain side sent all it will send
        self.tls_eof = False  # the TLS side did
        self.closed = 0
        self.done = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None

    # -- plain -> TLS ------------------------------------------------------------------

    def from_plain(self, data: bytes) -> None:
        # One record per chunk (up to 16 KiB each), all of them handed to the
        # transport in one write: when its buffer is empty that is one send().
        self._write(data)
        if self.secure is not None:
            self.secure.write(self.outgoing.read())

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
        read = self._read
        incoming = self.incoming
        first = b""
        chunks: list[bytes] | None = None
        ended = False
        while True:
            try:
                chunk = read(RECORD_READ)
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
            if not first:
                first = chunk
            elif chunks is None:
                chunks = [first, chunk]
            else:
                chunks.append(chunk)
            if not incoming.pending and not self._pending():
                # Nothing left to decrypt: the next read could only say "want
                # read" (an exception) - the usual case for a small record.
                break
        if chunks is not None:
            self.plain.write(b"".join(chunks))
        elif first:
            self.plain.write(first)
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
    """One socket of the relay; :class:`_PlainSide` and :class:`_TlsSide` say which.

    Two classes rather than a flag, so that each received chunk goes straight to
    its handler (the per-record path is a few calls deep, no more).
    """

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self._attach(transport)

    def _attach(self, transport: asyncio.Transport) -> None:
        raise NotImplementedError

    def _other(self) -> asyncio.Transport | None:
        raise NotImplementedError

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


class _PlainSide(_Side):
    def _attach(self, transport: asyncio.Transport) -> None:
        self.relay.plain = transport

    def _other(self) -> asyncio.Transport | None:
        return self.relay.secure

    def data_received(self, data: bytes) -> None:
        try:
            self.relay.from_plain(data)
        except (ssl.SSLError, OSError) as exc:
            self.relay.fail(exc)

    def eof_received(self) -> bool:
        try:
            self.relay.plain_ended()
        except (ssl.SSLError, OSError) as exc:
            self.relay.fail(exc)
        return True  # keep the transport open: the other direction may go on


class _TlsSide(_Side):
    def _attach(self, transport: asyncio.Transport) -> None:
        self.relay.secure = transport

    def _other(self) -> asyncio.Transport | None:
        return self.relay.plain

    def data_received(self, data: bytes) -> None:
        try:
            self.relay.from_tls(data)
        except (ssl.SSLError, OSError) as exc:
            self.relay.fail(exc)

    def eof_received(self) -> bool:
        try:
            self.relay.tls_transport_ended()
        except (ssl.SSLError, OSError) as exc:
            self.relay.fail(exc)
        return True  # keep the transport open: the other direction may go on


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
        await loop.connect_accepted_socket(lambda: _TlsSide(state), tls.sock)
        await loop.connect_accepted_socket(lambda: _PlainSide(state), plain)
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
