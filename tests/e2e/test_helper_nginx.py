"""Helper mode feeding a real nginx (Debian's package) doing mutual TLS, across rotations.

The stack's agent serves two identities to this test's user: ``.../web`` (the
default, which ``sigil-agent helper`` writes for nginx) and ``.../web-client``
(which the Python client picks from py-spiffe). nginx requires a client
certificate verified by ``bundle.pem`` (``ssl_verify_client on``); the helper
reloads it with SIGHUP through its PID file on every update. The client checks
nginx's SPIFFE ID on every request, and keeps requesting until nginx has served
at least two rotated SVIDs: not one request may fail.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.e2e.conftest import Stack, _tool, free_port, wait_for
from tests.support.require import require, require_module

spiffe = require_module("spiffe", "py-spiffe")

pytestmark = pytest.mark.slow

NGINX = "/usr/sbin/nginx"
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {root}/access.log;
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
        ssl_verify_depth 3;
        location / {{ return 200 "hello $ssl_client_s_dn_legacy\\n"; }}
    }}
}}
"""


def nginx_or_skip() -> str:
    require(Path(NGINX).exists(),
            f"nginx is not installed at {NGINX}; `python3 dev.py test` as root installs it")
    return NGINX


def uri_san(cert_der: bytes) -> str:
    cert = x509.load_der_x509_certificate(cert_der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def test_nginx_mtls_with_helper_files_across_rotations(stack: Stack, uid_selector: str) -> None:
    nginx = nginx_or_skip()
    from spiffe import WorkloadApiClient, X509Source

    td = stack.trust_domain
    web, client_id = f"spiffe://{td}/web", f"spiffe://{td}/web-client"
    # 10 s SVIDs rotate every 4-6 s: two rotations in well under half a minute.
    stack.create_entry(web, uid_selector, extra=("--x509-svid-ttl", "10"))
    stack.create_entry(client_id, uid_selector)
    root = Path(tempfile.mkdtemp(prefix="sgn-", dir="/tmp"))
    certs = root / "certs"
    (root / "tmp").mkdir()
    port = free_port()
    (root / "nginx.conf").write_text(
        NGINX_CONF.format(root=root, port=port, certs=certs))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    source = None
    try:
        wait_for(lambda: stack.agent_cli("api", "fetch", "x509", "--write", str(certs),
                                         check=False).returncode == 0,
                 timeout=30, what="the first SVID")
        procs["nginx"] = subprocess.Popen(
            [nginx, "-p", str(root), "-c", str(root / "nginx.conf")],
            stdout=subprocess.DEVNULL, stderr=open(root / "nginx.out", "wb"),
        )
        wait_for(lambda: (root / "nginx.pid").exists(), timeout=10, what="nginx to start")
        procs["helper"] = subprocess.Popen(
            [_tool("sigil-agent"), "helper", "--socket-path", str(stack.agent_socket),
             "--dir", str(certs), "--signal", "HUP", "--pid-file", str(root / "nginx.pid")],
            stdout=subprocess.DEVNULL, stderr=open(root / "helper.log", "wb"),
        )
        source = X509Source(
            workload_api_client=WorkloadApiClient(stack.endpoint),
            svid_picker=lambda svids: next(s for s in svids if str(s.spiffe_id) == client_id),
        )
        served: list[int] = []
        failures: list[str] = []
        requests = 0
        deadline = time.monotonic() + 60
        while len(set(served)) < 3 and time.monotonic() < deadline:
            try:
                serial = one_request(source, port, certs / "bundle.pem", root, web)
                served.append(serial)
            except (OSError, ssl.SSLError, AssertionError, http.client.HTTPException) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            requests += 1
            time.sleep(0.05)
        helper_log = (root / "helper.log").read_text(errors="replace")
        assert failures == [], (failures[:5], helper_log,
                                (root / "error.log").read_text(errors="replace")[-2000:])
        assert len(set(served)) >= 3, (requests, helper_log)
        assert "helper notify failed" not in helper_log, helper_log
    finally:
        if source is not None:
            source.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def one_request(source: object, port: int, bundle: Path, root: Path, expected: str) -> int:
    """One HTTPS request with the client SVID; returns the serial nginx presented."""
    svid = source.get_x509_context().default_svid  # type: ignore[attr-defined]
    from cryptography.hazmat.primitives import serialization

    cert_file, key_file = root / "client.pem", root / "client.key"
    cert_file.write_bytes(b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain))
    key_file.write_bytes(svid.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_file.chmod(0o600)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # SPIFFE: verify the chain against the bundle and the SPIFFE ID, not a host name.
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert uri_san(der) == expected
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.sock = tls
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        resp.read()
        return x509.load_der_x509_certificate(der).serial_number
