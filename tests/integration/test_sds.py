"""Envoy SDS v3 on the Workload API socket: names, contents, ACK/NACK, pushes, limits.

A real front and internal grpc server (tests/integration/workload_api_harness.py)
over an in-memory cache with real certificates; the client is our own Envoy-like
SDS client on the ``xds-protos`` messages (tests/support/sds_client.py), which
sends no ``workload.spiffe.io`` header, as Envoy does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from agent.config import SdsSettings
from identity.spiffeid import TrustDomain
from tests.integration.workload_api_harness import TD, Harness, TestCA, entry
from tests.support import sds_client as sds
from tests.support.require import require_root
from tests.support.sds_client import SdsStream, secrets_of

UID = f"unix:uid:{os.getuid()}"
WEB = "spiffe://example.org/web"
API = "spiffe://example.org/api"
PARTNER = TrustDomain("partner.org")
OTHER = TrustDomain("other.org")
# The promised bound from a change in the agent's cache to the stream's client.
PROMPT = 1.0
# Long enough for a message already on its way to arrive on a loaded machine; a
# slow machine only makes the "nothing arrives" checks weaker, never fail.
QUIET = 1.0


def pem(certs: list) -> list[bytes]:  # type: ignore[type-arg]
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(sds=SdsSettings())
    try:
        yield h
    finally:
        h.close()


def _federated_state(h: Harness) -> tuple[TestCA, TestCA, dict]:  # type: ignore[type-arg]
    """WEB (federates with partner.org) and API; bundles for partner.org and other.org."""
    partner, other = TestCA(PARTNER), TestCA(OTHER)
    web = dataclasses.replace(entry("e-web", WEB, UID), federates_with=(PARTNER,))
    api = entry("e-api", API, UID)
    svids = h.set_state([web, api])
    h.call(lambda: h.cache.set_bundles({TD: h.ca.bundle(), PARTNER: partner.bundle(),
                                         OTHER: other.bundle()}))
    return partner, other, svids


def test_empty_names_ask_for_everything_the_caller_may_have(harness: Harness) -> None:
    partner, _other, svids = _federated_state(harness)
    with SdsStream(harness.socket_path) as stream:
        stream.send([])
        response = stream.recv()
    assert response.version_info and response.nonce
    got = secrets_of(response)
    # Its SVIDs by SPIFFE ID, its own and federated bundles by trust domain ID;
    # other.org, which none of its entries federates with, is not there.
    assert set(got) == {WEB, API, "spiffe://example.org", "spiffe://partner.org"}
    for name, entry_id in ((WEB, "e-web"), (API, "e-api")):
        leaf = sds.check_key_matches(got[name])
        assert sds.uri_san(leaf) == name
        assert pem(sds.certificate_chain(got[name])) == pem(list(svids[entry_id].cert_chain))
    assert pem(sds.trusted_ca(got["spiffe://example.org"])) == pem([harness.ca.cert])
    assert pem(sds.trusted_ca(got["spiffe://partner.org"])) == pem([partner.cert])


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        (WEB, "svid:web"),
        (API, "svid:api"),
        ("default", "svid:api"),  # the first in the stable order (by SPIFFE ID)
        ("ROOTCA", "ca:own"),
        ("spiffe://example.org", "ca:own"),
        ("spiffe://partner.org", "ca:partner"),
        ("ALL", "all"),
    ],
)
def test_each_resource_name(harness: Harness, name: str, kind: str) -> None:
    partner, _other, svids = _federated_state(harness)
    with SdsStream(harness.socket_path) as stream:
        stream.send([name])
        got = secrets_of(stream.recv())
    assert list(got) == [name]
    secret = got[name]
    if kind.startswith("svid:"):
        entry_id = "e-" + kind.split(":")[1]
        leaf = sds.check_key_matches(secret)
        assert sds.uri_san(leaf) == str(svids[entry_id].spiffe_id)
        assert pem(sds.certificate_chain(secret)) == pem(list(svids[entry_id].cert_chain))
    elif kind == "ca:own":
        assert pem(sds.trusted_ca(secret)) == pem([harness.ca.cert])
    elif kind == "ca:partner":
        assert pem(sds.trusted_ca(secret)) == pem([partner.cert])
    else:
        # Per trust domain, each with its own roots; other.org is not the caller's.
        roots = sds.spiffe_validator(secret)
        assert {td: pem(certs) for td, certs in roots.items()} == {
            "example.org": pem([harness.ca.cert]), "partner.org": pem([partner.cert])}


def test_federated_bundle_only_for_an_entry_that_federates(harness: Harness) -> None:
    _federated_state(harness)
    with SdsStream(harness.socket_path) as stream:
        stream.send(["spiffe://other.org", "spiffe://partner.org", WEB])
        got = secrets_of(stream.recv())
    # Unknown or not entitled names are left out; the others are answered.
    assert set(got) == {"spiffe://partner.org", WEB}


def test_unknown_names_answer_the_known_ones_and_are_logged(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.set_state([entry("e-web", WEB, UID)])
    with caplog.at_level(logging.WARNING, logger="sigil.agent"), \
            SdsStream(harness.socket_path) as stream:
        stream.send(["spiffe://example.org/nobody", "no-such-name", WEB])
        got = secrets_of(stream.recv())
    assert list(got) == [WEB]
    logged = [str(getattr(r, "fields", {}).get("names")) for r in caplog.records
              if r.getMessage() == "sds resources not available to the caller"]
    assert logged == ["spiffe://example.org/nobody,no-such-name"]


def test_all_can_be_disabled_by_config_and_by_the_node(harness: Harness) -> None:
    harness.set_state([entry("e-web", WEB, UID)])
    off = Harness(sds=SdsSettings(disable_spiffe_cert_validation=True))
    try:
        off.set_state([entry("e-web", WEB, UID)])
        with SdsStream(off.socket_path) as stream:
            stream.send(["ALL", "ROOTCA"])
            assert list(secrets_of(stream.recv())) == ["ROOTCA"]
    finally:
        off.close()
    node = base_pb2.Node(id="envoy", metadata=struct_pb2.Struct(
        fields={"disable_spiffe_cert_validation": struct_pb2.Value(bool_value=True)}))
    with SdsStream(harness.socket_path) as stream:
        stream.send(["ALL", "ROOTCA"], node=node)
        assert list(secrets_of(stream.recv())) == ["ROOTCA"]


def test_configured_names(harness: Harness) -> None:
    named = Harness(sds=SdsSettings(default_svid_name="mine", default_bundle_name="ours",
                                    default_all_bundles_name="everything"))
    try:
        named.set_state([entry("e-web", WEB, UID)])
        with SdsStream(named.socket_path) as stream:
            stream.send(["mine", "ours", "everything", "default", "ROOTCA", "ALL"])
            got = secrets_of(stream.recv())
        assert list(got) == ["mine", "ours", "everything"]
        assert sds.uri_san(sds.check_key_matches(got["mine"])) == WEB
    finally:
        named.close()


def test_ack_sends_nothing_nack_is_logged_and_not_resent(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.set_state([entry("e-web", WEB, UID)])
    with caplog.at_level(logging.WARNING, logger="sigil.agent"), \
            SdsStream(harness.socket_path) as stream:
        stream.send([WEB])
        first = stream.recv()
        stream.ack(first, [WEB])
        assert stream.quiet(QUIET), "an ACK was answered"
        # A NACK of the same response: logged, nothing resent.
        stream.send([WEB], version="", nonce=first.nonce, error="bad certificate")
        assert stream.quiet(QUIET), "a NACK was answered with a resend"
        # A stale nonce (not the last response's) changes nothing either.
        stream.send([WEB, "ROOTCA"], nonce="stale")
        assert stream.quiet(QUIET), "a request with a stale nonce was answered"
        # New names, with the right nonce: answered at once, with a new version.
        stream.send([WEB, "ROOTCA"], version=first.version_info, nonce=first.nonce)
        second = stream.recv()
    assert set(secrets_of(second)) == {WEB, "ROOTCA"}
    assert second.version_info != first.version_info and second.nonce != first.nonce
    nacks = [str(getattr(r, "fields", {}).get("reason")) for r in caplog.records
             if r.getMessage() == "sds secrets rejected by the client"]
    assert nacks == ["bad certificate"]


def test_svid_rotation_and_bundle_change_are_pushed_promptly(harness: Harness) -> None:
    harness.set_state([entry("e-web", WEB, UID), entry("e-api", API, UID)])
    with SdsStream(harness.socket_path) as stream:
        stream.send([WEB, "ROOTCA"])
        first = stream.recv()
        stream.ack(first, [WEB, "ROOTCA"])
        # A rotation of an SVID the stream did not ask for sends nothing.
        harness.call(lambda: harness.cache.set_x509_svid("e-api", harness.ca.svid(API)))
        assert stream.quiet(QUIET), "a change of an unrequested SVID was pushed"

        new = harness.ca.svid(WEB)
        started = time.monotonic()
        harness.call(lambda: harness.cache.set_x509_svid("e-web", new))
        pushed = stream.recv()
        elapsed = time.monotonic() - started
        assert elapsed < PROMPT, f"SVID rotation pushed after {elapsed:.2f}s"
        got = secrets_of(pushed)
        assert pem(sds.certificate_chain(got[WEB])) == pem(list(new.cert_chain))
        assert pushed.version_info != first.version_info
        stream.ack(pushed, [WEB, "ROOTCA"])

        # A CA prepared: the bundle gains a second root.
        nxt = TestCA()
        bundle = dataclasses.replace(
            harness.ca.bundle(), x509_authorities=(harness.ca.cert, nxt.cert))
        started = time.monotonic()
        harness.call(lambda: harness.cache.set_bundles({TD: bundle}))
        pushed = stream.recv()
        elapsed = time.monotonic() - started
        assert elapsed < PROMPT, f"bundle change pushed after {elapsed:.2f}s"
        assert pem(sds.trusted_ca(secrets_of(pushed)["ROOTCA"])) == pem(
            [harness.ca.cert, nxt.cert])


def test_fetch_secrets(harness: Harness) -> None:
    svids = harness.set_state([entry("e-web", WEB, UID)])
    response = sds.fetch(harness.socket_path, ["default", "ROOTCA"])
    got = secrets_of(response)
    assert list(got) == ["default", "ROOTCA"]
    assert pem(sds.certificate_chain(got["default"])) == pem(list(svids["e-web"].cert_chain))
    assert response.version_info


def test_a_caller_of_another_uid_gets_nothing(harness: Harness) -> None:
    # Entries for another uid only: this process is not entitled to them.
    harness.set_state([entry("e-web", WEB, f"unix:uid:{os.getuid() + 1}")])
    with SdsStream(harness.socket_path) as stream:
        stream.send([])
        assert stream.status() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        sds.fetch(harness.socket_path, [WEB])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"type_url": "type.googleapis.com/envoy.config.cluster.v3.Cluster"}, [WEB]),
        ({}, [f"n{i}" for i in range(1025)]),
        ({}, ["spiffe://example.org/" + "a" * 3000]),
        ({}, [f"spiffe://example.org/{i:02d}" + "a" * 2000 for i in range(40)]),
    ],
    ids=["type-url", "too-many-names", "name-too-long", "names-too-long-in-all"],
)
def test_bad_requests_are_invalid_argument(
        harness: Harness, kwargs: dict, names: list[str]) -> None:  # type: ignore[type-arg]
    harness.set_state([entry("e-web", WEB, UID)])
    with SdsStream(harness.socket_path) as stream:
        stream.send(names, **kwargs)
        assert stream.status() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        sds.fetch(harness.socket_path, names, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_delta_secrets_is_unimplemented(harness: Harness) -> None:
    harness.set_state([entry("e-web", WEB, UID)])
    with sds.channel(harness.socket_path) as ch:
        call = ch.stream_stream(f"{sds.SERVICE}/DeltaSecrets")
        with pytest.raises(grpc.RpcError) as err:
            list(call(iter([b""]), timeout=20))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_client_that_never_acks_gets_the_latest_state(harness: Harness) -> None:
    """Nothing waits for an ACK and nothing is queued per response: a stream sends
    the state it holds when it can write, so a client that never acknowledges
    (or reads slowly) gets the latest state, not a backlog of every change."""
    harness.set_state([entry("e-web", WEB, UID)])
    with SdsStream(harness.socket_path) as stream:
        stream.send([WEB])
        stream.recv()
        svids = [harness.ca.svid(WEB) for _ in range(30)]
        for svid in svids:
            harness.call(lambda s=svid: harness.cache.set_x509_svid("e-web", s))
        received = 0
        deadline = time.monotonic() + 20
        while True:
            got = secrets_of(stream.recv(timeout=max(0.1, deadline - time.monotonic())))
            received += 1
            if pem(sds.certificate_chain(got[WEB])) == pem(list(svids[-1].cert_chain)):
                break
    assert received <= len(svids)


def test_streams_are_cleaned_up_when_callers_go_away(harness: Harness) -> None:
    harness.set_state([entry("e-web", WEB, UID)])
    streams = [SdsStream(harness.socket_path) for _ in range(5)]
    for s in streams:
        s.send([WEB])
        s.recv()
    sds_servicer = harness.server.sds
    assert sds_servicer is not None
    assert harness.call(lambda: sds_servicer.stream_count) == 5
    assert harness.call(lambda: "e-web" in harness.cache.in_use())
    for s in streams:
        s.close()
    deadline = time.monotonic() + 20
    while harness.call(lambda: sds_servicer.stream_count) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert harness.call(lambda: sds_servicer.stream_count) == 0
    assert harness.call(lambda: harness.cache.in_use()) == frozenset()


@pytest.mark.slow
def test_a_thousand_streams_from_one_process(harness: Harness) -> None:
    harness.set_state([entry("e-web", WEB, UID)])
    with sds.channel(harness.socket_path) as ch:
        streams = [SdsStream(on=ch) for _ in range(1000)]
        try:
            for s in streams:
                s.send([WEB])
            for s in streams:
                assert list(secrets_of(s.recv(timeout=120))) == [WEB]
        finally:
            for s in streams:
                s.close()
    # The agent is still up and serves a new caller.
    assert list(secrets_of(sds.fetch(harness.socket_path, [WEB]))) == [WEB]


def test_streams_over_the_cap_are_resource_exhausted() -> None:
    h = Harness(sds=SdsSettings())
    try:
        h.set_state([entry("e-web", WEB, UID)])
        servicer = h.server.sds
        assert servicer is not None
        servicer._max_streams_per_uid = 2
        with sds.channel(h.socket_path) as ch:
            held = [SdsStream(on=ch) for _ in range(2)]
            for s in held:
                s.send([WEB])
                s.recv()
            with SdsStream(on=ch) as extra:
                extra.send([WEB])
                assert extra.status() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for s in held:
                s.close()
    finally:
        h.close()


def test_sds_off_is_unimplemented_and_the_workload_api_needs_its_header() -> None:
    off = Harness()  # no sds settings: SDS is not served
    try:
        off.set_state([entry("e-web", WEB, UID)])
        with pytest.raises(grpc.RpcError) as err:
            sds.fetch(off.socket_path, [WEB])
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        off.close()
    on = Harness(sds=SdsSettings())
    try:
        on.set_state([entry("e-web", WEB, UID)])
        # SDS needs no header; the Workload API on the same socket still does.
        assert list(secrets_of(sds.fetch(on.socket_path, [WEB]))) == [WEB]
        with sds.channel(on.socket_path) as ch:
            call = ch.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID")
            with pytest.raises(grpc.RpcError) as err:
                list(call(b"", timeout=20))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        on.close()


_NOBODY_CLIENT = r"""
import json, sys
import grpc
from tests.support import sds_client as sds
out = {}
try:
    with sds.SdsStream(sys.argv[1]) as stream:
        stream.send([])
        first = stream.recv()
        out["all"] = sorted(sds.secrets_of(first))
        stream.ack(first, sys.argv[2:])
        out["asked"] = sorted(sds.secrets_of(stream.recv()))
except AssertionError as exc:
    out["error"] = str(exc)
print(json.dumps(out))
"""


def test_a_process_of_another_uid_gets_only_its_own(harness: Harness) -> None:
    require_root("to run an SDS client as another user")
    nobody = 65534
    harness.set_state([entry("e-web", WEB, UID), entry("e-api", API, f"unix:uid:{nobody}")])
    proc = subprocess.run(
        [sys.executable, "-c", _NOBODY_CLIENT, str(harness.socket_path), WEB, API],
        capture_output=True, text=True, timeout=120, user=nobody, group=nobody,
        env={**os.environ, "PYTHONPATH": str(os.getcwd())}, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # Its own SVID and the bundle; never this uid's SVID, even asked by name.
    assert got == {"all": sorted([API, "spiffe://example.org"]), "asked": [API]}, got


_HOLDER = r"""
import sys, time
from tests.support import sds_client as sds
stream = sds.SdsStream(sys.argv[1])
stream.send([sys.argv[2]])
stream.recv()
print("holding", flush=True)
time.sleep(3600)
"""


def test_a_caller_killed_mid_stream_is_cleaned_up(harness: Harness) -> None:
    harness.set_state([entry("e-web", WEB, UID)])
    sds_servicer = harness.server.sds
    assert sds_servicer is not None
    procs = [subprocess.Popen([sys.executable, "-c", _HOLDER, str(harness.socket_path), WEB],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
             for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "holding"
        assert harness.call(lambda: sds_servicer.stream_count) == 3
        for p in procs:
            p.kill()
            p.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
                harness.call(lambda: sds_servicer.stream_count)
                or harness.server.front.connection_count):
            time.sleep(0.05)
        assert harness.call(lambda: sds_servicer.stream_count) == 0
        assert harness.server.front.connection_count == 0
        assert harness.call(lambda: harness.cache.in_use()) == frozenset()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_names_that_resolve_to_nothing_wait_for_it(harness: Harness) -> None:
    """No empty answer (Envoy would reject it); the secret is pushed once it exists."""
    harness.set_state([entry("e-web", WEB, UID)])
    with SdsStream(harness.socket_path) as stream:
        stream.send([API])
        assert stream.quiet(QUIET), "an empty answer was sent"
        # An entry for it is registered and its SVID signed: pushed promptly.
        api = entry("e-api", API, UID)
        svid = harness.ca.svid(API)

        def register() -> None:
            harness.cache.set_entries([entry("e-web", WEB, UID), api])
            harness.cache.set_x509_svid("e-api", svid)

        started = time.monotonic()
        harness.call(register)
        got = secrets_of(stream.recv())
        elapsed = time.monotonic() - started
    assert list(got) == [API] and elapsed < PROMPT, elapsed
    assert pem(sds.certificate_chain(got[API])) == pem(list(svid.cert_chain))
