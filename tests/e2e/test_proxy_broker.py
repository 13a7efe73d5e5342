"""sigil-proxy in broker mode on a real server and agent: it presents the SVID of
the program it fronts, fetched from the agent's SPIFFE Broker API by PID.

The agent's unix attestor reports ``unix:path``, so the proxy (this Python) and
the fronted program (a copy of ``sleep`` under a path of its own, standing for
the program behind the proxy) have distinct identities although both run as the
test's user. The plain-TCP backend the proxy forwards to is an HTTP server in
this process.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from identity.x509svid import spiffe_id_from_certificate
from tests.e2e.conftest import Stack, free_port, running_stack
from tests.support.proxies import ProxyProcess, http_backend, proxies

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TD = "broker.sigil.test"
APP, PROXY, FRONTEND = (f"spiffe://{TD}/{n}" for n in ("app", "proxy", "frontend"))


@pytest.fixture(scope="module")
def broker_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sgb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def st(broker_dir: Path) -> Iterator[Stack]:
    config = f"""
[workload_attestors.unix]
discover_workload_path = true

[broker]
socket_path = "{broker_dir / 'b' / 'broker.sock'}"
authorized = ["{PROXY}"]
"""
    with running_stack(trust_domain=TD, agent_config=config) as stack:
        # The proxy runs as `python -m proxy`: this interpreter's binary.
        stack.create_entry(PROXY, f"unix:path:{os.path.realpath(sys.executable)}")
        stack.create_entry(APP, f"unix:path:{broker_dir / 'webapp'}")
        shutil.copy(shutil.which("sleep") or "/bin/sleep", broker_dir / "webapp")
        shutil.copy(shutil.which("sleep") or "/bin/sleep", broker_dir / "stranger")
        yield stack


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sgp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _mint(st: Stack, spiffe_id: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    st.server_cli("x509", "mint", "--spiffe-id", spiffe_id, "--ttl", "1h",
                  "--write", str(folder))
    return folder


def _call(port: int, certs: Path) -> tuple[str, bytes]:
    """(the server's SPIFFE ID, its answer to a GET), or ("", b"") when refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(certs / "bundle.pem"))
    ctx.load_cert_chain(str(certs / "svid.pem"), str(certs / "svid.key"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
                ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            peer = str(spiffe_id_from_certificate(x509.load_der_x509_certificate(der or b"")))
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            out = b""
            while data := tls.recv(65536):
                out += data
            return peer, out
    except (ssl.SSLError, ConnectionError):
        return "", b""


def _program(st_dir: Path, name: str, pidfile: Path | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(st_dir / name), "300"])
    if pidfile is not None:
        pidfile.write_text(f"{proc.pid}\n")
    return proc


def _wait(predicate: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_proxy_presents_the_fronted_programs_svid_and_follows_its_life(
    st: Stack, broker_dir: Path, workdir: Path
) -> None:
    pidfile = workdir / "webapp.pid"
    app = _program(broker_dir, "webapp", pidfile)
    client = _mint(st, FRONTEND, workdir / "client")
    port = free_port()
    try:
        with http_backend() as backend, proxies(workdir) as started:
            proxy = ProxyProcess("broker", workdir, [
                "--broker-socket", f"unix://{broker_dir / 'b' / 'broker.sock'}",
                "--broker-pidfile", str(pidfile),
                "--inbound", f"127.0.0.1:{port}=127.0.0.1:{backend}", "--allow", FRONTEND])
            started.append(proxy)
            proxy.wait_for_log(r"info listening ")
            assert f"svid updated spiffe_id={APP}" in proxy.log()
            peer, answer = _call(port, client)
            assert peer == APP  # the program's identity, not the proxy's
            assert b"hello from the backend" in answer
            # The program exits: the agent ends the stream (NOT_FOUND) and the
            # proxy stops presenting an SVID whose PID may be reused.
            app.kill()
            app.wait()
            proxy.wait_for_log(r"svid withdrawn")
            assert "code=NOT_FOUND" in proxy.log()
            assert _call(port, client) == ("", b"")
            # It comes back under a new PID: the pidfile is read again.
            app = _program(broker_dir, "webapp", pidfile)
            proxy.wait_for_log(rf"svid updated spiffe_id={APP}", count=2)
            peer, answer = _call(port, client)
            assert peer == APP and b"hello from the backend" in answer
    finally:
        app.kill()
        app.wait()


def test_a_program_without_an_entry_gets_nothing(
    st: Stack, broker_dir: Path, workdir: Path
) -> None:
    stranger = _program(broker_dir, "stranger")
    try:
        with http_backend() as backend, proxies(workdir) as started:
            proxy = ProxyProcess("stranger", workdir, [
                "--broker-socket", f"unix://{broker_dir / 'b' / 'broker.sock'}",
                "--broker-pid", str(stranger.pid),
                "--inbound", f"127.0.0.1:{free_port()}=127.0.0.1:{backend}",
                "--allow", FRONTEND])
            started.append(proxy)
            proxy.wait_for_log(r"broker api unavailable code=PERMISSION_DENIED")
            # Never the proxy's own identity (it has one, as an authorized broker).
            assert "svid updated" not in proxy.log()
            assert "info listening " not in proxy.log()
    finally:
        stranger.kill()
        stranger.wait()


def test_a_fixed_pid_whose_program_exits_stops_the_proxy(
    st: Stack, broker_dir: Path, workdir: Path
) -> None:
    app = _program(broker_dir, "webapp")
    client = _mint(st, FRONTEND, workdir / "client")
    port = free_port()
    proxy: ProxyProcess | None = None
    try:
        with http_backend() as backend:
            proxy = ProxyProcess("fixed", workdir, [
                "--broker-socket", f"unix://{broker_dir / 'b' / 'broker.sock'}",
                "--broker-pid", str(app.pid),
                "--inbound", f"127.0.0.1:{port}=127.0.0.1:{backend}", "--allow", FRONTEND])
            proxy.wait_for_log(r"info listening ")
            peer, _ = _call(port, client)
            assert peer == APP
            # The program exits: its PID can only name another program from now
            # on, so the proxy does not retry it; it exits non-zero, saying why.
            app.kill()
            app.wait()
            assert proxy.proc.wait(timeout=60) == 1, proxy.log()
            log = proxy.log()
            assert "broker api watcher stopped" in log and "NOT_FOUND" in log
            assert log.count(f"svid updated spiffe_id={APP}") == 1
    finally:
        app.kill()
        app.wait()
        if proxy is not None:
            proxy.stop()
