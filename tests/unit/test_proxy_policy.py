"""sigil-proxy's allow lists, config file and command line: what is accepted, and the
exact error (with the file's line) for what is not."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from identity.spiffeid import SpiffeId
from proxy.cli import main
from proxy.config import load_file, parse_pair
from proxy.errors import ConfigError, PolicyError
from proxy.policy import Policy, from_rules, parse_rule

TD = "example.org"


@pytest.mark.parametrize(("rule", "peer", "allowed"), [
    ("spiffe://example.org/web", "spiffe://example.org/web", True),
    ("spiffe://example.org/web", "spiffe://example.org/web/x", False),
    ("spiffe://example.org/web", "spiffe://other.org/web", False),
    ("spiffe://example.org", "spiffe://example.org/anything/at/all", True),
    ("example.org", "spiffe://example.org/a", True),
    ("spiffe://example.org", "spiffe://example.org.evil/a", False),
    ("spiffe://example.org/ns/prod/*", "spiffe://example.org/ns/prod", True),
    ("spiffe://example.org/ns/prod/*", "spiffe://example.org/ns/prod/api", True),
    ("spiffe://example.org/ns/prod/*", "spiffe://example.org/ns/production", False),
    ("spiffe://example.org/ns/prod/*", "spiffe://other.org/ns/prod/api", False),
])
def test_rules(rule: str, peer: str, allowed: bool) -> None:
    assert parse_rule(rule).allows(SpiffeId.parse(peer)) is allowed


def test_default_deny() -> None:
    assert Policy().empty
    assert not Policy().allows(SpiffeId.parse("spiffe://example.org/web"))
    assert from_rules([]).describe() == "(nobody)"


@pytest.mark.parametrize(("rule", "message"), [
    ("spiffe://example.org/a//b", "invalid SPIFFE ID: 'spiffe://example.org/a//b': path '/a//b' "
     "cannot contain empty segments"),
    ("spiffe://Example.org/a", "invalid SPIFFE ID: 'spiffe://Example.org/a': trust domain "
     "'Example.org' must be lowercase"),
    ("spiffe://example.org/a/../*", "invalid path prefix 'spiffe://example.org/a/../*': "
     "'spiffe://example.org/a/..': path '/a/..' cannot contain dot segments"),
    ("spiffe://*", "invalid path prefix 'spiffe://*': expected spiffe://TRUST-DOMAIN/PATH"),
    ("http://example.org/a", "invalid rule 'http://example.org/a': a rule is a SPIFFE ID "
     "(spiffe://...)"),
])
def test_bad_rules(rule: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_rule(rule)
    assert str(caught.value) == message


GOOD = """\
socket_path = "/run/sigil/api.sock"

[[inbound]]
name = "web"
listen = "0.0.0.0:8443"
forward = "127.0.0.1:8080"
allow_ids = ["spiffe://example.org/frontend"]
allow_trust_domains = ["partner.org"]
allow_path_prefixes = ["spiffe://example.org/ns/prod/"]

[[outbound]]
listen = "127.0.0.1:9000"
connect = "db.example.org:8443"
allow_ids = ["spiffe://example.org/db"]
"""


def test_good_file(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(GOOD)
    loaded = load_file(path)
    web, db = loaded.listeners
    assert (web.name, web.mode, str(web.listen), str(web.target)) == (
        "web", "inbound", "0.0.0.0:8443", "127.0.0.1:8080")
    assert web.policy.allows(SpiffeId.parse("spiffe://partner.org/x"))
    assert web.policy.allows(SpiffeId.parse("spiffe://example.org/ns/prod/api"))
    assert not web.policy.allows(SpiffeId.parse("spiffe://example.org/db"))
    assert (db.name, db.mode) == ("outbound:127.0.0.1:9000", "outbound")
    assert loaded.settings == {"socket_path": "/run/sigil/api.sock"}


@pytest.mark.parametrize(("old", "new", "message"), [
    ('"spiffe://example.org/frontend"', '"spiffe://example.org/front//end"',
     "line 7: allow_ids: invalid SPIFFE ID: 'spiffe://example.org/front//end': path "
     "'/front//end' cannot contain empty segments"),
    ('"spiffe://example.org/ns/prod/"', '"spiffe://example.org/ns/../prod"',
     "line 9: allow_path_prefixes: invalid path prefix"),
    ('"partner.org"', '"Partner.org"', "line 8: allow_trust_domains: invalid trust domain"),
    ('"spiffe://example.org/db"', '"spiffe://example.org"',
     "line 14: allow_ids: invalid SPIFFE ID 'spiffe://example.org': a workload's ID has a path"),
    ('forward = "127.0.0.1:8080"', 'forward = "127.0.0.1"',
     "line 6: forward: address '127.0.0.1' must have the form HOST:PORT"),
    ('forward = "127.0.0.1:8080"', 'forwrd = "127.0.0.1:8080"',
     "line 6: unknown key 'forwrd' in [[inbound]]"),
    ('name = "web"', 'name = "web', "line 4: not valid TOML"),
    ('socket_path', 'sockets', "line 1: unknown key 'sockets'"),
])
def test_bad_file_names_the_line(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    assert str(caught.value).startswith(f"{path} {message}"), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("text", "message"), [
    ("127.0.0.1:8443", "expected LISTEN=TARGET"),
    ("127.0.0.1:8443=127.0.0.1", "must have the form HOST:PORT"),
    ("127.0.0.1:99999=127.0.0.1:1", "port 99999 is outside"),
    ("127.0.0.1:1=127.0.0.1:0", "port 0 is outside 1..65535"),
])
def test_bad_pairs(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_pair(text, "inbound")


@pytest.mark.parametrize(("args", "message"), [
    (["--inbound", "127.0.0.1:1=127.0.0.1:2"], "give at least one --allow"),
    (["--outbound", "127.0.0.1:1=127.0.0.1:2"], "give at least one --expect"),
    (["--inbound", "127.0.0.1:1=127.0.0.1:2", "--allow", "spiffe://x/a//b"],
     "--allow: invalid SPIFFE ID"),
    (["--allow", "spiffe://example.org/a"], "--allow applies to --inbound listeners"),
    ([], "nothing to do"),
    (["--inbound", "127.0.0.1:1=127.0.0.1:2", "--allow", "spiffe://example.org/a",
      "--handshake-timeout", "soon"], "handshake timeout"),
    (["--inbound", "127.0.0.1:1=127.0.0.1:2", "--allow", "spiffe://example.org/a",
      "--max-connections", "0"], "max connections must be at least 1"),
    (["--inbound", "127.0.0.1:1=127.0.0.1:2", "--allow", "spiffe://example.org/a",
      "--socket-path", "tcp://127.0.0.1:1"], "only Unix sockets are supported"),
    (["--inbound", "127.0.0.1:1=127.0.0.1:2", "--inbound", "127.0.0.1:1=127.0.0.1:3",
      "--allow", "spiffe://example.org/a"], "two listeners named"),
    (["--bogus"], "No such option '--bogus'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["run", "--socket-path", "/tmp/none.sock", *args],
                           env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


def test_check_config(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(GOOD)
    ok = CliRunner().invoke(main, ["check-config", str(path)])
    assert ok.exit_code == 0
    assert ok.output.splitlines()[0] == (
        "web: inbound 0.0.0.0:8443 -> 127.0.0.1:8080 allow spiffe://example.org/frontend,"
        "spiffe://partner.org,spiffe://example.org/ns/prod/*")
    path.write_text(GOOD.replace('"spiffe://example.org/db"', '"spiffe://example.org/d b"'))
    bad = CliRunner().invoke(main, ["check-config", str(path)])
    assert bad.exit_code == 2
    assert bad.stderr.strip().startswith(f"Error: {path} line 14: allow_ids: invalid SPIFFE ID")


def test_configuration_doc_lists_exactly_the_proxy_keys() -> None:
    from proxy import config

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    section = doc.split("# Proxy configuration", 1)[1]
    documented = {line.split("`")[1] for line in section.splitlines()
                  if line.startswith("| `")}
    assert documented == config._TOP_KEYS
