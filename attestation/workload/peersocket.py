"""Does the process that connected still run the same binary, and still hold the connection?

``unix:path`` and ``unix:sha256`` describe ``/proc/<pid>/exe`` when a call is
answered, but the process on the other end of a connection is only known at
``connect()``. A process can connect, fork a child that keeps the connection, and
exec a binary that has an identity: the child, speaking over the inherited
connection, would be attested as that binary. So the front pins, at accept:

- the executable's identity, ``(st_dev, st_ino)`` of ``/proc/<pid>/exe``
  (:func:`executable_identity`): an exec since then changes it;
- the inode of the peer's end of the connection, asked from the kernel with
  ``sock_diag`` (``UNIX_DIAG_PEER``, :func:`unix_peer_inode`): before answering, the
  process must still have a descriptor on that very socket
  (:func:`holds_socket`, a readlink of ``/proc/<pid>/fd/<n>``). An exec whose
  timing beat the front's look at the executable loses the connection (sockets
  are close-on-exec by default), and so does a process that handed its
  connection on and closed its own copy.

What remains: a process that execs the binary *before* the front looks and keeps
the socket open across the exec (cleared close-on-exec) still holds it, running
the binary; the binary then shares the connection with the child. Nothing the
kernel reports tells who, of the processes holding a socket, writes to it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from pathlib import Path

from attestation.workload import (
    DEFAULT_PROC_ROOT,
    ProcessGoneError,
    WorkloadAttestationError,
)

# linux/netlink.h, linux/sock_diag.h, linux/unix_diag.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLMSG_ERROR = 0x2
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_NLMSGHDR = struct.Struct("=IHHII")
# unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")
_UNIX_DIAG_MSG_SIZE = 16  # family, type, state, pad, ino, cookie[2]
_RTATTR = struct.Struct("=HH")
_NO_COOKIE = 0xFFFFFFFF


def executable_identity(pid: int, *, proc_root: Path = DEFAULT_PROC_ROOT
                        ) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the binary ``pid`` runs (None: not readable by us).

    Raises:
        ProcessGoneError: no such process.
    """
    try:
        st = os.stat(f"{proc_root}/{pid}/exe")
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGoneError(f"process {pid} is gone") from exc
    except OSError:
        return None  # a kernel thread, or a process we may not look into
    return st.st_dev, st.st_ino


def unix_peer_inode(sock: socket.socket) -> int:
    """The inode of the other end of a connected Unix socket, from the kernel.

    Raises:
        OSError: the kernel has no ``sock_diag`` for Unix sockets, or no peer.
    """
    inode = os.fstat(sock.fileno()).st_ino
    request = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, _UDIAG_SHOW_PEER,
                                  _NO_COOKIE, _NO_COOKIE)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(request), _SOCK_DIAG_BY_FAMILY,
                            _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       _NETLINK_SOCK_DIAG) as nl:
        nl.sendto(header + request, (0, 0))
        reply = nl.recv(8192)
    if len(reply) < _NLMSGHDR.size:
        raise OSError(errno.EPROTO, "short sock_diag reply")
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        code = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
        raise OSError(code, f"sock_diag: {os.strerror(code)}")
    offset = _NLMSGHDR.size + _UNIX_DIAG_MSG_SIZE
    end = min(length, len(reply))
    while offset + _RTATTR.size <= end:
        size, attr = _RTATTR.unpack_from(reply, offset)
        if size < _RTATTR.size:
            break
        if attr == _UNIX_DIAG_PEER and size >= _RTATTR.size + 4:
            return int(struct.unpack_from("=I", reply, offset + _RTATTR.size)[0])
        offset += (size + 3) & ~3
    raise OSError(errno.ENOTCONN, "the socket has no peer")


def holds_socket(pid: int, inode: int, *, hint: int | None = None,
                 proc_root: Path = DEFAULT_PROC_ROOT) -> int | None:
    """The descriptor number through which ``pid`` holds socket ``inode``, or None.

    Args:
        pid: the process.
        inode: the socket's inode (:func:`unix_peer_inode`).
        hint: where it was last found; one readlink when it is still there.
        proc_root: the /proc to read.

    Raises:
        ProcessGoneError: no such process.
        WorkloadAttestationError: its descriptors cannot be read.
    """
    target = f"socket:[{inode}]"
    fd_dir = f"{proc_root}/{pid}/fd"
    if hint is not None:
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{hint}") == target:
                return hint
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGoneError(f"process {pid} is gone") from exc
    except OSError as exc:
        raise WorkloadAttestationError(
            f"cannot read the descriptors of process {pid}: {exc.strerror}") from exc
    # Newest first: the connection is usually among the process's latest descriptors.
    for fd in sorted((int(n) for n in names if n.isdigit()), reverse=True):
        with contextlib.suppress(OSError):  # closed since the listing
            if os.readlink(f"{fd_dir}/{fd}") == target:
                return fd
    return None
