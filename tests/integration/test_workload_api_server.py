"""The Workload API over real Unix sockets: front, servicer, attestation, streams.

The server runs with an in-memory cache (real certificates); clients are our
bare-path client, raw grpc and py-spiffe.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.workload_api.client import WorkloadApiClient, method
from agent.workload_api.servicer import SECURITY_HEADER
from api.protos import workload_pb2 as pb
from identity.x509svid import load_certificates_der
from tests.integration.workload_api_harness import Harness, entry
from tests.support.raw_workload_client import raw_fetch_x509
from tests.support.require import require_root

RAW_CLIENT = Path(__file__).resolve().parents[1] / "support" / "raw_workload_client.py"

UID = os.getuid()
GID = os.getgid()
WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def client(h: Harness, **kw: object) -> WorkloadApiClient:
    return WorkloadApiClient(h.socket_path, timeout=10, **kw)  # type: ignore[arg-type]


def code_of(fn: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()  # type: ignore[operator]
    return info.value.code()  # type: ignore[no-any-return]


# -- Sockets and the security header ------------------------------------------------


def test_socket_modes(harness: Harness) -> None:
    assert stat.S_IMODE(harness.socket_path.stat().st_mode) == 0o777
    private = harness.server.front.private_dir
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    "metadata",
    [(), ((SECURITY_HEADER, "false"),), ((SECURITY_HEADER, "TRUE"),),
     ((SECURITY_HEADER, "true"), (SECURITY_HEADER, "true"))],
    ids=["missing", "false", "uppercase", "twice"],
)
def test_security_header_required(harness: Harness, metadata: tuple[tuple[str, str], ...]) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with client(harness, metadata=metadata) as c:
        for call in (c.fetch_x509_svid, c.fetch_x509_bundles, c.fetch_jwt_bundles,
                     lambda: c.fetch_jwt_svid(["aud"])):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "security header missing from request"


def test_no_identity_is_permission_denied(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, "unix:uid:4242424")])
    with client(harness) as c:
        for call in (c.fetch_x509_svid, c.fetch_x509_bundles, c.fetch_jwt_bundles,
                     lambda: c.fetch_jwt_svid(["aud"])):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.details() == "no identity issued"


def test_caller_without_identity_triggers_one_sync() -> None:
    calls: list[int] = []

    async def sync(h: Harness) -> None:
        # What the manager's sync does for an entry registered since the last one.
        calls.append(1)
        if len(calls) == 1:
            h.cache.set_bundles({h.ca.td: h.ca.bundle()})
            h.cache.set_entries([entry("e1", WEB, f"unix:uid:{UID}")])
            h.cache.set_x509_svid("e1", h.ca.svid(WEB))

    h = Harness(request_sync=sync)
    try:
        with client(h) as c:
            assert [s.spiffe_id for s in c.fetch_x509_svid().svids] == [WEB]
            assert len(calls) == 1
            h.call(lambda: h.cache.set_entries([entry("e2", DB, "unix:uid:4242424")]))
            assert code_of(c.fetch_x509_svid) == grpc.StatusCode.PERMISSION_DENIED
            assert len(calls) == 2  # one sync per refused call, then the refusal
    finally:
        h.close()


def test_entry_needing_a_selector_the_caller_lacks_is_not_returned(harness: Harness) -> None:
    # Security invariant: a workload never receives an SVID whose entry selectors it
    # does not all carry. "db" needs our uid AND a uid we do not have.
    harness.set_state([
        entry("e-web", WEB, f"unix:uid:{UID}", f"unix:gid:{GID}", hint="web"),
        entry("e-db", DB, f"unix:uid:{UID}", "unix:uid:4242424"),
    ])
    with client(harness) as c:
        resp = c.fetch_x509_svid()
        assert [s.spiffe_id for s in resp.svids] == [WEB]
        assert resp.svids[0].hint == "web"
        jwt = c.fetch_jwt_svid(["aud"])
        assert [s.spiffe_id for s in jwt.svids] == [WEB]
        assert code_of(lambda: c.fetch_jwt_svid(["aud"], DB)) == grpc.StatusCode.PERMISSION_DENIED


def test_x509_svid_response_encoding(harness: Harness) -> None:
    svids = harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with client(harness) as c:
        resp = c.fetch_x509_svid()
    (svid,) = resp.svids
    chain = load_certificates_der(svid.x509_svid)
    assert chain[0] == svids["e1"].leaf
    assert svid.x509_svid_key == svids["e1"].key_der()
    assert load_certificates_der(svid.bundle) == (harness.ca.cert,)
    assert not resp.federated_bundles


def test_identities_are_ordered_stably(harness: Harness) -> None:
    harness.set_state([
        entry("z", "spiffe://example.org/b", f"unix:uid:{UID}"),
        entry("y", "spiffe://example.org/a", f"unix:uid:{UID}"),
        entry("x", "spiffe://example.org/b", f"unix:gid:{GID}"),
    ])
    with client(harness) as c:
        ids = [s.spiffe_id for s in c.fetch_x509_svid().svids]
    assert ids == ["spiffe://example.org/a", "spiffe://example.org/b", "spiffe://example.org/b"]


def test_bundles_rpcs(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with client(harness) as c:
        x = c.fetch_x509_bundles()
        j = c.fetch_jwt_bundles()
    assert dict(x.bundles) == {"spiffe://example.org": harness.ca.bundle().x509_der()}
    assert dict(j.bundles) == {"spiffe://example.org": harness.ca.bundle().jwt_jwks()}


def test_fetch_jwt_svid_argument_errors(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with client(harness) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.fetch_jwt_svid([])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "audience must be specified"
        assert code_of(lambda: c.fetch_jwt_svid(["a"], "not an id")) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        resp = c.fetch_jwt_svid(["a", "b"], WEB)
        assert resp.svids[0].spiffe_id == WEB


def test_validate_jwt_svid(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with client(harness) as c:
        token = c.fetch_jwt_svid(["svc"]).svids[0].svid
        ok = c.validate_jwt_svid(token, "svc")
        assert ok.spiffe_id == WEB
        assert list(ok.claims["aud"]) == ["svc"]
        assert ok.claims["sub"] == WEB
        for tok, aud in ((token, "other"), ("not.a.jwt", "svc"), ("", "svc"), (token, "")):
            with pytest.raises(grpc.RpcError) as info:
                c.validate_jwt_svid(tok, aud)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (tok, aud)


def test_wit_svid_without_a_signer_is_unavailable(harness: Harness) -> None:
    # The WIT-SVID profile is implemented (tests/integration/test_workload_api_wit.py);
    # an agent that cannot have tokens signed yet says so with a retryable code.
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with client(harness) as c:
        stream = c.stream("FetchWITSVID", pb.WITSVIDRequest(), pb.WITSVIDResponse, timeout=5)
        assert code_of(lambda: next(stream)) == grpc.StatusCode.UNAVAILABLE


# -- Streams ---------------------------------------------------------------------------


def test_stream_waits_for_svids_then_updates_and_ends_when_identity_goes(
    harness: Harness,
) -> None:
    e = entry("e1", WEB, f"unix:uid:{UID}")
    # Entitled but not yet signed: the stream waits instead of answering empty.
    harness.set_state([e], sign=False)
    with client(harness) as c:
        stream = c.stream("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse, timeout=20)
        received: list[pb.X509SVIDResponse] = []
        errors: list[grpc.RpcError] = []

        def reader() -> None:
            try:
                for msg in stream:
                    received.append(msg)
            except grpc.RpcError as exc:
                errors.append(exc)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        time.sleep(0.3)
        assert received == []
        first = harness.ca.svid(WEB)
        harness.call(lambda: harness.cache.set_x509_svid("e1", first))
        _wait(lambda: len(received) == 1)
        # Rotation: a new SVID is pushed on the same stream.
        second = harness.ca.svid(WEB)
        harness.call(lambda: harness.cache.set_x509_svid("e1", second))
        _wait(lambda: len(received) == 2)
        assert load_certificates_der(received[1].svids[0].x509_svid)[0] == second.leaf
        # The entry goes: the stream ends with PermissionDenied, never normally.
        harness.call(lambda: harness.cache.set_entries([]))
        t.join(timeout=10)
        assert not t.is_alive()
        assert errors and errors[0].code() == grpc.StatusCode.PERMISSION_DENIED


def test_unchanged_state_is_not_resent(harness: Harness) -> None:
    e = entry("e1", WEB, f"unix:uid:{UID}")
    harness.set_state([e])
    with client(harness) as c:
        stream = c.stream("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse, timeout=3)
        next(stream)
        # An unrelated change (another caller's entry) bumps the cache version.
        harness.call(lambda: harness.cache.set_entries([e, entry("e2", DB, "unix:uid:4242424")]))
        assert code_of(lambda: next(stream)) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unsigned_identity_times_out_as_unavailable() -> None:
    h = Harness(first_response_timeout=0.3)
    try:
        h.set_state([entry("e1", WEB, f"unix:uid:{UID}")], sign=False)
        with client(h) as c:
            assert code_of(c.fetch_x509_svid) == grpc.StatusCode.UNAVAILABLE
    finally:
        h.close()


def _wait(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


# -- Bypassing the front ---------------------------------------------------------


def test_direct_connection_to_internal_socket_is_refused(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    internal = harness.server.front.internal_socket
    assert stat.S_IMODE(internal.parent.stat().st_mode) == 0o700
    # Root can still enter the directory; the servicer refuses a peer the front
    # did not record (an unbound client socket shows up as "unix:").
    with grpc.insecure_channel(f"unix:{internal}") as ch:
        call = ch.unary_stream(
            method("FetchX509SVID"),
            request_serializer=pb.X509SVIDRequest.SerializeToString,
            response_deserializer=pb.X509SVIDResponse.FromString,
        )
        stream = call(pb.X509SVIDRequest(), metadata=((SECURITY_HEADER, "true"),), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            next(stream)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_lookup_refuses_unknown_peers(harness: Harness) -> None:
    front = harness.server.front
    assert front.lookup("unix:") is None
    assert front.lookup(f"unix:{front.private_dir}/c-999.sock") is None
    assert front.lookup("ipv4:127.0.0.1:1234") is None


def test_connections_are_forgotten_after_close(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with client(harness) as c:
        c.fetch_x509_svid()
        assert harness.server.front.connection_count == 1
    _wait(lambda: harness.server.front.connection_count == 0)
    assert sorted(p.name for p in harness.server.front.private_dir.iterdir()) == ["grpc.sock"]


def test_raw_socket_garbage_does_not_break_the_server(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(harness.socket_path))
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
        s.settimeout(5)
        s.recv(1024)
    with client(harness) as c:
        assert c.fetch_x509_svid().svids


# -- Another user ----------------------------------------------------------------


def _fetch_as(uid: int, path: str) -> bytes:
    done = subprocess.run(
        [sys.executable, str(RAW_CLIENT), str(uid), path],
        capture_output=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def test_process_of_another_uid_is_denied(harness: Harness) -> None:
    require_root("to run a process as another user")
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    # The raw client itself works (as us).
    assert raw_fetch_x509(str(harness.socket_path)) == b"OK"
    assert _fetch_as(65534, str(harness.socket_path)) == b"DENIED"
    # With an entry for that uid, the same kind of process gets its SVID.
    harness.set_state([entry("e2", DB, "unix:uid:65534")])
    assert _fetch_as(65534, str(harness.socket_path)) == b"OK"
