"""Issue 14, operator experience: sigil-agent as an operator runs it (a real
process; exit codes and the exact first line of each message)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import DEFAULT_SOCKET_PATH
from tests.support.tls import make_ca


def agent_cmd() -> list[str]:
    script = Path(sys.executable).parent / "sigil-agent"
    return [str(script)] if script.exists() else [
        sys.executable, "-c", "from agent.cli import main; main(prog_name='sigil-agent')"]


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*agent_cmd(), *args], capture_output=True, text=True, timeout=60)


def first_error(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_version() -> None:
    proc = agent("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("sigil-agent ") and proc.stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (["api", "fetch", "x509", "-socketPath", "/run/x.sock"],
         "Error: -socketPath is SPIRE's spelling: use --socket-path"),
        (["run", "-joinToken", "abc"], "Error: -joinToken is SPIRE's spelling: use --join-token"),
        (["healthcheck", "--bogus"], "Error: No such option '--bogus'."),
    ],
)
def test_spire_style_flags_get_the_sigil_spelling(args: list[str], first_line: str) -> None:
    assert first_error(agent(*args)) == first_line


def _config(tmp_path: Path, bundle: Path | None, extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    text = ('trust_domain = "example.org"\nserver_address = "sigil.example.org:8081"\n'
            f'data_dir = "{tmp_path / "data"}"\n' + extra)
    if bundle is not None:
        text += f'trust_bundle_path = "{bundle}"\n'
    path.write_text(text)
    return path


def test_config_check_valid(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    path = _config(tmp_path, ca.ca_path)
    proc = agent("config", "check", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == (
        f"{path}: valid (trust domain example.org, server sigil.example.org:8081, socket "
        f"{DEFAULT_SOCKET_PATH})")
    assert not (tmp_path / "data").exists()


def test_config_check_names_the_bad_key(tmp_path: Path) -> None:
    path = _config(tmp_path, None, 'sync_interval = "soon"\n')
    assert first_error(agent("config", "check", str(path))) == (
        "Error: sync_interval: duration 'soon' is invalid: use seconds or a number and a "
        "unit ms, s, m, h or d (for example \"600\", \"90s\", \"5m\", \"1h30m\")")
    assert first_error(agent("config", "check", str(tmp_path / "none.toml"))) == (
        f"Error: {tmp_path / 'none.toml'} does not exist")


def _bad_bundle(tmp_path: Path, kind: str) -> Path:
    bundle = tmp_path / "bundle.pem"
    if kind == "empty":
        bundle.write_text("")
    else:  # a leaf (a server or workload certificate) saved instead of the CA
        bundle.write_bytes(make_ca(tmp_path).cert_path.read_bytes())
    return bundle


@pytest.mark.parametrize(
    ("kind", "first_line"),
    [
        ("empty", "Error: trust bundle {b} is empty: fetch it again with "
                  "`sigil-server bundle show --format pem > {b}`"),
        ("leaf", "Error: trust bundle {b} holds a certificate that is not a CA (CN=127.0.0.1; "
                 "an SVID?): it must hold the server's CA certificates: fetch it again with "
                 "`sigil-server bundle show --format pem > {b}`"),
    ],
)
def test_an_unusable_trust_bundle_is_refused_at_start(tmp_path: Path, kind: str,
                                                      first_line: str) -> None:
    bundle = _bad_bundle(tmp_path, kind)
    expected = first_line.format(b=bundle)
    path = _config(tmp_path, bundle)
    assert first_error(agent("config", "check", str(path))) == expected
    run = agent("run", "--config", str(path), "--join-token", "0123456789abcdef.x",
                "--socket-path", str(tmp_path / "s" / "api.sock"))
    assert first_error(run) == expected
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", [["api", "fetch", "x509"], ["api", "fetch", "jwt",
                                     "--audience", "db"], ["api", "watch"], ["healthcheck"]])
def test_no_agent_socket_says_where_the_path_came_from(tmp_path: Path,
                                                       command: list[str]) -> None:
    import os
    import socket

    missing = tmp_path / "missing.sock"
    env_run = subprocess.run(
        [*agent_cmd(), *command], capture_output=True, text=True, timeout=60,
        env={**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{missing}"})
    assert first_error(env_run, 1) == (
        f"Error: agent is not running: {missing} does not exist (from SPIFFE_ENDPOINT_SOCKET; "
        "set SPIFFE_ENDPOINT_SOCKET or pass --socket-path to use another)")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket file nobody listens on: what a killed agent leaves
    proc = agent(*command, "--socket-path", str(stale))
    assert first_error(proc, 1) == (
        f"Error: agent is not running: nobody answers on {stale} (set SPIFFE_ENDPOINT_SOCKET "
        "or pass --socket-path to use another)")


# ---- TLS failures at start: one line naming the cause and the fix -------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(tmp_path: Path, address: str, bundle: Path) -> subprocess.CompletedProcess[str]:
    return agent("run", "--trust-domain", "it.sigil.test", "--server-address", address,
                 "--join-token", "0123456789abcdef.secretsecretsecretsecret",
                 "--trust-bundle", str(bundle), "--data-dir", str(tmp_path / "data"),
                 "--socket-path", str(tmp_path / "s" / "api.sock"))


def test_wrong_bundle_names_the_file_and_the_fix(sigil_server: object, tmp_path: Path) -> None:
    from tests.integration.conftest import RunningServer

    assert isinstance(sigil_server, RunningServer)
    other = make_ca(tmp_path / "other")
    proc = _run(tmp_path, sigil_server.address, other.ca_path)
    assert first_error(proc, 1) == (
        f"Error: the server's CA is not in {other.ca_path}: fetch it again with "
        f"`sigil-server bundle show --format pem > {other.ca_path}` (the server at "
        f"{sigil_server.address}: self-signed certificate in certificate chain)")
    assert "secretsecret" not in sigil_server.log


def test_server_down_is_one_line(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    proc = _run(tmp_path, address, make_ca(tmp_path).ca_path)
    assert first_error(proc, 1) == (
        f"Error: cannot reach the server at {address}: connection refused: is the server "
        "running, and is --server-address (server_address) its agent API's HOST:PORT?")


def test_another_tls_service_is_named(tmp_path: Path) -> None:
    """A TLS service that is not a Sigil server (its certificate is for another name)."""
    import socket
    import threading

    ca = make_ca(tmp_path)
    ctx = ca.server_context()
    listener = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{listener.getsockname()[1]}"

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with conn, ctx.wrap_socket(conn, server_side=True):
                pass
        except OSError:
            pass  # the client gave up the handshake: what this test expects

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = _run(tmp_path, address, ca.ca_path)
    finally:
        listener.close()
    assert first_error(proc, 1) == (
        f"Error: the service at {address} is not a Sigil server (its certificate is not for "
        "server.sigil.invalid): check --server-address")
