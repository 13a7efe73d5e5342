"""sigil-proxy between unmodified plain-TCP programs, on a real server and agent.

One stack serves this test user several identities (frontend, backend, other,
...); each proxy picks its own with ``--spiffe-id``. Behind the inbound proxy
runs python's http.server (or a TCP echo server); in front, curl or urllib
through an outbound proxy, or Python ``ssl`` clients holding SVIDs minted by the
server (``sigil-server x509 mint``) for the refused cases.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import resource
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from identity.keys import generate_private_key, private_key_to_pem
from identity.spiffeid import SpiffeId
from identity.x509svid import SvidSigner, certificates_to_pem, new_ca_certificate
from tests.e2e.conftest import Stack, free_port, running_stack
from tests.support.proxies import (
    ProxyProcess,
    count_backend,
    echo_backend,
    echo_round_trip,
    http_backend,
    http_get,
    proxies,
    proxy_command,
    proxy_env,
)
from tests.support.require import require, require_program

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TD = "proxy.sigil.test"
FRONTEND, BACKEND, OTHER = (f"spiffe://{TD}/{n}" for n in ("frontend", "backend", "other"))


@pytest.fixture(scope="module")
def st() -> Iterator[Stack]:
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


def make_untrusted_svid(spiffe_id: str, folder: Path) -> bytes:
    """An SVID for ``spiffe_id`` from a CA made here (trusted by nobody yet); its CA in PEM."""
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
    return certificates_to_pem([ca])


def test_large_transfer_both_ways_and_half_close(st: Stack, workdir: Path) -> None:
    with echo_backend() as backend, pair(st, workdir, backend) as (out_port, *_):
        # 64 MiB out and back at the same time; the client half-closes at the end
        # and still reads the rest of the echo.
        sent, received = echo_round_trip(out_port, 64 * 1024 * 1024)
        assert sent == received
    with count_backend() as backend, pair(st, workdir, backend) as (out_port, *_):
        # The backend answers only once it sees EOF: the half-close must cross both
        # proxies (plain shutdown -> close_notify -> plain shutdown) and the answer
        # come back on the still-open direction.
        with socket.create_connection(("127.0.0.1", out_port), timeout=30) as sock:
            sock.sendall(b"x" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while data := sock.recv(4096):
                answer += data
        assert answer == b"got 100000 bytes"


def test_federated_peer_passes_once_the_bundle_is_held(st: Stack, workdir: Path) -> None:
    partner = "partner.proxy.test"
    client = workdir / "partner-client"
    ca_pem = make_untrusted_svid(f"spiffe://{partner}/client", client)
    (workdir / "partner-ca.pem").write_bytes(ca_pem)

    fed_backend = f"spiffe://{TD}/backend-federated"
    st.create_entry(fed_backend, f"unix:uid:{os.getuid()}",
                    extra=("--federates-with", f"spiffe://{partner}"))
    bundle = mint(st, FRONTEND, workdir / "own") / "bundle.pem"
    in_port, metrics = free_port(), free_port()
    with http_backend() as backend, proxies(workdir) as started:
        inbound = start(st, started, workdir, "inbound-fed", "--spiffe-id", fed_backend,
                        "--inbound", f"127.0.0.1:{in_port}=127.0.0.1:{backend}",
                        "--allow", f"spiffe://{partner}",
                        "--metrics-address", f"127.0.0.1:{metrics}")
        listener = f"inbound:127.0.0.1:{in_port}"
        # Not federated yet: the partner's CA is in no bundle the proxy holds, so
        # OpenSSL refuses the chain during the handshake (before any ID is read).
        assert tls_client(in_port, client, bundle) == b""
        inbound.wait_for_log(r"peer_id=- reason=untrusted "
                             r'detail="unable to get local issuer certificate"')
        st.server_cli("bundle", "set", "--id", f"spiffe://{partner}", "--format", "pem",
                      "--path", str(workdir / "partner-ca.pem"))
        inbound.wait_for_log(rf"svid updated .*trust_domains=[^ ]*{partner}")
        assert b"hello from the backend" in tls_client(in_port, client, bundle)
        assert denied_count(metrics, listener, "untrusted") == 1


@pytest.fixture
def raised_nofile() -> Iterator[None]:
    """Room for the flood's 2,000 client sockets in this process (root may raise the cap)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if soft >= want:
        yield
        return
    new_hard = hard
    if hard != resource.RLIM_INFINITY and hard < want and os.geteuid() == 0:
        new_hard = want
    require(new_hard == resource.RLIM_INFINITY or new_hard >= want,
            f"RLIMIT_NOFILE hard limit {hard} is below {want} (root may raise it)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, new_hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, new_hard))


@pytest.mark.usefixtures("raised_nofile")
def test_bad_input_junk_slow_handshake_and_a_flood(st: Stack, workdir: Path) -> None:
    with http_backend() as backend, pair(
        st, workdir, backend,
        inbound_extra=("--handshake-timeout", "2s", "--max-connections", "100"),
    ) as (out_port, in_port, metrics, started):
        inbound = started[0]
        listener = f"inbound:127.0.0.1:{in_port}"
        # A TLS record header announcing a ClientHello, then junk.
        with socket.create_connection(("127.0.0.1", in_port), timeout=20) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x40" + b"\xde\xad\xbe\xef" * 16)
            assert sock.recv(4096)[:1] in (b"\x15", b"")  # an alert, or just closed
        inbound.wait_for_log(r"connection denied .*reason=handshake_failed")

        # A client that connects and never finishes: the proxy drops it when its 2 s
        # handshake timeout fires (the socket's own 60 s timeout would fail the test).
        with socket.create_connection(("127.0.0.1", in_port), timeout=60) as sock:
            sock.sendall(b"\x16\x03\x01")
            assert sock.recv(4096) == b""
        inbound.wait_for_log(r"connection denied .*reason=handshake_timeout")

        # 2,000 connections at once, all idle: the cap (100) closes the rest at once,
        # the timeout the others; the proxy stays up and serves the next caller.
        flood: list[socket.socket] = []
        try:
            for _ in range(2000):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", in_port))
                flood.append(s)
            deadline = time.monotonic() + 60
            while denied_count(metrics, listener, "connection_cap") < 1:
                assert time.monotonic() < deadline, inbound.log()[-3000:]
                time.sleep(0.2)
        finally:
            for s in flood:
                s.close()
        assert inbound.proc.poll() is None
        assert "connection_cap" in inbound.log()
        deadline = time.monotonic() + 60
        while True:  # slots come back as the idle ones time out or close
            try:
                assert http_get(out_port) == "hello from the backend, path /\n"
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                assert time.monotonic() < deadline, inbound.log()[-3000:]
                time.sleep(0.5)


def test_policy_reload_applies_to_new_connections_only(st: Stack, workdir: Path) -> None:
    in_port, out_port, other_port = free_port(), free_port(), free_port()
    config = workdir / "proxy.toml"

    def write(allow: str, extra: str = "") -> None:
        config.write_text(f"""\
# the backend's sidecar
spiffe_id = "{BACKEND}"

[[inbound]]
name = "web"
listen = "127.0.0.1:{in_port}"
forward = "127.0.0.1:{{backend}}"
allow_ids = [
    "{allow}",{extra}
]
""")

    with http_backend() as backend, proxies(workdir) as started:
        def write_config(allow: str, extra: str = "") -> None:
            write(allow, extra)
            config.write_text(config.read_text().replace("{backend}", str(backend)))

        write_config(FRONTEND)
        inbound = start(st, started, workdir, "inbound-file", "--config", str(config))
        start(st, started, workdir, "front", "--spiffe-id", FRONTEND,
              "--outbound", f"127.0.0.1:{out_port}=127.0.0.1:{in_port}", "--expect", BACKEND)
        start(st, started, workdir, "other", "--spiffe-id", OTHER,
              "--outbound", f"127.0.0.1:{other_port}=127.0.0.1:{in_port}", "--expect", BACKEND)
        kept = http.client.HTTPConnection("127.0.0.1", out_port, timeout=20)
        kept.request("GET", "/before")
        assert kept.getresponse().read() == b"hello from the backend, path /before\n"
        sock_before = kept.sock
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            http_get(other_port)

        write_config(OTHER)
        inbound.wait_for_log(r"info policy reloaded .*web=" + OTHER)
        assert http_get(other_port) == "hello from the backend, path /\n"
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            http_get(out_port)
        # The connection made before the reload goes on under the old policy.
        kept.request("GET", "/after")
        assert kept.getresponse().read() == b"hello from the backend, path /after\n"
        assert kept.sock is sock_before
        kept.close()

        # A bad file is refused, naming the line; the previous policy stays.
        write_config(OTHER, '\n    "spiffe://proxy.sigil.test/bad//path",')
        inbound.wait_for_log(r"error policy reload refused.*line 10: allow_ids: invalid SPIFFE ID")
        assert http_get(other_port) == "hello from the backend, path /\n"


def test_traffic_flows_through_svid_and_ca_rotation(st: Stack, workdir: Path) -> None:
    uid = f"unix:uid:{os.getuid()}"
    rot_front, rot_back = f"spiffe://{TD}/rot-frontend", f"spiffe://{TD}/rot-backend"
    for spiffe_id in (rot_front, rot_back):
        st.create_entry(spiffe_id, uid, extra=("--x509-svid-ttl", "10"))
    in_port, out_port = free_port(), free_port()
    ok, failures = [0], []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                assert http_get(out_port) == "hello from the backend, path /\n"
                ok[0] += 1
            except Exception as exc:  # every failure counts, whatever its kind
                failures.append(repr(exc))
            time.sleep(0.05)

    with http_backend() as backend, proxies(workdir) as started:
        inbound = start(st, started, workdir, "rot-in", "--spiffe-id", rot_back,
                        "--inbound", f"127.0.0.1:{in_port}=127.0.0.1:{backend}",
                        "--allow", rot_front)
        outbound = start(st, started, workdir, "rot-out", "--spiffe-id", rot_front,
                         "--outbound", f"127.0.0.1:{out_port}=127.0.0.1:{in_port}",
                         "--expect", rot_back)
        # One connection opened now and used again after every rotation.
        kept = http.client.HTTPConnection("127.0.0.1", out_port, timeout=20)
        kept.request("GET", "/kept")
        assert kept.getresponse().read() == b"hello from the backend, path /kept\n"
        kept_sock = kept.sock
        thread = threading.Thread(target=loop)
        thread.start()
        try:
            # Two SVID rotations each (10 s SVIDs renew every 4-6 s): three SVIDs seen.
            for proxy in (inbound, outbound):
                wait_for_svids(proxy, lambda lines: len({_field(ln, "expires_at")
                                                         for ln in lines}) >= 3)
            # CA rotation: prepare, wait until both hold the new CA in their bundle,
            # activate, wait until both present SVIDs the new CA signed.
            new_id = json.loads(st.server_cli("localauthority", "x509", "prepare",
                                              "--output", "json").stdout)["authority_id"]
            for proxy in (inbound, outbound):
                wait_for_svids(proxy, lambda lines: _field(lines[-1], "authorities") == "2")
            st.server_cli("localauthority", "x509", "activate", "--output", "json")
            for proxy in (inbound, outbound):
                wait_for_svids(proxy, lambda lines: _field(lines[-1], "authority_id") == new_id)
            time.sleep(1)  # a few more connections under the new CA
        finally:
            stop.set()
            thread.join()
        assert failures == [], failures[:5]
        assert ok[0] >= 20
        kept.request("GET", "/kept-again")
        assert kept.getresponse().read() == b"hello from the backend, path /kept-again\n"
        assert kept.sock is kept_sock
        kept.close()


def _field(line: str, key: str) -> str:
    for part in line.split():
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return ""


def wait_for_svids(proxy: ProxyProcess, check: Callable[[list[str]], bool],
                   timeout: float = 90) -> None:
    """Wait until ``check`` holds for the proxy's ``svid updated`` log lines."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in proxy.log().splitlines() if "info svid updated" in ln]
        if lines and check(lines):
            return
        assert time.monotonic() < deadline, (proxy.name, lines[-5:])
        time.sleep(0.2)


def test_workload_api_down_at_start_and_later(workdir: Path) -> None:
    """Down at start: retries, listens only once it has an SVID. Down later: keeps the
    SVID it holds until that expires, then refuses new connections."""
    td = "down.sigil.test"
    server_id, client_id = f"spiffe://{td}/backend", f"spiffe://{td}/frontend"
    link = workdir / "api.sock"  # the agent's socket appears here only later
    in_port = free_port()
    with running_stack(trust_domain=td) as stack, http_backend() as backend, \
            proxies(workdir) as started:
        stack.create_entry(server_id, f"unix:uid:{os.getuid()}",
                           extra=("--x509-svid-ttl", "20"))
        client = mint(stack, client_id, workdir / "client")
        bundle = client / "bundle.pem"
        inbound = ProxyProcess("down", workdir, [
            "--socket-path", str(link), "--spiffe-id", server_id,
            "--inbound", f"127.0.0.1:{in_port}=127.0.0.1:{backend}", "--allow", client_id])
        started.append(inbound)
        inbound.wait_for_log(r"workload api retry scheduled", count=2)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", in_port), timeout=5).close()
        assert "info listening" not in inbound.log()

        link.symlink_to(stack.agent_socket)
        inbound.wait_for_log(r"info listening ")
        assert b"hello from the backend" in tls_client(in_port, client, bundle)

        stack.stop("agent")
        inbound.wait_for_log(r"warning workload api unavailable")
        last = [ln for ln in inbound.log().splitlines() if "info svid updated" in ln][-1]
        expires = dt.datetime.fromisoformat(_field(last, "expires_at"))
        if dt.datetime.now(dt.UTC) < expires - dt.timedelta(seconds=3):
            # Still valid: served as before, with the agent gone.
            assert b"hello from the backend" in tls_client(in_port, client, bundle)
        inbound.wait_for_log(r"error svid expired", timeout=90)
        assert tls_client(in_port, client, bundle) == b""
        inbound.wait_for_log(r"connection denied .*reason=no_svid")


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs}/svid.pem;
        ssl_certificate_key {certs}/svid.key;
        ssl_client_certificate {certs}/bundle.pem;
        ssl_verify_client on;
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
"""


def test_interop_openssl_client_and_nginx_server(st: Stack, workdir: Path) -> None:
    """Other TLS stacks on the far side: ``openssl s_client`` into the inbound proxy,
    and the outbound proxy into nginx doing mTLS with files from ``x509 mint``."""
    openssl = require_program("openssl")
    nginx = "/usr/sbin/nginx"
    require(Path(nginx).exists(), f"nginx is not installed at {nginx}; `python3 dev.py test` "
            "as root installs it")
    client = mint(st, FRONTEND, workdir / "client")
    nginx_id = f"spiffe://{TD}/nginx"
    certs = mint(st, nginx_id, workdir / "nginx-certs")
    (workdir / "tmp").mkdir()
    nginx_port, in_port, out_port, wrong_port = (free_port() for _ in range(4))
    (workdir / "nginx.conf").write_text(NGINX_CONF.format(root=workdir, port=nginx_port,
                                                          certs=certs))
    with http_backend() as backend, proxies(workdir) as started:
        start(st, started, workdir, "inbound", "--spiffe-id", BACKEND,
              "--inbound", f"127.0.0.1:{in_port}=127.0.0.1:{backend}", "--allow", FRONTEND)
        done = subprocess.run(
            [openssl, "s_client", "-connect", f"127.0.0.1:{in_port}", "-quiet",
             "-verify_return_error", "-CAfile", str(client / "bundle.pem"),
             "-cert", str(client / "svid.pem"), "-key", str(client / "svid.key")],
            input=b"GET /openssl HTTP/1.0\r\n\r\n", capture_output=True, timeout=60)
        assert b"hello from the backend, path /openssl" in done.stdout, done.stderr

        server = subprocess.Popen([nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
                                  stdout=subprocess.DEVNULL,
                                  stderr=open(workdir / "nginx.out", "wb"))
        try:
            # By name: resolved, every address tried in turn, sent as SNI.
            start(st, started, workdir, "to-nginx", "--spiffe-id", FRONTEND,
                  "--outbound", f"127.0.0.1:{out_port}=localhost:{nginx_port}",
                  "--expect", nginx_id)
            wrong = start(st, started, workdir, "to-nginx-wrong", "--spiffe-id", FRONTEND,
                          "--outbound", f"127.0.0.1:{wrong_port}=127.0.0.1:{nginx_port}",
                          "--expect", BACKEND)
            deadline = time.monotonic() + 30
            while True:  # until nginx listens
                try:
                    body = http_get(out_port)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    assert server.poll() is None, (workdir / "nginx.out").read_text()
                    assert time.monotonic() < deadline, (workdir / "error.log").read_text()
                    time.sleep(0.2)
            assert body == "hello from nginx\n"
            with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
                http_get(wrong_port)
            wrong.wait_for_log(rf"connection denied .* peer_id={nginx_id} reason=not_allowed")
        finally:
            server.terminate()
            server.wait(timeout=15)


def test_a_listening_address_in_use_is_one_line_and_exit_2(st: Stack) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [*proxy_command("run"), "--socket-path", str(st.agent_socket),
             "--spiffe-id", BACKEND, "--inbound", f"127.0.0.1:{port}=127.0.0.1:1",
             "--allow", FRONTEND],
            capture_output=True, text=True, timeout=120, env=proxy_env())
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: cannot listen on 127.0.0.1:{port} (listener inbound:127.0.0.1:{port}): "
        "Address already in use")
