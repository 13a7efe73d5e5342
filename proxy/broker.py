"""The proxy as a SPIFFE broker: the fronted program's SVID from the Broker API.

In this mode (``broker_pid`` or ``broker_pidfile``) the proxy does not present an
identity of its own: it follows ``/spiffe.broker.API/SubscribeToX509SVID`` for the
program it fronts, named by a ``WorkloadPIDReference`` (SPIFFE Broker API 3.1.3),
and presents that program's X.509-SVID. The agent attests the referenced process
as if it had called the Workload API itself, and the proxy itself must be an
authorized broker (an entry whose SPIFFE ID is in the agent's
``[broker] authorized``).

Messages are the generated ``sigil.broker.v1`` ones on the standard's paths, with
the ``broker.spiffe.io: true`` header (Broker Endpoint section 3). Every response
is the full state (API 4.4), so it is handled as a FetchX509SVID message is.

The PID is read again from the pidfile before every stream: when the fronted
program restarts, its new process is found. When the program exits the stream
ends with NOT_FOUND (API 4.9) and the proxy stops presenting its SVID at once
(its PID may be reused by another program); PERMISSION_DENIED (the proxy is not
an authorized broker, or the program has no identity) does the same. Other
failures keep the SVID held until it expires, and every failure is retried with
backoff.

PID reuse must never hand the proxy another workload's identity, so the watcher
pins what it fronts. The process: once an SVID arrives for a PID, that PID's start
time (``/proc/<pid>/stat`` field 22) is pinned with it, and a later stream for the
same PID whose process started at another time is refused (the SVID dropped, no
request sent); a pidfile naming another PID is a restart, pinned again on its
first SVID. The identity: without ``want``, the SPIFFE ID of the first SVID is
pinned and an SVID for another ID is refused (a restarted program with the same
entry gets the same ID). With a fixed PID (no pidfile) NOT_FOUND, or a process
that is no longer the pinned one, is final: the PID can only name another program
from then on, so the watcher stops with :class:`BrokerStopped`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from api.protos import broker_pb2 as bpb
from identity.spiffeid import SpiffeId
from proxy.errors import ConfigError, WorkloadApiError
from proxy.log import event
from proxy.workload import WorkloadApiWatcher, X509State

SERVICE_NAME = "spiffe.broker.API"
SECURITY_HEADER = "broker.spiffe.io"
SUBSCRIBE_X509_SVID = f"/{SERVICE_NAME}/SubscribeToX509SVID"
PID_REFERENCE_URL = "type.googleapis.com/spiffe.broker.WorkloadPIDReference"
MAX_PIDFILE_BYTES = 64
MAX_PID = 2**31 - 1  # WorkloadPIDReference.pid is an int32
PROC_ROOT = Path("/proc")
_LOST = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND})


def broker_target(value: str) -> str:
    """A gRPC target from a ``SPIFFE_BROKER_SOCKET``-style ``unix:///path`` (or a path).

    Raises:
        ConfigError: ``tcp://`` (not supported by the proxy yet), another scheme,
            or a relative path.
    """
    if value.startswith("tcp://"):
        raise ConfigError(
            f"broker socket {value!r}: sigil-proxy reaches the Broker API over its Unix "
            "socket only (unix:///path/to/broker.sock)")
    if value.startswith("unix://"):
        path = value[len("unix://"):]
    elif value.startswith("unix:"):
        path = value[len("unix:"):]
    elif "://" in value:
        raise ConfigError(f"broker socket {value!r}: expected unix:///path/to/broker.sock")
    else:
        path = value
    if not path.startswith("/"):
        raise ConfigError(f"broker socket {value!r} must be an absolute path")
    return f"unix:{Path(path)}"


def read_pidfile(path: Path) -> int:
    """The PID in ``path``: one positive integer, surrounding whitespace allowed.

    Raises:
        WorkloadApiError: unreadable, too long, or not an integer in 1..2**31-1.
    """
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PIDFILE_BYTES + 1)
    except OSError as exc:
        raise WorkloadApiError(f"pidfile {path}: {exc.strerror or exc}") from None
    text = raw.decode("ascii", "replace").strip()
    if (len(raw) > MAX_PIDFILE_BYTES or not text.isascii() or not text.isdigit()
            or not 1 <= int(text) <= MAX_PID):
        raise WorkloadApiError(f"pidfile {path}: not a PID ({text[:20]!r})")
    return int(text)


def process_start_time(pid: int, proc_root: Path = PROC_ROOT) -> int | None:
    """The start time of process ``pid`` (``/proc/<pid>/stat`` field 22, in clock
    ticks since boot), or None when there is no such process.

    The fields are counted after the last ``)``: the command name before it may
    hold spaces and parentheses.

    Raises:
        WorkloadApiError: the file cannot be read (other than the process being
            gone) or is not in the expected form.
    """
    path = proc_root / str(pid) / "stat"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return None
        raise WorkloadApiError(f"{path}: {exc.strerror or exc}") from None
    _, paren, rest = raw.rpartition(b")")
    fields = rest.split()
    # Field 3 (state) is the first after the name: field 22 is index 19.
    if not paren or len(fields) < 20 or not fields[19].isdigit():
        raise WorkloadApiError(f"{path}: no start time in it")
    return int(fields[19])


@dataclass(frozen=True)
class BrokerSource:
    """Where the fronted program's SVID comes from (the CLI fills it).

    Attributes:
        target: the broker endpoint, as a gRPC target (``unix:/path``).
        pid: the fronted program's PID; or
        pidfile: a file holding it, read again before every stream.
    """

    target: str
    pid: int | None = None
    pidfile: Path | None = None

    def current_pid(self) -> int:
        """The PID to reference now.

        Raises:
            WorkloadApiError: the pidfile cannot be read or holds no PID.
        """
        if self.pidfile is not None:
            return read_pidfile(self.pidfile)
        assert self.pid is not None
        return self.pid

    def describe(self) -> str:
        return f"pidfile {self.pidfile}" if self.pidfile is not None else f"pid {self.pid}"


def pid_reference(pid: int) -> bpb.WorkloadReference:
    """A ``WorkloadReference`` packing ``WorkloadPIDReference{pid}``.

    Raises:
        WorkloadApiError: ``pid`` outside 1..2**31-1 (the field is an int32).
    """
    if not 1 <= pid <= MAX_PID:
        raise WorkloadApiError(f"pid {pid} is not a PID (1..{MAX_PID})")
    reference = bpb.WorkloadReference()
    reference.reference.type_url = PID_REFERENCE_URL
    reference.reference.value = bpb.WorkloadPIDReference(pid=pid).SerializeToString()
    return reference


class BrokerStopped(WorkloadApiError):
    """The fronted program is gone for good (a fixed PID): the watcher stops."""


class BrokerWatcher(WorkloadApiWatcher):
    """Follows SubscribeToX509SVID for one fronted program; reconnects with backoff.

    Args:
        target: the broker endpoint as a gRPC target (``unix:/path``).
        pid: the fronted program's PID, asked before every stream (a fixed one,
            or :func:`read_pidfile`); may raise :class:`WorkloadApiError`.
        fixed: the PID is fixed (``--broker-pid``): NOT_FOUND, or the PID naming
            another process than the pinned one, stops :meth:`run` with
            :class:`BrokerStopped`, as the PID can only name another program.
        proc_root: where ``/proc`` is (tests give a fake one).
        want, on_update, on_lost, backoff_initial, backoff_max: as for
            :class:`WorkloadApiWatcher`.
    """

    name = "broker api"

    def __init__(self, target: str, *, pid: Callable[[], int], want: SpiffeId | None,
                 on_update: Callable[[X509State], None], on_lost: Callable[[str], None],
                 fixed: bool = False, proc_root: Path = PROC_ROOT,
                 backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        super().__init__(target, want=want, on_update=self._checked_update,
                         on_lost=on_lost,
                         backoff_initial=backoff_initial, backoff_max=backoff_max)
        self._pid = pid
        self._fixed = fixed
        self._proc_root = proc_root
        self._deliver = on_update
        self._withdraw = on_lost
        self.pinned: tuple[int, int] | None = None
        """(PID, start time) of the process an SVID was last received for."""
        self.pinned_id: SpiffeId | None = want
        """The SPIFFE ID presented: ``want``, or that of the first SVID received."""
        self._current: tuple[int, int] | None = None
        self._stopped: str | None = None

    async def run(self) -> None:
        """Watch until cancelled; with a fixed PID, until the program is gone.

        Raises:
            BrokerStopped: a fixed PID's program exited (or is not the pinned one).
        """
        delay = self._backoff_initial
        while True:
            got_message = await self._watch_once()
            if self._stopped is not None:
                raise BrokerStopped(self._stopped)
            delay = await self._backoff(delay, got_message)

    def _open(self, channel: grpc.aio.Channel) -> Any:
        pid = self._pid()
        self._current = None
        started = process_start_time(pid, self._proc_root)
        if started is None:
            self._refuse(f"pid {pid}: no such process")
            raise WorkloadApiError(f"pid {pid}: no such process")
        if self.pinned is not None and self.pinned[0] == pid and self.pinned[1] != started:
            reason = (f"pid {pid} now names another process (started at {started}, "
                      f"not {self.pinned[1]})")
            self._refuse(reason)
            raise WorkloadApiError(reason)
        self._current = (pid, started)
        request = bpb.SubscribeToX509SVIDRequest(reference=pid_reference(pid))
        return self._subscribe(channel, request)

    def _subscribe(self, channel: grpc.aio.Channel,
                   request: bpb.SubscribeToX509SVIDRequest) -> Any:
        return channel.unary_stream(
            SUBSCRIBE_X509_SVID,
            request_serializer=bpb.SubscribeToX509SVIDRequest.SerializeToString,
            response_deserializer=bpb.SubscribeToX509SVIDResponse.FromString,
        )(request, metadata=((SECURITY_HEADER, "true"),))

    def _refuse(self, reason: str) -> None:
        """Treat the program as lost; with a fixed PID, for good."""
        self._withdraw(reason)
        if self._fixed:
            self._stopped = reason

    def _checked_update(self, state: X509State) -> None:
        current = self._current
        if current is None:
            return
        # The process may have exited and its PID been reused since the stream
        # was opened: check again before presenting what arrived.
        pid, started = current
        try:
            now = process_start_time(pid, self._proc_root)
        except WorkloadApiError as exc:
            now = None
            reason = str(exc)
        else:
            reason = f"pid {pid}: no longer the process the stream was opened for"
        if now != started:
            event(f"{self.name} update refused", level=logging.ERROR, reason=reason)
            self._current = None
            self._refuse(reason)
            return
        spiffe_id = state.svid.spiffe_id
        if self.pinned_id is not None and spiffe_id != self.pinned_id:
            reason = f"svid for {spiffe_id}, not the pinned {self.pinned_id}"
            event(f"{self.name} update refused", level=logging.ERROR, reason=reason)
            self._current = None
            self._refuse(reason)
            return
        self.pinned_id = spiffe_id
        self.pinned = current
        self._deliver(state)

    def _keep_streaming(self) -> bool:
        # A refused update ends the stream: the next one reads the pidfile again.
        return self._current is not None and self._stopped is None

    def _lost(self, code: grpc.StatusCode | None) -> bool:
        # NOT_FOUND: the program exited; its PID may name another program soon.
        if code is grpc.StatusCode.NOT_FOUND and self._fixed:
            self._stopped = f"pid {self._pid()}: the program exited (NOT_FOUND)"
        return code in _LOST
