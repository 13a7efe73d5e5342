"""Shared fixtures for integration tests: a real ``sigil-server run`` subprocess.

``sigil_server`` starts the server in a temporary data directory on 127.0.0.1 with
a free port (``--bind-address 127.0.0.1:0``; the port is read from the
``server listening agent_api=HOST:PORT`` log line) and a temporary admin socket,
waits until ``healthcheck`` passes, and stops it with SIGTERM at the end,
asserting a clean exit (code 0).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT = 30.0


def server_command() -> list[str]:
    """How to run sigil-server: the console script next to our interpreter, else -m."""
    script = Path(sys.executable).parent / "sigil-server"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ca.cli"]


@dataclass
class RunningServer:
    """A ``sigil-server run`` subprocess and helpers to drive it."""

    trust_domain: str
    data_dir: Path
    socket_path: Path
    proc: subprocess.Popen[str] | None = None
    address: str = ""
    health_address: str = ""
    log_lines: list[str] = field(default_factory=list)
    extra_args: tuple[str, ...] = ()
    _listening: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        """The agent API's TCP port."""
        return int(self.address.rpartition(":")[2])

    @property
    def log(self) -> str:
        """Everything the server wrote to stderr so far."""
        return "".join(self.log_lines)

    def cli(self, *args: str, socket: bool = True, timeout: float = 60) -> (
        subprocess.CompletedProcess[str]
    ):
        """Run ``sigil-server <args> [--socket-path <ours>]``; never raises on failure."""
        extra = ["--socket-path", str(self.socket_path)] if socket else []
        return subprocess.run(
            [*server_command(), *args, *extra], capture_output=True, text=True,
            timeout=timeout,
        )

    def _read_stderr(self, proc: subprocess.Popen[str], listening: threading.Event) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.log_lines.append(line)
            if "health listening" in line and "health_address=" in line:
                self.health_address = line.split("health_address=", 1)[1].split()[0]
            if "server listening" in line and "agent_api=" in line:
                self.address = line.split("agent_api=", 1)[1].split()[0]
                listening.set()
        listening.set()  # the process ended: wake the waiter either way

    def start(self) -> None:
        """Start the server and wait until it is healthy."""
        # A fresh event per start: a killed predecessor's stderr can reach EOF late
        # (its children hold the pipe) and must not wake this start's waiter.
        self._listening = threading.Event()
        self.address = ""
        self.proc = subprocess.Popen(
            [*server_command(), "run", "--trust-domain", self.trust_domain,
             "--data-dir", str(self.data_dir), "--bind-address", "127.0.0.1:0",
             "--health-address", "127.0.0.1:0",
             "--socket-path", str(self.socket_path), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        threading.Thread(target=self._read_stderr, args=(self.proc, self._listening),
                         daemon=True).start()
        if not self._listening.wait(START_TIMEOUT) or not self.address:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not start:\n{self.log}")
        health = self.cli("healthcheck")
        assert health.returncode == 0, f"{health.stderr}\n{self.log}"

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"server ignored SIGTERM for 20s:\n{self.log}") from None
        return self.proc.returncode

    def restart(self) -> None:
        """Stop cleanly and start again on the same data directory."""
        assert self.stop() == 0, self.log
        self.start()


@pytest.fixture
def server_root() -> Iterator[Path]:
    """A short temporary directory (Unix socket paths are limited to ~100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="sgs-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sigil_server(server_root: Path) -> Iterator[RunningServer]:
    """A running ``sigil-server`` in a fresh data directory; stopped cleanly after.

    Attributes: ``trust_domain``, ``address`` (``127.0.0.1:PORT``), ``socket_path``,
    ``data_dir``, ``cli(*args)`` -> CompletedProcess, ``log``, ``restart()``.
    """
    srv = RunningServer(
        trust_domain="it.sigil.test",
        data_dir=server_root / "data",
        socket_path=server_root / "admin" / "admin.sock",
    )
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log}"
    assert "Traceback" not in srv.log, srv.log
