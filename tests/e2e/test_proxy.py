"""sigil-proxy between unmodified plain-TCP programs, on a real server and agent.

One stack serves this test user several identities (frontend, backend, other,
...); each proxy picks its own with ``--spiffe-id``. Behind the inbound proxy
runs python's http.server (or a TCP echo server); in front, curl or urllib
through an outbound proxy, or Python ``ssl`` clients holding SVIDs minted by the
server (``sigil-server x509 mint``) for the refused cases.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack, free_port, running_stack
from tests.support.proxies import (
    ProxyProcess,
    echo_backend,
    echo_round_trip,
    http_backend,
    http_get,
    proxies,
)
from tests.support.require import require_program

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TD = "proxy.sigil.test"
FRONTEND, BACKEND, OTHER = (f"spiffe://{TD}/{n}" for n in ("frontend", "backend", "other"))


@pytest.fixture(scope="module")
def st() -> Iterator[Stack]:
    import os

    uid = f"unix:uid:{os.getuid()}"
    with running_stack(trust_domain=TD) as stack:
        for spiffe_id in (FRONTEND, BACKEND, OTHER):
            stack.create_entry(spiffe_id, uid)
        yield stack


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sgp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(st: Stack, started: list[ProxyProcess], workdir: Path, name: str, *args: str,
          listeners: int = 1) -> ProxyProcess:
    proc = ProxyProcess(name, workdir, ["--socket-path", str(st.agent_socket), *args])
    started.append(proc)
    proc.wait_for_log(r"info listening ", count=listeners)
    return proc


def mint(st: Stack, spiffe_id: str, folder: Path, ttl: str = "1h") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    st.server_cli("x509", "mint", "--spiffe-id", spiffe_id, "--ttl", ttl,
                  "--write", str(folder))
    return folder


def tls_client(port: int, certs: Path | None, bundle: Path) -> bytes:
    """Connect with TLS (client cert from ``certs``, if any), send a request, read the answer.

    The server's refusal of the client certificate arrives (TLS 1.3) after the
    client's handshake: as an alert or an EOF on the first read, so an empty answer.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(bundle))
    if certs is not None:
        ctx.load_cert_chain(str(certs / "svid.pem"), str(certs / "svid.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                out = b""
                while data := tls.recv(65536):
                    out += data
                return out
        except (ssl.SSLError, ConnectionResetError):
            return b""


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def denied_count(port: int, listener: str, reason: str) -> float:
    needle = f'sigil_proxy_denied_total{{listener="{listener}",reason="{reason}"}} '
    for line in metrics_text(port).splitlines():
        if line.startswith(needle):
            return float(line[len(needle):])
    return 0.0


@contextlib.contextmanager
def pair(st: Stack, workdir: Path, backend_port: int, *, client_id: str = FRONTEND,
         inbound_extra: tuple[str, ...] = ()) -> Iterator[tuple[int, int, int, list[ProxyProcess]]]:
    """An inbound proxy (backend, allows frontend) and an outbound one (as ``client_id``).

    Yields (outbound port, inbound port, inbound metrics port, the proxies).
    """
    in_port, out_port, metrics_port = free_port(), free_port(), free_port()
    with proxies(workdir) as started:
        start(st, started, workdir, "inbound", "--spiffe-id", BACKEND,
              "--inbound", f"127.0.0.1:{in_port}=127.0.0.1:{backend_port}",
              "--allow", FRONTEND, "--metrics-address", f"127.0.0.1:{metrics_port}",
              *inbound_extra)
        start(st, started, workdir, "outbound", "--spiffe-id", client_id,
              "--outbound", f"127.0.0.1:{out_port}=127.0.0.1:{in_port}", "--expect", BACKEND)
        yield out_port, in_port, metrics_port, started


def test_http_through_two_proxies_allowed_and_denied(st: Stack, workdir: Path) -> None:
    curl = require_program("curl")
    with http_backend() as backend, pair(st, workdir, backend) as (out_port, in_port,
                                                                      metrics, started):
        inbound = started[0]
        # An unmodified HTTP client (curl) through the outbound proxy: allowed.
        done = subprocess.run([curl, "-sS", "--max-time", "20", f"http://127.0.0.1:{out_port}/x"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "hello from the backend, path /x\n"
        assert denied_count(metrics, f"inbound:127.0.0.1:{in_port}", "not_allowed") == 0

        # The same path as spiffe://.../other: the inbound proxy refuses and says why.
        other_port = free_port()
        start(st, started, workdir, "other", "--spiffe-id", OTHER,
              "--outbound", f"127.0.0.1:{other_port}=127.0.0.1:{in_port}", "--expect", BACKEND)
        denied = subprocess.run([curl, "-sS", "--max-time", "20",
                                 f"http://127.0.0.1:{other_port}/x"],
                                capture_output=True, text=True, timeout=60)
        assert denied.returncode != 0 and "hello" not in denied.stdout
        inbound.wait_for_log(r"warning connection denied listener=inbound:127\.0\.0\.1:\d+ "
                             rf"peer=127\.0\.0\.1:\d+ peer_id={OTHER} reason=not_allowed")
        assert denied_count(metrics, f"inbound:127.0.0.1:{in_port}", "not_allowed") == 1

        # An outbound proxy expecting another server ID refuses the backend.
        wrong_port = free_port()
        wrong = start(st, started, workdir, "wrong-expect", "--spiffe-id", FRONTEND,
                      "--outbound", f"127.0.0.1:{wrong_port}=127.0.0.1:{in_port}",
                      "--expect", OTHER)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            http_get(wrong_port)
        wrong.wait_for_log(rf"connection denied .* peer_id={BACKEND} reason=not_allowed")


def test_refused_clients(st: Stack, workdir: Path) -> None:
    """No certificate, another ID, an expired SVID, a certificate of an unknown CA."""
    good = mint(st, FRONTEND, workdir / "good")
    another = mint(st, OTHER, workdir / "another")
    expired = mint(st, FRONTEND, workdir / "expired", ttl="2s")
    stranger = workdir / "stranger"
    make_untrusted_svid(FRONTEND, stranger)
    bundle = good / "bundle.pem"
    with http_backend() as backend, pair(st, workdir, backend) as (_, in_port, metrics, started):
        inbound = started[0]
        listener = f"inbound:127.0.0.1:{in_port}"
        assert b"hello from the backend" in tls_client(in_port, good, bundle)
        time.sleep(2.5)  # the 2 s SVID is now expired
        cases = [(None, "no_client_cert"), (another, "not_allowed"), (expired, "untrusted"),
                 (stranger, "untrusted")]
        for certs, reason in cases:
            before = denied_count(metrics, listener, reason)
            assert tls_client(in_port, certs, bundle) == b"", (certs, reason)
            deadline = time.monotonic() + 20
            while denied_count(metrics, listener, reason) < before + 1:
                assert time.monotonic() < deadline, (reason, inbound.log())
                time.sleep(0.1)
        log = inbound.log()
        assert "reason=no_client_cert" in log
        assert "certificate has expired" in log or "not valid at" in log, log
        assert f"peer_id={OTHER} reason=not_allowed" in log


def make_untrusted_svid(spiffe_id: str, folder: Path) -> None:
    """An SVID for ``spiffe_id`` from a CA nobody trusts (made here)."""
    import datetime as dt

    from identity.keys import generate_private_key, private_key_to_pem
    from identity.spiffeid import SpiffeId
    from identity.x509svid import SvidSigner, certificates_to_pem, new_ca_certificate

    folder.mkdir(parents=True)
    sid = SpiffeId.parse(spiffe_id)
    now = dt.datetime.now(dt.UTC)
    ca_key, key = generate_private_key(), generate_private_key()
    ca = new_ca_certificate(trust_domain=sid.trust_domain, public_key=ca_key.public_key(),
                            signer_key=ca_key, not_before=now - dt.timedelta(minutes=1),
                            not_after=now + dt.timedelta(hours=1))
    leaf = SvidSigner(ca, ca_key).sign(spiffe_id=sid, public_key=key.public_key(),
                                       not_before=now, not_after=now + dt.timedelta(minutes=30))
    (folder / "svid.pem").write_bytes(certificates_to_pem([leaf]))
    (folder / "svid.key").write_bytes(private_key_to_pem(key))


def test_large_transfer_both_ways_and_half_close(st: Stack, workdir: Path) -> None:
    with echo_backend() as backend, pair(st, workdir, backend) as (out_port, *_):
        sent, received = echo_round_trip(out_port, 64 * 1024 * 1024)
        assert sent == received
