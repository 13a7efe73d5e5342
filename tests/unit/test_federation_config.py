"""[federation] and [oidc_discovery] config, and relationship validation: each bad
value is a ConfigError / InvalidArgumentError naming it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ca.cli import cli
from ca.config.relationship import check_url, new_relationship, parse_bootstrap_bundle
from ca.config.server import load_config
from ca.errors import ConfigError, InvalidArgumentError
from identity.spiffeid import SpiffeId, TrustDomain

OWN = TrustDomain("own.test")


def _load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "server.toml"
    path.write_text(f'trust_domain = "own.test"\n{text}')
    return load_config(path)


def test_defaults(tmp_path: Path) -> None:
    fed = _load(tmp_path, "").federation  # type: ignore[attr-defined]
    assert (fed.refresh_min_interval, fed.refresh_max_interval, fed.refresh_default_interval,
            fed.fetch_timeout) == (dt.timedelta(seconds=30), dt.timedelta(hours=1),
                                   dt.timedelta(minutes=5), dt.timedelta(seconds=10))
    assert (fed.bundle_endpoint, fed.relationships, fed.oidc_discovery) == (None, (), None)
    endpoint = _load(tmp_path, '[federation.bundle_endpoint]\nprofile = "https_spiffe"\n'
                     ).federation.bundle_endpoint  # type: ignore[attr-defined]
    assert endpoint.omit_post_quantum_keys is True  # interop first: docs/federation.md
    oidc = _load(tmp_path, '[oidc_discovery]\naddress = "127.0.0.1:0"\ndomain = "o.own.test"\n'
                 'cert_file = "/c"\nkey_file = "/k"\n'
                 ).federation.oidc_discovery  # type: ignore[attr-defined]
    assert oidc.omit_post_quantum_keys is True  # interop first: docs/federation.md


def test_full_config(tmp_path: Path) -> None:
    bootstrap = tmp_path / "b.json"
    from tests.integration.federation_helpers import TestCa

    b = TestCa("b.test")
    bootstrap.write_bytes(b.bundle(sequence=3).to_json())
    fed = _load(tmp_path, f'''
[federation]
refresh_min_interval = "10s"
refresh_max_interval = "2h"
fetch_timeout = "3s"
web_ca_file = "{tmp_path}/roots.pem"
[federation.bundle_endpoint]
address = "127.0.0.1:0"
profile = "https_spiffe"
refresh_hint = "1m"
max_connections = 32
max_connections_per_ip = 0
request_timeout = "3s"
omit_post_quantum_keys = false
[[federation.relationships]]
trust_domain = "b.test"
bundle_endpoint_url = "https://b.example:8443/"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://b.test/sigil/server"
bootstrap_bundle_file = "{bootstrap}"
[[federation.relationships]]
trust_domain = "c.test"
bundle_endpoint_url = "https://bundles.c.example/"
profile = "https_web"
[oidc_discovery]
address = "0.0.0.0:8444"
domain = "oidc.own.test"
cert_file = "/etc/c.pem"
key_file = "/etc/k.pem"
omit_post_quantum_keys = false
''').federation  # type: ignore[attr-defined]
    assert fed.refresh_min_interval == dt.timedelta(seconds=10)
    assert fed.web_ca_file == tmp_path / "roots.pem"
    assert (fed.bundle_endpoint.profile, fed.bundle_endpoint.refresh_hint) == (
        "https_spiffe", dt.timedelta(minutes=1))
    assert (fed.bundle_endpoint.max_connections, fed.bundle_endpoint.max_connections_per_ip,
            fed.bundle_endpoint.request_timeout) == (32, 0, dt.timedelta(seconds=3))
    assert fed.bundle_endpoint.omit_post_quantum_keys is False
    [rb, rc] = fed.relationships
    assert rb.relationship.endpoint_spiffe_id == SpiffeId.parse("spiffe://b.test/sigil/server")
    assert rb.bootstrap_bundle.sequence_number == 3
    assert (rc.relationship.profile, rc.bootstrap_bundle) == ("https_web", None)
    assert fed.oidc_discovery.domain == "oidc.own.test"
    assert fed.oidc_discovery.omit_post_quantum_keys is False


@pytest.mark.parametrize(("text", "message"), [
    ("[federation]\nfoo = 1\n", "federation: unknown key 'foo'"),
    ('[federation]\nrefresh_min_interval = "2h"\n',
     "refresh_min_interval must not be longer than federation.refresh_max_interval"),
    ('[federation]\nfetch_timeout = "soon"\n', "federation.fetch_timeout:"),
    ("[federation]\nfetch_timeout = 5\n", "must be a duration string"),
    ('[federation.bundle_endpoint]\nprofile = "https_web"\n',
     "profile https_web needs cert_file and key_file"),
    ('[federation.bundle_endpoint]\nprofile = "https_spiffe"\ncert_file = "/x"\n',
     "profile https_spiffe serves the server's own SVID"),
    ('[federation.bundle_endpoint]\nprofile = "mtls"\n', "profile 'mtls' is not one of"),
    ('[federation.bundle_endpoint]\nprofile = "https_spiffe"\naddress = "nowhere"\n',
     "federation.bundle_endpoint.address:"),
    ('[federation.bundle_endpoint]\nprofile = "https_spiffe"\nmax_connections = 0\n',
     "federation.bundle_endpoint.max_connections must be a whole number >= 1, not 0"),
    ('[federation.bundle_endpoint]\nprofile = "https_spiffe"\nmax_connections_per_ip = -1\n',
     "federation.bundle_endpoint.max_connections_per_ip must be a whole number >= 0"),
    ('[federation.bundle_endpoint]\nprofile = "https_spiffe"\nrequest_timeout = 10\n',
     "federation.bundle_endpoint.request_timeout must be a duration string"),
    ('[federation.bundle_endpoint]\nprofile = "https_spiffe"\nomit_post_quantum_keys = 1\n',
     "federation.bundle_endpoint.omit_post_quantum_keys must be true or false, not 1"),
    ('[federation]\nrelationships = "b.test"\n', "must be an array of tables"),
    ('[[federation.relationships]]\ntrust_domain = "b.test"\n',
     "federation.relationships[0]: bundle_endpoint_url is required"),
    ('[[federation.relationships]]\ntrust_domain = "b.test"\nbundle_endpoint_url = '
     '"http://b/"\nprofile = "https_web"\n', "federation.relationships[0]: bundle_endpoint_url "
     "'http://b/' must use https"),
    ('[[federation.relationships]]\ntrust_domain = "own.test"\nbundle_endpoint_url = '
     '"https://b/"\nprofile = "https_web"\n', "own.test is our own trust domain"),
    ('[[federation.relationships]]\ntrust_domain = "b.test"\nbundle_endpoint_url = '
     '"https://b/"\nprofile = "https_spiffe"\nendpoint_spiffe_id = "spiffe://b.test/s"\n',
     "give a bootstrap bundle of b.test"),
    ('[[federation.relationships]]\ntrust_domain = "b.test"\nbundle_endpoint_url = '
     '"https://b/"\nprofile = "https_spiffe"\nendpoint_spiffe_id = "spiffe://b.test/s"\n'
     'bootstrap_bundle_file = "/nonexistent/b.json"\n',
     "bootstrap_bundle_file /nonexistent/b.json: No such file or directory"),
    ('[[federation.relationships]]\ntrust_domain = "b.test"\nbundle_endpoint_url = '
     '"https://b/"\nprofile = "https_web"\nextra = 1\n',
     "federation.relationships[0]: unknown key 'extra'"),
    ('[[federation.relationships]]\ntrust_domain = "b.test"\nbundle_endpoint_url = '
     '"https://b/"\nprofile = "https_web"\n[[federation.relationships]]\n'
     'trust_domain = "b.test"\nbundle_endpoint_url = "https://c/"\nprofile = "https_web"\n',
     "trust domain b.test is configured twice"),
    ('[oidc_discovery]\naddress = "0.0.0.0:1"\ndomain = "x"\n', "oidc_discovery: cert_file is "
     "required"),
    ('[oidc_discovery]\naddress = "0.0.0.0:1"\ndomain = "https://x/"\ncert_file = "/c"\n'
     'key_file = "/k"\n', "must be a host name"),
    ('[oidc_discovery]\ndomain = "x"\ncert_file = "/c"\nkey_file = "/k"\n',
     "oidc_discovery: address is required"),
    ('[oidc_discovery]\naddress = "0.0.0.0:1"\ndomain = "x"\ncert_file = "/c"\n'
     'key_file = "/k"\nomit_post_quantum_keys = "no"\n',
     "oidc_discovery.omit_post_quantum_keys must be true or false, not 'no'"),
])
def test_bad_config(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert message in str(info.value)


@pytest.mark.parametrize(("url", "message"), [
    ("http://b.example/", "must use https"),
    ("HTTPS://b.example/", None),
    ("https://u@b.example/", "must not carry userinfo"),
    ("https://b.example:0/", "has port 0"),
    ("https://b.example:99999/", "is not a URL"),
    ("https://b.example/a b", "spaces or control characters"),
    ("ftp://b.example/", "must use https"),
    ("https://b.example:8443/bundle?x=1", None),
    ("https://" + "a" * 2050, "longer than 2048"),
])
def test_url_rules(url: str, message: str | None) -> None:
    if message is None:
        assert check_url(url) == url
        return
    with pytest.raises(InvalidArgumentError) as info:
        check_url(url)
    assert message in str(info.value)


def test_nothing_is_inferred() -> None:
    # A non-self-serving https_spiffe endpoint needs no bootstrap (another bundle
    # authenticates it), and the trust domain is never taken from the URL host.
    rel = new_relationship(trust_domain="b.test", bundle_endpoint_url="https://c.test/",
                           profile="https_spiffe", endpoint_spiffe_id="spiffe://c.test/ep",
                           own_trust_domain=OWN, has_bootstrap=False)
    assert (rel.trust_domain, rel.self_serving) == (TrustDomain("b.test"), False)
    with pytest.raises(InvalidArgumentError, match="trust_domain is required"):
        new_relationship(trust_domain="", bundle_endpoint_url="https://b.test/",
                         profile="https_web", endpoint_spiffe_id="", own_trust_domain=OWN,
                         has_bootstrap=False)


def test_bootstrap_formats() -> None:
    from tests.integration.federation_helpers import TestCa

    b = TestCa("b.test")
    td = TrustDomain("b.test")
    assert parse_bootstrap_bundle(td, b.bundle().x509_pem()).x509_authorities == (b.cert,)
    assert parse_bootstrap_bundle(td, b.bundle().to_json()).jwt_authorities
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        parse_bootstrap_bundle(td, b"{nope")
    assert json.loads(b.bundle().to_json())["spiffe_sequence"] == 1


@pytest.mark.parametrize("command", ["create", "list", "show", "update", "delete", "refresh"])
def test_federation_help_has_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, ["federation", command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert "sigil-server federation " + command in result.output
