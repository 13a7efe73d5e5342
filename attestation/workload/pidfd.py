"""Pin the process on the other end of a Unix socket with a pidfd.

A PID names a process only while it lives: once it exits, the kernel may hand
the same number to another process, and anything read from ``/proc/<pid>`` then
describes that other process. A pidfd refers to one process for as long as the
descriptor is open, whatever happens to its number, and becomes readable when
that process exits. So the Workload API front takes one per connection and,
before every answer, checks that it is still not readable: the process it
attested is still alive, so the PID still names it.

Where the pidfd comes from, best first:

1. ``SO_PEERPIDFD`` (Linux 6.5+): the kernel's pidfd of the process that called
   ``connect()``, with no window at all.
2. ``os.pidfd_open(pid)`` (Linux 5.3+) on the ``SO_PEERCRED`` PID: pins whatever
   holds that PID when it is called; if the connecting process already exited
   and its PID was reused before that call, this pins the newcomer. The front
   then also compares the process start time, which narrows the window to the
   time between accept and this call.
3. Neither: only the start-time comparison guards against reuse.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket

# Not in Python's socket module before 3.13; the value is the same on every
# Linux architecture (include/uapi/asm-generic/socket.h).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)

# Errors meaning "this kernel or platform has no such option": fall back.
_UNSUPPORTED = {errno.ENOPROTOOPT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _kernel_has_peer_pidfd() -> bool:
    """Whether this kernel answers SO_PEERPIDFD (asked once, on a socket pair)."""
    if not hasattr(socket, "AF_UNIX"):
        return False
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fd = a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return False
    finally:
        a.close()
        b.close()
    with contextlib.suppress(OSError):
        os.close(fd)
    return True


KERNEL_PEER_PIDFD = _kernel_has_peer_pidfd()
"""This kernel gives the pidfd of a Unix socket's peer (Linux 6.5+)."""


class PeerGoneError(OSError):
    """The kernel has the peer's pidfd to give, but not for this peer: it exited."""


def kernel_peer_pidfd(sock: socket.socket) -> int | None:
    """The kernel's pidfd of the process that connected (``SO_PEERPIDFD``).

    Exact: it names the connecting process itself, so nothing else (a start
    time) is needed to tell it from a later holder of its PID.

    Returns:
        The pidfd, or None on a kernel without SO_PEERPIDFD (before 6.5).

    Raises:
        PeerGoneError: the kernel has SO_PEERPIDFD but gave none: the connecting
            process already exited (ESRCH, or EINVAL on 6.5 to 6.15). Its PID may
            already name another process, so nothing read by PID may stand in.
    """
    if not KERNEL_PEER_PIDFD:
        return None
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        raise PeerGoneError(exc.errno, f"no pidfd for the peer: {exc.strerror}") from None
    if fd < 0:
        raise PeerGoneError(errno.ESRCH, "no pidfd for the peer")
    return int(fd)


def peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd for the peer of a connected Unix socket, or None where unsupported.

    Args:
        sock: the accepted connection.
        pid: the peer's PID from ``SO_PEERCRED`` (for the ``pidfd_open`` fallback).

    Returns:
        An open descriptor the caller must close (:func:`close_pidfd`), or None
        when neither ``SO_PEERPIDFD`` nor ``pidfd_open`` is available, or the
        process is already gone (the caller's start-time read then fails too).
    """
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            # ESRCH: the connecting process already exited.
            return None
    else:
        if fd >= 0:
            return int(fd)
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return int(pidfd_open(pid))
    except OSError:
        return None


def pidfd_exited(fd: int) -> bool:
    """True when the process the pidfd refers to has exited.

    A pidfd polls readable once its process exits (man 2 pidfd_open); a zero
    timeout makes this a cheap, non-blocking check.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def close_pidfd(fd: int | None) -> None:
    """Close a pidfd from :func:`peer_pidfd` (None is ignored)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
