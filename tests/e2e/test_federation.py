"""Two trust domains, two complete stacks, one workload in each: federation end to end.

``a.test`` and ``b.test`` each run a real ``sigil-server`` and ``sigil-agent``
(tests/e2e/conftest.py, ``make_stack``). Each workload's entry federates with
the other trust domain. The workloads are py-spiffe clients of their own agent:

- mutual TLS across the domains fails while neither server holds the other's
  bundle, and succeeds once each holds the other's; each side checks the peer's
  exact SPIFFE ID by path validation against the peer trust domain's bundle;
- a JWT-SVID minted in one domain (audience: the other workload) is refused by
  the other domain's Workload API before, and accepted after;
- while ``a.test`` rotates its X.509 CA (prepare, then activate), the two
  workloads keep connecting in a loop: not one handshake may fail; then it
  rotates its JWT key, and b.test validates JWT-SVIDs signed by the new one.

The main test federates the servers with ``federation create`` on both sides
(``https_spiffe`` bundle endpoints, bootstrap bundle from ``bundle show --format
spiffe``), so b.test picks up a.test's rotated bundle through its refresher; a
smaller one federates by hand (``bundle show`` on one side, ``bundle set`` on the
other). The rotation helper takes a ``propagate`` step, so the same scenario runs
with a hand exchange too.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identity.bundle import Bundle, BundleSet
from identity.spiffeid import TrustDomain as SigilTrustDomain
from identity.x509svid import verify_chain
from tests.e2e.conftest import Stack, StackFactory, free_port
from tests.support.require import require_module

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import TrustDomain as SpiffeTrustDomain  # noqa: E402
from spiffe import WorkloadApiClient, X509Source  # noqa: E402
from spiffe.workloadapi.errors import ValidateJwtSvidError  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

A, B = "a.test", "b.test"
A_ID, B_ID = f"spiffe://{A}/web", f"spiffe://{B}/api"
SERVER_CONFIG = """\
x509_svid_ttl = "20s"
jwt_svid_ttl = "20s"
# The test forces each rotation step; the schedule must not race it.
ca_rotation_interval = "1h"
"""
# A busy machine is never the reason to fail: generous waits, checked outcomes.
TIMEOUT = 120.0
SOCKET_TIMEOUT = 20.0
MIN_HANDSHAKES_PER_PHASE = 5


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``check`` every 0.2 s; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def key_ids(certs: list[x509.Certificate], ext: type[Any]) -> set[str]:
    """Hex SKIs (``ext`` = SubjectKeyIdentifier) or AKIs of ``certs``."""
    out = set()
    for c in certs:
        value = c.extensions.get_extension_for_class(ext).value
        out.add((value.digest if ext is x509.SubjectKeyIdentifier
                 else value.key_identifier).hex())
    return out


class Workload:
    """A workload of one stack: its X509Source, and TLS contexts from what it holds."""

    def __init__(self, stack: Stack, spiffe_id: str) -> None:
        self.stack = stack
        self.spiffe_id = spiffe_id
        self.source = X509Source(
            workload_api_client=WorkloadApiClient(stack.endpoint),
            timeout_in_seconds=TIMEOUT,
            svid_picker=lambda svids: next(s for s in svids if str(s.spiffe_id) == spiffe_id),
        )

    def bundles(self) -> dict[str, list[x509.Certificate]]:
        """Trust domain name -> X.509 authorities, as this workload holds them now."""
        ctx = self.source.get_x509_context()
        return {b.trust_domain.name: list(b.x509_authorities)
                for b in ctx.x509_bundle_set.bundles}

    def svid_issuer(self) -> str:
        leaf = self.source.get_x509_context().default_svid.leaf
        (issuer,) = key_ids([leaf], x509.AuthorityKeyIdentifier)
        return issuer

    def tls(self, *, server_side: bool) -> tuple[ssl.SSLContext, BundleSet]:
        """A context trusting every bundle held (own + federated), and those bundles.

        ``ssl`` accepts a chain to any root; the SPIFFE rule (the chain ends in the
        bundle of the peer's own trust domain) is checked after the handshake.
        """
        ctx = self.source.get_x509_context()
        svid = ctx.default_svid
        held = self.bundles()
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        tls.check_hostname = False  # SPIFFE peers are named by their URI SAN
        tls.verify_mode = ssl.CERT_REQUIRED
        tls.load_verify_locations(cadata="".join(
            c.public_bytes(serialization.Encoding.PEM).decode()
            for certs in held.values() for c in certs))
        with tempfile.TemporaryDirectory(dir=self.stack.root) as tmp:  # ssl loads keys from files
            cert_path, key_path = Path(tmp) / "svid.pem", Path(tmp) / "svid.key"
            cert_path.write_bytes(b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain))
            key_path.write_bytes(svid.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            tls.load_cert_chain(cert_path, key_path)
        bundles = BundleSet(Bundle(SigilTrustDomain(td), tuple(certs))
                            for td, certs in held.items())
        return tls, bundles


def _peer_id(conn: ssl.SSLSocket, bundles: BundleSet) -> str:
    der = conn.getpeercert(binary_form=True)
    assert der is not None, "the peer sent no certificate"
    # Our SVIDs hang directly off the CA: the leaf is the whole chain to verify.
    return str(verify_chain([x509.load_der_x509_certificate(der)], bundles,
                            now=dt.datetime.now(dt.UTC)))


def mtls_once(server: Workload, client: Workload) -> str | None:
    """One mutual-TLS connection; None when both sides verified the expected peer ID,
    else what went wrong (either side)."""
    errors: list[str] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SOCKET_TIMEOUT)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            ctx, bundles = server.tls(server_side=True)
            raw, _ = listener.accept()
            raw.settimeout(SOCKET_TIMEOUT)
            with ctx.wrap_socket(raw, server_side=True) as conn:
                got = _peer_id(conn, bundles)
                if got != client.spiffe_id:
                    errors.append(f"server saw {got}, expected {client.spiffe_id}")
                conn.sendall(b"ok")
        except Exception as exc:  # reported, not raised: a thread
            errors.append(f"server: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        ctx, bundles = client.tls(server_side=False)
        with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as raw, \
                ctx.wrap_socket(raw) as conn:
            got = _peer_id(conn, bundles)
            if got != server.spiffe_id:
                errors.append(f"client saw {got}, expected {server.spiffe_id}")
            if conn.recv(2) != b"ok":
                errors.append("client: no answer")
    except Exception as exc:  # collected with the server's
        errors.append(f"client: {type(exc).__name__}: {exc}")
    thread.join(SOCKET_TIMEOUT + 5)
    listener.close()
    return "; ".join(errors) or None


class Loop:
    """Both directions of mutual TLS in a loop, counting outcomes by phase."""

    def __init__(self, a: Workload, b: Workload) -> None:
        self.a, self.b = a, b
        self.phase = "warm-up"
        self.handshakes: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Loop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2 * SOCKET_TIMEOUT + 10)

    def _run(self) -> None:
        flip = False
        while not self._stop.is_set():
            phase = self.phase
            pair = (self.a, self.b) if flip else (self.b, self.a)
            error = mtls_once(*pair)
            if error is None:
                self.handshakes[phase] += 1
            else:
                self.failures.append(f"[{phase}] {error}")
            flip = not flip
            time.sleep(0.05)

    def enter(self, phase: str) -> None:
        """Start counting under ``phase`` once the previous one saw enough handshakes."""
        previous = self.phase
        wait_until(lambda: self.handshakes[previous] >= MIN_HANDSHAKES_PER_PHASE
                   or bool(self.failures), timeout=TIMEOUT, what=f"handshakes in {previous}")
        assert not self.failures, self.failures
        self.phase = phase


def hand_exchange(src: Stack, dst: Stack) -> None:
    """``dst`` trusts ``src``: src's SPIFFE bundle (with JWT keys) set on dst by hand."""
    doc = src.server_cli("bundle", "show", "--format", "spiffe").stdout
    path = dst.root / f"{src.trust_domain}.bundle.json"
    path.write_text(doc)
    dst.server_cli("bundle", "set", "--id", f"spiffe://{src.trust_domain}",
                   "--format", "spiffe", "--path", str(path))


def jwt_across(minter: Workload, validator: Workload) -> tuple[str, str]:
    """A JWT-SVID minted by ``minter`` for ``validator``, validated by the
    validator's own Workload API: the SPIFFE ID it vouches for, and the token's kid."""
    with WorkloadApiClient(minter.stack.endpoint) as client:
        token = client.fetch_jwt_svid(audience={validator.spiffe_id}).token
    with WorkloadApiClient(validator.stack.endpoint) as client:
        validated = str(client.validate_jwt_svid(token, validator.spiffe_id).spiffe_id)
    return validated, str(pyjwt.get_unverified_header(token)["kid"])


def jwt_kids(workload: Workload, trust_domain: str) -> set[str]:
    """The JWT key ids ``workload`` holds for ``trust_domain`` (FetchJWTBundles)."""
    with WorkloadApiClient(workload.stack.endpoint) as client:
        bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(
            SpiffeTrustDomain(trust_domain))
    return set(bundle.jwt_authorities) if bundle is not None else set()


Propagate = Callable[[Stack, Stack], None]
"""After ``src`` changed its bundle: make ``dst`` hold the new one (by hand), or
nothing (the refresher will)."""


def assert_not_federated(wa: Workload, wb: Workload) -> None:
    """Each workload holds only its own bundle; neither mTLS nor JWT-SVIDs cross."""
    assert set(wa.bundles()) == {A} and set(wb.bundles()) == {B}
    for server, client in ((wa, wb), (wb, wa)):
        error = mtls_once(server, client)
        assert error is not None and "CERTIFICATE_VERIFY_FAILED" in error, error
    with pytest.raises(ValidateJwtSvidError,
                       match=f"no JWT bundle found for trust domain {A}"):
        jwt_across(wa, wb)


def assert_federated(wa: Workload, wb: Workload) -> None:
    """Both workloads hold both bundles; mTLS and JWT-SVIDs cross both ways."""
    wait_until(lambda: set(wa.bundles()) == {A, B} and set(wb.bundles()) == {A, B},
               timeout=TIMEOUT, what="the federated bundles at both workloads")
    assert mtls_once(wa, wb) is None
    assert mtls_once(wb, wa) is None
    assert jwt_across(wa, wb)[0] == A_ID
    assert jwt_across(wb, wa)[0] == B_ID


def rotate_a(sa: Stack, sb: Stack, wa: Workload, wb: Workload, propagate: Propagate) -> None:
    """a.test rotates its CA, then its JWT key, while the workloads keep connecting:
    not one handshake fails, and b.test validates JWT-SVIDs signed by the new key."""
    old_a = key_ids(wa.bundles()[A], x509.SubjectKeyIdentifier)
    with Loop(wa, wb) as loop:
        loop.enter("prepare")
        sa.server_cli("localauthority", "x509", "prepare")
        wait_until(lambda: len(wa.bundles()[A]) == 2, timeout=TIMEOUT,
                   what="a.test's new CA in its own workload's bundle")
        (new_a,) = key_ids(wa.bundles()[A], x509.SubjectKeyIdentifier) - old_a
        propagate(sa, sb)
        wait_until(lambda: new_a in key_ids(wb.bundles()[A], x509.SubjectKeyIdentifier),
                   timeout=TIMEOUT, what="a.test's new CA at b.test's workload")
        loop.enter("activate")
        sa.server_cli("localauthority", "x509", "activate")
        wait_until(lambda: wa.svid_issuer() == new_a, timeout=TIMEOUT,
                   what="a.test's workload SVID signed by the new CA")
        loop.enter("after")
        loop.enter("done")
    assert loop.failures == []
    assert all(loop.handshakes[p] >= MIN_HANDSHAKES_PER_PHASE
               for p in ("warm-up", "prepare", "activate", "after")), loop.handshakes

    new_kid = json.loads(sa.server_cli("localauthority", "jwt", "prepare",
                                       "--output", "json").stdout)["authority_id"]
    propagate(sa, sb)
    wait_until(lambda: new_kid in jwt_kids(wb, A), timeout=TIMEOUT,
               what="a.test's new JWT key at b.test's workload")
    sa.server_cli("localauthority", "jwt", "activate")
    # The agent hands out a cached JWT-SVID until its half-life (jwt_svid_ttl 20 s).
    wait_until(lambda: jwt_across(wa, wb) == (A_ID, new_kid), timeout=TIMEOUT,
               what="a JWT-SVID signed by a.test's new key, validated in b.test")


def hand_federation(sa: Stack, sb: Stack) -> None:
    """Each side sets the other's bundle by hand."""
    hand_exchange(sa, sb)
    hand_exchange(sb, sa)


def two_domains(make_stack: StackFactory, uid_selector: str, *, config_a: str = "",
                config_b: str = "") -> tuple[Stack, Stack, Workload, Workload]:
    """Both stacks, and a workload in each whose entry federates with the other side."""
    sa = make_stack(A, server_config=SERVER_CONFIG + config_a)
    sb = make_stack(B, server_config=SERVER_CONFIG + config_b)
    sa.create_entry(A_ID, uid_selector, extra=("--federates-with", f"spiffe://{B}"))
    sb.create_entry(B_ID, uid_selector, extra=("--federates-with", f"spiffe://{A}"))
    return sa, sb, Workload(sa, A_ID), Workload(sb, B_ID)


def test_federation_by_hand(make_stack: StackFactory, uid_selector: str) -> None:
    """No relationship, no endpoint: bundles exchanged with bundle show/set."""
    sa, sb, wa, wb = two_domains(make_stack, uid_selector)
    try:
        assert_not_federated(wa, wb)
        hand_federation(sa, sb)
        assert_federated(wa, wb)
    finally:
        wa.source.close()
        wb.source.close()


def endpoint_config(port: int) -> str:
    """Serve our bundle (https_spiffe) on ``port``, with a short refresh hint."""
    return f"""
[federation]
refresh_min_interval = "1s"
[federation.bundle_endpoint]
address = "127.0.0.1:{port}"
profile = "https_spiffe"
refresh_hint = "2s"
"""


def relate(local: Stack, remote: Stack, remote_port: int) -> None:
    """``local`` fetches ``remote``'s bundle from its endpoint; the first fetch is
    authenticated with the bundle ``remote`` shows (the bootstrap bundle)."""
    path = local.root / f"{remote.trust_domain}.bootstrap.json"
    path.write_text(remote.server_cli("bundle", "show", "--format", "spiffe").stdout)
    local.server_cli(
        "federation", "create", "--trust-domain", remote.trust_domain,
        "--bundle-endpoint-url", f"https://127.0.0.1:{remote_port}/",
        "--profile", "https_spiffe",
        "--endpoint-spiffe-id", f"spiffe://{remote.trust_domain}/sigil/server",
        "--bootstrap-bundle", str(path))


def test_federation_relationships_refresh_through_rotation(
    make_stack: StackFactory, uid_selector: str
) -> None:
    port_a, port_b = free_port(), free_port()
    sa, sb, wa, wb = two_domains(make_stack, uid_selector, config_a=endpoint_config(port_a),
                                 config_b=endpoint_config(port_b))
    try:
        assert_not_federated(wa, wb)
        relate(sa, sb, port_b)
        relate(sb, sa, port_a)
        assert_federated(wa, wb)
        # Nobody copies anything now: b.test's refresher fetches a.test's new bundle
        # (authenticated with the bundle it holds, so the rotation rolls forward).
        rotate_a(sa, sb, wa, wb, lambda src, dst: None)
    finally:
        wa.source.close()
        wb.source.close()
