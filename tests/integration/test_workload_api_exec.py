"""Connect, then exec: ``unix:path`` / ``unix:sha256`` describe the process that connected.

Reproduces issue 10, section 5: a process connects to the agent, forks a child that
keeps the connection, and then execs a binary that has an identity
(``unix:path:/usr/bin/sleep``). The child, speaking over the inherited connection,
was attested by the connecting PID, which now runs that binary, and received its
SVID. Now the agent records which executable the connecting process ran when it
was accepted and refuses the call if that changed, and refuses a call on a
connection the attested process no longer holds (the same attack when the exec
happens before the agent looked; the socket is close-on-exec).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.workload_api.client import WorkloadApiClient
from attestation.workload import ProcessGoneError
from attestation.workload.peersocket import holds_socket, unix_peer_inode
from attestation.workload.unix import UnixAttestor, UnixAttestorConfig
from tests.integration.workload_api_harness import Harness, entry

SLEEP = os.path.realpath("/bin/sleep")
PYTHON = os.path.realpath(sys.executable)
ALLOWED = "spiffe://example.org/allowed"


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def _code(fn: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()  # type: ignore[no-any-return]


# Connects to the agent; on "go" forks a child that relays a local socket to that
# connection, while the parent execs the allowed binary ("exec") or closes its
# copy of the connection and lives on ("close").
_WORKLOAD = r"""
import os, socket, sys, threading
agent, proxy, mode, allowed = sys.argv[1:5]
conn = socket.socket(socket.AF_UNIX); conn.connect(agent)
print("connected", flush=True)
assert sys.stdin.readline().strip() == "go"
if os.fork() == 0:
    lst = socket.socket(socket.AF_UNIX); lst.bind(proxy); lst.listen(1)
    print("proxy", flush=True)
    client, _ = lst.accept()
    def pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        os._exit(0)
    threading.Thread(target=pump, args=(conn, client), daemon=True).start()
    pump(client, conn)
if mode == "exec":
    os.execv(allowed, [allowed, "60"])  # the connection is close-on-exec
conn.close()
sys.stdin.readline()
"""


def _harness(*, sha256: bool = False) -> Harness:
    return Harness(attestors=[UnixAttestor(UnixAttestorConfig(
        discover_workload_path=not sha256, workload_path_sha256=sha256))])


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = _harness()
    try:
        yield h
    finally:
        h.close()


def _run(harness: Harness, mode: str, selector: str) -> grpc.StatusCode | str:
    """The workload's attack; what its child gets over the inherited connection."""
    harness.set_state([entry("e1", ALLOWED, selector)])
    proxy = harness.root / f"proxy-{mode}.sock"
    workload = subprocess.Popen(
        [sys.executable, "-c", _WORKLOAD, str(harness.socket_path), str(proxy), mode, SLEEP],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert workload.stdout is not None and workload.stdin is not None
        assert workload.stdout.readline() == "connected\n"
        # The agent has accepted it and recorded who it is.
        _wait(lambda: harness.server.front.connection_count == 1)
        workload.stdin.write("go\n")
        workload.stdin.flush()
        assert workload.stdout.readline() == "proxy\n"
        if mode == "exec":
            _wait(lambda: os.path.realpath(f"/proc/{workload.pid}/exe") == SLEEP)
        else:
            _wait(lambda: not _holds_any_socket(workload.pid))
        with WorkloadApiClient(proxy) as c:
            try:
                return str(c.fetch_x509_svid().svids[0].spiffe_id)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
    finally:
        workload.kill()
        workload.wait()


def _holds_any_socket(pid: int) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fds / n).startswith("socket:") for n in os.listdir(fds))


def _reasons(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(str(getattr(r, "fields", {}).get("reason")) for r in caplog.records
                     if r.getMessage() == "workload refused")


def test_exec_after_connect_is_refused_for_unix_path(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sigil.agent")
    assert _run(harness, "exec", f"unix:path:{SLEEP}") == grpc.StatusCode.PERMISSION_DENIED
    assert "process runs another executable than when it connected" in _reasons(caplog)


def test_exec_after_connect_is_refused_for_unix_sha256() -> None:
    digest = hashlib.sha256(Path(SLEEP).read_bytes()).hexdigest()
    h = _harness(sha256=True)
    try:
        assert _run(h, "exec", f"unix:sha256:{digest}") == grpc.StatusCode.PERMISSION_DENIED
    finally:
        h.close()


def test_a_connection_the_process_no_longer_holds_is_refused(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The exec may come before the agent looks at the executable: then the process
    no longer holds the connection (close-on-exec). Same state, without the race:
    it closed its copy, a child speaks over the one it inherited."""
    caplog.set_level(logging.WARNING, logger="sigil.agent")
    assert _run(harness, "close", f"unix:path:{PYTHON}") == grpc.StatusCode.PERMISSION_DENIED
    assert "process no longer holds its connection" in _reasons(caplog)


def test_a_process_that_keeps_its_connection_is_served(harness: Harness) -> None:
    harness.set_state([entry("e1", ALLOWED, f"unix:path:{PYTHON}")])
    with WorkloadApiClient(harness.socket_path) as c:
        assert c.fetch_x509_svid().svids[0].spiffe_id == ALLOWED
        assert c.fetch_jwt_svid(["db"]).svids[0].spiffe_id == ALLOWED


def test_peer_socket_inode_and_holder(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as lst, socket.socket(socket.AF_UNIX) as client:
        lst.bind(path)
        lst.listen(1)
        client.connect(path)
        conn, _ = lst.accept()
        with conn:
            inode = unix_peer_inode(conn)
            assert inode == os.fstat(client.fileno()).st_ino
            assert holds_socket(os.getpid(), inode) == client.fileno()
            # A hint that is wrong is corrected by a scan.
            assert holds_socket(os.getpid(), inode, hint=conn.fileno()) == client.fileno()
            fd = client.fileno()
            client.close()
            assert holds_socket(os.getpid(), inode, hint=fd) is None


def test_no_peer_and_no_process(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as lst:
        lst.bind(str(tmp_path / "l.sock"))
        lst.listen(1)
        with pytest.raises(OSError):
            unix_peer_inode(lst)  # a listening socket has no peer
    with pytest.raises(ProcessGoneError):
        holds_socket(2**22 + 12345, 1, proc_root=tmp_path)
