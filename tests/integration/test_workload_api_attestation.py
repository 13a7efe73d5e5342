"""Attestation safety: the process the agent attested is the one it answers.

Two ways to make the PID-reuse race happen:

- for real (root only): a workload connects, hands its connection to a child,
  exits, and the test forces the kernel to give its PID to a new process
  (``/proc/sys/kernel/ns_last_pid``) before the child asks for an SVID;
- simulated at the attestor boundary: a fixture ``/proc`` whose ``stat`` file
  reports another start time for the same PID, which is what a reused PID looks
  like to an agent without a pidfd.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.workload_api.client import WorkloadApiClient
from attestation.workload.pidfd import (
    close_pidfd,
    kernel_peer_pidfd,
    peer_pidfd,
    pidfd_exited,
)
from tests.integration.workload_api_harness import Harness, entry
from tests.support.require import require

UID = os.getuid()
WEB = "spiffe://example.org/web"
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")


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


# A workload that connects, then (on "fork") hands its connection to a child that
# relays a local socket to it, and (on "exit") exits while the child lives on.
_WORKLOAD = r"""
import os, socket, sys, threading
agent, proxy = sys.argv[1], sys.argv[2]
conn = socket.socket(socket.AF_UNIX); conn.connect(agent)
print("connected", flush=True)
assert sys.stdin.readline().strip() == "fork"
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
sys.stdin.readline()
os._exit(0)
"""


def _reuse_pid(pid: int, attempts: int = 50) -> subprocess.Popen[bytes] | None:
    """Start a process that gets ``pid`` (free by now), or None if others keep taking it."""
    for _ in range(attempts):
        NS_LAST_PID.write_text(str(pid - 1))
        proc = subprocess.Popen(["sleep", "60"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def test_real_pid_reuse_is_denied(harness: Harness) -> None:
    require(os.getuid() == 0 and os.access(NS_LAST_PID, os.W_OK),
            "forcing PID reuse needs root (writes /proc/sys/kernel/ns_last_pid)")
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    proxy = harness.root / "proxy.sock"
    workload = subprocess.Popen(
        [sys.executable, "-c", _WORKLOAD, str(harness.socket_path), str(proxy)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    reused: subprocess.Popen[bytes] | None = None
    try:
        assert workload.stdout is not None and workload.stdin is not None
        assert workload.stdout.readline() == "connected\n"
        _wait(lambda: harness.server.front.connection_count == 1)
        workload.stdin.write("fork\n")
        workload.stdin.flush()
        assert workload.stdout.readline() == "proxy\n"
        with WorkloadApiClient(proxy) as c:
            # While the workload lives, its connection (through the child) is served.
            assert c.fetch_x509_svid().svids[0].spiffe_id == WEB
            workload.stdin.write("exit\n")
            workload.stdin.flush()
            workload.wait(timeout=10)
            reused = _reuse_pid(workload.pid)
            if reused is None:
                pytest.skip("other processes kept taking the PID")
            # The PID now names a live process with the same uid (so the same
            # selectors): attesting it would hand its identity to the child.
            assert _code(c.fetch_x509_svid) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: c.fetch_jwt_svid(["db"])) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        for proc in (workload, reused):
            if proc is not None:
                proc.kill()
                proc.wait()


def _reasons(caplog: pytest.LogCaptureFixture, event: str) -> str:
    """The ``reason`` fields of the logged ``event``s, one a line."""
    return "\n".join(
        str(getattr(r, "fields", {}).get("reason"))
        for r in caplog.records
        if r.getMessage() == event
    )


def _fake_proc(root: Path, pid: int, *, start_time: int) -> None:
    """A /proc entry for ``pid``: what the unix attestor and the front read."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(f"{pid} (py thon) S 1 " + " ".join(["0"] * 17) + f" {start_time} 0\n")
    (d / "status").write_text(f"Name:\tpython\nGroups:\t{os.getgid()}\n")


@pytest.fixture
def fake_proc(tmp_path: Path) -> Iterator[tuple[Harness, Path]]:
    root = tmp_path / "proc"
    _fake_proc(root, os.getpid(), start_time=1000)
    h = Harness(proc_root=root)
    try:
        yield h, root / str(os.getpid())
    finally:
        h.close()


def test_simulated_pid_reuse_between_calls_is_denied(
    fake_proc: tuple[Harness, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Faithful simulation at the attestor boundary: same PID, another start time.

    Runs as on a kernel without pidfds (a pidfd of our own live process could not
    show an exit anyway), so this checks the start-time comparison.
    """
    monkeypatch.setattr("agent.workload_api.front.kernel_peer_pidfd", lambda sock: None)
    monkeypatch.setattr("agent.workload_api.front.peer_pidfd", lambda sock, pid: None)
    harness, proc_dir = fake_proc
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with WorkloadApiClient(harness.socket_path) as c:
        assert c.fetch_x509_svid().svids[0].spiffe_id == WEB
        _fake_proc(proc_dir.parent, os.getpid(), start_time=2000)
        assert _code(c.fetch_x509_svid) == grpc.StatusCode.PERMISSION_DENIED
    # A new connection records the new process and is served again (once grpc has
    # really closed the old one: its channels share connections to one target).
    _wait(lambda: harness.server.front.connection_count == 0)
    with WorkloadApiClient(harness.socket_path) as c:
        assert c.fetch_x509_svid().svids[0].spiffe_id == WEB


def test_process_gone_during_attestation_is_denied_and_logged(
    fake_proc: tuple[Harness, Path], caplog: pytest.LogCaptureFixture
) -> None:
    harness, proc_dir = fake_proc
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    caplog.set_level(logging.WARNING, logger="sigil.agent")
    with WorkloadApiClient(harness.socket_path) as c:
        c.fetch_x509_svid()  # the connection is recorded and served
        shutil.rmtree(proc_dir)
        assert _code(c.fetch_x509_svid) == grpc.StatusCode.PERMISSION_DENIED
    assert f"process {os.getpid()} is gone" in _reasons(caplog, "workload attestation failed")


def test_unreadable_proc_is_denied_and_logged(
    fake_proc: tuple[Harness, Path], caplog: pytest.LogCaptureFixture
) -> None:
    harness, proc_dir = fake_proc
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    caplog.set_level(logging.WARNING, logger="sigil.agent")
    # Root reads any file whatever its mode; a directory in its place is unreadable to all.
    (proc_dir / "status").unlink()
    (proc_dir / "status").mkdir()
    with WorkloadApiClient(harness.socket_path) as c:
        assert _code(c.fetch_x509_svid) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: c.fetch_jwt_svid(["db"])) == grpc.StatusCode.PERMISSION_DENIED
    reason = _reasons(caplog, "workload attestation failed")
    assert f"cannot read /proc/{os.getpid()}/status" in reason, reason


def test_connection_of_a_process_gone_before_it_was_recorded_is_closed(
    fake_proc: tuple[Harness, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the kernel's exact pidfd the front reads the start time: none, no relay.

    (With it, the pidfd itself says whether the process exited: see
    test_peer_pidfd_follows_the_connecting_process.)
    """
    monkeypatch.setattr("agent.workload_api.front.kernel_peer_pidfd", lambda sock: None)
    harness, proc_dir = fake_proc
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    shutil.rmtree(proc_dir)
    with WorkloadApiClient(harness.socket_path, timeout=5) as c:
        assert _code(c.fetch_x509_svid) == grpc.StatusCode.UNAVAILABLE
    assert harness.server.front.connection_count == 0


def test_with_the_kernels_pidfd_no_start_time_is_read(
    fake_proc: tuple[Harness, Path],
) -> None:
    """SO_PEERPIDFD names the connecting process itself: the start time adds nothing."""
    harness, proc_dir = fake_proc
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as a, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as b:
        path = str(proc_dir.parent / "probe.sock")
        a.bind(path)
        a.listen(1)
        b.connect(path)
        conn, _ = a.accept()
        with conn:
            fd = kernel_peer_pidfd(conn)
        if fd is None:
            pytest.skip("this kernel has no SO_PEERPIDFD")
        close_pidfd(fd)
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    (proc_dir / "stat").unlink()  # what the start time is read from
    with WorkloadApiClient(harness.socket_path) as c:
        assert c.fetch_x509_svid().svids[0].spiffe_id == WEB


def test_kernel_pidfd_refused_means_the_peer_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel has SO_PEERPIDFD, failing to give one is an exited peer."""
    import errno

    from attestation.workload import pidfd as pidfd_module

    class Refusing:
        def getsockopt(self, *_args: object) -> int:
            raise OSError(errno.ESRCH, "No such process")

    monkeypatch.setattr(pidfd_module, "KERNEL_PEER_PIDFD", True)
    with pytest.raises(pidfd_module.PeerGoneError):
        pidfd_module.kernel_peer_pidfd(Refusing())  # type: ignore[arg-type]
    monkeypatch.setattr(pidfd_module, "KERNEL_PEER_PIDFD", False)
    assert pidfd_module.kernel_peer_pidfd(Refusing()) is None  # type: ignore[arg-type]


def test_a_connection_whose_peer_is_gone_is_closed_unserved(
    fake_proc: tuple[Harness, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fallback to what the PID names now: the connection is closed, never relayed."""
    from attestation.workload.pidfd import PeerGoneError

    def gone(_sock: object) -> int:
        raise PeerGoneError(3, "no pidfd for the peer")

    monkeypatch.setattr("agent.workload_api.front.kernel_peer_pidfd", gone)
    harness, _ = fake_proc
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    with WorkloadApiClient(harness.socket_path, timeout=5) as c:
        assert _code(c.fetch_x509_svid) == grpc.StatusCode.UNAVAILABLE
    assert harness.server.front.connection_count == 0


def test_peer_pidfd_follows_the_connecting_process(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as lst:
        lst.bind(path)
        lst.listen(1)
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
             "sys.stdin.readline()", path],
            stdin=subprocess.PIPE,
        )
        conn, _ = lst.accept()
        with conn:
            fd = peer_pidfd(conn, child.pid)
            if fd is None:
                pytest.skip("this kernel has neither SO_PEERPIDFD nor pidfd_open")
            exact = kernel_peer_pidfd(conn)  # None before Linux 6.5
            try:
                for pinned in (fd, exact):
                    assert pinned is None or not pidfd_exited(pinned)
                assert child.stdin is not None
                child.stdin.close()
                child.wait(timeout=10)
                for pinned in (fd, exact):
                    assert pinned is None or pidfd_exited(pinned)
            finally:
                close_pidfd(fd)
                close_pidfd(exact)
