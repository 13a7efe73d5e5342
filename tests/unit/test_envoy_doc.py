"""docs/envoy.md: its Envoy bootstrap is a valid ``envoy.config.bootstrap.v3.Bootstrap``.

The YAML is parsed with protobuf's json_format against the descriptors of the
``xds-protos`` package, which fails on any unknown field, enum value or
``@type``. Then the SDS parts are checked for what the agent serves: the agent
cluster speaks HTTP/2 to the socket, every secret is asked for over SDS from it,
and the validation contexts match a SPIFFE ID as a URI SAN.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.support.require import require_module

yaml = require_module("yaml", "pyyaml")
from envoy.config.bootstrap.v3 import bootstrap_pb2  # noqa: E402

# Every type an "@type" in the document names must be in the descriptor pool.
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: E402, F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: E402, F401
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: E402
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from agent.config import SdsSettings  # noqa: E402
from identity.spiffeid import SpiffeId  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "envoy.md"


def _bootstrap() -> Any:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/envoy.md should hold one YAML bootstrap"
    document = yaml.safe_load(blocks[0])
    message = bootstrap_pb2.Bootstrap()
    # ignore_unknown_fields=False (the default): a misspelt field is an error.
    json_format.ParseDict(document, message)
    return message


def _tls_contexts(bootstrap: Any) -> list[Any]:
    contexts = []
    for listener in bootstrap.static_resources.listeners:
        for chain in listener.filter_chains:
            if chain.HasField("transport_socket"):
                ctx = tls_pb2.DownstreamTlsContext()
                assert chain.transport_socket.typed_config.Unpack(ctx)
                assert ctx.require_client_certificate.value
                contexts.append(ctx.common_tls_context)
    for cluster in bootstrap.static_resources.clusters:
        if cluster.HasField("transport_socket"):
            up = tls_pb2.UpstreamTlsContext()
            assert cluster.transport_socket.typed_config.Unpack(up)
            contexts.append(up.common_tls_context)
    return contexts


def test_the_bootstrap_parses_into_envoys_protos() -> None:
    bootstrap = _bootstrap()
    assert len(bootstrap.static_resources.listeners) == 2
    assert {c.name for c in bootstrap.static_resources.clusters} == {
        "sigil_agent", "local_service", "payments"}


def test_the_agent_cluster_is_http2_on_the_socket() -> None:
    (agent,) = [c for c in _bootstrap().static_resources.clusters if c.name == "sigil_agent"]
    (endpoint,) = agent.load_assignment.endpoints[0].lb_endpoints
    assert endpoint.endpoint.address.pipe.path == "/run/sigil-agent/public/api.sock"
    options = http_protocol_options_pb2.HttpProtocolOptions()
    assert agent.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")


def test_every_secret_comes_from_the_agent_by_a_name_it_serves() -> None:
    contexts = _tls_contexts(_bootstrap())
    assert len(contexts) == 2  # the inbound listener and the outbound cluster
    settings = SdsSettings()
    for ctx in contexts:
        configs = [*ctx.tls_certificate_sds_secret_configs,
                   ctx.combined_validation_context.validation_context_sds_secret_config]
        for config in configs:
            source = config.sds_config.api_config_source
            assert source.api_type == source.GRPC
            assert [g.envoy_grpc.cluster_name for g in source.grpc_services] == ["sigil_agent"]
        (cert,) = ctx.tls_certificate_sds_secret_configs
        assert SpiffeId.parse(cert.name).has_path or cert.name == settings.default_svid_name
        bundle = ctx.combined_validation_context.validation_context_sds_secret_config.name
        assert bundle in (settings.default_bundle_name, settings.default_all_bundles_name) or (
            not SpiffeId.parse(bundle).has_path)
        (san,) = ctx.combined_validation_context.default_validation_context \
            .match_typed_subject_alt_names
        assert san.san_type == san.URI
        assert SpiffeId.parse(san.matcher.exact).has_path


def test_a_misspelt_field_would_fail() -> None:
    # A guard on the guard: the parse above is strict.
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict({"static_resources": {"listners": []}}, bootstrap_pb2.Bootstrap())
