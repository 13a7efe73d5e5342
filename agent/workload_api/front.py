"""The peer-credential front of the Workload API (DESIGN flow 4).

grpcio does not expose a Unix peer's credentials, so the agent accepts workload
connections itself:

1. An asyncio server listens on the public socket (mode 0777: any local process
   may connect; its identity comes from the kernel, not from what it sends).
2. For each connection it reads ``SO_PEERCRED`` (pid, uid, gid) and pins the
   process with a pidfd (PID-reuse defence: :mod:`attestation.workload.pidfd`).
   The kernel's own pidfd of the connecting process (``SO_PEERPIDFD``) needs
   nothing more; otherwise it also reads the process's start time. Beyond
   ``max_connections`` open connections, a new one is accepted and closed at
   once: the kernel's backlog never grows without bound and the agent keeps
   serving those it has.
3. It hands the connection and those credentials to a
   :class:`~attestation.relay.ConnectionRelay`, which relays it to the internal
   grpc.aio server through a client socket bound to a per-connection path in a
   private 0700 directory, remembering ``path -> credentials`` while it lasts.

The servicer sees ``context.peer()`` (``unix-abstract:<name>`` on Linux) and maps
it back with :meth:`PeerCredentialFront.lookup`. A connection that did not come through the
front (only the agent's user could even reach the internal socket) has no record
and is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from agent import log
from agent.errors import AgentError
from agent.memory import TrimAfterBurst
from attestation.relay import ConnectionRelay
from attestation.socketdir import check_socket_directory
from attestation.workload import (
    DEFAULT_PROC_ROOT,
    ProcessGoneError,
    WorkloadAttestationError,
    process_start_time,
)
from attestation.workload.peersocket import (
    executable_identity,
    holds_socket,
    unix_peer_inode,
)
from attestation.workload.pidfd import (
    PeerGoneError,
    close_pidfd,
    kernel_peer_pidfd,
    peer_pidfd,
    pidfd_exited,
)
from identity.errors import SigilError

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
_UCRED = struct.Struct("3i")
INTERNAL_SOCKET_NAME = "grpc.sock"
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_PREFACE_TIMEOUT = 10.0
# RFC 9113 section 3.4: every HTTP/2 client connection starts with these bytes.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Refused connections are logged at most this often (seconds), with a count, so
# a flood of them cannot flood the log too.
_REFUSAL_LOG_INTERVAL = 5.0


class PeerSocket:
    """The workload's own end of its connection, and where it last held it.

    Args:
        inode: the socket inode of the peer's end (``sock_diag``).
    """

    __slots__ = ("_fd", "inode")

    def __init__(self, inode: int) -> None:
        self.inode = inode
        self._fd: int | None = None

    def held_by(self, pid: int, *, proc_root: Path = DEFAULT_PROC_ROOT) -> bool:
        """Whether ``pid`` still has a descriptor on this socket.

        One readlink once it was found; a scan of ``/proc/<pid>/fd`` otherwise.

        Raises:
            WorkloadAttestationError: the process is gone, or its descriptors
                cannot be read.
        """
        self._fd = holds_socket(pid, self.inode, hint=self._fd, proc_root=proc_root)
        return self._fd is not None


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end of a workload connection."""

    pid: int
    uid: int
    gid: int
    start_time: int | None
    """Its start time, read when the kernel gave no exact pidfd (else None)."""
    pidfd: int | None = None
    """Pins the process while the connection lasts (None where unsupported)."""
    executable: tuple[int, int] | None = None
    """``(st_dev, st_ino)`` of the binary it ran at accept (None: not pinned, or
    not readable); only recorded with ``pin_executable``."""
    peer_socket: PeerSocket | None = field(default=None, compare=False)
    """Its end of the connection; only recorded with ``pin_executable``."""

    def process_exited(self) -> bool:
        """True when the pinned process has exited (always False without a pidfd)."""
        return self.pidfd is not None and pidfd_exited(self.pidfd)


def check_socket_path(path: Path) -> None:
    """Raise :class:`AgentError` when ``path`` is too long for a Unix socket."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise AgentError(
            f"socket path {str(path)!r} is longer than {MAX_SOCKET_PATH} bytes, the limit "
            "of a Unix socket address"
        )


def read_peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a connected Unix socket's peer, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class PeerCredentialFront:
    """Accepts workload connections, records their credentials, relays to grpcio.

    Use as an async context manager, or call :meth:`start` and :meth:`close`.

    Args:
        public_socket: where workloads connect.
        private_dir: the relay's private directory (None: a new temporary one).
        proc_root: the /proc to read start times from.
        max_connections: connections open at once; more are closed at once.
        max_connections_per_uid: connections of one uid open at once (None: as
            many as ``max_connections``); more of that uid are closed at once.
        preface_timeout: seconds a new connection may take to send the HTTP/2
            client preface before it is closed (None: no limit).
        pin_executable: record, at accept, the binary the connecting process runs
            and its end of the connection (:mod:`attestation.workload.peersocket`),
            for attestors whose selectors describe the executable.
    """

    def __init__(
        self,
        public_socket: Path,
        *,
        private_dir: Path | None = None,
        proc_root: Path = DEFAULT_PROC_ROOT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_uid: int | None = None,
        preface_timeout: float | None = DEFAULT_PREFACE_TIMEOUT,
        pin_executable: bool = False,
    ) -> None:
        check_socket_path(public_socket)
        self.pin_executable = pin_executable
        if max_connections < 1:
            raise AgentError(f"max_connections must be at least 1, not {max_connections}")
        if max_connections_per_uid is not None and max_connections_per_uid < 1:
            raise AgentError(f"max_connections_per_uid must be at least 1, not "
                             f"{max_connections_per_uid}")
        if preface_timeout is not None and preface_timeout <= 0:
            raise AgentError(f"preface_timeout must be positive, not {preface_timeout}")
        self.max_connections = max_connections
        self.max_connections_per_uid = (
            max_connections if max_connections_per_uid is None else max_connections_per_uid)
        self.preface_timeout = preface_timeout
        self._open = 0
        # Gives a burst's freed memory back to the system once it is over.
        self._memory = TrimAfterBurst()
        self._open_by_uid: dict[int, int] = {}
        self._recorded = 0
        self._refused = 0
        self._refusal_logged_at: float | None = None
        self.public_socket = public_socket
        self._relay: ConnectionRelay[PeerCredentials] = ConnectionRelay(
            internal_socket_name=INTERNAL_SOCKET_NAME, private_dir=private_dir,
            prefix="sigil-wl-",
        )
        check_socket_path(self._relay.connection_path(999_999_999))
        self._proc_root = proc_root
        self._server: asyncio.Server | None = None
        self._socket_id: tuple[int, int] | None = None

    @property
    def private_dir(self) -> Path:
        """The 0700 directory of the internal socket and the per-connection sockets."""
        return self._relay.private_dir

    @property
    def internal_socket(self) -> Path:
        """Where the internal grpc.aio server listens."""
        return self._relay.internal_socket

    # Lifecycle ---------------------------------------------------------------

    def prepare_private_dir(self) -> None:
        """Create the private directory 0700 (before the internal server binds in it)."""
        self._relay.prepare_private_dir()

    async def start(self) -> None:
        """Listen on the public socket. The internal server must already be up."""
        self.prepare_private_dir()
        claim_socket_path(self.public_socket)
        listener = bind_public_socket(self.public_socket)
        # Remembered so that close() removes this socket and never another agent's.
        self._socket_id = _socket_id(self.public_socket)
        self._server = await asyncio.start_unix_server(
            self._handle,
            sock=listener,
            # asyncio's default of 100 makes a burst of clients wait in connect();
            # the kernel caps it at net.core.somaxconn anyway.
            backlog=min(self.max_connections, 4096),
        )

    async def close(self) -> None:
        """Stop accepting, end every relay, remove the sockets."""
        if self._server is not None:
            self._server.close()
            # Relays first: from Python 3.12.1, wait_closed also waits for every
            # accepted connection to close, which the relays hold open.
            await self._relay.cancel_all()
            await self._server.wait_closed()
            self._server = None
        if self._socket_id is not None and _socket_id(self.public_socket) == self._socket_id:
            with contextlib.suppress(FileNotFoundError):
                self.public_socket.unlink()
        self._socket_id = None
        self._relay.remove_private_dir()

    async def __aenter__(self) -> PeerCredentialFront:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Lookup ------------------------------------------------------------------

    def lookup(self, peer: str) -> PeerCredentials | None:
        """Credentials of a connection to the internal server, by ``context.peer()``.

        Returns None for any peer the front did not create (unbound client
        sockets show up as ``unix:`` with an empty path).
        """
        return self._relay.lookup(peer)

    @property
    def connection_count(self) -> int:
        """How many workload connections are open with their credentials recorded
        (relayed, or waiting for the client preface)."""
        return self._recorded

    # Connections -------------------------------------------------------------

    @property
    def refused_count(self) -> int:
        """How many connections were closed at once for exceeding max_connections
        or max_connections_per_uid."""
        return self._refused

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.max_connections:
            self._refuse("max_connections reached", self.max_connections)
            writer.close()
            return
        self._open += 1
        self._memory.connections(self._open)
        try:
            with self._relay.tracked():
                await self._relay_connection(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.event("workload connection failed", level=logging.ERROR, exc_info=True)
        finally:
            self._open -= 1
            self._memory.connections(self._open)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _refuse(self, reason: str, limit: int, uid: int | None = None) -> None:
        self._refused += 1
        now = asyncio.get_running_loop().time()
        last = self._refusal_logged_at
        if last is None or now - last >= _REFUSAL_LOG_INTERVAL:
            self._refusal_logged_at = now
            if uid is None:
                log.event("workload connection refused", level=logging.WARNING,
                          reason=reason, max_connections=limit, refused_total=self._refused)
            else:
                log.event("workload connection refused", level=logging.WARNING,
                          reason=reason, uid=uid, max_connections_per_uid=limit,
                          refused_total=self._refused)

    async def _relay_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        pid, uid, gid = read_peer_credentials(sock)
        if pid <= 0:
            # A peer in another PID namespace is reported as pid 0: we cannot
            # attest it, so we do not serve it.
            log.event("workload refused", level=logging.WARNING, uid=uid, reason="pid unknown")
            return
        held = self._open_by_uid.get(uid, 0)
        if held >= self.max_connections_per_uid:
            self._refuse("max_connections_per_uid reached", self.max_connections_per_uid, uid)
            return
        self._open_by_uid[uid] = held + 1
        try:
            await self._relay_attested(reader, writer, sock, pid, uid, gid)
        finally:
            left = self._open_by_uid[uid] - 1
            if left:
                self._open_by_uid[uid] = left
            else:
                del self._open_by_uid[uid]

    async def _relay_attested(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        sock: socket.socket, pid: int, uid: int, gid: int,
    ) -> None:
        # The kernel's own pidfd names the connecting process: nothing more is
        # needed. Otherwise pin what holds the PID now, and read its start time
        # to narrow the window in which that is already another process.
        try:
            pidfd = kernel_peer_pidfd(sock)
        except PeerGoneError:
            log.event("workload refused", level=logging.WARNING, pid=pid,
                      reason="process exited before it was recorded")
            return
        start_time: int | None = None
        try:
            if pidfd is None:
                pidfd = peer_pidfd(sock, pid)
                try:
                    start_time = await asyncio.to_thread(
                        process_start_time, pid, proc_root=self._proc_root
                    )
                except WorkloadAttestationError as exc:
                    log.event("workload refused", level=logging.WARNING, pid=pid,
                              reason=str(exc))
                    return
            executable: tuple[int, int] | None = None
            peer_socket: PeerSocket | None = None
            if self.pin_executable:
                # As early as we can: an exec after this changes the identity.
                try:
                    executable = executable_identity(pid, proc_root=self._proc_root)
                    peer_socket = PeerSocket(unix_peer_inode(sock))
                except ProcessGoneError:
                    log.event("workload refused", level=logging.WARNING, pid=pid,
                              reason="process exited before it was recorded")
                    return
                except OSError as exc:
                    log.event("workload refused", level=logging.WARNING, pid=pid,
                              reason=f"cannot find the peer's socket (sock_diag): {exc}")
                    return
            creds = PeerCredentials(
                pid=pid, uid=uid, gid=gid, start_time=start_time, pidfd=pidfd,
                executable=executable, peer_socket=peer_socket,
            )
            # Alive after the read: the start time is the pinned process's own
            # (and a process that already exited is not served at all).
            if creds.process_exited():
                log.event("workload refused", level=logging.WARNING, pid=pid,
                          reason="process exited before it was recorded")
                return
            self._recorded += 1
            try:
                await self._relay.relay(reader, writer, creds, preface=HTTP2_PREFACE,
                                        preface_timeout=self.preface_timeout)
            finally:
                self._recorded -= 1
        finally:
            close_pidfd(pidfd)


def prepare_socket_dir(path: Path) -> None:
    """Create the public socket's directory 0755 if missing; refuse one that another
    user controls (:mod:`attestation.socketdir`: they could swap in their own socket).

    Raises:
        AgentError: the directory is unsafe or cannot be created.
    """
    parent = path.parent
    try:
        if not parent.exists():
            parent.mkdir(mode=0o755, parents=True)
            os.chmod(parent, 0o755)  # noqa: S103 (workloads of any user must reach the socket)
        check_socket_directory(path, client=False)
    except SigilError as exc:
        raise AgentError(f"socket_path: {exc}") from None
    except OSError as exc:
        raise AgentError(f"socket_path {str(path)!r}: cannot prepare its directory: "
                         f"{exc.strerror}") from None


def claim_socket_path(path: Path) -> None:
    """Make ``path`` ready to bind: a safe directory, and no socket anyone serves on
    (a stale one is removed). ``sigil-agent run`` calls it before attesting too, so
    a bad socket path fails before a join token is spent.

    Raises:
        AgentError: the directory is unsafe, or another process serves on ``path``.
    """
    prepare_socket_dir(path)
    _remove_stale_socket(path)


def bind_public_socket(path: Path) -> socket.socket:
    """A Unix socket bound to ``path`` (mode 0777), which must not exist.

    asyncio, given a path, unlinks any socket already there, so an agent starting
    just after another one's probe would take its path. Here the socket is bound
    to a private name and gets ``path`` by link(2), which fails if ``path`` exists.

    Raises:
        AgentError: ``path`` exists (another agent got there first) or cannot be made.
    """
    bound = path.with_name(f".{path.name}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bound)
        sock.bind(str(bound))
        # Any local process may connect: the kernel tells us who it is.
        os.chmod(bound, 0o777)  # noqa: S103 (identity comes from the kernel)
        os.link(bound, path)
    except FileExistsError:
        sock.close()
        raise AgentError(f"another process is serving on {str(path)!r}") from None
    except OSError as exc:
        sock.close()
        raise AgentError(f"cannot listen on {str(path)!r}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bound)
    return sock


def _socket_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a previous run; refuse to remove anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AgentError(f"{str(path)!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise AgentError(f"another process is serving on {str(path)!r}")
