"""sigil-agent's Workload API commands and helper mode against a real Workload API.

The Workload API (front + servicer) runs over an in-memory cache (the harness);
rotations are made by installing new SVIDs in the cache. Also: openssl s_server
and s_client doing mutual TLS with the files the helper wrote, and py-spiffe's
X509Source / JwtSource following rotations.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.helper import Helper, HelperConfig, federated_file_name
from identity.bundle import Bundle
from identity.spiffeid import TrustDomain
from identity.x509svid import X509Svid, load_certificates_pem
from tests.integration.workload_api_harness import Harness, TestCA, entry
from tests.support.require import require_module, require_program

REPO = Path(__file__).resolve().parents[2]
UID = f"unix:uid:{os.getuid()}"
WEB = "spiffe://example.org/web"


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def cli(h: Harness, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [*args, "--socket-path", str(h.socket_path)])


def wait_until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


# CLI ---------------------------------------------------------------------------------


def test_fetch_jwt_bundles_json_and_text(harness: Harness) -> None:
    harness.set_state([entry("w", WEB, UID)])
    result = cli(harness, "api", "fetch", "jwt-bundles", "--output", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc) == ["spiffe://example.org"]
    assert [k["kid"] for k in doc["spiffe://example.org"]["keys"]] == [harness.ca.jwt_kid]
    text = cli(harness, "api", "fetch", "jwt-bundles")
    assert text.stdout == f"spiffe://example.org keys=1 kid={harness.ca.jwt_kid}\n"


def test_validate_jwt_good_and_bad(harness: Harness) -> None:
    harness.set_state([entry("w", WEB, UID)])
    fetched = cli(harness, "api", "fetch", "jwt", "--audience", "db")
    assert fetched.exit_code == 0, fetched.output
    token = fetched.stdout.strip()
    ok = cli(harness, "api", "validate", "jwt", "--audience", "db", "--svid", token,
             "--output", "json")
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["spiffe_id"] == WEB
    assert doc["claims"]["aud"] == ["db"]
    assert doc["claims"]["sub"] == WEB
    text = cli(harness, "api", "validate", "jwt", "--audience", "db", "--svid", token)
    assert text.stdout.startswith(f"valid: {WEB}\n")
    for args, message in [
        (["--audience", "other", "--svid", token], "the JWT-SVID is not valid"),
        (["--audience", "db", "--svid", "not.a.jwt"], "the JWT-SVID is not valid"),
        (["--audience", "db", "--svid", token[:-4] + "AAAA"], "the JWT-SVID is not valid"),
    ]:
        bad = cli(harness, "api", "validate", "jwt", *args)
        assert bad.exit_code == 2, bad.output
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), bad.stderr


def test_watch_prints_each_update(harness: Harness, tmp_path: Path) -> None:
    """`sigil-agent api watch` prints a line as each update arrives: the first at once,
    the rotation made only after that line appeared, then it stops at --count 2."""
    first = harness.set_state([entry("w", WEB, UID)])["w"]
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from agent.cli import main; main(prog_name='sigil-agent')",
             "api", "watch", "--count", "2", "--output", "json",
             "--socket-path", str(harness.socket_path)],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def next_row(what: str, timeout: float = 20.0) -> dict:  # type: ignore[type-arg]
        try:
            return json.loads(lines.get(timeout=timeout))  # type: ignore[no-any-return]
        except queue.Empty:
            raise AssertionError(f"no {what} line from watch in {timeout} s: "
                                 f"{stderr.read_text()}") from None

    try:
        rows = [next_row("first")]
        rotated = harness.set_state([entry("w", WEB, UID)])["w"]
        rows.append(next_row("rotation"))
        assert proc.wait(timeout=20) == 0, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [r["svids"][0]["serial"] for r in rows] == [
        f"{first.leaf.serial_number:x}", f"{rotated.leaf.serial_number:x}"]
    assert [r["svids"][0]["spiffe_id"] for r in rows] == [WEB, WEB]
    reader.join(timeout=10)
    assert lines.empty(), "watch printed more than --count 2 updates"


def test_healthcheck_json(harness: Harness) -> None:
    harness.set_state([entry("w", WEB, UID)])
    result = cli(harness, "healthcheck", "--output", "json")
    assert result.exit_code == 0, result.output
    from importlib.metadata import version

    assert json.loads(result.stdout) == {"healthy": True, "socket_path": str(harness.socket_path),
                                         "version": version("sigil")}


def test_watch_without_identity_fails_with_the_reason(harness: Harness) -> None:
    harness.set_state([entry("w", WEB, "unix:uid:999999")])
    result = cli(harness, "api", "watch", "--count", "1")
    assert result.exit_code == 1
    assert "PERMISSION_DENIED" in result.stderr


# Helper mode -------------------------------------------------------------------------


def run_helper(config: HelperConfig) -> tuple[Helper, threading.Thread]:
    helper = Helper(config)
    t = threading.Thread(target=helper.run, daemon=True)
    t.start()
    return helper, t


def test_helper_writes_files_and_runs_command_on_every_update(
    harness: Harness, tmp_path: Path
) -> None:
    fed = TestCA(TrustDomain("partner.org"))
    web = entry("w", WEB, UID)
    web = type(web)(**{**{f: getattr(web, f) for f in web.__slots__},  # type: ignore[attr-defined]
                       "federates_with": (fed.td,)})
    svids = harness.set_state([web])

    def add_federated() -> None:
        harness.cache.set_bundles({TrustDomain("example.org"): harness.ca.bundle(),
                                   fed.td: fed.bundle()})

    harness.call(add_federated)
    out = tmp_path / "out"
    marker = tmp_path / "ran"
    config = HelperConfig(socket_path=harness.socket_path, dir=out,
                          cmd=f"{sys.executable} -c \"import pathlib; p = pathlib.Path("
                              f"'{marker}'); p.write_text(p.read_text() + 'x' "
                              f"if p.exists() else 'x')\"")
    helper, t = run_helper(config)
    try:
        wait_until(lambda: marker.exists() and marker.read_text() == "x")
        svid = X509Svid.parse((out / "svid.pem").read_bytes(), (out / "svid.key").read_bytes())
        assert svid.leaf.serial_number == svids["w"].leaf.serial_number
        assert stat.S_IMODE((out / "svid.key").stat().st_mode) == 0o600
        assert load_certificates_pem((out / "bundle.pem").read_bytes()) == (harness.ca.cert,)
        fed_file = out / federated_file_name(fed.td)
        assert fed_file.name == "federated_bundle_partner.org.pem"
        assert load_certificates_pem(fed_file.read_bytes()) == (fed.cert,)
        # A rotation: new files, the command runs again; no temporary files left.
        new = harness.set_state([web], bundles=False)["w"]
        wait_until(lambda: marker.read_text() == "xx")
        svid = X509Svid.parse((out / "svid.pem").read_bytes(), (out / "svid.key").read_bytes())
        assert svid.leaf.serial_number == new.leaf.serial_number
        assert sorted(p.name for p in out.iterdir()) == [
            "bundle.pem", "federated_bundle_partner.org.pem", "svid.key", "svid.pem"]
        # Federation dropped: its file goes away.
        harness.call(lambda: harness.cache.set_bundles(
            {TrustDomain("example.org"): harness.ca.bundle()}))
        wait_until(lambda: not fed_file.exists())
    finally:
        helper.stop()
        t.join(timeout=10)
    assert not t.is_alive()


def test_helper_signals_the_pid_in_the_pid_file(harness: Harness, tmp_path: Path) -> None:
    harness.set_state([entry("w", WEB, UID)])
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys, time\n"
         "n = 0\n"
         "def hup(*a):\n"
         "    global n; n += 1; print(n, flush=True)\n"
         "signal.signal(signal.SIGHUP, hup)\n"
         "print('ready', flush=True)\n"
         "while True: time.sleep(0.1)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        pid_file = tmp_path / "app.pid"
        pid_file.write_text(f"{child.pid}\n")
        helper, t = run_helper(HelperConfig(socket_path=harness.socket_path, dir=tmp_path / "o",
                                            signal=signal.SIGHUP, pid_file=pid_file))
        try:
            assert child.stdout.readline() == "1\n"
            harness.set_state([entry("w", WEB, UID)])
            assert child.stdout.readline() == "2\n"
        finally:
            helper.stop()
            t.join(timeout=10)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(("args", "message"), [
    (["--dir", "/tmp/x"], "the agent's socket is required"),
    (["--socket-path", "/s.sock"], "the output directory is required"),
    (["--socket-path", "/s.sock", "--dir", "d", "--signal", "FOO", "--pid-file", "p"],
     "signal 'FOO' is not a signal name"),
    (["--socket-path", "/s.sock", "--dir", "d", "--signal", "HUP"], "needs the PID file"),
    (["--socket-path", "/s.sock", "--dir", "d", "--pid-file", "p"], "only used with a signal"),
    (["--socket-path", "/s.sock", "--dir", "d", "--cmd", "x", "--signal", "HUP",
      "--pid-file", "p"], "not both"),
    (["--socket-path", "/s.sock", "--dir", "d", "--cmd", "'unclosed"], "cannot be split"),
    (["--socket-path", "tcp://1.2.3.4:5", "--dir", "d"], "tcp is not supported"),
    (["--config", "/nonexistent.toml"], "cannot read config file"),
    (["--socket-path", "/s.sock", "--dir", "d", "--count", "0"], "0 is not in the range"),
])
def test_helper_bad_input(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["helper", *args], env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]


@pytest.mark.parametrize(("toml", "message"), [
    ("trust_domain = 'example.org'\n", "has no [helper] table"),
    ("[helper]\nsocket_path = '/s.sock'\ndir = 'd'\nbogus = 1\n", "unknown key 'helper.bogus'"),
    ("[helper]\nsocket_path = '/s.sock'\ndir = 5\n", "helper.dir must be a string"),
    ("[helper\n", "is not valid TOML"),
])
def test_helper_config_file_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "h.toml"
    path.write_text(toml)
    result = CliRunner().invoke(main, ["helper", "--config", str(path)],
                                env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_helper_from_config_file_with_count(harness: Harness, tmp_path: Path) -> None:
    harness.set_state([entry("w", WEB, UID)])
    out = tmp_path / "files"
    path = tmp_path / "agent.toml"
    path.write_text(f"trust_domain = 'example.org'\n[helper]\nsocket_path = "
                    f"'unix://{harness.socket_path}'\ndir = '{out}'\n")
    result = CliRunner().invoke(main, ["helper", "--config", str(path), "--count", "1"],
                                env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 0, result.output
    assert (out / "svid.pem").exists() and (out / "svid.key").exists()


# openssl with the written files --------------------------------------------------------


def test_openssl_mutual_tls_with_helper_files(harness: Harness, tmp_path: Path) -> None:
    require_program("openssl")
    harness.set_state([entry("w", WEB, UID)])
    out = tmp_path / "files"
    result = CliRunner().invoke(main, ["helper", "--socket-path", str(harness.socket_path),
                                       "--dir", str(out), "--count", "1"])
    assert result.exit_code == 0, result.output
    import socket as socketlib

    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(out / "svid.pem"),
         "-key", str(out / "svid.key"), "-CAfile", str(out / "bundle.pem"),
         "-Verify", "3", "-verify_return_error", "-naccept", "1", "-www"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 10
        client = None
        while time.monotonic() < deadline:
            client = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                 "-cert", str(out / "svid.pem"), "-key", str(out / "svid.key"),
                 "-CAfile", str(out / "bundle.pem"), "-verify_return_error"],
                input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=20,
            )
            if "Connection refused" not in client.stderr + client.stdout:
                break
            time.sleep(0.1)
        assert client is not None
        assert "Verify return code: 0 (ok)" in client.stdout, client.stdout + client.stderr
        server_out, _ = server.communicate(timeout=20)
        assert server.returncode == 0, server_out
        # -Verify: s_server demanded and verified the client's SVID (chain depth 1 and 0).
        assert "depth=1 C = US, O = SPIFFE" in server_out, server_out
        assert "depth=0 \nverify return:1" in server_out, server_out
        assert "verify error" not in server_out
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# py-spiffe follows rotations ----------------------------------------------------------

spiffe = require_module("spiffe", "py-spiffe")


def test_py_spiffe_x509_and_jwt_sources_follow_rotation(harness: Harness) -> None:
    from spiffe import JwtSource, WorkloadApiClient, X509Source

    first = harness.set_state([entry("w", WEB, UID)])["w"]
    address = f"unix://{harness.socket_path}"
    client = WorkloadApiClient(address)
    contexts: list[int] = []
    done = threading.Event()

    def on_update(ctx) -> None:  # type: ignore[no-untyped-def]
        contexts.append(ctx.default_svid.leaf.serial_number)
        if len(contexts) >= 2:
            done.set()

    stream = client.stream_x509_contexts(on_success=on_update, on_error=lambda e: None)
    source = X509Source(workload_api_client=WorkloadApiClient(address))
    jwt_source = JwtSource(workload_api_client=WorkloadApiClient(address))
    try:
        wait_until(lambda: contexts == [first.leaf.serial_number])
        assert source.get_x509_context().default_svid.leaf.serial_number == first.leaf.serial_number
        new = harness.set_state([entry("w", WEB, UID)])["w"]
        assert done.wait(10), contexts
        assert contexts[1] == new.leaf.serial_number
        wait_until(lambda: source.get_x509_context().default_svid.leaf.serial_number
                   == new.leaf.serial_number)
        # A JWT bundle rotation reaches JwtSource too.
        jwt = jwt_source.fetch_svid(audience={"db"})
        assert str(jwt.spiffe_id) == WEB
        new_ca = TestCA()
        harness.call(lambda: harness.cache.set_bundles({TrustDomain("example.org"): Bundle(
            trust_domain=TrustDomain("example.org"),
            x509_authorities=(harness.ca.cert,),
            jwt_authorities=(*harness.ca.bundle().jwt_authorities,
                             *new_ca.bundle().jwt_authorities),
        )}))

        def has_new_kid() -> bool:
            b = jwt_source.get_bundle_for_trust_domain(
                spiffe.TrustDomain("example.org"))
            return b is not None and b.get_jwt_authority(new_ca.jwt_kid) is not None

        wait_until(has_new_kid)
        assert client.validate_jwt_svid(jwt.token, "db").spiffe_id == jwt.spiffe_id
    finally:
        stream.cancel()
        source.close()
        jwt_source.close()
        client.close()


# spiffe-tls (PyPI) between two workloads ------------------------------------------------


def test_spiffe_tls_mutual_tls_between_two_workloads(harness: Harness) -> None:
    spiffetls = require_module("spiffetls", "spiffe-tls")
    from spiffe import SpiffeId, WorkloadApiClient, X509Source
    from spiffetls.tlsconfig.authorize import authorize_id

    db = "spiffe://example.org/db"
    # Both workloads run as this test's user: the client uses its default
    # identity (db sorts first), the server picks web.
    harness.set_state([entry("w", WEB, UID), entry("d", db, UID)])
    address = f"unix://{harness.socket_path}"
    server_source = X509Source(
        workload_api_client=WorkloadApiClient(address),
        svid_picker=lambda svids: next(s for s in svids if str(s.spiffe_id) == WEB),
    )
    client_source = X509Source(workload_api_client=WorkloadApiClient(address))
    port = 0
    import socket as socketlib

    with socketlib.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listener = spiffetls.listen(
        f"127.0.0.1:{port}", server_source,
        spiffetls.ListenOptions(authorize_fn=authorize_id(SpiffeId(db))),
    )
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            seen.append(conn.recv(1024))
            conn.sendall(b"pong")
        finally:
            conn.shutdown()
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        conn = spiffetls.dial(f"127.0.0.1:{port}", client_source,
                              authorize_fn=authorize_id(SpiffeId(WEB)))
        try:
            conn.sendall(b"ping")
            assert conn.recv(1024) == b"pong"
        finally:
            conn.close()
        t.join(timeout=10)
        assert seen == [b"ping"]
    finally:
        listener.close()
        server_source.close()
        client_source.close()


def test_helper_reload_failure_is_a_warning_and_fails_count(harness: Harness,
                                                           tmp_path: Path) -> None:
    """Issue 14: a reload command that fails is logged at warning, and `--count 1`
    (a script waiting for the first files) exits 1 saying so."""
    harness.set_state([entry("w", WEB, UID)])

    def helper(cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from agent.cli import main; main(prog_name='sigil-agent')",
             "helper", "--count", "1", "--dir", str(tmp_path / "out"), "--cmd", cmd,
             "--socket-path", str(harness.socket_path)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})

    failed = helper("sh -c 'echo no such service >&2; exit 3'")
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert lines[-1] == ("Error: files written, but the reload failed: command 'sh' exited "
                         "with 3: no such service")
    [warning] = [line for line in lines if "helper notify failed" in line]
    assert "WARNING" in warning.upper(), warning
    assert (tmp_path / "out" / "svid.pem").exists()
    good = helper("true")
    assert good.returncode == 0, good.stderr


def test_a_denied_call_is_logged_at_debug_with_the_callers_selectors(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 14: the operator who sees PermissionDenied finds, at debug, who asked and
    which selectors it has (what an entry must name)."""
    import logging

    from agent.log import LOGGER_NAME

    harness.set_state([entry("w", WEB, "unix:uid:999999")])
    with caplog.at_level(logging.DEBUG, logger=LOGGER_NAME):
        result = cli(harness, "api", "fetch", "x509")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: FetchX509SVID failed: PERMISSION_DENIED")
    [denied] = [r for r in caplog.records if r.getMessage() == "workload denied"]
    assert denied.levelno == logging.DEBUG
    fields = denied.fields  # type: ignore[attr-defined]
    assert (fields["pid"], fields["uid"], fields["reason"]) == (os.getpid(), os.getuid(),
                                                                "no identity")
    assert f"unix:uid:{os.getuid()}" in fields["selectors"].split(",")
