"""Workload attestors: turn a process on the agent's socket into selectors.

The agent learns a connecting process's PID, UID and GID from the kernel
(SO_PEERCRED) and hands them to each configured attestor. An attestor reads what
it needs about that process (``/proc``, the kubelet, ...) and returns selectors
whose type is its own name (``unix:uid:1000``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from identity.errors import SigilError
from identity.selectors import Selector

DEFAULT_PROC_ROOT = Path("/proc")


class WorkloadAttestationError(SigilError):
    """A process could not be attested (unreadable, malformed /proc data)."""


class ProcessGoneError(WorkloadAttestationError):
    """The process exited (or its PID now names another process)."""


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What the kernel told us about the peer of a socket.

    Attributes:
        pid: process ID in the agent's PID namespace.
        uid: effective user ID at ``connect()`` time.
        gid: effective group ID at ``connect()`` time.
    """

    pid: int
    uid: int
    gid: int


class WorkloadAttestor(Protocol):
    """One workload attestor plugin.

    An attestor may also have ``attest_without_waiting(process)``: the same
    selectors when it can answer without waiting (only ``/proc`` reads and what it
    keeps in memory; no network, no directory service, no hashing of a binary),
    else None. The agent calls that on its event loop, saving a thread hop per
    Workload API call, and ``attest`` in a thread only when it returns None.

    An attestor whose selectors describe the process's executable (``unix:path``)
    also has ``uses_executable`` true: the agent then pins, at accept, the binary
    the connecting process runs and its end of the connection, and refuses a call
    once either changed (a process that connected and then exec'd another binary,
    leaving the connection to a child: :mod:`attestation.workload.peersocket`).
    """

    @property
    def name(self) -> str:
        """The plugin name, which is also the type of every selector it returns."""
        ...

    def attest(self, process: ProcessInfo) -> list[Selector]:
        """Selectors describing ``process``.

        Blocking (reads files); the agent runs it off the event loop.

        Args:
            process: the peer's credentials as the kernel reported them.

        Returns:
            The selectors, all of type :attr:`name`.

        Raises:
            ProcessGoneError: the process no longer exists.
            WorkloadAttestationError: its details could not be read.
        """
        ...


def process_start_time(pid: int, *, proc_root: Path = DEFAULT_PROC_ROOT) -> int:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22).

    Together with the PID it names one process for the life of the machine, so
    comparing it before and after attestation detects a PID that was reused.

    Raises:
        ProcessGoneError: no such process.
        WorkloadAttestationError: the stat file is malformed.
    """
    try:
        text = (proc_root / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGoneError(f"process {pid} is gone") from exc
    except OSError as exc:
        raise WorkloadAttestationError(f"cannot read /proc/{pid}/stat: {exc}") from exc
    # Field 2 (comm) is in parentheses and may itself contain spaces and ')', so
    # split after the last ')': field 3 is then index 0 and field 22 index 19.
    _, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 20:
        raise WorkloadAttestationError(f"/proc/{pid}/stat is malformed")
    try:
        return int(fields[19])
    except ValueError as exc:
        raise WorkloadAttestationError(f"/proc/{pid}/stat has a bad start time") from exc
