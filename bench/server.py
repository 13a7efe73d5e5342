"""A real ``sigil-server run`` for the benchmarks, the admin API next to it, and
a real ``sigil-agent run`` attested to it.

Benchmarks measure the server as operators run it: the console script, its own
processes, a data directory of its own. :func:`sigil_server` starts one in a
temporary directory, waits until it (and every worker) listens, and stops it;
:func:`sigil_agent` does the same for an agent that attests with a join token.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TARGET = "server.sigil.invalid"
"""The name agents verify in the server's certificate (sent as SNI)."""


@dataclass(frozen=True)
class SigilProcess:
    """A running server."""

    address: str
    """The agent API, host:port."""
    admin_socket: Path
    data_dir: Path
    pids: list[int]
    """The main process and its workers."""

    @property
    def database_url(self) -> str:
        """The SQLite datastore of the data directory (the default database_url)."""
        return f"sqlite:///{self.data_dir / 'datastore.sqlite3'}"

    def cli(self, *args: str) -> bytes:
        """``sigil-server <args> --socket-path <ours>``: its standard output."""
        return subprocess.run(
            [str(Path(sys.executable).parent / "sigil-server"), *args,
             "--socket-path", str(self.admin_socket)], capture_output=True, check=True).stdout

    def roots(self) -> bytes:
        """The trust bundle's CA certificates, PEM."""
        return self.cli("bundle", "show", "--format", "pem")

    def admin(self) -> tuple[Any, Any]:
        """A stub of the admin API on its Unix socket, and its channel (to close)."""
        import grpc

        from api.protos.sigil.admin.v1 import admin_pb2_grpc

        channel = grpc.insecure_channel(f"unix:{self.admin_socket}")
        return admin_pb2_grpc.AdminStub(channel), channel  # type: ignore[no-untyped-call]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    user, system = cpu_split(pids)
    return user + system


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU time of these processes so far; system is the kernel's
    work for them (sockets, context switches, futexes)."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime (stat field 14)
        system += int(fields[12])  # stime (stat field 15)
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


@contextlib.contextmanager
def sigil_server(*, trust_domain: str, config: str = "", workers: int = 1
                 ) -> Iterator[SigilProcess]:
    """``sigil-server run`` in a temporary directory, every worker listening.

    Args:
        trust_domain: the server's trust domain.
        config: more TOML for the config file (health and workers are set here).
        workers: ``worker_processes`` (0: one per core).
    """
    bin_dir = Path(sys.executable).parent
    root = Path(tempfile.mkdtemp(prefix="sgb-", dir="/tmp"))
    sock = root / "admin" / "admin.sock"
    cfg = root / "server.toml"
    cfg.write_text(f'worker_processes = {workers}\nhealth_address = ""\n'
                   f'log_level = "warning"\n{config}')
    server = subprocess.Popen(
        [str(bin_dir / "sigil-server"), "run", "--config", str(cfg),
         "--trust-domain", trust_domain, "--data-dir", str(root / "data"),
         "--bind-address", "127.0.0.1:0", "--socket-path", str(sock), "--log-level", "info"],
        stderr=subprocess.PIPE, text=True)
    address = ""
    listening = threading.Event()
    worker_pids: list[int] = []

    def read() -> None:
        nonlocal address
        assert server.stderr is not None
        for line in server.stderr:
            if "server listening" in line:
                address = line.split("agent_api=", 1)[1].split()[0]
                listening.set()
            if "worker listening" in line:
                worker_pids.append(int(line.split(" pid=", 1)[1].split()[0]))
            if "level=error" in line or line.startswith("error"):
                sys.stderr.write(line)
        listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not listening.wait(120) or not address:
            raise SystemExit("server did not start")
        extra = (workers or (os.cpu_count() or 1)) - 1
        deadline = time.monotonic() + 120
        while len(worker_pids) < extra:  # every worker listens before any client connects
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(worker_pids)} of {extra} workers started")
            time.sleep(0.1)
        yield SigilProcess(address, sock, root / "data", [server.pid, *worker_pids])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class SigilAgent:
    """A running agent, attested to a :class:`SigilProcess` with a join token."""

    agent_id: str
    """Its SPIFFE ID, the parent of the entries it serves."""
    socket: Path
    """The Workload API socket."""
    pid: int

    @property
    def endpoint(self) -> str:
        """The Workload API address, as py-spiffe and go-spiffe take it."""
        return f"unix://{self.socket}"


@contextlib.contextmanager
def sigil_agent(srv: SigilProcess, *, trust_domain: str, config: str = ""
                ) -> Iterator[SigilAgent]:
    """``sigil-agent run`` next to ``srv``, attested with a fresh join token.

    The agent verifies the server with the bundle's CA certificates (PEM, from
    ``bundle show``) and keeps its data in a temporary directory; this waits
    until its Workload API socket exists, and stops it (SIGTERM) on exit.

    Args:
        srv: the server to attest to.
        trust_domain: the server's trust domain.
        config: TOML for the agent's config file (e.g. ``sync_interval``).
    """
    token = json.loads(srv.cli("token", "generate", "--output", "json"))
    root = Path(tempfile.mkdtemp(prefix="sga-", dir="/tmp"))
    (root / "bundle.pem").write_bytes(srv.roots())
    (root / "agent.toml").write_text(config)
    sock = root / "ws" / "api.sock"
    sock.parent.mkdir()
    log = root / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [str(Path(sys.executable).parent / "sigil-agent"), "run",
             "--config", str(root / "agent.toml"), "--trust-domain", trust_domain,
             "--server-address", srv.address, "--data-dir", str(root / "data"),
             "--socket-path", str(sock), "--join-token", token["token"],
             "--trust-bundle", str(root / "bundle.pem")],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                sys.stderr.write(log.read_text(errors="replace"))
                raise SystemExit("agent did not start")
            time.sleep(0.05)
        yield SigilAgent(token["agent_id"], sock, agent.pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        shutil.rmtree(root, ignore_errors=True)
