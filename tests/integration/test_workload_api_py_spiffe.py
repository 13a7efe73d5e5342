"""py-spiffe (a client nobody here wrote) against the agent's Workload API.

This works only because our messages live in ``sigil.workload.v1`` while the
wire paths are the bare ``/SpiffeWorkloadAPI/...``: py-spiffe's package-less
protos and ours share this process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.integration.workload_api_harness import Harness, entry
from tests.support.require import require_module

spiffe = require_module("spiffe", "py-spiffe")
from spiffe import JwtSvid, SpiffeId, WorkloadApiClient, X509Source  # noqa: E402

UID = os.getuid()
WEB = "spiffe://example.org/web"
AUD = "spiffe://example.org/db"


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def test_py_spiffe_fetches_and_validates(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}", hint="web")])
    client = WorkloadApiClient(socket_path=f"unix://{harness.socket_path}")
    try:
        ctx = client.fetch_x509_context(timeout=10)
        svid = ctx.default_svid
        assert str(svid.spiffe_id) == WEB
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None
        assert list(bundle.x509_authorities) == [harness.ca.cert]
        svid.leaf.verify_directly_issued_by(harness.ca.cert)

        bundles = client.fetch_x509_bundles()
        assert bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) is not None

        jwt = client.fetch_jwt_svid(audience={AUD, "extra"}, subject=SpiffeId(WEB))
        assert str(jwt.spiffe_id) == WEB
        assert {AUD, "extra"} <= set(jwt.audience)
        jwt_bundles = client.fetch_jwt_bundles()
        jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert jwt_bundle is not None
        checked = JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {AUD})
        assert str(checked.spiffe_id) == WEB
        # The agent's own validation, as py-spiffe calls it.
        assert str(client.validate_jwt_svid(jwt.token, AUD).spiffe_id) == WEB
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):
            client.validate_jwt_svid(jwt.token, "spiffe://example.org/other")
    finally:
        client.close()


def test_py_spiffe_x509_source_follows_rotation(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    client = WorkloadApiClient(socket_path=f"unix://{harness.socket_path}")
    source = X509Source(workload_api_client=client, timeout_in_seconds=10)
    try:
        first = source.get_x509_context().default_svid.leaf
        rotated = harness.ca.svid(WEB)
        harness.call(lambda: harness.cache.set_x509_svid("e1", rotated))
        deadline = time.monotonic() + 10
        while source.get_x509_context().default_svid.leaf == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert source.get_x509_context().default_svid.leaf == rotated.leaf
    finally:
        source.close()
        client.close()


def test_py_spiffe_sees_permission_denied_without_identity(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, "unix:uid:4242424")])
    client = WorkloadApiClient(socket_path=f"unix://{harness.socket_path}")
    try:
        with pytest.raises(Exception, match="PERMISSION_DENIED"):
            client.fetch_x509_context(timeout=10)
    finally:
        client.close()
