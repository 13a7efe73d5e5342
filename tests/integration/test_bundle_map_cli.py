"""``sigil-server bundle show|set --format spiffe-map``: the SPIFFE bundle map
(Trust Domain and Bundle §5) against a running server."""

from __future__ import annotations

import json
import subprocess

import pytest

from identity.bundle import bundle_map_to_json, parse_bundle_map
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
    # The shown map set back: our own member is skipped, the foreign ones unchanged.
    before = _ok(_run(sigil_server, "bundle", "list", "--output", "json"))
    doc = json.loads(_ok(_run(sigil_server, "bundle", "set", "--format", "spiffe-map",
                              "--output", "json", stdin=shown)))
    assert doc["skipped"] == ["it.sigil.test"]
    assert [x["trust_domain"] for x in doc["bundles"]] == ["b.fed.test", "c.fed.test"]
    assert _ok(_run(sigil_server, "bundle", "show", "--format", "spiffe")) == own
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
    ]


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
