"""SDS name resolution and the shared caller views, without sockets."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2

from agent.cache import Cache
from agent.config import SdsSettings
from agent.workload_api.sds import SecretDiscoveryServicer, caller_view, resolve
from identity.clock import FakeClock
from identity.selectors import Selector
from identity.spiffeid import TrustDomain
from tests.integration.workload_api_harness import TD, TestCA, entry

SEL = "unix:uid:1000"
SELECTORS = frozenset({Selector.parse(SEL)})
WEB = "spiffe://example.org/web"
B = TrustDomain("b.org")
A = TrustDomain("a.org")


def _cache(clock: Any = None) -> tuple[Cache, TestCA]:
    ca = TestCA()
    cache = Cache(trust_domain=TD, clock=clock)
    return cache, ca


def _kinds(resolved: Any) -> list[tuple[str, str]]:
    return [(s.name, s.WhichOneof("type")) for s in resolved.secrets]


def test_two_entries_with_one_spiffe_id_give_one_secret() -> None:
    cache, ca = _cache()
    cache.set_bundles({TD: ca.bundle()})
    cache.set_entries([entry("e1", WEB, SEL), entry("e2", WEB, SEL)])
    first, second = ca.svid(WEB), ca.svid(WEB)
    cache.set_x509_svid("e1", first)
    cache.set_x509_svid("e2", second)
    view = caller_view(cache.snapshot(), SELECTORS, now=dt.datetime.now(dt.UTC))
    resolved = resolve([], view, settings=SdsSettings(), spiffe_validation=True)
    assert _kinds(resolved) == [("spiffe://example.org", "validation_context"),
                                (WEB, "tls_certificate")]
    # The first entry in the stable order (by SPIFFE ID, then entry id).
    assert resolved.secrets[1].tls_certificate.certificate_chain.inline_bytes == \
        first.chain_pem()


def test_all_lists_trust_domains_in_order_and_only_the_callers() -> None:
    cache, ca = _cache()
    a, b, c = TestCA(A), TestCA(B), TestCA(TrustDomain("c.org"))
    cache.set_bundles({TD: ca.bundle(), A: a.bundle(), B: b.bundle(),
                       TrustDomain("c.org"): c.bundle()})
    cache.set_entries([dataclasses.replace(entry("e1", WEB, SEL), federates_with=(B, A))])
    cache.set_x509_svid("e1", ca.svid(WEB))
    view = caller_view(cache.snapshot(), SELECTORS, now=dt.datetime.now(dt.UTC))
    (secret,) = resolve(["ALL"], view, settings=SdsSettings(), spiffe_validation=True).secrets
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert secret.validation_context.custom_validator_config.typed_config.Unpack(config)
    assert [td.name for td in config.trust_domains] == ["a.org", "b.org", "example.org"]
    off = resolve(["ALL"], view, settings=SdsSettings(), spiffe_validation=False)
    assert off.secrets == () and off.unknown == ("ALL",)


@pytest.mark.parametrize("name", ["spiffe://example.org/web/x", "spiffe://c.org", "ROOTCA2",
                                  "spiffe://EXAMPLE.org", ""])
def test_names_that_name_nothing(name: str) -> None:
    cache, ca = _cache()
    cache.set_bundles({TD: ca.bundle()})
    cache.set_entries([entry("e1", WEB, SEL)])
    cache.set_x509_svid("e1", ca.svid(WEB))
    view = caller_view(cache.snapshot(), SELECTORS, now=dt.datetime.now(dt.UTC))
    resolved = resolve([name, WEB], view, settings=SdsSettings(), spiffe_validation=True)
    assert _kinds(resolved) == [(WEB, "tls_certificate")]
    assert resolved.unknown == (name,)


def test_a_shared_view_never_serves_an_svid_past_its_expiry() -> None:
    now = dt.datetime.now(dt.UTC)
    clock = FakeClock(now)
    cache, ca = _cache(clock)
    cache.set_bundles({TD: ca.bundle()})
    cache.set_entries([entry("e1", WEB, SEL)])
    svid = ca.svid(WEB, ttl=dt.timedelta(minutes=10))
    cache.set_x509_svid("e1", svid)
    servicer = SecretDiscoveryServicer(workload=None, cache=cache,  # type: ignore[arg-type]
                                       settings=SdsSettings(), clock=clock)
    snap = cache.snapshot()
    view = servicer._view(snap, SELECTORS)
    assert [str(i.entry.spiffe_id) for i in view.identities] == [WEB]
    assert servicer._view(snap, SELECTORS) is view  # shared while nothing changes
    # The SVID expires before the sync loop drops it: same cache version, new view.
    clock.advance(svid.expires_at - now)
    assert cache.snapshot().version == snap.version
    assert servicer._view(cache.snapshot(), SELECTORS).identities == ()
