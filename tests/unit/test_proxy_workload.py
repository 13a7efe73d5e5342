"""sigil-proxy's Workload API message handling and its memory of verified peer chains."""

from __future__ import annotations

import datetime as dt
import ssl
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from api.protos import workload_pb2 as pb
from identity.bundle import Bundle, BundleSet
from identity.clock import FakeClock
from identity.keys import generate_private_key
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate
from proxy.errors import ConfigError, WorkloadApiError
from proxy.server import Denied, Identity, Proxy, Settings, _handshake_denial
from proxy.tls import client_context, server_context
from proxy.workload import X509State, parse_response, socket_target

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class _CA:
    def __init__(self, td: str) -> None:
        self.td = TrustDomain(td)
        self.key = generate_private_key()
        self.cert = new_ca_certificate(trust_domain=self.td, public_key=self.key.public_key(),
                                       signer_key=self.key, not_before=NOW - dt.timedelta(days=1),
                                       not_after=NOW + dt.timedelta(days=1))

    def svid(self, path: str, hours: float = 1) -> X509Svid:
        key = generate_private_key()
        sid = SpiffeId.parse(f"spiffe://{self.td}{path}")
        cert = new_svid_certificate(spiffe_id=sid, public_key=key.public_key(),
                                    ca_cert=self.cert, ca_key=self.key, not_before=NOW,
                                    not_after=NOW + dt.timedelta(hours=hours))
        return X509Svid(sid, (cert,), key)

    def bundle(self) -> Bundle:
        return Bundle(self.td, (self.cert,))


def _message(ca: _CA, *svids: X509Svid, federated: dict[str, bytes] | None = None
             ) -> pb.X509SVIDResponse:
    return pb.X509SVIDResponse(
        svids=[pb.X509SVID(spiffe_id=str(s.spiffe_id), x509_svid=s.chain_der(),
                           x509_svid_key=s.key_der(), bundle=ca.bundle().x509_der())
               for s in svids],
        federated_bundles=federated or {})


def test_parse_response_picks_the_svid_and_keeps_federated_bundles() -> None:
    ca, partner = _CA("example.org"), _CA("partner.org")
    web, api = ca.svid("/web"), ca.svid("/api")
    message = _message(ca, web, api,
                       federated={"spiffe://partner.org": partner.bundle().x509_der()})
    first = parse_response(message, None)
    assert first.svid.spiffe_id == web.spiffe_id
    chosen = parse_response(message, api.spiffe_id)
    assert chosen.svid.spiffe_id == api.spiffe_id
    assert chosen.bundles.bundle_for(TrustDomain("partner.org")) == partner.bundle()
    assert chosen.bundles.bundle_for(TrustDomain("example.org")) == ca.bundle()


def test_parse_response_refusals() -> None:
    ca = _CA("example.org")
    with pytest.raises(WorkloadApiError, match=r"^no SVIDs in the response$"):
        parse_response(pb.X509SVIDResponse(), None)
    with pytest.raises(WorkloadApiError, match=r"^no SVID for spiffe://example.org/db among "
                       r"those offered \(spiffe://example.org/web\)$"):
        parse_response(_message(ca, ca.svid("/web")), SpiffeId.parse("spiffe://example.org/db"))
    bad = _message(ca, ca.svid("/web"))
    bad.svids[0].x509_svid_key = b"junk"
    with pytest.raises(WorkloadApiError, match="cannot parse DER encoded private key"):
        parse_response(bad, None)
    bad = _message(ca, ca.svid("/web"), federated={"spiffe://partner.org": b"junk"})
    with pytest.raises(WorkloadApiError, match=r"X\.509 bundle of partner\.org"):
        parse_response(bad, None)


@pytest.mark.parametrize(("value", "target"), [
    ("unix:///run/a/api.sock", "unix:/run/a/api.sock"),
    ("unix:/run/a/api.sock", "unix:/run/a/api.sock"),
    ("/run/a/api.sock", "unix:/run/a/api.sock"),
])
def test_socket_target(value: str, target: str) -> None:
    assert socket_target(value) == target


@pytest.mark.parametrize(("value", "message"), [
    ("tcp://127.0.0.1:1", "only Unix sockets are supported"),
    ("api.sock", "must be absolute"),
])
def test_socket_target_refusals(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        socket_target(value)


def _proxy(clock: FakeClock, ca: _CA, *others: _CA) -> tuple[Proxy, Identity]:
    proxy = Proxy(Settings(socket_target="unix:/none", spiffe_id=None, listeners=(),
                           clock=clock))
    svid = ca.svid("/proxy", hours=24)
    state = X509State(svid, BundleSet([ca.bundle(), *(o.bundle() for o in others)]))
    proxy.on_update(state)
    assert proxy._identity is not None
    return proxy, proxy._identity


def test_verified_chains_are_remembered_only_while_valid_and_for_the_same_bundles(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.server as server_module

    calls: list[object] = []
    real = server_module.verify_chain

    def counting(*args: Any, **kwargs: Any) -> SpiffeId:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(server_module, "verify_chain", counting)
    clock = FakeClock(NOW + dt.timedelta(minutes=1))
    ca = _CA("example.org")
    prox, identity = _proxy(clock, ca)
    peer = ca.svid("/web", hours=1)
    ders = [c.public_bytes(Encoding.DER) for c in peer.cert_chain]
    assert prox._verify(ders, identity) == peer.spiffe_id
    assert prox._verify(ders, identity) == peer.spiffe_id
    assert len(calls) == 1  # the second came from memory
    other = ca.svid("/api", hours=1)
    assert prox._verify([c.public_bytes(Encoding.DER) for c in other.cert_chain],
                        identity) == other.spiffe_id
    assert len(calls) == 2  # another chain is verified
    clock.advance(dt.timedelta(hours=2))  # the peer's SVID has expired
    with pytest.raises(Denied) as caught:
        prox._verify(ders, identity)
    assert caught.value.reason == "untrusted"
    assert "not valid at" in caught.value.detail


def test_a_bundle_change_forgets_what_was_verified() -> None:
    clock = FakeClock(NOW + dt.timedelta(minutes=1))
    ca, other = _CA("example.org"), _CA("example.org")
    proxy, identity = _proxy(clock, ca)
    peer = ca.svid("/web")
    ders = [c.public_bytes(Encoding.DER) for c in peer.cert_chain]
    assert proxy._verify(ders, identity) == peer.spiffe_id
    # A new state whose bundle no longer holds the peer's CA.
    proxy.on_update(X509State(other.svid("/proxy", hours=24), BundleSet([other.bundle()])))
    assert proxy._verified == {}
    new_identity = proxy._identity
    assert new_identity is not None and new_identity is not identity
    with pytest.raises(Denied) as caught:
        proxy._verify(ders, new_identity)
    assert caught.value.reason == "untrusted"


def test_contexts_build_from_an_svid() -> None:
    ca = _CA("example.org")
    svid = ca.svid("/web")
    server = server_context(svid, [ca.bundle()])
    client = client_context(svid, [ca.bundle()])
    assert server.verify_mode.name == client.verify_mode.name == "CERT_REQUIRED"
    assert not client.check_hostname
    assert len(server.get_ca_certs()) == 1


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, reason)
    error.reason = reason
    return error


@pytest.mark.parametrize(("exc", "reason"), [
    (TimeoutError(), "handshake_timeout"),
    (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "no_client_cert"),
    (_ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "peer_refused"),
    (_ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), "peer_refused"),
    (_ssl_error("WRONG_VERSION_NUMBER"), "handshake_failed"),
    (ConnectionAbortedError("peer closed the connection during the handshake"),
     "handshake_failed"),
])
def test_handshake_failures_map_to_deny_reasons(exc: BaseException, reason: str) -> None:
    assert _handshake_denial(exc).reason == reason


def test_a_burst_already_in_the_backlog_is_capped() -> None:
    """Connections waiting in the backlog are accepted without the loop running any
    connection's task in between: each counts against ``max_connections`` when it
    is accepted, so a burst of 5 against a cap of 2 serves 2 and closes 3."""
    import asyncio
    import socket

    from proxy.config import Address, Listener
    from proxy.policy import from_rules

    listener = Listener(name="inbound:test", mode="inbound", listen=Address("127.0.0.1", 0),
                        target=Address("127.0.0.1", 9), policy=from_rules(["example.org"]))
    proxy = Proxy(Settings(socket_target="unix:/none", spiffe_id=None, listeners=(listener,),
                           max_connections=2, handshake_timeout=30.0))

    def denied(reason: str) -> float:
        value: float = proxy.metrics.denied.labels(listener.name, reason)._value.get()
        return value

    async def burst() -> tuple[float, float]:
        sock = proxy._bind(listener)
        clients = [socket.create_connection(sock.getsockname()[:2]) for _ in range(5)]
        serving = asyncio.create_task(proxy._serve(listener, sock))
        try:
            # The proxy holds no SVID, so each connection it keeps is denied as
            # no_svid once its task runs; those it cannot keep, as connection_cap.
            for _ in range(100):
                await asyncio.sleep(0.02)
                if denied("no_svid") + denied("connection_cap") >= 5:
                    break
            return denied("no_svid"), denied("connection_cap")
        finally:
            serving.cancel()
            await asyncio.gather(serving, *proxy._tasks, return_exceptions=True)
            for c in clients:
                c.close()
            sock.close()

    assert asyncio.run(burst()) == (2.0, 3.0)
    assert proxy._active == 0  # every connection's count was given back
