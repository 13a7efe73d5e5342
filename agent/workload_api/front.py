"""The peer-credential front of the Workload API (DESIGN flow 4).

grpcio does not expose a Unix peer's credentials, so the agent accepts workload
connections itself:

1. An asyncio server listens on the public socket (mode 0777: any local process
   may connect; its identity comes from the kernel, not from what it sends).
2. For each connection it reads ``SO_PEERCRED`` (pid, uid, gid) and the process's
   start time (PID-reuse defence).
3. It opens a client socket *bound to a per-connection path* inside a private
   directory (0700: only the agent's user can enter it), connects it to the
   internal grpc.aio server listening in that same directory, and records
   ``path -> credentials``.
4. It relays bytes both ways until either side closes, then forgets the path.

The servicer sees ``context.peer() == "unix:<bound path>"`` (checked with grpcio
1.85) and maps it back with :meth:`PeerCredentialFront.lookup`. A connection that
did not come through the front (only the agent's user could even reach the
internal socket) has no record and is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent import log
from agent.errors import AgentError
from attestation.workload import (
    DEFAULT_PROC_ROOT,
    WorkloadAttestationError,
    process_start_time,
)

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
_UCRED = struct.Struct("3i")
_RELAY_CHUNK = 64 * 1024
INTERNAL_SOCKET_NAME = "grpc.sock"


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end of a workload connection."""

    pid: int
    uid: int
    gid: int
    start_time: int


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
    """

    def __init__(
        self,
        public_socket: Path,
        *,
        private_dir: Path | None = None,
        proc_root: Path = DEFAULT_PROC_ROOT,
    ) -> None:
        check_socket_path(public_socket)
        self.public_socket = public_socket
        self._own_private_dir = private_dir is None
        # A short random directory under the system temp dir keeps the per-connection
        # paths well inside the 107-byte limit whatever the data dir is; mkdtemp
        # creates it 0700.
        self.private_dir = (
            Path(tempfile.mkdtemp(prefix="sigil-wl-")) if private_dir is None else private_dir
        )
        self.internal_socket = self.private_dir / INTERNAL_SOCKET_NAME
        check_socket_path(self.private_dir / "c-999999999.sock")
        self._proc_root = proc_root
        self._peers: dict[str, PeerCredentials] = {}
        self._counter = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # Lifecycle ---------------------------------------------------------------

    def prepare_private_dir(self) -> None:
        """Create the private directory 0700 (before the internal server binds in it)."""
        self.private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask and ignored for an existing dir:
        # enforce it, since this directory is what keeps other users off the
        # internal socket.
        os.chmod(self.private_dir, 0o700)

    async def start(self) -> None:
        """Listen on the public socket. The internal server must already be up."""
        self.prepare_private_dir()
        parent = self.public_socket.parent
        if not parent.exists():
            parent.mkdir(mode=0o755, parents=True)
            os.chmod(parent, 0o755)  # noqa: S103 (workloads of any user must reach the socket)
        _remove_stale_socket(self.public_socket)
        self._server = await asyncio.start_unix_server(
            self._handle, path=str(self.public_socket)
        )
        # Any local process may connect: the kernel tells us who it is.
        os.chmod(self.public_socket, 0o777)  # noqa: S103 (identity comes from the kernel)

    async def close(self) -> None:
        """Stop accepting, end every relay, remove the sockets."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.public_socket.unlink()
        if self._own_private_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)

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
        if not peer.startswith("unix:"):
            return None
        return self._peers.get(peer[len("unix:"):])

    @property
    def connection_count(self) -> int:
        """How many workload connections are being relayed."""
        return len(self._peers)

    # Connections -------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay_connection(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.event("workload connection failed", level=logging.ERROR, exc_info=True)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

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
        try:
            start_time = await asyncio.to_thread(
                process_start_time, pid, proc_root=self._proc_root
            )
        except WorkloadAttestationError as exc:
            log.event("workload refused", level=logging.WARNING, pid=pid, reason=str(exc))
            return
        creds = PeerCredentials(pid=pid, uid=uid, gid=gid, start_time=start_time)
        path = self.private_dir / f"c-{next(self._counter)}.sock"
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        key = str(path)
        try:
            upstream.setblocking(False)
            upstream.bind(key)
            # Recorded before connecting, so the record exists before grpcio can
            # see the connection's first RPC.
            self._peers[key] = creds
            await asyncio.get_running_loop().sock_connect(upstream, str(self.internal_socket))
            # The kernel keeps the bound address on the connection; the file is
            # no longer needed, and removing it now leaves nothing behind on a crash.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(key)
            up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
        except BaseException:
            self._peers.pop(key, None)
            upstream.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(key)
            raise
        try:
            pumps = [
                asyncio.create_task(_pump(reader, up_writer)),
                asyncio.create_task(_pump(up_reader, writer)),
            ]
            try:
                # Either side closing ends the relay: gRPC has nothing to say to a
                # half-open HTTP/2 connection.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._peers.pop(key, None)
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await src.read(_RELAY_CHUNK):
            dst.write(data)
            await dst.drain()


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
