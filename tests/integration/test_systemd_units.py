"""deploy/systemd: the units are hardened, run as their own user, make socket
directories that pass the socket-directory rule, and systemd-analyze verify has
nothing to say about them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import DEFAULT_SOCKET_PATH as AGENT_SOCKET
from attestation.socketdir import UnsafeSocketDirectoryError, check_socket_directory
from ca.config.defaults import DEFAULT_SOCKET_PATH as SERVER_SOCKET
from tests.support.require import require_program

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
CASES = [("sigil-server", SERVER_SOCKET), ("sigil-agent", AGENT_SOCKET)]


def settings(name: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (a key may repeat), comments left out."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / f"{name}.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize(("name", "socket"), CASES)
def test_hardened_and_unprivileged(name: str, socket: str) -> None:
    s = settings(name)
    assert s["User"] == [name] and s["Group"] == [name]
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes"), ("PrivateDevices", "yes"),
                       ("CapabilityBoundingSet", ""), ("RuntimeDirectory", name),
                       ("StateDirectory", name), ("StateDirectoryMode", "0700")]:
        assert s[key] == [value], key
    assert s["ExecStart"][0].split()[:2] == [f"/usr/local/bin/{name}", "run"]
    assert s["ExecStartPre"][0].split()[1:3] == ["config", "check"]


def mirror_check(tmp_path: Path, runtime_mode: int, socket: str) -> None:
    """The socket's chain as systemd makes it: /run (root, 0755), then the
    RuntimeDirectory (the service's user, its mode), then the subdirectory the
    service creates 0700/0755 itself; checked with the service's own rule."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    runtime = run / Path(socket).relative_to("/run").parts[0]
    runtime.mkdir()
    os.chmod(runtime, runtime_mode)
    sub = runtime / Path(socket).relative_to("/run").parts[1]
    sub.mkdir(mode=0o700)
    check_socket_directory(sub / Path(socket).name, client=False)
    check_socket_directory(sub / Path(socket).name, client=True)


@pytest.mark.parametrize(("name", "socket"), CASES)
def test_runtime_directory_passes_the_socket_directory_rule(name: str, socket: str,
                                                            tmp_path: Path) -> None:
    s = settings(name)
    assert Path(socket).parts[:3] == ("/", "run", s["RuntimeDirectory"][0])
    mirror_check(tmp_path, int(s["RuntimeDirectoryMode"][0], 8), socket)


def test_the_check_refuses_a_world_writable_runtime_directory(tmp_path: Path) -> None:
    with pytest.raises(UnsafeSocketDirectoryError, match="writable by others"):
        mirror_check(tmp_path, 0o777, SERVER_SOCKET)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_program("systemd-analyze")
    bindir = Path(sys.executable).parent
    paths = []
    for name, _ in CASES:
        script = bindir / name
        assert script.exists(), f"{name} is not installed next to {sys.executable}"
        unit = tmp_path / f"{name}.service"
        # verify checks that ExecStart's program exists: point it at the installed one.
        unit.write_text((UNITS / f"{name}.service").read_text().replace(
            f"/usr/local/bin/{name}", str(script)))
        paths.append(str(unit))
    proc = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
