"""``sigil-server federation ...`` against real servers: a relationship between two
servers (one serving its bundle with https_spiffe), each bad input refused with one
``Error:`` line and exit 2 with nothing written, and the bundle endpoint's answers."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from pathlib import Path

import grpc
import pytest

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from identity.bundle import Bundle
from identity.spiffeid import TrustDomain
from tests.integration.conftest import RunningServer
from tests.integration.federation_helpers import TestCa

A_TD = "a.fed.test"


def _ok(proc: object) -> str:
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    return str(proc.stdout)  # type: ignore[attr-defined]


def _error(proc: object) -> str:
    assert proc.returncode == 2, proc.stdout  # type: ignore[attr-defined]
    lines = str(proc.stderr).strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def _wait_for(server: RunningServer, needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log_lines:
            if needle in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not logged:\n{server.log}")


@pytest.fixture
def server_a(server_root: Path) -> object:
    root = server_root / "a"
    root.mkdir()
    config = root / "server.toml"
    config.write_text('[federation.bundle_endpoint]\naddress = "127.0.0.1:0"\n'
                      'profile = "https_spiffe"\nrefresh_hint = "2m"\n')
    srv = RunningServer(trust_domain=A_TD, data_dir=root / "data",
                        socket_path=root / "admin" / "admin.sock",
                        extra_args=("--config", str(config)))
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def _endpoint_address(server: RunningServer) -> str:
    line = _wait_for(server, "endpoint=bundle_endpoint")
    return line.split("address=", 1)[1].split()[0]


def _get(address: str, method: str = "GET") -> tuple[int, str, bytes]:
    host, port = address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request(method, "/")
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_relationship_lifecycle_between_two_servers(
        server_a: RunningServer, sigil_server: RunningServer, tmp_path: Path) -> None:
    address = _endpoint_address(server_a)
    status, ctype, body = _get(address)
    assert (status, ctype) == (200, "application/json")
    served = Bundle.from_jwks(TrustDomain(A_TD), body)
    assert served.refresh_hint == 120 and served.x509_authorities
    assert _get(address, "POST")[0] == 405

    bootstrap = tmp_path / "a.json"
    bootstrap.write_text(_ok(server_a.cli("bundle", "show", "--format", "spiffe")))
    url = f"https://{address}/"
    args = ("--trust-domain", A_TD, "--bundle-endpoint-url", url, "--profile", "https_spiffe",
            "--endpoint-spiffe-id", f"spiffe://{A_TD}/sigil/server")
    created = json.loads(_ok(sigil_server.cli("federation", "create", *args,
                                              "--bootstrap-bundle", str(bootstrap),
                                              "--output", "json")))
    assert created["trust_domain"] == A_TD and created["profile"] == "https_spiffe"
    assert created["bundle_sequence"] == served.sequence_number  # the bootstrap, held

    out = _ok(sigil_server.cli("federation", "refresh", "--trust-domain", A_TD))
    assert out == f"Bundle of {A_TD} unchanged (sequence {served.sequence_number}).\n"
    channel, stub = _stub(sigil_server)
    name = admin_pb2.FederationRelationshipName(trust_domain=A_TD)
    try:
        shown = stub.GetFederationRelationship(name, timeout=30)
        assert (shown.last_refresh, shown.bundle_sequence) == ("ok", served.sequence_number)
        listed = stub.ListFederationRelationships(
            admin_pb2.ListFederationRelationshipsRequest(), timeout=30)
        assert [r.trust_domain for r in listed.relationships] == [A_TD]

        # The endpoint ID now names another workload: the next refresh is refused as
        # unauthenticated, and the bundle held is kept.
        stub.UpdateFederationRelationship(_request(
            A_TD, url, "https_spiffe", f"spiffe://{A_TD}/not/the/server"), timeout=30)
        err = _error(sigil_server.cli("federation", "refresh", "--trust-domain", A_TD))
        assert err.startswith(f"Error: refresh of {A_TD} failed (unauthenticated): {url}: "
                              f"endpoint is spiffe://{A_TD}/sigil/server, expected "), err
        shown = stub.GetFederationRelationship(name, timeout=30)
        assert (shown.last_refresh, shown.bundle_sequence) == (
            "unauthenticated", served.sequence_number)

        stub.DeleteFederationRelationship(name, timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetFederationRelationship(name, timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # The bundle held stays until `bundle delete`.
        held = stub.GetBundle(admin_pb2.GetBundleRequest(trust_domain=A_TD), timeout=30)
        assert held.sequence_number == served.sequence_number
    finally:
        channel.close()


BAD = [
    (("http://b.example/", "https_web", ""), "must use https"),
    (("https://user:pw@b.example/", "https_web", ""), "must not carry userinfo"),
    (("https:///path", "https_web", ""), "has no host"),
    (("https://b.example/#frag", "https_web", ""), "must not have a fragment"),
    (("", "https_web", ""), "bundle_endpoint_url is required"),
    (("https://b.example/", "https_spiffe", ""), "profile https_spiffe needs endpoint_spiffe_id"),
    (("https://b.example/", "https_spiffe", "spiffe://b.fed.test/sigil/server"),
     "self-serving): give a bootstrap bundle of b.fed.test"),
    (("https://b.example/", "https_spiffe", "spiffe://b.fed.test"), "must name a workload"),
    (("https://b.example/", "https_spiffe", "not an id"), "endpoint_spiffe_id:"),
    (("https://b.example/", "https_web", "spiffe://b.fed.test/x"),
     "endpoint_spiffe_id is only for profile https_spiffe"),
    (("https://b.example/", "https_other", ""), "profile 'https_other' must be one of"),
    (("https://b.example/", "", ""), "profile '' must be one of"),
]


def _stub(server: RunningServer) -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
    channel = grpc.insecure_channel(f"unix:{server.socket_path}")
    return channel, admin_pb2_grpc.AdminStub(channel)


def _request(td: str, url: str, profile: str, endpoint_id: str, bootstrap: bytes = b""
             ) -> admin_pb2.FederationRelationshipRequest:
    return admin_pb2.FederationRelationshipRequest(
        relationship=admin_pb2.FederationRelationship(
            trust_domain=td, bundle_endpoint_url=url, profile=profile,
            endpoint_spiffe_id=endpoint_id),
        bootstrap_bundle=bootstrap)


def test_bad_input_is_refused_and_changes_nothing(sigil_server: RunningServer) -> None:
    channel, stub = _stub(sigil_server)
    bootstrap = TestCa("b.fed.test").bundle().to_json()
    spiffe = ("https://b.example/", "https_spiffe", "spiffe://b.fed.test/sigil/server")
    cases = [*BAD,
             (("https://b.example/", "https_web", ""), "is our own trust domain",
              sigil_server.trust_domain),
             (("https://b.example/", "https_web", ""), "trust_domain:", "Bad_Domain!"),
             (("https://b.example/", "https_web", ""), "trust_domain is required", ""),
             ((*spiffe, b"hello"), "neither a SPIFFE bundle (JSON) nor PEM"),
             ((*spiffe, b'{"keys": []}'), "bootstrap bundle has no X.509 authority"),
             ((*spiffe, b'{"keys": [], "keys": []}'), "duplicate JSON member 'keys'"),
             ((*spiffe, b"{" + b" " * (1024 * 1024) + b"}"), "larger than 1048576 bytes"),
             (("https://b.example/", "https_web", "", bootstrap),
              "a bootstrap bundle is only for profile https_spiffe"),
             (("https://b.example/", "https_spiffe", "spiffe://c.fed.test/sigil/server",
               bootstrap), "only for an https_spiffe endpoint whose ID is in the foreign"),
             ]
    try:
        for case in cases:
            args, message = case[0], case[1]
            td = case[2] if len(case) > 2 else "b.fed.test"
            for rpc in (stub.CreateFederationRelationship, stub.UpdateFederationRelationship):
                with pytest.raises(grpc.RpcError) as info:
                    rpc(_request(str(td), *args), timeout=30)  # type: ignore[arg-type]
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, info.value)
                assert message in (info.value.details() or ""), (case, info.value.details())
        resp = stub.ListFederationRelationships(
            admin_pb2.ListFederationRelationshipsRequest(), timeout=30)
        assert list(resp.relationships) == []
        with pytest.raises(grpc.RpcError) as info:
            stub.GetBundle(admin_pb2.GetBundleRequest(trust_domain="b.fed.test"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # no bootstrap was stored

        # Duplicates and missing ones.
        stub.CreateFederationRelationship(_request("b.fed.test", "https://b.example/",
                                                   "https_web", ""), timeout=30)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateFederationRelationship(_request("b.fed.test", "https://b.example/",
                                                       "https_web", ""), timeout=30)
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        name = admin_pb2.FederationRelationshipName(trust_domain="c.fed.test")
        for rpc in (stub.GetFederationRelationship, stub.DeleteFederationRelationship,
                    stub.RefreshFederatedBundle):
            with pytest.raises(grpc.RpcError) as info:
                rpc(name, timeout=30)  # type: ignore[operator]
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert info.value.details() == "no federation relationship with c.fed.test"
        for bad in ("", "spiffe://c.fed.test/workload"):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetFederationRelationship(
                    admin_pb2.FederationRelationshipName(trust_domain=bad), timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()


def test_cli_bad_input_is_one_line_exit_2(sigil_server: RunningServer, tmp_path: Path) -> None:
    err = _error(sigil_server.cli("federation", "create", "--trust-domain", "b.fed.test",
                                  "--bundle-endpoint-url", "http://b.example/",
                                  "--profile", "https_web"))
    assert err == ("Error: bundle_endpoint_url 'http://b.example/' must use https "
                   "(SPIFFE Federation §5.1) (INVALID_ARGUMENT)")
    err = _error(sigil_server.cli(
        "federation", "create", "--trust-domain", "b.fed.test",
        "--bundle-endpoint-url", "https://b.example/", "--profile", "https_spiffe",
        "--endpoint-spiffe-id", "spiffe://b.fed.test/s",
        "--bootstrap-bundle", str(tmp_path / "missing.json")))
    missing = tmp_path / "missing.json"
    assert err == f"Error: --bootstrap-bundle {missing}: No such file or directory"
    assert _ok(sigil_server.cli("federation", "list")) == "No federation relationships.\n"
