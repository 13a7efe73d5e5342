"""Issue 14, operator experience: sigil-server's CLI as an operator runs it, against
one real server shared by the module (exit codes and the exact first line of each
message)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from ca.cli import main as cli_main
from tests.integration.conftest import RunningServer


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    root = Path(tempfile.mkdtemp(prefix="sgo-", dir="/tmp"))
    srv = RunningServer(trust_domain="ops.sigil.test", data_dir=root / "data",
                        socket_path=root / "admin" / "admin.sock")
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert code == 0, srv.log
    assert "Traceback" not in srv.log, srv.log


def cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    """``sigil-server ARGS --socket-path ...`` in this process, stdout not a terminal."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            cli_main([*args, "--socket-path", str(server.socket_path)])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``Error:`` line of a refused command (exit 2)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- 1. durations: one form for every TTL flag ------------------------------------------


@pytest.mark.parametrize("ttl", ["600", "10m", "600s"])
def test_every_ttl_flag_takes_seconds_or_a_unit(server: RunningServer, ttl: str) -> None:
    td = server.trust_domain
    tok = json.loads(ok(cli(server, "token", "generate", "--ttl", ttl, "--output", "json")))
    assert tok["token"]
    created = json.loads(ok(cli(
        server, "entry", "create", "--spiffe-id", f"spiffe://{td}/ttl/{ttl}",
        "--parent-id", f"spiffe://{td}/node/ttl", "--selector", "unix:uid:4242",
        "--x509-svid-ttl", ttl, "--jwt-svid-ttl", ttl, "--output", "json")))
    assert (created["x509_svid_ttl"], created["jwt_svid_ttl"]) == (600, 600)
    updated = json.loads(ok(cli(server, "entry", "update", "--id", created["id"],
                                "--x509-svid-ttl", "1h", "--output", "json")))
    assert updated["x509_svid_ttl"] == 3600
    minted = json.loads(ok(cli(server, "jwt", "mint", "--spiffe-id", f"spiffe://{td}/m",
                               "--audience", "a", "--ttl", ttl, "--output", "json")))
    assert minted["token"]
    ok(cli(server, "entry", "delete", "--id", created["id"]))


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (["token", "generate", "--ttl", "10x"],
         "Error: Invalid value for '--ttl': duration '10x' is invalid: use seconds or a "
         "number and a unit s, m, h or d (for example \"600\", \"90s\", \"5m\", \"1h30m\")"),
        (["x509", "mint", "--spiffe-id", "spiffe://ops.sigil.test/x", "--ttl", "0"],
         "Error: Invalid value for '--ttl': duration '0' must be greater than zero"),
        (["entry", "update", "--id", "x", "--jwt-svid-ttl", "-5"],
         "Error: Invalid value for '--jwt-svid-ttl': duration '-5' is invalid: use seconds "
         "or a number and a unit s, m, h or d (for example \"600\", \"90s\", \"5m\", "
         "\"1h30m\")"),
    ],
)
def test_bad_durations_are_one_line(server: RunningServer, args: list[str],
                                    first_line: str) -> None:
    assert error(cli(server, *args)) == first_line


# ---- 1. token generate on a pipe, and on a terminal --------------------------------------


def test_token_generate_prints_only_the_token_on_a_pipe(server: RunningServer) -> None:
    proc = server.cli("token", "generate")  # a real process; stdout is a pipe
    assert proc.returncode == 0, proc.stderr
    [token] = proc.stdout.splitlines()
    token_id, _, secret = token.partition(".")
    assert token_id and secret and " " not in token
    quiet = ok(cli(server, "token", "generate", "--quiet"))
    assert len(quiet.splitlines()) == 1 and "." in quiet


def test_token_generate_is_readable_on_a_terminal(server: RunningServer) -> None:
    import os
    import pty

    from tests.integration.conftest import server_command

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([*server_command(), "token", "generate", "--socket-path",
                               str(server.socket_path)], stdout=follower,
                              stderr=subprocess.PIPE, timeout=60)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0, proc.stderr
    lines = out.decode().splitlines()
    assert lines[0].startswith("Token: ") and lines[1].startswith(
        f"Agent ID: spiffe://{server.trust_domain}/sigil/agent/join_token/")


# ---- 1. every list command answers {"<things>": [...]} -------------------------------------


def test_list_commands_share_one_json_shape(server: RunningServer) -> None:
    td = server.trust_domain
    created = json.loads(ok(cli(
        server, "entry", "create", "--spiffe-id", f"spiffe://{td}/shape",
        "--parent-id", f"spiffe://{td}/node/shape", "--selector", "unix:uid:77",
        "--output", "json")))
    shown = json.loads(ok(cli(server, "entry", "show", "--spiffe-id", f"spiffe://{td}/shape",
                              "--output", "json")))
    assert shown == {"entries": [created]}
    for args, key in [(["agent", "list"], "agents"), (["bundle", "list"], "bundles"),
                      (["federation", "list"], "relationships"),
                      (["localauthority", "x509", "show"], "authorities"),
                      (["localauthority", "jwt", "show"], "authorities")]:
        doc = json.loads(ok(cli(server, *args, "--output", "json")))
        assert list(doc) == [key] and isinstance(doc[key], list), (args, doc)
    ok(cli(server, "entry", "delete", "--id", created["id"]))


# ---- 2. mistakes caught: selector types, join token secrets --------------------------------

KNOWN = "join_token, k8s, k8s_psat, spiffe_id, sshpop, unix, x509pop"


def _entry_args(td: str, *extra: str) -> list[str]:
    return ["entry", "create", "--spiffe-id", f"spiffe://{td}/sel",
            "--parent-id", f"spiffe://{td}/node/sel", *extra]


@pytest.mark.parametrize(
    ("selector", "first_line"),
    [
        ("uid:1000", "Error: --selector uid:1000: no attestor makes selectors of type 'uid' "
         f"(did you mean unix:uid:1000?); known types: {KNOWN}; --force to register it "
         "anyway"),
        ("ns:payments", "Error: --selector ns:payments: no attestor makes selectors of type "
         f"'ns' (did you mean k8s:ns:payments?); known types: {KNOWN}; --force to register "
         "it anyway"),
        ("docker:label:x", "Error: --selector docker:label:x: no attestor makes selectors of "
         f"type 'docker'; known types: {KNOWN}; --force to register it anyway"),
    ],
)
def test_unknown_selector_type_is_refused(server: RunningServer, selector: str,
                                          first_line: str) -> None:
    td = server.trust_domain
    assert error(cli(server, *_entry_args(td, "--selector", selector))) == first_line
    assert json.loads(ok(cli(server, "entry", "show", "--spiffe-id", f"spiffe://{td}/sel",
                             "--output", "json"))) == {"entries": []}


def test_unknown_selector_type_with_force_is_a_warning(server: RunningServer,
                                                       tmp_path: Path) -> None:
    td = server.trust_domain
    proc = cli(server, *_entry_args(td, "--selector", "uid:1000", "--force", "--output",
                                    "json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == (
        "Warning: --selector uid:1000: no attestor makes selectors of type 'uid' (did you "
        f"mean unix:uid:1000?); known types: {KNOWN}")
    created = json.loads(proc.stdout)
    bad = cli(server, "entry", "update", "--id", created["id"], "--selector", "gid:0")
    assert error(bad).startswith("Error: --selector gid:0: no attestor makes selectors of "
                                 "type 'gid' (did you mean unix:gid:0?)")
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([{"spiffe_id": f"spiffe://{td}/b", "parent_id": f"spiffe://{td}/n",
                                  "selectors": ["pid:1"]}]))
    assert error(cli(server, "entry", "create", "--data", str(batch))).startswith(
        "Error: --selector pid:1: no attestor makes selectors of type 'pid'")
    ok(cli(server, "entry", "delete", "--id", created["id"]))


def test_a_join_token_secret_is_never_stored_nor_echoed(server: RunningServer,
                                                        tmp_path: Path) -> None:
    td = server.trust_domain
    token = ok(cli(server, "token", "generate")).strip()
    token_id, _, secret = token.partition(".")
    agent_path = f"spiffe://{td}/sigil/agent/join_token/{token}"
    expected = (f"Error: --parent-id contains a join token's secret (the part after the dot): "
                f"give only its ID, {token_id} (e.g. spiffe://<trust domain>/sigil/agent/"
                f"join_token/{token_id}); nothing was sent")
    for args in (["entry", "create", "--spiffe-id", f"spiffe://{td}/t", "--parent-id",
                  agent_path, "--selector", "unix:uid:1"],
                 ["entry", "update", "--id", "x", "--parent-id", agent_path]):
        proc = cli(server, *args)
        assert error(proc) == expected
        assert secret not in proc.stdout + proc.stderr
    proc = cli(server, "entry", "create", "--node", "--spiffe-id", f"spiffe://{td}/rack",
               "--selector", f"join_token:{token}")
    assert error(proc).startswith("Error: --selector contains a join token's secret")
    assert secret not in proc.stderr
    batch = tmp_path / "secret.json"
    batch.write_text(json.dumps([{"spiffe_id": f"spiffe://{td}/b", "parent_id": agent_path,
                                  "selectors": ["unix:uid:1"]}]))
    proc = cli(server, "entry", "create", "--data", str(batch))
    assert error(proc).startswith(f"Error: {batch}: entry 0: parent_id contains a join "
                                  "token's secret")
    assert secret not in proc.stderr
    listed = ok(cli(server, "entry", "show", "--output", "json"))
    assert secret not in listed and secret not in server.log


# ---- 2. bundle set of JSON without --format spiffe; SPIRE's spellings ----------------------


def test_bundle_set_of_json_suggests_format_spiffe(server: RunningServer,
                                                   tmp_path: Path) -> None:
    doc = tmp_path / "b.json"
    doc.write_text(json.dumps({"keys": [], "spiffe_sequence": 1}))
    assert error(cli(server, "bundle", "set", "--trust-domain", "b.test", "--path",
                     str(doc))) == (
        f"Error: {doc} holds a JSON document, not PEM: a SPIFFE bundle (as `bundle show "
        "--format spiffe` prints it) needs --format spiffe")
    assert json.loads(ok(cli(server, "bundle", "list", "--output", "json"))) == {"bundles": []}


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (["entry", "create", "-spiffeID", "spiffe://ops.sigil.test/w"],
         "Error: -spiffeID is SPIRE's spelling: use --spiffe-id"),
        (["entry", "show", "-parentID", "spiffe://ops.sigil.test/p"],
         "Error: -parentID is SPIRE's spelling: use --parent-id"),
        (["entry", "delete", "-entryID", "x"], "Error: -entryID is SPIRE's spelling: use --id"),
        (["entry", "create", "-x509SVIDTTL", "60"],
         "Error: -x509SVIDTTL is SPIRE's spelling: use --x509-svid-ttl"),
        (["agent", "show", "--bogus"], "Error: No such option '--bogus'."),
    ],
)
def test_spire_style_flags_get_the_sigil_spelling(server: RunningServer, args: list[str],
                                                  first_line: str) -> None:
    assert error(cli(server, *args)) == first_line


# ---- 3. --version, healthcheck's version, config check -----------------------------------


def test_version(server: RunningServer) -> None:
    from importlib.metadata import version

    proc = server.cli("--version", socket=False)
    assert (proc.returncode, proc.stdout) == (0, f"sigil-server {version('sigil')}\n")
    health = json.loads(ok(cli(server, "healthcheck", "--output", "json")))
    assert health["version"] == version("sigil") and health["serving"] is True


def test_config_check(tmp_path: Path) -> None:
    good = tmp_path / "server.toml"
    good.write_text('trust_domain = "example.org"\nx509_svid_ttl = 600\n'
                    f'data_dir = "{tmp_path / "data"}"\n')
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli_main(["config", "check", str(good)])
    assert exit_.value.code == 0, err.getvalue()
    assert out.getvalue() == (f"{good}: valid (trust domain example.org, agent API "
                              "0.0.0.0:8081, admin socket /run/sigil-server/private/admin.sock)\n")
    assert not (tmp_path / "data").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('trust_domain = "example.org"\nsocket_pth = "/run/x.sock"\n')
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli_main(["config", "check", str(bad)])
    assert exit_.value.code == 2
    assert err.getvalue().splitlines() == [f"Error: config file {bad}: unknown key 'socket_pth'"]


# ---- 3. status: one view of the trust domain -----------------------------------------------


def test_status(server: RunningServer) -> None:
    import datetime as dt
    import socket as socket_module
    from importlib.metadata import version

    td = server.trust_domain
    ok(cli(server, "localauthority", "x509", "prepare"))
    created = json.loads(ok(cli(
        server, "entry", "create", "--spiffe-id", f"spiffe://{td}/status",
        "--parent-id", f"spiffe://{td}/node/status", "--selector", "unix:uid:5",
        "--output", "json")))
    entries = json.loads(ok(cli(server, "entry", "count", "--output", "json")))["count"]
    doc = json.loads(ok(cli(server, "status", "--output", "json")))
    host = socket_module.gethostname()
    assert doc["trust_domain"] == td and doc["entries"] == entries and doc["agents"] == 0
    assert doc["server"]["hostname"] == host and doc["server"]["version"] == version("sigil")
    assert doc["server"]["instance_id"]
    x509 = doc["x509"]
    assert sorted(a["status"] for a in x509["authorities"]) == ["active", "prepared"]
    assert {a["held_by"] for a in x509["authorities"]} == {host}
    assert {a["owner_hostname"] for a in x509["authorities"]} == {host}
    [active] = [a for a in x509["authorities"] if a["status"] == "active"]
    begin = dt.datetime.fromisoformat(active["not_before"])
    end = dt.datetime.fromisoformat(active["not_after"])
    # A prepared authority exists: the next step is its activation, at 5/6 of the life.
    assert x509["next_prepare_at"] is None
    activate = dt.datetime.fromisoformat(x509["next_activate_at"])
    assert abs((activate - (begin + (end - begin) * 5 / 6)).total_seconds()) <= 1
    jwt = doc["jwt"]
    assert [a["status"] for a in jwt["authorities"]] == ["active"]
    assert jwt["next_prepare_at"] is not None and doc["federation"] == []
    text = ok(cli(server, "status")).splitlines()
    assert text[0] == f"Trust domain : {td} (bundle sequence {doc['bundle_sequence']})"
    assert text[1].startswith(f"Server       : {host} (instance ")
    assert f"Entries      : {entries}" in text and "Federation   : none" in text
    ok(cli(server, "entry", "delete", "--id", created["id"]))


def test_status_names_another_servers_keys_by_the_host_it_recorded(database_url: str) -> None:
    """HA: keys another server instance holds are shown with the host that instance
    recorded at its start (datastore_info), else with its instance id."""
    from api.protos.sigil.admin.v1 import admin_pb2
    from ca import cli as base
    from ca.cli.status import status_doc
    from ca.datastore import Datastore

    with Datastore(database_url) as store:
        store.record_server_host("instance-b", "old-name")
        store.record_server_host("instance-b", "host-b")
        store.record_server_host("instance-c", "host-c")
        assert store.server_hosts() == {"instance-b": "host-b", "instance-c": "host-c"}
    assert base.__name__ == "ca.cli"  # status_doc formats with ca.cli's helpers
    health = admin_pb2.HealthResponse(trust_domain="x.test", instance_id="instance-a",
                                      hostname="host-a")
    keys = [admin_pb2.LocalAuthority(kind="x509", authority_id=i, status=s, owner=o,
                                     owner_hostname=h, not_after=2, not_before=1)
            for i, s, o, h in [("1", "active", "instance-a", "host-a"),
                               ("2", "active", "instance-b", "host-b"),
                               ("3", "old", "instance-d", "")]]
    doc = status_doc(health, keys, [], 0, 0, [])
    assert [a["held_by"] for a in doc["x509"]["authorities"]] == [
        "host-a", "host-b", "instance instance-d"]
