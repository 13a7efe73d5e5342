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
