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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from api.protos import broker_pb2 as bpb
from identity.spiffeid import SpiffeId
from proxy.errors import ConfigError, WorkloadApiError
from proxy.workload import WorkloadApiWatcher, X509State

SERVICE_NAME = "spiffe.broker.API"
SECURITY_HEADER = "broker.spiffe.io"
SUBSCRIBE_X509_SVID = f"/{SERVICE_NAME}/SubscribeToX509SVID"
PID_REFERENCE_URL = "type.googleapis.com/spiffe.broker.WorkloadPIDReference"
MAX_PIDFILE_BYTES = 64
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
        WorkloadApiError: unreadable, too long, or not a positive integer.
    """
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PIDFILE_BYTES + 1)
    except OSError as exc:
        raise WorkloadApiError(f"pidfile {path}: {exc.strerror or exc}") from None
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > MAX_PIDFILE_BYTES or not text.isdigit() or int(text) <= 0:
        raise WorkloadApiError(f"pidfile {path}: not a PID ({text[:20]!r})")
    return int(text)


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
    """A ``WorkloadReference`` packing ``WorkloadPIDReference{pid}``."""
    reference = bpb.WorkloadReference()
    reference.reference.type_url = PID_REFERENCE_URL
    reference.reference.value = bpb.WorkloadPIDReference(pid=pid).SerializeToString()
    return reference


class BrokerWatcher(WorkloadApiWatcher):
    """Follows SubscribeToX509SVID for one fronted program; reconnects with backoff.

    Args:
        target: the broker endpoint as a gRPC target (``unix:/path``).
        pid: the fronted program's PID, asked before every stream (a fixed one,
            or :func:`read_pidfile`); may raise :class:`WorkloadApiError`.
        want, on_update, on_lost, backoff_initial, backoff_max: as for
            :class:`WorkloadApiWatcher`.
    """

    name = "broker api"

    def __init__(self, target: str, *, pid: Callable[[], int], want: SpiffeId | None,
                 on_update: Callable[[X509State], None], on_lost: Callable[[str], None],
                 backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        super().__init__(target, want=want, on_update=on_update, on_lost=on_lost,
                         backoff_initial=backoff_initial, backoff_max=backoff_max)
        self._pid = pid

    def _open(self, channel: grpc.aio.Channel) -> Any:
        request = bpb.SubscribeToX509SVIDRequest(reference=pid_reference(self._pid()))
        return channel.unary_stream(
            SUBSCRIBE_X509_SVID,
            request_serializer=bpb.SubscribeToX509SVIDRequest.SerializeToString,
            response_deserializer=bpb.SubscribeToX509SVIDResponse.FromString,
        )(request, metadata=((SECURITY_HEADER, "true"),))

    def _lost(self, code: grpc.StatusCode | None) -> bool:
        # NOT_FOUND: the program exited; its PID may name another program soon.
        return code in _LOST
