"""A broker's side of the Broker API over TCP with mutual TLS, for tests.

grpcio's client checks the server's certificate against a host name, and an
X.509-SVID has none (only its SPIFFE ID, in a URI SAN): a grpcio TLS channel
cannot talk to it. So, like go-spiffe's ``tlsconfig.MTLSClientConfig`` does for
Go, the TLS is done here with Python's ``ssl``: :class:`TlsTunnel` listens on a
Unix socket, and each connection grpcio opens to it becomes one TLS connection to
the agent, presenting the broker's SVID and requiring the agent's to chain to
the bundle and carry the expected SPIFFE ID (SPIFFE Broker Endpoint section 5).

:func:`handshake` is the bare TLS handshake plus a first read, to see a refusal
at the TLS layer for what it is.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509

from identity.x509svid import spiffe_id_from_certificate

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True)
class BrokerCredentials:
    """PEM files of a broker: its SVID chain and key (both optional, to test
    refusals), the bundle to verify the agent with, and the agent's SPIFFE ID."""

    bundle: Path
    server_id: str
    chain: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # an SVID has no host name: its ID is checked below
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(self.bundle))
        ctx.set_alpn_protocols(["h2"])
        if self.chain is not None and self.key is not None:
            ctx.load_cert_chain(str(self.chain), str(self.key))
        return ctx

    def connect(self, address: tuple[str, int], timeout: float = 10) -> ssl.SSLSocket:
        """A TLS connection to the agent whose SVID carries :attr:`server_id`.

        Raises:
            ssl.SSLError, OSError: the handshake failed.
            ConnectionRefusedError: the agent presented another SPIFFE ID.
        """
        raw = socket.create_connection(address, timeout=timeout)
        try:
            tls = self.context().wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        der = tls.getpeercert(binary_form=True)
        got = str(spiffe_id_from_certificate(x509.load_der_x509_certificate(der))) if der else ""
        if got != self.server_id:
            tls.close()
            raise ConnectionRefusedError(f"the server is {got!r}, not {self.server_id!r}")
        tls.settimeout(None)
        return tls


def handshake(address: tuple[str, int], creds: BrokerCredentials) -> str:
    """Handshake, send the HTTP/2 preface, read once; "ok" when the server kept the
    connection open, else the error (with TLS 1.3 the server's verdict on our
    certificate arrives after our side of the handshake finished)."""
    try:
        tls = creds.connect(address)
    except (OSError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"
    with tls:
        tls.settimeout(5)
        try:
            tls.sendall(HTTP2_PREFACE + bytes.fromhex("000000040000000000"))  # SETTINGS
            data = tls.recv(65536)
        except (OSError, ssl.SSLError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok" if data else "closed"


class TlsTunnel:
    """``unix:`` target for grpcio whose connections go to ``address`` over mTLS."""

    def __init__(self, address: tuple[str, int], creds: BrokerCredentials) -> None:
        self._address = address
        self._creds = creds
        self._dir = tempfile.mkdtemp(prefix="sg-brk-")
        self.path = os.path.join(self._dir, "tunnel.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._open: list[socket.socket] = []
        self.errors: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    def _accept(self) -> None:
        while True:
            try:
                local, _ = self._listener.accept()
            except OSError:
                return
            try:
                remote = self._creds.connect(self._address)
            except (OSError, ssl.SSLError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                local.close()
                continue
            self._open += [local, remote]
            threading.Thread(target=_relay, args=(local, remote), daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TlsTunnel:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _relay(local: socket.socket, remote: ssl.SSLSocket) -> None:
    """Copy bytes both ways until either side closes, in one thread: an SSL object
    must not be read and written by two threads at once (OpenSSL is not safe for
    that, and Python's ssl releases the GIL around both)."""
    try:
        while True:
            ready = [remote] if remote.pending() else \
                select.select([local, remote], [], [])[0]
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (remote if sock is local else local).sendall(data)
    except (OSError, ValueError):  # ssl.SSLError is an OSError; ValueError: closed
        pass
    finally:
        for sock in (local, remote):
            with contextlib.suppress(OSError):
                sock.close()
