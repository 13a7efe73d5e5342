"""TLS for the proxy: contexts built from an SVID, and a TLS stream over a raw socket.

Contexts. Each SVID or bundle change builds a new pair of :class:`ssl.SSLContext`
(server and client); connections keep the context they started with, so a
rotation never touches an established connection. OpenSSL gets every trusted
authority (own and federated trust domains) as ``cadata`` and requires a peer
certificate; that only proves the chain ends at *some* trusted authority. The
SPIFFE rules come after the handshake: :func:`identity.x509svid.verify_chain`
checks the peer's chain against the bundle of the peer's own trust domain (never
pooled across trust domains, X509-SVID §5) and the leaf rules.

Connections. asyncio's TLS transport cannot half-close (``can_write_eof()`` is
False), and a TCP proxy must: a client that shuts down its sending side still
waits for the answer. :class:`TlsStream` runs an :class:`ssl.SSLObject` over
memory BIOs on a non-blocking socket, so the relay (:mod:`proxy.relay`) can send
close_notify (TLS 1.3 §6.1) and keep reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from identity.bundle import Bundle
from identity.x509svid import X509Svid, certificates_to_pem

# Bytes asked of the socket per receive during the handshake, and of the TLS
# object per read (one record is at most 16 KiB of plaintext).
RECV_SIZE = 64 * 1024
RECORD_READ = 64 * 1024


def _private_dir() -> str:
    # The key touches a file only because SSLContext.load_cert_chain reads files:
    # in memory (/dev/shm) where there is one, in a 0700 folder, removed at once.
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a fresh 0700 folder in it
    return tempfile.mkdtemp(prefix="sigil-proxy-", dir=shm if shm.is_dir() else None)


def _load_identity(ctx: ssl.SSLContext, svid: X509Svid) -> None:
    folder = _private_dir()
    cert_path, key_path = os.path.join(folder, "svid.pem"), os.path.join(folder, "svid.key")
    try:
        for path, data in ((key_path, svid.key_pem()), (cert_path, svid.chain_pem())):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    finally:
        for path in (key_path, cert_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.rmdir(folder)


def _configure(ctx: ssl.SSLContext, svid: X509Svid, bundles: Iterable[Bundle]) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    authorities = [cert for bundle in bundles for cert in bundle.x509_authorities]
    if authorities:
        ctx.load_verify_locations(cadata=certificates_to_pem(authorities).decode("ascii"))
    _load_identity(ctx, svid)
    return ctx


def server_context(svid: X509Svid, bundles: Iterable[Bundle]) -> ssl.SSLContext:
    """A context for the inbound side: presents ``svid``, requires a client certificate.

    Args:
        svid: our SVID, with its key.
        bundles: every trusted bundle (own and federated trust domains).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # No session tickets: every connection shows its certificate, which is what
    # the SPIFFE check after the handshake reads.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    return _configure(ctx, svid, bundles)


def client_context(svid: X509Svid, bundles: Iterable[Bundle]) -> ssl.SSLContext:
    """A context for the outbound side: presents ``svid``, verifies the server.

    The server is named by its SPIFFE ID, not a host name: host name checking is
    off and the ID is checked after the handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _configure(ctx, svid, bundles)


def _der(cert: Any) -> bytes:
    if isinstance(cert, bytes):
        return cert
    return cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined,no-any-return]


def peer_chain_der(obj: ssl.SSLObject) -> list[bytes]:
    """The certificates the peer sent, DER, leaf first (empty when it sent none).

    Python 3.13 has ``get_unverified_chain()``; 3.10 to 3.12 have the same method
    on the private ``_sslobj``. Without either, only the leaf is available (enough
    when the peer's SVIDs are signed directly by an authority in the bundle).
    """
    leaf_der = obj.getpeercert(binary_form=True)
    if not leaf_der:
        return []
    getter = getattr(obj, "get_unverified_chain", None) or getattr(
        getattr(obj, "_sslobj", None), "get_unverified_chain", None)
    ders: list[bytes] = []
    if getter is not None:
        ders = [_der(c) for c in (getter() or [])]
    # OpenSSL leaves the leaf out of the server side's chain; put it first.
    if not ders or ders[0] != leaf_der:
        ders.insert(0, leaf_der)
    return ders


class TlsStream:
    """TLS over a connected non-blocking socket: the handshake, then the relay's.

    :meth:`handshake` runs it over the loop's socket calls; afterwards
    :func:`proxy.relay.relay` takes over the socket, the TLS object and its BIOs.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # server_hostname only sets SNI (host name checking is off: the SPIFFE ID is
        # what gets checked), for servers that pick a certificate by name.
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                server_hostname=server_hostname)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self._loop.sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        data = await self._loop.sock_recv(self.sock, RECV_SIZE)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        """Run the handshake.

        Raises:
            ssl.SSLError: the handshake failed (SSLCertVerificationError: the
                peer's certificate is not trusted).
            ConnectionError: the peer went away first.
        """
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionAbortedError(
                        "peer closed the connection during the handshake") from None
                continue
            except ssl.SSLError:
                # Send our alert, so the peer learns why.
                with contextlib.suppress(OSError):
                    await self._flush()
                raise
            await self._flush()
            return
