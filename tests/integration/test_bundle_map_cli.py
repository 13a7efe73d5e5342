"""``sigil-server bundle show|set --format spiffe-map``: the SPIFFE bundle map
(Trust Domain and Bundle §5) against a running server."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from identity.bundle import Bundle, JwtAuthority, bundle_map_to_json, parse_bundle_map
from identity.keys import generate_private_key, key_id
from identity.spiffeid import TrustDomain
from tests.integration.conftest import RunningServer, server_command
from tests.integration.test_bundle_admin import _error, _foreign_bundle, _ok, _run

B = TrustDomain("b.fed.test")
C = TrustDomain("c.fed.test")


def test_round_trip(sigil_server: RunningServer) -> None:
    b, c = _foreign_bundle(B), _foreign_bundle(C, sequence=None)
    out = _ok(_run(sigil_server, "bundle", "set", "--format", "spiffe-map",
                   stdin=bundle_map_to_json([b, c]).decode()))
    assert out.startswith("Bundle map set: 2 trust domain(s).\n"), out
    shown = _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe-map"))
    doc = json.loads(shown)
    assert sorted(doc["trust_domains"]) == ["b.fed.test", "c.fed.test", "it.sigil.test"]
    for member in doc["trust_domains"].values():
        assert "spiffe_refresh_hint" not in member
    held = {x.trust_domain: x for x in parse_bundle_map(shown)}
    for sent in (b, c):
        got = held[sent.trust_domain]
        assert got.x509_authorities == sent.x509_authorities
        assert got.jwt_authorities == sent.jwt_authorities
    assert held[B].sequence_number == 7
    own = _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe"))
    assert held[TrustDomain("it.sigil.test")].to_json().decode() == json.dumps(
        {k: v for k, v in json.loads(own).items() if k != "spiffe_refresh_hint"},
        separators=(",", ":"))
    # The shown map set back holds our own trust domain: refused whole, nothing written.
    before = _ok(_run(sigil_server, "bundle", "list", "--output", "json"))
    line = _error(_run(sigil_server, "bundle", "set", "--format", "spiffe-map", stdin=shown))
    assert line.startswith("Error: member 'it.sigil.test': it.sigil.test is this server's own "
                           "trust domain"), line
    assert line.endswith("(INVALID_ARGUMENT)"), line
    assert _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe")) == own
    assert _ok(_run(sigil_server, "bundle", "list", "--output", "json")) == before
    # Without it, the foreign members are set back unchanged.
    foreign = bundle_map_to_json([x for x in held.values()
                                  if x.trust_domain != TrustDomain("it.sigil.test")])
    doc = json.loads(_ok(_run(sigil_server, "bundle", "set", "--format", "spiffe-map",
                              "--output", "json", stdin=foreign.decode())))
    assert [x["trust_domain"] for x in doc["bundles"]] == ["b.fed.test", "c.fed.test"]
    after = json.loads(_ok(_run(sigil_server, "bundle", "list", "--output", "json")))
    assert [(x["trust_domain"], x["bundle"]["keys"]) for x in after["bundles"]] == [
        (x["trust_domain"], x["bundle"]["keys"]) for x in json.loads(before)["bundles"]]
    # One trust domain only, with --id.
    one = json.loads(_ok(_run(sigil_server, "bundle", "show", "--format", "spiffe-map",
                              "--id", "spiffe://c.fed.test")))
    assert list(one["trust_domains"]) == ["c.fed.test"]


def _bad_maps() -> list[tuple[str, str]]:
    good = _foreign_bundle(C).to_json().decode()
    wrong_domain = _foreign_bundle(TrustDomain("d.fed.test")).to_json().decode()
    return [
        (f'{{"trust_domains": {{"c.fed.test": {good}, "c.fed.test": {good}}}}}',
         "duplicate JSON member 'c.fed.test'"),
        (f'{{"trust_domains": {{"c.fed.test": {good}, "Bad_Domain": {good}}}}}',
         "bundle map key 'Bad_Domain' is not a trust domain name"),
        (f'{{"trust_domains": {{"c.fed.test": {good}, "e.fed.test": {{"keys": 5}}}}}}',
         "bundle map member 'e.fed.test': bundle 'keys' must be an array"),
        # Valid JSON, but the server's checks refuse it: still before any write.
        (f'{{"trust_domains": {{"c.fed.test": {good}, "e.fed.test": {wrong_domain}}}}}',
         "member 'e.fed.test': bundle holds a CA certificate of trust domain d.fed.test"),
        (f'{{"trust_domains": {{"c.fed.test": {good}, "e.fed.test": {{"keys": []}}}}}}',
         "holds no CA certificate and no JWT key"),
        (f'{{"trust_domains": {{"c.fed.test": {good}, "it.sigil.test": {good}}}}}',
         "member 'it.sigil.test': it.sigil.test is this server's own trust domain"),
        (_too_many_map(), "at most 1000 trust domains, not 1001"),
    ]


def _too_many_map() -> str:
    members = []
    for i in range(1001):
        key = generate_private_key().public_key()
        members.append(Bundle(TrustDomain(f"t{i}.fed.test"), (),
                              (JwtAuthority(key_id(key), key, None),), sequence_number=1))
    return bundle_map_to_json(members).decode()


def test_bad_map_is_refused_and_nothing_written(sigil_server: RunningServer) -> None:
    _ok(_run(sigil_server, "bundle", "set", "--id", "spiffe://b.fed.test", "--format",
             "spiffe", stdin=_foreign_bundle(B).to_json().decode()))
    before = _ok(_run(sigil_server, "bundle", "list", "--output", "json"))
    own_before = _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe"))
    for text, message in _bad_maps():
        line = _error(_run(sigil_server, "bundle", "set", "--format", "spiffe-map",
                           stdin=text))
        assert message in line, line
    line = _error(_run(sigil_server, "bundle", "set", "--format", "spiffe-map",
                       "--trust-domain", "c.fed.test", stdin='{"trust_domains": {}}'))
    assert "a bundle map names its trust domains" in line
    assert _ok(_run(sigil_server, "bundle", "list", "--output", "json")) == before
    assert _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe")) == own_before


@pytest.mark.parametrize("command", ["show", "set"])
def test_help_names_the_map_format(command: str) -> None:
    proc = subprocess.run([*server_command(), "bundle", command, "--help"],
                          capture_output=True, text=True, timeout=60)
    assert "spiffe-map" in _ok(proc)


def _member(b: Bundle, name: str | None = None) -> admin_pb2.SetBundleRequest:
    return admin_pb2.SetBundleRequest(trust_domain=name or b.trust_domain.name,
                                      format="spiffe", data=b.to_json())


def test_batch_rpc_is_all_or_nothing(sigil_server: RunningServer) -> None:
    """BatchSetFederatedBundles over raw gRPC: each bad request INVALID_ARGUMENT and
    nothing written (read back), a good one written whole and audited."""
    d = _foreign_bundle(TrustDomain("d.fed.test"))
    b, c = _foreign_bundle(B), _foreign_bundle(C)
    own = _foreign_bundle(TrustDomain("it.sigil.test"))
    with grpc.insecure_channel(f"unix:{sigil_server.socket_path}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        stub.SetBundle(_member(d), timeout=30)
        before = stub.ListBundles(admin_pb2.ListBundlesRequest(), timeout=30)
        many = [_member(_foreign_bundle(TrustDomain(f"t{i}.fed.test")))
                for i in range(1001)]
        bad = [
            ([_member(b), _member(c), _member(b, "spiffe://b.fed.test")],
             "trust domain 'b.fed.test' appears more than once"),
            ([_member(b), _member(own), _member(c)],
             "member 'it.sigil.test': it.sigil.test is this server's own trust domain"),
            ([_member(b), admin_pb2.SetBundleRequest(trust_domain="c.fed.test",
                                                     format="spiffe", data=b'{"keys": 5}'),
              _member(d)],
             "member 'c.fed.test': bundle of c.fed.test (spiffe): bundle 'keys' must be"),
            (many, "a bundle map may hold at most 1000 trust domains, not 1001"),
        ]
        for members, message in bad:
            with pytest.raises(grpc.RpcError) as info:
                stub.BatchSetFederatedBundles(
                    admin_pb2.BatchSetFederatedBundlesRequest(bundles=members), timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (info.value.details() or ""), info.value.details()
            assert stub.ListBundles(admin_pb2.ListBundlesRequest(), timeout=30) == before
        resp = stub.BatchSetFederatedBundles(
            admin_pb2.BatchSetFederatedBundlesRequest(bundles=[_member(c), _member(b)]),
            timeout=30)
        assert [(x.trust_domain, x.sequence_number) for x in resp.bundles] == [
            ("c.fed.test", 7), ("b.fed.test", 7)]
        listed = stub.ListBundles(admin_pb2.ListBundlesRequest(), timeout=30)
        assert [x.trust_domain for x in listed.bundles] == ["b.fed.test", "c.fed.test",
                                                            "d.fed.test"]
    lines = [json.loads(line) for line in
             (sigil_server.data_dir / "admin-audit.log").read_text().splitlines()]
    batch = [x for x in lines if x["method"] == "BatchSetFederatedBundles"]
    assert [x["code"] for x in batch] == ["INVALID_ARGUMENT"] * 4 + ["OK"]
    assert batch[-1]["role"] == "all"  # the socket owner
    assert batch[-1]["ids"] == {"bundles.count": 2,
                                "bundles.trust_domain": ["c.fed.test", "b.fed.test"]}
    assert batch[3]["ids"]["bundles.count"] == 1001
    assert len(batch[3]["ids"]["bundles.trust_domain"]) == 20
