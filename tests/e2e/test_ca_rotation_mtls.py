"""Two workloads keep doing mutual TLS while the CA is prepared, activated, tainted and revoked.

A real ``sigil-server`` and ``sigil-agent`` (tests/e2e/conftest.py) serve two
identities to this test's user. Two workloads, threads here, each follow the
agent with their own py-spiffe ``X509Source`` (a Workload API stream): a TLS
server (``.../mtls-server``) and a TLS client (``.../mtls-client``). On every
connection each side builds a fresh Python ``ssl`` context from its *current*
SVID and bundle (the trust store is exactly the bundle), and checks the peer's
SPIFFE ID. Meanwhile the test drives ``sigil-server localauthority x509``
through the operator's steps, waiting after each for what makes the next one
safe:

    prepare  -> both workloads' bundles hold the new CA
    activate -> both workloads hold SVIDs signed by the new CA (half-life of 20 s SVIDs)
    taint    -> no workload SVID is signed by the old CA
    revoke   -> (once nothing the old CA signed is still valid) the old CA leaves
                both workloads' bundles

Not one handshake may fail, and each phase must see handshakes.

Revoking without ``--force`` is refused while anything the old CA signed is
valid (the server's own TLS certificate and the agent's SVID included). That is
bounded by the CA's own end of life, so the server runs with a short ``ca_ttl``
(L): the test lasts about that long. The test prepares the new CA when the old
one is L/2 old, as the server's own schedule would: the old CA then has L/2
left for the steps up to taint, and the new one still has L/2 when the old one
is revoked, so neither side of the rotation runs against a CA's end of life
even on a slow machine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.conftest import Stack, running_stack
from tests.support.require import require_module

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import TrustDomain, WorkloadApiClient, X509Source  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRUST_DOMAIN = "e2e.sigil.test"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/mtls-server"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/mtls-client"
CA_TTL_SECONDS = 150
SERVER_CONFIG = f"""\
ca_ttl = "{CA_TTL_SECONDS}s"
x509_svid_ttl = "20s"
jwt_svid_ttl = "20s"
agent_svid_ttl = "60s"
# The test forces every step itself; the automatic ones (prepare at ca_ttl/2,
# activate at 5/6, drop after the margin) would race it, so the schedule never
# looks within the test.
ca_rotation_interval = "1h"
"""
# The machine may be busy with other suites: generous, and never the reason to fail.
PHASE_TIMEOUT = 120.0
MIN_HANDSHAKES_PER_PHASE = 10
# A pause between connections, so the loop does not take a whole core from the rest.
LOOP_PAUSE = 0.02
SOCKET_TIMEOUT = 20.0


def wait_until(check: Callable[[], bool], *, timeout: float, what: str,
               describe: Callable[[], object] = lambda: "") -> None:
    """Poll ``check`` every 0.2 s until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} {describe()}")


def subject_key_id(cert: x509.Certificate) -> str:
    """A CA certificate's SKI in hex: what ``localauthority`` calls its authority id."""
    return cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest.hex()


def issuer_key_id(cert: x509.Certificate) -> str:
    """The AKI of a leaf in hex: the authority id of the CA that signed it."""
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier.hex()


def uri_san(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    return str(uri)


class Workload:
    """One workload: its X509Source, and TLS contexts built from what it holds now."""

    def __init__(self, endpoint: str, spiffe_id: str, workdir: Path) -> None:
        self.spiffe_id = spiffe_id
        self._workdir = workdir
        self.source = X509Source(
            workload_api_client=WorkloadApiClient(endpoint),
            timeout_in_seconds=PHASE_TIMEOUT,
            svid_picker=lambda svids: next(s for s in svids if str(s.spiffe_id) == spiffe_id),
        )

    def material(self) -> tuple[Any, list[x509.Certificate]]:
        """The current SVID and our trust domain's X.509 authorities, one snapshot."""
        ctx = self.source.get_x509_context()
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(
            TrustDomain(TRUST_DOMAIN))
        assert bundle is not None, "no bundle for our trust domain"
        return ctx.default_svid, list(bundle.x509_authorities)

    def svid_issuer(self) -> str:
        svid, _ = self.material()
        return issuer_key_id(svid.leaf)

    def bundle_ids(self) -> set[str]:
        _, roots = self.material()
        return {subject_key_id(c) for c in roots}

    def tls_context(self, *, server_side: bool) -> tuple[ssl.SSLContext, str]:
        """A context from the current SVID and bundle; also who signed our SVID."""
        svid, roots = self.material()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side
                             else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # SPIFFE peers are named by their URI SAN, checked after the handshake.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata="".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in roots))
        # ssl loads keys only from files.
        with tempfile.TemporaryDirectory(dir=self._workdir) as tmp:
            cert_path, key_path = Path(tmp) / "svid.pem", Path(tmp) / "svid.key"
            cert_path.write_bytes(b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain))
            key_path.write_bytes(svid.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            ctx.load_cert_chain(cert_path, key_path)
        return ctx, issuer_key_id(svid.leaf)


def peer_id(tls: ssl.SSLSocket) -> tuple[str, str]:
    """The verified peer's SPIFFE ID and the authority id of the CA that signed it."""
    der = tls.getpeercert(binary_form=True)
    assert der is not None, "the peer sent no certificate"
    cert = x509.load_der_x509_certificate(der)
    return uri_san(cert), issuer_key_id(cert)


class MtlsLoop:
    """The two workloads connecting in a loop, counting handshakes by phase."""

    def __init__(self, server: Workload, client: Workload) -> None:
        self.server = server
        self.client = client
        self.phase = "warm-up"
        self._t0 = time.monotonic()
        self.timeline: dict[str, float] = {"warm-up": 0.0}
        self.handshakes: Counter[str] = Counter()
        # Per phase, which authorities signed the SVIDs both sides presented.
        self.signers: dict[str, set[str]] = {}
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.5)
        self._threads = [threading.Thread(target=self._serve, daemon=True),
                         threading.Thread(target=self._connect, daemon=True)]

    def __enter__(self) -> MtlsLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=SOCKET_TIMEOUT + 5)
        self._listener.close()

    def enter(self, phase: str) -> None:
        """Count the handshakes that start from now on under ``phase``."""
        self.phase = phase
        self.timeline[phase] = round(time.monotonic() - self._t0, 1)

    def count(self, phase: str) -> int:
        with self._lock:
            return self.handshakes[phase]

    def _fail(self, side: str, phase: str, exc: BaseException) -> None:
        with self._lock:
            self.failures.append(f"{side} in {phase}: {type(exc).__name__}: {exc}")

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            phase = self.phase
            try:
                with conn:
                    conn.settimeout(SOCKET_TIMEOUT)
                    ctx, _ = self.server.tls_context(server_side=True)
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        peer, _ = peer_id(tls)
                        assert peer == CLIENT_ID, f"client is {peer}"
                        assert tls.recv(4) == b"ping"
                        tls.sendall(b"pong")
            except (OSError, ssl.SSLError, AssertionError, ValueError) as exc:
                self._fail("server", phase, exc)

    def _connect(self) -> None:
        address = self._listener.getsockname()
        while not self._stop.is_set():
            phase = self.phase
            try:
                ctx, own_signer = self.client.tls_context(server_side=False)
                with socket.create_connection(address, timeout=SOCKET_TIMEOUT) as raw, \
                        ctx.wrap_socket(raw) as tls:
                    peer, peer_signer = peer_id(tls)
                    assert peer == SERVER_ID, f"server is {peer}"
                    tls.sendall(b"ping")
                    assert tls.recv(4) == b"pong"
                with self._lock:
                    self.handshakes[phase] += 1
                    self.signers.setdefault(phase, set()).update({own_signer, peer_signer})
            except (OSError, ssl.SSLError, AssertionError, ValueError) as exc:
                self._fail("client", phase, exc)
            time.sleep(LOOP_PAUSE)


def _authorities(st: Stack) -> list[dict[str, Any]]:
    doc = json.loads(st.server_cli("localauthority", "x509", "show", "--output", "json").stdout)
    return doc["authorities"]  # type: ignore[no-any-return]


def _step(st: Stack, *args: str) -> dict[str, Any]:
    return json.loads(  # type: ignore[no-any-return]
        st.server_cli("localauthority", "x509", *args, "--output", "json").stdout)


def _revocable_at(authority: dict[str, Any]) -> dt.datetime:
    """When nothing the authority signed is valid any more (the server's revoke rule)."""
    until = dt.datetime.fromisoformat(authority["not_after"])
    if authority["signed_until"]:
        until = min(until, dt.datetime.fromisoformat(authority["signed_until"]))
    return until


def _wait_for_both_svids(st: Stack) -> None:
    client = WorkloadApiClient(st.endpoint)
    try:
        def both() -> bool:
            with contextlib.suppress(Exception):  # PermissionDenied until entries sync
                ctx = client.fetch_x509_context(timeout=10)
                return {str(s.spiffe_id) for s in ctx.x509_svids} >= {SERVER_ID, CLIENT_ID}
            return False
        wait_until(both, timeout=PHASE_TIMEOUT, what="both workloads' first SVIDs")
    finally:
        client.close()


def test_mutual_tls_never_fails_through_a_ca_rotation(uid_selector: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sgm-", dir="/tmp"))
    try:
        with running_stack(server_config=SERVER_CONFIG) as st:
            _run_rotation(st, uid_selector, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_rotation(st: Stack, uid_selector: str, workdir: Path) -> None:
    for spiffe_id in (SERVER_ID, CLIENT_ID):
        st.create_entry(spiffe_id, uid_selector, extra=("--x509-svid-ttl", "20"))
    (first,) = _authorities(st)
    assert first["status"] == "active"
    old = first["authority_id"]
    _wait_for_both_svids(st)

    server = Workload(st.endpoint, SERVER_ID, workdir)
    client = Workload(st.endpoint, CLIENT_ID, workdir)
    workloads = (server, client)
    try:
        with MtlsLoop(server, client) as loop:

            def state() -> str:
                try:
                    held = (f"bundles {[sorted(w.bundle_ids()) for w in workloads]}, "
                            f"SVIDs signed by {[w.svid_issuer() for w in workloads]}")
                except Exception as exc:  # a closed source says why
                    held = f"workload sources: {exc}"
                return (f"(handshakes {dict(loop.handshakes)}, phases began at "
                        f"{loop.timeline} s, failures {loop.failures[:3]}, "
                        f"{held}, authorities {_authorities(st)})")

            def settle(phase: str, condition: Callable[[], bool], *, what: str,
                       timeout: float = PHASE_TIMEOUT) -> None:
                """Wait for ``condition`` and enough handshakes in ``phase``; none may fail."""
                wait_until(lambda: bool(loop.failures) or (
                    loop.count(phase) >= MIN_HANDSHAKES_PER_PHASE and condition()),
                    timeout=timeout, what=what, describe=state)
                assert loop.failures == [], f"handshakes failed in phase {phase} {state()}"

            prepare_at = (dt.datetime.fromisoformat(first["not_after"])
                          - dt.timedelta(seconds=CA_TTL_SECONDS / 2))
            settle("warm-up", lambda: dt.datetime.now(dt.UTC) >= prepare_at,
                   timeout=CA_TTL_SECONDS, what="half the first CA's life")
            assert {w.svid_issuer() for w in workloads} == {old}

            loop.enter("prepared")
            new = _step(st, "prepare")["authority_id"]
            assert new != old
            settle("prepared", lambda: all(w.bundle_ids() == {old, new} for w in workloads),
                   what="the new CA in both bundles")

            loop.enter("activated")
            assert _step(st, "activate")["authority_id"] == new
            settle("activated", lambda: all(w.svid_issuer() == new for w in workloads),
                   what="SVIDs signed by the new CA")

            loop.enter("tainted")
            assert _step(st, "taint", old)["status"] == "tainted"
            settle("tainted", lambda: all(w.svid_issuer() != old for w in workloads),
                   what="no SVID signed by the tainted CA")
            # Revoking is legitimate (no --force) once everything the old CA signed
            # has expired: its last SVIDs, the agent's and the server's own TLS
            # certificate, at the latest its own end of life.
            (tainted,) = [a for a in _authorities(st) if a["authority_id"] == old]
            assert tainted["status"] == "tainted"
            revocable = _revocable_at(tainted) + dt.timedelta(seconds=1)
            settle("tainted", lambda: dt.datetime.now(dt.UTC) >= revocable,
                   timeout=CA_TTL_SECONDS + PHASE_TIMEOUT,
                   what=f"the old CA to be revocable at {revocable}")

            loop.enter("revoked")
            revoked = st.server_cli("localauthority", "x509", "revoke", old, check=False)
            assert revoked.returncode == 0, revoked.stderr
            assert [a["authority_id"] for a in _authorities(st)] == [new]
            settle("revoked", lambda: all(w.bundle_ids() == {new} for w in workloads),
                   what="the old CA gone from both bundles")

            # And connections keep working with the bundle that lost the old CA.
            loop.enter("after")
            settle("after", lambda: True, what="handshakes after the revocation")
        final = [(w.svid_issuer(), w.bundle_ids()) for w in workloads]
    finally:
        for w in workloads:
            w.source.close()

    # Shown with -s (or on a failure): how long each step took on this machine.
    print(f"phases began at {loop.timeline} s; handshakes {dict(loop.handshakes)}")
    assert loop.failures == [], loop.failures[:10]
    phases = ("warm-up", "prepared", "activated", "tainted", "revoked", "after")
    for phase in phases:
        assert loop.handshakes[phase] >= MIN_HANDSHAKES_PER_PHASE, (phase, loop.handshakes)
    # Who signed what both sides presented, phase by phase.
    assert loop.signers["warm-up"] == {old}
    assert loop.signers["prepared"] == {old}
    assert loop.signers["after"] == {new}

    # The final SVIDs chain to the new CA, and the old CA is nowhere.
    pem = st.server_cli("bundle", "show", "--format", "pem").stdout
    (root,) = x509.load_pem_x509_certificates(pem.encode())
    assert subject_key_id(root) == new
    assert final == [(new, {new})] * 2
    client_fetch = WorkloadApiClient(st.endpoint)
    try:
        ctx = client_fetch.fetch_x509_context(timeout=10)
    finally:
        client_fetch.close()
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert bundle is not None
    assert [subject_key_id(c) for c in bundle.x509_authorities] == [new]
    assert {str(s.spiffe_id) for s in ctx.x509_svids} == {SERVER_ID, CLIENT_ID}
    for svid in ctx.x509_svids:
        assert issuer_key_id(svid.leaf) == new
        svid.leaf.verify_directly_issued_by(root)
