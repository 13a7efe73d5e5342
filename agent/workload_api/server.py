"""The running Workload API: front (public socket) + internal grpc.aio server."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from agent.cache import Cache
from agent.config import SdsSettings
from agent.workload_api.front import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PREFACE_TIMEOUT,
    PeerCredentialFront,
)
from agent.workload_api.servicer import SyncRequest, WorkloadApiServicer
from attestation.workload import DEFAULT_PROC_ROOT, WorkloadAttestor
from identity.clock import Clock

if TYPE_CHECKING:
    from agent.workload_api.sds import SecretDiscoveryServicer

# Requests are tiny (the largest is a JWT to validate); bound them so a local
# process cannot make the agent buffer megabytes. Responses carry certificate
# chains and bundles, which stay far below 4 MiB.
MAX_REQUEST_BYTES = 64 * 1024
# With SDS on, more: Envoy's node description (sent with its requests) lists
# every extension the binary was built with, some tens of KiB. SDS bounds the
# names in a request itself (agent/workload_api/sds.py).
MAX_SDS_REQUEST_BYTES = 1024 * 1024
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 300.0


class WorkloadApiServer:
    """Serves the SPIFFE Workload API on ``socket_path``.

    Use as an async context manager, or call :meth:`start` and :meth:`stop`.
    ``max_connections``, ``max_connections_per_uid`` and ``preface_timeout`` are the
    front's (:class:`PeerCredentialFront`); a connection with no call for
    ``idle_timeout`` seconds is closed (None: never). ``sds`` (when enabled) also
    serves Envoy's SDS on the socket (:mod:`agent.workload_api.sds`).
    """

    def __init__(
        self,
        *,
        socket_path: Path,
        cache: Cache,
        attestors: Sequence[WorkloadAttestor],
        proc_root: Path = DEFAULT_PROC_ROOT,
        clock: Clock | None = None,
        private_dir: Path | None = None,
        first_response_timeout: float = 5.0,
        request_sync: SyncRequest | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_uid: int | None = None,
        preface_timeout: float | None = DEFAULT_PREFACE_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
        sds: SdsSettings | None = None,
    ) -> None:
        # Served next to the Workload API on the same socket (the agent's health).
        self._extra_handlers = tuple(extra_handlers)
        self.front = PeerCredentialFront(
            socket_path, private_dir=private_dir, proc_root=proc_root,
            max_connections=max_connections, max_connections_per_uid=max_connections_per_uid,
            preface_timeout=preface_timeout,
            # Only selectors that describe the binary need it pinned at accept.
            pin_executable=any(getattr(a, "uses_executable", False) for a in attestors),
        )
        self._idle_timeout = idle_timeout
        self.servicer = WorkloadApiServicer(
            cache=cache,
            peers=self.front.lookup,
            attestors=attestors,
            proc_root=proc_root,
            clock=clock,
            first_response_timeout=first_response_timeout,
            request_sync=request_sync,
        )
        # Envoy's SDS on the same socket, callers attested the same way (None: off).
        self.sds: SecretDiscoveryServicer | None = None
        if sds is not None and sds.enabled:
            # Imported only when served: Envoy's generated protos take a fifth of
            # a second to load, which the helper and the CLI need not pay.
            from agent.workload_api.sds import SecretDiscoveryServicer

            self.sds = SecretDiscoveryServicer(
                workload=self.servicer, cache=cache, settings=sds, clock=clock,
                first_response_timeout=first_response_timeout,
            )
        self._server: grpc.aio.Server | None = None

    @property
    def socket_path(self) -> Path:
        """The public socket workloads connect to."""
        return self.front.public_socket

    async def start(self) -> None:
        """Start the internal server, then open the public socket."""
        self.front.prepare_private_dir()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length",
                 MAX_SDS_REQUEST_BYTES if self.sds is not None else MAX_REQUEST_BYTES),
                ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
                # Request metadata is small too (the security header); grpc's
                # default allows 8 KiB, plenty, and refuses more on its own.
                ("grpc.max_metadata_size", 16 * 1024),
                # grpc counts each connection's calls itself: one with none for
                # this long gets GOAWAY and is closed (its relay and the workload's
                # connection with it), so idle connections do not hold the front's
                # connection slots. A call in progress (a watching stream) keeps
                # its connection, however quiet.
                *([("grpc.max_connection_idle_ms", max(1, int(self._idle_timeout * 1000)))]
                  if self._idle_timeout is not None else []),
            ]
        )
        handlers = [self.servicer.handler(), *self._extra_handlers]
        if self.sds is not None:
            handlers.append(self.sds.handler())
        server.add_generic_rpc_handlers(handlers)
        internal = self.front.internal_socket
        with contextlib.suppress(FileNotFoundError):
            internal.unlink()
        server.add_insecure_port(f"unix:{internal}")
        await server.start()
        # The 0700 directory is the real guard; this is belt and braces.
        os.chmod(internal, 0o600)
        self._server = server
        try:
            await self.front.start()
        except BaseException:
            await server.stop(None)
            self._server = None
            raise

    async def stop(self, grace: float | None = 1.0) -> None:
        """Close the public socket, end the relays, stop the internal server."""
        await self.front.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def __aenter__(self) -> WorkloadApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
