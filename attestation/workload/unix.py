"""The ``unix`` workload attestor: selectors from a process's Unix identity.

Selectors (the names SPIRE's unix attestor uses, so operators can reuse entries):

- ``unix:uid:<n>``, ``unix:gid:<n>``: from the kernel's peer credentials;
- ``unix:user:<name>``, ``unix:group:<name>``: when the IDs resolve via pwd/grp;
- ``unix:supplementary_gid:<n>``, ``unix:supplementary_group:<name>``: from the
  ``Groups:`` line of ``/proc/<pid>/status``;
- ``unix:path:<exe>`` (``discover_workload_path``) and ``unix:sha256:<hex>``
  (``workload_path_sha256``): off by default because hashing reads the whole binary.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attestation.workload import (
    DEFAULT_PROC_ROOT,
    ProcessGoneError,
    ProcessInfo,
    WorkloadAttestationError,
)
from identity.selectors import Selector

NAME = "unix"

_HASH_CHUNK = 1 << 20
# /proc/<pid>/status is a few KiB (more with thousands of supplementary groups).
_STATUS_READ = 64 * 1024
_STATUS_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class UnixAttestorConfig:
    """Options of the unix attestor.

    Attributes:
        discover_workload_path: add ``unix:path`` (a readlink of /proc/<pid>/exe).
        workload_path_sha256: add ``unix:sha256`` (reads the whole binary).
    """

    discover_workload_path: bool = False
    workload_path_sha256: bool = False


class UnixAttestor:
    """Produces ``unix:*`` selectors for a process."""

    def __init__(
        self,
        config: UnixAttestorConfig | None = None,
        *,
        proc_root: Path = DEFAULT_PROC_ROOT,
    ) -> None:
        self._config = config or UnixAttestorConfig()
        self._proc_root = proc_root

    @property
    def name(self) -> str:
        """``unix``."""
        return NAME

    @property
    def uses_executable(self) -> bool:
        """True with ``unix:path`` or ``unix:sha256``: they describe the binary."""
        return self._config.discover_workload_path or self._config.workload_path_sha256

    def attest(self, process: ProcessInfo) -> list[Selector]:
        """Selectors for ``process`` (see the module docstring for the list).

        Blocking: user and group names may come from a directory service.

        Raises:
            ProcessGoneError: the process no longer exists.
            WorkloadAttestationError: /proc could not be read.
        """
        return self._attest(process, _user_name, _group_name)

    def attest_without_waiting(self, process: ProcessInfo) -> list[Selector] | None:
        """:meth:`attest` if it needs nothing that can wait, else None.

        Reading ``/proc`` never waits; names do only when not kept
        (:class:`_NameCache`), and hashing the binary always may. The agent calls
        this on its event loop and :meth:`attest` in a thread only on None.
        """
        if self._config.workload_path_sha256:
            return None
        try:
            return self._attest(process, _users.kept, _groups.kept)
        except _NotKept:
            return None

    def _attest(self, process: ProcessInfo, user_name: Callable[[int], str | None],
                group_name: Callable[[int], str | None]) -> list[Selector]:
        proc_dir = self._proc_root / str(process.pid)
        # Read first: a process that is gone fails here, before any selector.
        supplementary = self._supplementary_gids(process.pid)
        out = [
            Selector(NAME, f"uid:{process.uid}"),
            Selector(NAME, f"gid:{process.gid}"),
        ]
        user = user_name(process.uid)
        if user is not None:
            out.append(Selector(NAME, f"user:{user}"))
        group = group_name(process.gid)
        if group is not None:
            out.append(Selector(NAME, f"group:{group}"))
        for gid in supplementary:
            out.append(Selector(NAME, f"supplementary_gid:{gid}"))
            name = group_name(gid)
            if name is not None:
                out.append(Selector(NAME, f"supplementary_group:{name}"))
        if self._config.discover_workload_path or self._config.workload_path_sha256:
            exe = proc_dir / "exe"
            if self._config.discover_workload_path:
                out.append(Selector(NAME, f"path:{self._exe_path(process.pid, exe)}"))
            if self._config.workload_path_sha256:
                out.append(Selector(NAME, f"sha256:{self._exe_sha256(process.pid, exe)}"))
        # Deduplicate (a supplementary group may equal the primary one) but keep order.
        return list(dict.fromkeys(out))

    def _supplementary_gids(self, pid: int) -> list[int]:
        path = self._proc_root / str(pid) / "status"
        try:
            # Plain os calls: this runs once per Workload API call, and pathlib's
            # text layer costs more than the read itself.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                chunks: list[bytes] = []
                size = 0
                while chunk := os.read(fd, _STATUS_READ):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > _STATUS_LIMIT:
                        # Never parse a cut-off Groups line: a number cut in two
                        # is another group, one the process does not have.
                        raise WorkloadAttestationError(
                            f"/proc/{pid}/status is larger than {_STATUS_LIMIT} bytes")
                data = b"".join(chunks)
            finally:
                os.close(fd)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise ProcessGoneError(f"process {pid} is gone") from exc
        except OSError as exc:
            raise WorkloadAttestationError(f"cannot read /proc/{pid}/status: {exc}") from exc
        data = b"\n" + data  # so a first line matches too
        start = data.find(b"\nGroups:")
        if start < 0:
            return []
        end = data.find(b"\n", start + 1)
        line = data[start + len(b"\nGroups:"):end if end >= 0 else len(data)]
        try:
            return [int(g) for g in line.split()]
        except ValueError as exc:
            raise WorkloadAttestationError(
                f"/proc/{pid}/status has a malformed Groups line"
            ) from exc

    @staticmethod
    def _exe_path(pid: int, exe: Path) -> str:
        try:
            return os.readlink(exe)
        except FileNotFoundError as exc:
            raise ProcessGoneError(f"process {pid} is gone") from exc
        except OSError as exc:
            raise WorkloadAttestationError(
                f"cannot read the executable path of process {pid}: {exc}"
            ) from exc

    @staticmethod
    def _exe_sha256(pid: int, exe: Path) -> str:
        # Open through /proc/<pid>/exe rather than the path it names: that is the
        # inode the process runs, even if the file was replaced or deleted since.
        digest = hashlib.sha256()
        try:
            with exe.open("rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError as exc:
            raise ProcessGoneError(f"process {pid} is gone") from exc
        except OSError as exc:
            raise WorkloadAttestationError(
                f"cannot read the executable of process {pid}: {exc}"
            ) from exc
        return digest.hexdigest()


class _NotKept(Exception):
    """A name that is not kept: looking it up could wait."""


class _NameCache:
    """uid/gid -> name lookups, kept briefly.

    ``pwd``/``grp`` go through NSS (a read of /etc/passwd, or a directory
    service) on every call, which under a burst of Workload API connections
    costs more than the rest of the attestation. An answer is kept for
    :data:`NAME_TTL` seconds, and all of them are dropped when /etc/passwd or
    /etc/group changes (looked at no more than every :data:`FILES_CHECK_INTERVAL`
    seconds), so a local rename or removal applies within a second; one in a
    directory service within the TTL.
    """

    def __init__(self, lookup: Callable[[int], str], files: tuple[str, ...], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self._files = files
        self._clock = clock
        self._names: dict[int, tuple[float, str | None]] = {}
        self._stamp: tuple[float, ...] = ()
        self._checked_at = float("-inf")

    def _files_stamp(self) -> tuple[float, ...]:
        stamp = []
        for name in self._files:
            try:
                st = os.stat(name)
                stamp += [st.st_mtime_ns, st.st_ino, st.st_size]
            except OSError:
                stamp += [-1, -1, -1]
        return tuple(stamp)

    def _fresh(self, number: int, now: float) -> tuple[float, str | None] | None:
        if now - self._checked_at >= FILES_CHECK_INTERVAL:
            self._checked_at = now
            stamp = self._files_stamp()  # a stat of a local file: never waits
            if stamp != self._stamp:
                self._names.clear()
                self._stamp = stamp
        found = self._names.get(number)
        return found if found is not None and now - found[0] < NAME_TTL else None

    def kept(self, number: int) -> str | None:
        """The name while it is kept; raises :class:`_NotKept` rather than look it up."""
        found = self._fresh(number, self._clock())
        if found is None:
            raise _NotKept(number)
        return found[1]

    def name(self, number: int) -> str | None:
        """The name (None: no such user or group), looked up if not kept; may wait."""
        now = self._clock()
        found = self._fresh(number, now)
        if found is not None:
            return found[1]
        try:
            name: str | None = self._lookup(number)
        except KeyError:
            name = None
        if len(self._names) >= _NAME_CACHE_SIZE:
            self._names.clear()
        self._names[number] = (now, name)
        return name


NAME_TTL = 5.0
FILES_CHECK_INTERVAL = 1.0
_NAME_CACHE_SIZE = 4096
_users = _NameCache(lambda uid: pwd.getpwuid(uid).pw_name, ("/etc/passwd",))
_groups = _NameCache(lambda gid: grp.getgrgid(gid).gr_name, ("/etc/group",))


def _user_name(uid: int) -> str | None:
    return _users.name(uid)


def _group_name(gid: int) -> str | None:
    return _groups.name(gid)
