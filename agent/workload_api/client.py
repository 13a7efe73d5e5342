"""A small synchronous Workload API client (the CLI's, and the tests').

It speaks the bare ``/SpiffeWorkloadAPI/<Method>`` paths with our
``sigil.workload.v1`` messages, so it works against any SPIFFE Workload API
server and can share a process with py-spiffe.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from agent.workload_api.names import SECURITY_HEADER, SERVICE_NAME
from api.protos import workload_pb2 as pb

DEFAULT_METADATA: tuple[tuple[str, str], ...] = ((SECURITY_HEADER, "true"),)


def method(name: str) -> str:
    """The wire path of a Workload API method."""
    return f"/{SERVICE_NAME}/{name}"


class WorkloadApiClient:
    """Calls the Workload API on a Unix socket.

    Args:
        socket_path: the agent's socket (a path, not a URI).
        timeout: deadline of each call, in seconds.
        metadata: request metadata; the security header by default (tests pass
            other values to check the server refuses them).
    """

    def __init__(
        self,
        socket_path: str | Path,
        *,
        timeout: float = 10.0,
        metadata: Sequence[tuple[str, str]] = DEFAULT_METADATA,
    ) -> None:
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._timeout = timeout
        self._metadata = tuple(metadata)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> WorkloadApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _first(self, name: str, request: Any, response_type: Any) -> Any:
        stream = self.stream(name, request, response_type, timeout=self._timeout)
        try:
            return next(stream)
        finally:
            stream.cancel()  # type: ignore[attr-defined]

    def stream(self, name: str, request: Any, response_type: Any,
               timeout: float | None = None) -> Iterator[Any]:
        """Open a server stream; the result is also a grpc.Call (``.cancel()``)."""
        call = self._channel.unary_stream(
            method(name),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(request, metadata=self._metadata, timeout=timeout)  # type: ignore[no-any-return]

    def _unary(self, name: str, request: Any, response_type: Any) -> Any:
        call = self._channel.unary_unary(
            method(name),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(request, metadata=self._metadata, timeout=self._timeout)

    def fetch_x509_svid(self) -> pb.X509SVIDResponse:
        """The first message of FetchX509SVID."""
        return self._first("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)  # type: ignore[no-any-return]

    def fetch_x509_bundles(self) -> pb.X509BundlesResponse:
        """The first message of FetchX509Bundles."""
        return self._first(  # type: ignore[no-any-return]
            "FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse
        )

    def fetch_jwt_bundles(self) -> pb.JWTBundlesResponse:
        """The first message of FetchJWTBundles."""
        return self._first(  # type: ignore[no-any-return]
            "FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse
        )

    def fetch_wit_svid(self, spiffe_id: str = "") -> pb.WITSVIDResponse:
        """The first message of FetchWITSVID (WIT-SVIDs and their private JWKs)."""
        return self._first(  # type: ignore[no-any-return]
            "FetchWITSVID", pb.WITSVIDRequest(spiffe_id=spiffe_id), pb.WITSVIDResponse
        )

    def fetch_wit_bundles(self) -> pb.WITBundlesResponse:
        """The first message of FetchWITBundles (JWK sets of wit-svid keys)."""
        return self._first(  # type: ignore[no-any-return]
            "FetchWITBundles", pb.WITBundlesRequest(), pb.WITBundlesResponse
        )

    def fetch_jwt_svid(self, audience: Sequence[str], spiffe_id: str = "") -> pb.JWTSVIDResponse:
        """FetchJWTSVID for ``audience`` (and one SPIFFE ID, if given)."""
        return self._unary(  # type: ignore[no-any-return]
            "FetchJWTSVID",
            pb.JWTSVIDRequest(audience=list(audience), spiffe_id=spiffe_id),
            pb.JWTSVIDResponse,
        )

    def validate_jwt_svid(self, token: str, audience: str) -> pb.ValidateJWTSVIDResponse:
        """ValidateJWTSVID."""
        return self._unary(  # type: ignore[no-any-return]
            "ValidateJWTSVID",
            pb.ValidateJWTSVIDRequest(audience=audience, svid=token),
            pb.ValidateJWTSVIDResponse,
        )
