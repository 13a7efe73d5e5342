"""A small Envoy-like SDS v3 client on the generated protos of ``xds-protos``.

It speaks to the agent's socket the way Envoy does: gRPC over a Unix socket, no
``workload.spiffe.io`` header, ``StreamSecrets`` with ``DiscoveryRequest``s that
name resources, acknowledge (version and nonce of the last response) or reject
(``error_detail``) what arrived. Responses are read by a thread into a queue, so
a test can wait for the next one with a timeout.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

SERVICE = "/envoy.service.secret.v3.SecretDiscoveryService"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SPIFFE_VALIDATOR_TYPE_URL = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig")


def channel(socket_path: Path) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{socket_path}")


def request(names: Sequence[str] = (), *, version: str = "", nonce: str = "",
            error: str | None = None, type_url: str = SECRET_TYPE_URL,
            node: base_pb2.Node | None = None) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        resource_names=list(names), version_info=version, response_nonce=nonce,
        type_url=type_url)
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    if node is not None:
        req.node.CopyFrom(node)
    return req


def fetch(socket_path: Path, names: Sequence[str] = (), **kwargs: Any
          ) -> discovery_pb2.DiscoveryResponse:
    """One FetchSecrets call."""
    with channel(socket_path) as ch:
        call = ch.unary_unary(
            f"{SERVICE}/FetchSecrets",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        return call(request(names, **kwargs), timeout=30)


class SdsStream:
    """One StreamSecrets stream; its requests go out when :meth:`send` is called."""

    _END = object()

    def __init__(self, socket_path: Path | None = None, *, on: grpc.Channel | None = None
                 ) -> None:
        assert (socket_path is None) != (on is None)
        self._own = on is None
        self.channel = on if on is not None else channel(socket_path)  # type: ignore[arg-type]
        self._requests: queue.Queue[object] = queue.Queue()
        self.responses: queue.Queue[object] = queue.Queue()
        self.error: grpc.RpcError | None = None
        method = self.channel.stream_stream(
            f"{SERVICE}/StreamSecrets",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
        self.call = method(self._iter())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iter(self) -> Iterator[discovery_pb2.DiscoveryRequest]:
        while True:
            item = self._requests.get()
            if item is self._END:
                return
            yield item  # type: ignore[misc]

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as exc:
            self.error = exc
        self.responses.put(self._END)

    def send(self, names: Sequence[str] = (), **kwargs: Any) -> None:
        self._requests.put(request(names, **kwargs))

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: Sequence[str] = ()) -> None:
        self.send(names, version=response.version_info, nonce=response.nonce)

    def recv(self, timeout: float = 20.0) -> discovery_pb2.DiscoveryResponse:
        """The next response; AssertionError when the stream ended or none came."""
        try:
            item = self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no SDS response within {timeout}s") from None
        if item is self._END:
            self.responses.put(item)
            raise AssertionError(f"the SDS stream ended: {self.error}")
        return item  # type: ignore[return-value]

    def quiet(self, seconds: float) -> bool:
        """True when nothing arrives for ``seconds`` (and the stream is still open)."""
        try:
            item = self.responses.get(timeout=seconds)
        except queue.Empty:
            return True
        self.responses.put(item)
        return False

    def status(self, timeout: float = 20.0) -> grpc.StatusCode:
        """The code the stream ended with (skipping any responses before it)."""
        while True:
            try:
                item = self.responses.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"the SDS stream did not end within {timeout}s") from None
            if item is self._END:
                self.responses.put(item)
                return self.error.code() if self.error is not None else grpc.StatusCode.OK

    def close(self) -> None:
        self.call.cancel()
        self._requests.put(self._END)
        self._reader.join(timeout=10)
        if self._own:
            self.channel.close()

    def __enter__(self) -> SdsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def secrets_of(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    """The response's Secrets by name (each resource must be a Secret)."""
    assert response.type_url == SECRET_TYPE_URL
    out: dict[str, secret_pb2.Secret] = {}
    for resource in response.resources:
        assert resource.type_url == SECRET_TYPE_URL, resource.type_url
        secret = secret_pb2.Secret()
        assert resource.Unpack(secret)
        assert secret.name not in out, f"{secret.name} twice"
        out[secret.name] = secret
    return out


def certificate_chain(secret: secret_pb2.Secret) -> list[x509.Certificate]:
    assert secret.WhichOneof("type") == "tls_certificate", secret.WhichOneof("type")
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)


def check_key_matches(secret: secret_pb2.Secret) -> x509.Certificate:
    """The leaf of a tls_certificate Secret, after checking its key is the leaf's."""
    chain = certificate_chain(secret)
    key = serialization.load_pem_private_key(
        secret.tls_certificate.private_key.inline_bytes, password=None)
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (key.public_key().public_bytes(der, spki)
            == chain[0].public_key().public_bytes(der, spki)), "key does not match the leaf"
    return chain[0]


def uri_san(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    return str(uri)


def trusted_ca(secret: secret_pb2.Secret) -> list[x509.Certificate]:
    assert secret.WhichOneof("type") == "validation_context", secret.WhichOneof("type")
    return x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)


def spiffe_validator(secret: secret_pb2.Secret) -> dict[str, list[x509.Certificate]]:
    """Trust domain name -> roots, from a SPIFFE certificate validator Secret."""
    assert secret.WhichOneof("type") == "validation_context"
    custom = secret.validation_context.custom_validator_config
    assert custom.name == "envoy.tls.cert_validator.spiffe"
    assert custom.typed_config.type_url == SPIFFE_VALIDATOR_TYPE_URL
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert custom.typed_config.Unpack(config)
    return {td.name: x509.load_pem_x509_certificates(td.trust_bundle.inline_bytes)
            for td in config.trust_domains}
