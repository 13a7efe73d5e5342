"""Socket directories another user controls are refused, by services and clients.

An unprivileged user who pre-creates the directory of a default socket path
under a world-writable directory (``/tmp``) can serve their own socket there:
root's ``sigil-server token generate`` then printed the attacker's token, and
``sigil-agent api validate jwt`` sent the JWT-SVID to the attacker. Here the
attacker is ``nobody`` (uid 65534) in a root-owned sticky 1777 directory, as
``/tmp`` is.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.workload_api.front import PeerCredentialFront
from attestation.socketdir import UnsafeSocketDirectoryError, check_socket_directory
from tests.integration.conftest import server_command
from tests.support.require import require_root

NOBODY = 65534


def _require_root() -> None:
    require_root("to act as another user (uid 65534, nobody)")


def agent_command() -> list[str]:
    script = Path(sys.executable).parent / "sigil-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A root-owned, sticky, world-writable directory: a private stand-in for /tmp."""
    _require_root()
    root = Path(tempfile.mkdtemp(prefix="sgo-", dir="/tmp"))
    os.chmod(root, 0o1777)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def as_nobody_mkdir(path: Path, mode: int = 0o777) -> None:
    """Create ``path`` (and missing parents) as nobody, with ``mode``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.umask(0)
            path.mkdir(mode=mode, parents=True)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert path.stat().st_uid == NOBODY


class FakeServer:
    """A socket nobody listens on; tells afterwards whether anyone connected."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._done_r, self._done_w = os.pipe()
        ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                path.parent.mkdir(mode=0o777, parents=True, exist_ok=True)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(str(path))
                os.chmod(path, 0o777)
                s.listen(8)
                os.write(ready_w, b"r")
                # Until the test is done with the client (bounded: a failed test
                # must not leave this process behind).
                select.select([self._done_r], [], [], 120)
                s.setblocking(False)
                try:
                    s.accept()
                    code = 3  # someone connected
                except BlockingIOError:
                    code = 0
            finally:
                os._exit(code)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"r"
        os.close(ready_r)

    def connected(self) -> bool:
        os.write(self._done_w, b"d")
        _, status = os.waitpid(self.pid, 0)
        assert os.WEXITSTATUS(status) in (0, 3)
        return os.WEXITSTATUS(status) == 3


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    return lines[0]


# ---- the rule itself ------------------------------------------------------------------------


def test_rule_refuses_other_owner_and_accepts_own(shared_tmp: Path) -> None:
    evil = shared_tmp / "sigil-server" / "private"
    as_nobody_mkdir(evil, 0o700)
    with pytest.raises(UnsafeSocketDirectoryError, match=r"owned by nobody \(uid 65534\)"):
        check_socket_directory(evil / "admin.sock", client=True)
    mine = shared_tmp / "mine" / "private"
    mine.mkdir(parents=True, mode=0o700)
    check_socket_directory(mine / "admin.sock", client=False)
    check_socket_directory(mine / "admin.sock", client=True)
    os.chmod(mine.parent, 0o777)  # no sticky bit: anyone could rename "private"
    with pytest.raises(UnsafeSocketDirectoryError, match="writable by others"):
        check_socket_directory(mine / "admin.sock", client=True)


def test_rule_allows_group_write_only_for_our_own_group(shared_tmp: Path) -> None:
    parent = shared_tmp / "shared"
    (parent / "private").mkdir(parents=True, mode=0o700)
    os.chmod(parent, 0o770)
    os.chown(parent, 0, NOBODY)  # group nogroup may write: its members could swap "private"
    with pytest.raises(UnsafeSocketDirectoryError, match=f"writable by group {NOBODY}"):
        check_socket_directory(parent / "private" / "admin.sock", client=True)
    os.chown(parent, 0, os.getegid())  # our own group: as trusted as we are
    check_socket_directory(parent / "private" / "admin.sock", client=True)
    os.chmod(parent, 0o755)
    os.chmod(parent / "private", 0o1777)  # the socket's own directory: sticky is not enough
    with pytest.raises(UnsafeSocketDirectoryError, match="private: it is writable by others"):
        check_socket_directory(parent / "private" / "admin.sock", client=True)


def test_rule_follows_links_and_checks_their_owner(shared_tmp: Path) -> None:
    real = shared_tmp / "real"
    real.mkdir(mode=0o700)
    link = shared_tmp / "link"
    link.symlink_to(real)
    check_socket_directory(link / "api.sock", client=True)
    # A link in a sticky directory, made by another user, is theirs to point anywhere.
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            (shared_tmp / "evil-link").symlink_to(real)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(UnsafeSocketDirectoryError, match="evil-link is owned by nobody"):
        check_socket_directory(shared_tmp / "evil-link" / "api.sock", client=True)


def test_client_trusts_a_user_root_gave_a_directory_to(shared_tmp: Path) -> None:
    root_only = shared_tmp / "run"
    root_only.mkdir(mode=0o755)
    given = root_only / "sigil-server"
    given.mkdir(mode=0o700)
    os.chown(given, NOBODY, NOBODY)  # as systemd's RuntimeDirectory= does for User=
    check_socket_directory(given / "admin.sock", client=True)
    with pytest.raises(UnsafeSocketDirectoryError,
                       match=r"sigil-server is owned by nobody \(uid 65534\), not by root"):
        check_socket_directory(given / "admin.sock", client=False)


ATTACKER = 4242


def test_dotdot_in_a_link_rejudges_the_directory_it_climbs_to(shared_tmp: Path) -> None:
    # Root's app directory holds a relative link up into the sticky shared directory,
    # where another user (uid 4242) made the directory the link names first. ".."
    # lands in shared_tmp, writable by anyone: what uid 4242 owns there is not to be
    # trusted, whether it is reached through the link or named directly.
    app = shared_tmp / "app"
    app.mkdir(mode=0o755)
    (app / "sock-dir").symlink_to("../app-sockets")
    sockets = shared_tmp / "app-sockets"
    sockets.mkdir(mode=0o755)
    os.chown(sockets, ATTACKER, ATTACKER)
    for path in (sockets / "agent.sock", app / "sock-dir" / "agent.sock",
                 app / "." / ".." / "app-sockets" / "agent.sock"):
        with pytest.raises(UnsafeSocketDirectoryError, match=r"app-sockets is owned by uid 4242"):
            check_socket_directory(path, client=True)
    # Legitimate: the same link when root made the directory it names.
    os.chown(sockets, 0, 0)
    check_socket_directory(app / "sock-dir" / "agent.sock", client=True)
    # And ".." back into a closed directory keeps trusting a user root gave a directory to.
    run = shared_tmp / "run"
    (run / "sigil").mkdir(parents=True, mode=0o755)
    os.chmod(run, 0o755)
    os.chown(run / "sigil", ATTACKER, ATTACKER)
    (app / "to-run").symlink_to("../run/x/../sigil")
    (run / "x").mkdir(mode=0o755)
    check_socket_directory(app / "to-run" / "agent.sock", client=True)


# ---- the server and its admin clients --------------------------------------------------------


def test_server_refuses_a_socket_directory_another_user_made(shared_tmp: Path,
                                                             server_root: Path) -> None:
    as_nobody_mkdir(shared_tmp / "sigil-server" / "private")
    data_dir = server_root / "data"
    proc = subprocess.run(
        [*server_command(), "run", "--trust-domain", "it.sigil.test",
         "--data-dir", str(data_dir), "--bind-address", "127.0.0.1:0",
         "--health-address", "127.0.0.1:0",
         "--socket-path", str(shared_tmp / "sigil-server" / "private" / "admin.sock")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert f"{shared_tmp}/sigil-server is owned by nobody (uid 65534)" in line, line
    assert not (data_dir / "datastore.sqlite3").exists()


def test_admin_client_refuses_a_socket_another_user_serves(shared_tmp: Path) -> None:
    fake = FakeServer(shared_tmp / "sigil-server" / "private" / "admin.sock")
    proc = subprocess.run([*server_command(), "token", "generate", "--socket-path",
                           str(fake.path)], capture_output=True, text=True, timeout=60)
    assert not fake.connected(), "the client connected to the fake admin socket"
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert f"{shared_tmp}/sigil-server is owned by nobody (uid 65534)" in line, line
    assert proc.stdout == ""


# ---- the agent and its Workload API clients --------------------------------------------------


def test_agent_front_refuses_a_socket_directory_another_user_made(shared_tmp: Path) -> None:
    as_nobody_mkdir(shared_tmp / "sigil-agent" / "public")
    front = PeerCredentialFront(shared_tmp / "sigil-agent" / "public" / "api.sock")

    async def start() -> None:
        try:
            await front.start()
        finally:
            await front.close()

    with pytest.raises(AgentError, match=r"sigil-agent is owned by nobody \(uid 65534\)"):
        asyncio.run(start())
    assert not (shared_tmp / "sigil-agent" / "public" / "api.sock").exists()


def test_agent_run_refuses_before_attesting(shared_tmp: Path, tmp_path: Path) -> None:
    as_nobody_mkdir(shared_tmp / "sigil-agent" / "public")
    data_dir = tmp_path / "agent-data"
    proc = subprocess.run(
        [*agent_command(), "run", "--trust-domain", "example.org",
         "--server-address", "127.0.0.1:1", "--join-token", "not-spent",
         "--insecure-bootstrap", "--data-dir", str(data_dir),
         "--socket-path", str(shared_tmp / "sigil-agent" / "public" / "api.sock")],
        capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert f"{shared_tmp}/sigil-agent is owned by nobody (uid 65534)" in line, line
    assert not data_dir.exists()


def test_agent_cli_refuses_a_socket_another_user_serves(shared_tmp: Path) -> None:
    fake = FakeServer(shared_tmp / "sigil-agent" / "public" / "api.sock")
    proc = subprocess.run(
        [*agent_command(), "api", "validate", "jwt", "--socket-path", str(fake.path),
         "--audience", "spiffe://example.org/db", "--svid", "eyJhbGciOiJFUzI1NiJ9.e30.sig"],
        capture_output=True, text=True, timeout=60)
    assert not fake.connected(), "the client sent the JWT-SVID to the fake agent"
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert f"{shared_tmp}/sigil-agent is owned by nobody (uid 65534)" in line, line


def test_helper_refuses_a_socket_another_user_serves(shared_tmp: Path, tmp_path: Path) -> None:
    fake = FakeServer(shared_tmp / "sigil-agent" / "public" / "api.sock")
    proc = subprocess.run(
        [*agent_command(), "helper", "--socket-path", str(fake.path),
         "--dir", str(tmp_path / "svid"), "--count", "1"],
        capture_output=True, text=True, timeout=60)
    assert not fake.connected(), "the helper asked the fake agent for SVIDs and bundles"
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert f"{shared_tmp}/sigil-agent is owned by nobody (uid 65534)" in line, line
