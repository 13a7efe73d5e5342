"""A small asyncio Workload API client: follows FetchX509SVID like any workload.

It calls the bare ``/SpiffeWorkloadAPI/FetchX509SVID`` path with the
``workload.spiffe.io: true`` header and our ``sigil.workload.v1`` messages
(DESIGN.md, "The Workload API on the wire"), so it works against any SPIFFE
Workload API server. Each message is the complete state (Workload API §6.5): it
becomes one :class:`X509State`, handed to a callback. When the stream breaks the
last state is kept (its SVID is still usable until it expires) and the client
reconnects with a jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from api.protos import broker_pb2 as bpb
from api.protos import workload_pb2 as pb
from identity.bundle import Bundle, BundleSet
from identity.errors import SigilError
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid
from proxy.errors import ConfigError, WorkloadApiError
from proxy.log import event

SERVICE_NAME = "SpiffeWorkloadAPI"
SECURITY_HEADER = "workload.spiffe.io"
FETCH_X509_SVID = f"/{SERVICE_NAME}/FetchX509SVID"
# An X509SVIDResponse is a few kilobytes per SVID; a generous bound for many
# SVIDs and federated bundles, still refusing the absurd.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class X509State:
    """What the proxy works with: its SVID and the bundles it trusts.

    Attributes:
        svid: the SVID it presents (with its key).
        bundles: its own trust domain's bundle plus every federated one.
    """

    svid: X509Svid
    bundles: BundleSet


def socket_target(value: str) -> str:
    """A gRPC target from ``unix:///path``, ``unix:/path`` or a bare path.

    Raises:
        ConfigError: another scheme, or a relative path.
    """
    if value.startswith("unix://"):
        path = value[len("unix://"):]
    elif value.startswith("unix:"):
        path = value[len("unix:"):]
    elif "://" in value:
        raise ConfigError(
            f"socket path {value!r}: only Unix sockets are supported "
            "(unix:///path/to/api.sock or /path/to/api.sock)"
        )
    else:
        path = value
    if not path.startswith("/"):
        raise ConfigError(f"socket path {value!r} must be absolute")
    return f"unix:{Path(path)}"


def parse_response(response: pb.X509SVIDResponse | bpb.SubscribeToX509SVIDResponse,
                   want: SpiffeId | None) -> X509State:
    """Turn one FetchX509SVID message (or the Broker API's SubscribeToX509SVID
    message, whose fields are named alike) into an :class:`X509State`.

    Args:
        response: the message.
        want: the SVID to use; None for the first (the default identity).

    Raises:
        WorkloadApiError: no SVIDs, not the wanted one, a bad SVID or bundle.
    """
    if not response.svids:
        raise WorkloadApiError("no SVIDs in the response")
    chosen = None
    for item in response.svids:
        if want is None or item.spiffe_id == str(want):
            chosen = item
            break
    if chosen is None:
        offered = ", ".join(item.spiffe_id for item in response.svids)
        raise WorkloadApiError(f"no SVID for {want} among those offered ({offered})")
    try:
        svid = X509Svid.parse_raw(chosen.x509_svid, chosen.x509_svid_key)
        own = svid.spiffe_id.trust_domain
        bundles = [Bundle.from_x509_der(own, chosen.bundle)]
        for key, der in response.federated_bundles.items():
            td = TrustDomain.parse(key)
            if td != own:
                bundles.append(Bundle.from_x509_der(td, der))
        return X509State(svid, BundleSet(bundles))
    except SigilError as exc:
        raise WorkloadApiError(str(exc)) from None


class WorkloadApiWatcher:
    """Follows FetchX509SVID for as long as it runs; reconnects with backoff.

    Args:
        target: a gRPC target (``unix:/path``), see :func:`socket_target`.
        want: the SPIFFE ID to use, or None for the default (first) SVID.
        on_update: called with each new state.
        on_lost: called when the server says the caller has no identity any more
            (PermissionDenied): its SVIDs must no longer be used.
        backoff_initial: first retry delay in seconds.
        backoff_max: the longest retry delay.
    """

    def __init__(self, target: str, *, want: SpiffeId | None,
                 on_update: Callable[[X509State], None], on_lost: Callable[[str], None],
                 backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        self._target = target
        self._want = want
        self._on_update = on_update
        self._on_lost = on_lost
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

    async def run(self) -> None:
        """Watch until cancelled."""
        delay = self._backoff_initial
        while True:
            got_message = await self._watch_once()
            delay = await self._backoff(delay, got_message)

    async def _backoff(self, delay: float, got_message: bool) -> float:
        """Wait before the next stream; the delay after that."""
        if got_message:
            delay = self._backoff_initial
        # Jitter (50-100 %) so proxies restarted together do not retry in step.
        wait = delay * (0.5 + random.random() / 2)  # noqa: S311 - not a secret
        event(f"{self.name} retry scheduled", level=logging.INFO,
              delay=f"{wait:.1f}s")
        await asyncio.sleep(wait)
        return min(delay * 2, self._backoff_max)

    name = "workload api"
    """How log lines name the API watched."""

    def _open(self, channel: grpc.aio.Channel) -> Any:
        """Start the stream (a call to iterate over).

        Raises:
            WorkloadApiError: it cannot be started (logged, then retried).
        """
        return channel.unary_stream(
            FETCH_X509_SVID,
            request_serializer=pb.X509SVIDRequest.SerializeToString,
            response_deserializer=pb.X509SVIDResponse.FromString,
        )(pb.X509SVIDRequest(), metadata=((SECURITY_HEADER, "true"),))

    def _keep_streaming(self) -> bool:
        """Whether to go on with the stream after an update was handled."""
        return True

    def _lost(self, code: grpc.StatusCode | None) -> bool:
        """Whether a stream ending with ``code`` withdraws the identity held."""
        return code is grpc.StatusCode.PERMISSION_DENIED

    async def _watch_once(self) -> bool:
        """One stream, until it ends; True when it delivered at least one message."""
        got = False
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        async with grpc.aio.insecure_channel(self._target, options=options) as channel:
            try:
                call = self._open(channel)
            except WorkloadApiError as exc:
                event(f"{self.name} unavailable", level=logging.WARNING, reason=str(exc))
                return False
            try:
                async for response in call:
                    got = True
                    try:
                        state = parse_response(response, self._want)
                    except WorkloadApiError as exc:
                        # Keep what we have: a bad update must not take the proxy down.
                        event(f"{self.name} update refused", level=logging.ERROR,
                              reason=str(exc))
                        continue
                    self._on_update(state)
                    if not self._keep_streaming():
                        break
                event(f"{self.name} stream ended", level=logging.WARNING)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if self._lost(code):
                    self._on_lost(exc.details() or (code.name if code else "lost"))
                event(f"{self.name} unavailable", level=logging.WARNING,
                      code=code.name if code else "unknown", reason=exc.details() or "")
        return got
