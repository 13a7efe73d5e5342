"""One workload of the demo: gets its SVIDs from the agent and talks mutual TLS.

It uses py-spiffe (the PyPI package ``spiffe``), a SPIFFE client nobody on this
project wrote, to show that an ordinary SPIFFE workload works against Sigil
unchanged. The TLS itself is Python's ``ssl`` module (OpenSSL), configured with
the SVID as certificate and the trust bundle as the only CA; after the handshake
each side checks the peer's SPIFFE ID, which is what authorises it.

Usage (the demo starts these; you can too, with SPIFFE_ENDPOINT_SOCKET set):
    python deploy/demo_workload.py serve  --port P --hint backend  --peer-id ID
    python deploy/demo_workload.py call   --port P --hint frontend --peer-id ID
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from spiffe import WorkloadApiClient
from spiffe.workloadapi.errors import FetchX509SvidError


def say(role: str, text: str) -> None:
    print(f"   [{role}] {text}", flush=True)


def tls_context(svid, bundle_pem: bytes, server_side: bool) -> ssl.SSLContext:  # type: ignore[no-untyped-def]
    """An SSL context presenting ``svid`` and trusting only the bundle's CAs."""
    from cryptography.hazmat.primitives import serialization

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # SPIFFE authenticates by SPIFFE ID, not host name: we check the URI SAN below.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    workdir = Path(tempfile.mkdtemp(prefix="sigil-demo-svid-"))  # 0700
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (workdir / "svid.pem").write_bytes(chain)
    keyfile = workdir / "svid.key"
    keyfile.touch(mode=0o600)
    keyfile.write_bytes(key)
    ctx.load_cert_chain(str(workdir / "svid.pem"), str(keyfile))
    keyfile.unlink()
    (workdir / "svid.pem").unlink()
    workdir.rmdir()
    return ctx


def peer_spiffe_id(conn: ssl.SSLSocket) -> str:
    der = conn.getpeercert(binary_form=True)
    if der is None:
        raise SystemExit("peer sent no certificate")
    cert = x509.load_der_x509_certificate(der)
    uris = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SystemExit(f"peer certificate has {len(uris)} URI SANs; an X.509-SVID has one")
    return uris[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["serve", "call"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--hint", required=True, help="which of our identities to use")
    ap.add_argument("--peer-id", required=True, help="the SPIFFE ID we expect on the other end")
    args = ap.parse_args()
    role = args.hint

    client = WorkloadApiClient()  # SPIFFE_ENDPOINT_SOCKET
    # An entry registered a moment ago reaches the agent at its next sync, so wait
    # (bounded) until our identity is among those the agent hands us.
    deadline = time.monotonic() + 30
    while True:
        try:
            ctx = client.fetch_x509_context(timeout=10)
            mine = [s for s in ctx.x509_svids if str(s.spiffe_id).endswith("/" + role)]
        except FetchX509SvidError:  # no identity yet: PermissionDenied until the entry syncs
            mine = []
        if mine:
            svid = mine[0]
            break
        if time.monotonic() > deadline:
            say(role, "no SVID for this workload after 30 s; is it registered?")
            return 1
        time.sleep(0.2)
    td_bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    from cryptography.hazmat.primitives import serialization

    bundle_pem = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in td_bundle.x509_authorities
    )
    expires = svid.leaf.not_valid_after_utc
    say(role, f"got X.509-SVID {svid.spiffe_id} (expires {expires:%H:%M:%S} UTC, "
        f"pid {os.getpid()}, uid {os.getuid()})")

    if args.mode == "serve":
        tls = tls_context(svid, bundle_pem, server_side=True)
        with socket.create_server(("127.0.0.1", args.port)) as lsock:
            say(role, f"listening for mutual TLS on 127.0.0.1:{args.port}")
            print("READY", flush=True)
            raw, _ = lsock.accept()
            with tls.wrap_socket(raw, server_side=True) as conn:
                peer = peer_spiffe_id(conn)
                if peer != args.peer_id:
                    say(role, f"REFUSED peer {peer}: expected {args.peer_id}")
                    return 1
                say(role, f"TLS handshake done; peer proved SPIFFE ID {peer}")
                request = json.loads(conn.recv(65536).decode())
                token = request["jwt"]
                claims = client.validate_jwt_svid(token, audience=str(svid.spiffe_id))
                say(role, f"JWT-SVID in the request validated by the agent: sub={claims.spiffe_id}")
                reply = {"answer": f"hello {peer}, this is {svid.spiffe_id}"}
                conn.sendall(json.dumps(reply).encode())
        return 0

    tls = tls_context(svid, bundle_pem, server_side=False)
    jwt = client.fetch_jwt_svid(audience={args.peer_id}, subject=svid.spiffe_id)
    say(role, f"got JWT-SVID for audience {args.peer_id} (sub={jwt.spiffe_id})")
    with socket.create_connection(("127.0.0.1", args.port), timeout=10) as raw:
        with tls.wrap_socket(raw) as conn:
            peer = peer_spiffe_id(conn)
            if peer != args.peer_id:
                say(role, f"REFUSED server {peer}: expected {args.peer_id}")
                return 1
            say(role, f"TLS handshake done; server proved SPIFFE ID {peer}")
            conn.sendall(json.dumps({"jwt": jwt.token}).encode())
            reply = json.loads(conn.recv(65536).decode())
            say(role, f"reply over mutual TLS: {reply['answer']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
