"""sigil-server's admin CLI against a running server."""

from __future__ import annotations

import datetime as dt
import json
import subprocess

import pytest
from cryptography import x509

from tests.integration.conftest import RunningServer, server_command

ENTRY_KEYS = {"id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl",
              "dns_names"}


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_token_generate_json(sigil_server: RunningServer) -> None:
    alias = f"spiffe://{sigil_server.trust_domain}/node/a"
    doc = json.loads(_ok(sigil_server.cli("token", "generate", "--spiffe-id", alias,
                                          "--ttl", "120", "--output", "json")))
    assert set(doc) >= {"token", "spiffe_id", "expires_at", "agent_id"}
    token_id = doc["token"].split(".")[0]
    assert doc["agent_id"] == (
        f"spiffe://{sigil_server.trust_domain}/sigil/agent/join_token/{token_id}")
    assert doc["spiffe_id"] == alias
    expires = dt.datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00"))
    assert 100 < (expires - dt.datetime.now(dt.UTC)).total_seconds() <= 121
    assert doc["token"] not in sigil_server.log


def test_entry_create_show_delete(sigil_server: RunningServer) -> None:
    td = sigil_server.trust_domain
    created = json.loads(_ok(sigil_server.cli(
        "entry", "create", "--spiffe-id", f"spiffe://{td}/web", "--parent-id",
        f"spiffe://{td}/node/a", "--selector", "unix:uid:1000", "--selector", "unix:gid:0",
        "--dns-name", "Web.Example.test", "--x509-svid-ttl", "120", "--output", "json")))
    assert set(created) >= ENTRY_KEYS
    assert created["selectors"] == [{"type": "unix", "value": "gid:0"},
                                    {"type": "unix", "value": "uid:1000"}]
    assert created["dns_names"] == ["web.example.test"]
    assert (created["x509_svid_ttl"], created["jwt_svid_ttl"]) == (120, 0)

    shown = json.loads(_ok(sigil_server.cli("entry", "show", "--output", "json")))
    assert shown == {"entries": [created]}
    by_sel = json.loads(_ok(sigil_server.cli(
        "entry", "show", "--selector", "unix:uid:1000", "--selector", "unix:gid:0",
        "--output", "json")))["entries"]
    assert [e["id"] for e in by_sel] == [created["id"]]
    assert json.loads(_ok(sigil_server.cli("entry", "show", "--parent-id",
                                           f"spiffe://{td}/other", "--output", "json"))) == {
        "entries": []}
    assert json.loads(_ok(sigil_server.cli("entry", "show", "--id", created["id"],
                                           "--output", "json"))) == {"entries": [created]}
    assert "Found 1 entry" in _ok(sigil_server.cli("entry", "show"))

    dup = sigil_server.cli("entry", "create", "--spiffe-id", f"spiffe://{td}/web",
                           "--parent-id", f"spiffe://{td}/node/a", "--selector", "unix:gid:0",
                           "--selector", "unix:uid:1000")
    assert dup.returncode == 2 and "already exists" in dup.stderr

    _ok(sigil_server.cli("entry", "delete", "--id", created["id"]))
    assert json.loads(_ok(sigil_server.cli("entry", "show", "--output", "json"))) == {
        "entries": []}
    gone = sigil_server.cli("entry", "delete", "--id", created["id"])
    assert gone.returncode == 2 and "not found" in gone.stderr


BAD_ENTRY_ARGS = [
    (["--spiffe-id", "not-an-id"], "--spiffe-id"),
    (["--spiffe-id", "spiffe://other.test/w"], "not in the trust domain"),
    (["--spiffe-id", "spiffe://TD/sigil/agent/x"], "reserved"),
    (["--spiffe-id", "spiffe://TD"], "must have a path"),
    (["--parent-id", "spiffe://bad domain/x"], "--parent-id"),
    (["--selector", "nocolon"], "type:value"),
    (["--selector", "UPPER:x"], "selector type"),
    (["--x509-svid-ttl", "-1"], "x509-svid-ttl"),
    (["--jwt-svid-ttl", "999999999"], "jwt_svid_ttl"),
    (["--x509-svid-ttl", "abc"], "abc"),
    (["--dns-name", "bad_name!"], "not a valid host name"),
    (["--dns-name", "x.sigil.invalid"], "reserved"),
    (["--dns-name", "-lead.example"], "not a valid host name"),
    (["--federates-with", "TD"], "own trust domain"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ENTRY_ARGS)
def test_bad_entry_input(sigil_server: RunningServer, args: list[str], message: str) -> None:
    td = sigil_server.trust_domain
    base = {"--spiffe-id": f"spiffe://{td}/w", "--parent-id": f"spiffe://{td}/p",
            "--selector": "unix:uid:1"}
    flags = dict(zip(args[::2], [a.replace("TD", td) for a in args[1::2]], strict=True))
    argv = ["entry", "create"]
    for k, v in {**base, **flags}.items():
        argv += [k, v]
    proc = sigil_server.cli(*argv)
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert message in lines[0]
    assert json.loads(_ok(sigil_server.cli("entry", "show", "--output", "json"))) == {
        "entries": []}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["token", "generate", "--spiffe-id", "nope"], "--spiffe-id"),
        (["token", "generate", "--spiffe-id", "spiffe://elsewhere.test/x"], "trust domain"),
        (["token", "generate", "--ttl", "0"], "ttl"),
        (["entry", "show", "--selector", "x"], "type:value"),
        (["entry", "create", "--spiffe-id", "spiffe://a/b"], "Missing option"),
        (["bundle", "show", "--format", "der"], "der"),
    ],
)
def test_bad_other_input(sigil_server: RunningServer, args: list[str], message: str) -> None:
    proc = sigil_server.cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ")


def test_unreachable_socket(server_root: object) -> None:
    proc = subprocess.run([*server_command(), "healthcheck", "--socket-path",
                           "/tmp/does-not-exist/admin.sock"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error: cannot reach")


def test_bundle_show_pem_and_spiffe(sigil_server: RunningServer, tmp_path: object) -> None:
    pem = _ok(sigil_server.cli("bundle", "show", "--format", "pem"))
    (cert,) = x509.load_pem_x509_certificates(pem.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=pem,
                          capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert f"URI:spiffe://{sigil_server.trust_domain}" in text.stdout
    doc = json.loads(_ok(sigil_server.cli("bundle", "show", "--format", "spiffe")))
    assert {k["use"] for k in doc["keys"]} == {"x509-svid", "jwt-svid", "wit-svid"}
    assert doc["spiffe_sequence"] == 1


def test_healthcheck_json(sigil_server: RunningServer) -> None:
    doc = json.loads(_ok(sigil_server.cli("healthcheck", "--output", "json")))
    from importlib.metadata import version

    assert doc == {"serving": True, "trust_domain": sigil_server.trust_domain,
                   "bundle_sequence": 1, "version": version("sigil")}


@pytest.mark.parametrize("args", [[], ["run"], ["token", "generate"], ["entry", "create"],
                                  ["entry", "show"], ["entry", "delete"], ["bundle", "show"],
                                  ["healthcheck"]])
def test_help_has_examples(args: list[str]) -> None:
    proc = subprocess.run([*server_command(), *args, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "Usage:" in proc.stdout
    if args:
        assert "Example" in proc.stdout


@pytest.mark.slow
def test_restart_keeps_ca(sigil_server: RunningServer) -> None:
    before = _ok(sigil_server.cli("bundle", "show", "--format", "spiffe"))
    td = sigil_server.trust_domain
    entry = json.loads(_ok(sigil_server.cli(
        "entry", "create", "--spiffe-id", f"spiffe://{td}/w", "--parent-id", f"spiffe://{td}/p",
        "--selector", "unix:uid:1", "--output", "json")))
    sigil_server.restart()
    assert _ok(sigil_server.cli("bundle", "show", "--format", "spiffe")) == before
    assert json.loads(_ok(sigil_server.cli("entry", "show", "--output", "json"))) == {
        "entries": [entry]}


def test_admin_socket_permissions(sigil_server: RunningServer) -> None:
    import stat

    assert stat.S_IMODE(sigil_server.socket_path.stat().st_mode) == 0o770
    assert stat.S_IMODE(sigil_server.socket_path.parent.stat().st_mode) == 0o700
    keys = sigil_server.data_dir / "keys"
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys.iterdir())


def test_bad_config_file(tmp_path: object) -> None:
    from pathlib import Path

    cfg = Path(str(tmp_path)) / "s.toml"
    cfg.write_text('trust_domain = "example.org"\nnope = 1\n')
    proc = subprocess.run([*server_command(), "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"Error: config file {cfg}: unknown key 'nope'"
