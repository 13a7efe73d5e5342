"""Is a Unix socket's directory safe to serve on, or to talk through?

A Unix socket is only as trustworthy as the directories above it: whoever can
create, rename or replace an entry on the way to the socket can put their own
socket there. A user who pre-created ``/tmp/sigil-server/private`` could serve a
fake admin API (and hand root's ``token generate`` their own token); the same
trick on the agent's directory catches the JWT-SVIDs sent to ``ValidateJWTSVID``.
So the server and the agent check their socket's directory before they bind, and
their clients check it before they connect. Both sides need the same rule, and it
is I/O, so it lives here, in the package ``ca`` and ``agent`` both import.

The rule, from ``/`` down to the socket's directory, symbolic links followed:

- every directory and link is owned by a trusted user: root or the caller's
  user. A client also accepts a user root gave a directory to (its parent
  is writable by trusted users only, so a trusted user put it there, as
  systemd's ``RuntimeDirectory=`` or ``install -d -o sigil`` do); that user is
  then trusted further down.
- no directory is writable by others, or by a group other than root's or the
  caller's, unless it has the sticky bit (``/tmp``): there others cannot
  rename or remove what they do not own.
- the socket's own directory is never writable by untrusted users, sticky or
  not: anyone who may create entries there may create the socket first. A
  service also requires that directory to be its own (``owner_only``).
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field
from pathlib import Path

from identity.errors import SigilError

_MAX_LINKS = 40  # as the kernel's ELOOP limit


class UnsafeSocketDirectoryError(SigilError):
    """A socket's directory, or one above it, could be controlled by another user."""


def describe_user(uid: int) -> str:
    """``name (uid N)``, or ``uid N`` for a user without a passwd entry."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@dataclass
class _Trust:
    uids: set[int]
    gids: set[int]
    inherit: bool
    expected: str = field(default="")

    def untrusted_write(self, st: os.stat_result, *, sticky_ok: bool) -> str:
        """Who other than trusted users may write a directory ("" when nobody)."""
        if sticky_ok and st.st_mode & stat.S_ISVTX:
            return ""
        if st.st_mode & stat.S_IWOTH:
            return "others"
        if st.st_mode & stat.S_IWGRP and st.st_gid not in self.gids:
            return f"group {st.st_gid}"
        return ""


def check_socket_directory(
    socket_path: Path, *, client: bool, uid: int | None = None, gid: int | None = None
) -> None:
    """Raise unless ``socket_path``'s directory is safe by the rule above.

    Args:
        socket_path: the socket (it need not exist; its directory must).
        client: True for a process about to connect (trusts users root gave a
            directory to); False for the service about to bind (the socket's
            directory must be its own).
        uid, gid: the caller's user and group (default: the effective ones).

    Raises:
        UnsafeSocketDirectoryError: one line naming the directory and its owner
            or mode.
        FileNotFoundError: the directory (or one above it) does not exist.
    """
    me = os.geteuid() if uid is None else uid
    my_group = os.getegid() if gid is None else gid
    trust = _Trust(uids={0, me}, gids={0, my_group}, inherit=client)
    trust.expected = "root" if me == 0 else f"root or {describe_user(me)}"
    directory = Path(os.path.abspath(socket_path)).parent
    final = _walk(directory, trust, socket_path)
    st = os.stat(final)
    writers = trust.untrusted_write(st, sticky_ok=False)
    if writers:
        raise UnsafeSocketDirectoryError(
            f"refusing socket directory {final}: it is writable by {writers} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}, owner {describe_user(st.st_uid)})")
    if not client and st.st_uid != me:
        raise UnsafeSocketDirectoryError(
            f"refusing socket directory {final}: it is owned by {describe_user(st.st_uid)}, "
            f"not by this service's user {describe_user(me)}")


def _walk(directory: Path, trust: _Trust, socket_path: Path) -> Path:
    """Check every component of ``directory``; return it with links resolved.

    ``..`` climbs back to the parent as it was judged on the way down: its own
    ``parent_closed`` and the users trusted there (a user trusted below it is not
    trusted beside it). An absolute link starts again from ``/`` with the caller's
    trust alone.
    """
    initial_uids = frozenset(trust.uids)
    root = Path("/")
    root_st = os.lstat(root)
    _check_entry(root, root_st, trust, True, socket_path)  # "/" has no parent
    root_closed = not trust.untrusted_write(root_st, sticky_ok=False)
    pending = list(directory.parts[1:])
    current, parent_closed = root, root_closed
    # The directories above ``current``, each as it was before descending from it.
    above: list[tuple[Path, bool, frozenset[int]]] = []
    links = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            if above:  # "/.." is "/"
                current, parent_closed, uids = above.pop()
                trust.uids = set(uids)
            continue
        entry = current / name
        st = os.lstat(entry)
        here = (current, parent_closed, frozenset(trust.uids))
        _check_entry(entry, st, trust, parent_closed, socket_path)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise UnsafeSocketDirectoryError(
                    f"refusing socket path {socket_path}: too many symbolic links")
            target = Path(os.readlink(entry))
            if target.is_absolute():
                above.clear()
                current, parent_closed = root, root_closed
                trust.uids = set(initial_uids)
            pending[:0] = list(target.parts[1:] if target.is_absolute() else target.parts)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeSocketDirectoryError(
                f"refusing socket path {socket_path}: {entry} is not a directory")
        above.append(here)
        current = entry
        parent_closed = not trust.untrusted_write(st, sticky_ok=False)
    return current


def _check_entry(entry: Path, st: os.stat_result, trust: _Trust, parent_closed: bool,
                 socket_path: Path) -> None:
    if st.st_uid not in trust.uids:
        if not (trust.inherit and parent_closed):
            raise UnsafeSocketDirectoryError(
                f"refusing socket path {socket_path}: {entry} is owned by "
                f"{describe_user(st.st_uid)}, not by {trust.expected}")
        # Placed by a trusted user in a directory only trusted users may write:
        # its owner is who the administrator chose to run the service as.
        trust.uids.add(st.st_uid)
    if stat.S_ISDIR(st.st_mode):
        writers = trust.untrusted_write(st, sticky_ok=True)
        if writers:
            raise UnsafeSocketDirectoryError(
                f"refusing socket path {socket_path}: {entry} is writable by {writers} "
                f"(mode {stat.S_IMODE(st.st_mode):04o}) without the sticky bit")
