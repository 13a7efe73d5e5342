"""The Workload API, complete: federated bundles, JWT rules, bad input, JWT caching.

SPIFFE-NOTES §6-7 give the rules; each test names the one it checks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc
import pytest

from agent.cache import CachedEntry
from agent.workload_api.client import DEFAULT_METADATA, WorkloadApiClient, method
from agent.workload_api.servicer import MAX_AUDIENCES
from api.protos import workload_pb2 as pb
from identity.jwtsvid import JwtSvid, parse_insecure, sign_jwt_svid
from identity.keys import generate_private_key, key_id
from identity.spiffeid import SpiffeId, TrustDomain
from tests.integration.workload_api_harness import TD, Harness, TestCA, entry

UID = os.getuid()
WEB = "spiffe://example.org/web"
API = "spiffe://example.org/api"
FED = TrustDomain("partner.org")
OTHER = TrustDomain("stranger.org")


class CountingSigner:
    """The server's NewJWTSVID, counting calls; slow enough that calls overlap."""

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    async def __call__(self, e: CachedEntry, audience: Sequence[str]) -> JwtSvid:
        import asyncio

        self.calls.append((e.id, tuple(audience)))
        await asyncio.sleep(0.2)
        return await self.ca.sign_jwt(e, audience)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def _signer(harness: Harness) -> CountingSigner:
    signer = CountingSigner(harness.ca)
    harness.call(lambda: harness.cache.set_jwt_signer(signer))
    return signer


def _code(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def _federated_state(harness: Harness, fed: TestCA, other: TestCA) -> None:
    """web (default, hint) and api; web federates with partner.org; a bundle the
    workload has no business seeing (stranger.org) is in the cache too."""
    web = dataclasses.replace(
        entry("e-web", WEB, f"unix:uid:{UID}", hint="internal"), federates_with=(FED,)
    )
    api = entry("e-api", API, f"unix:uid:{UID}", hint="internal")
    harness.set_state([web, api])
    harness.call(lambda: harness.cache.set_bundles(
        {TD: harness.ca.bundle(), FED: fed.bundle(), OTHER: other.bundle()}
    ))


# -- FetchX509SVID and the bundle RPCs (§6.3, §6.4) -------------------------------------


def test_x509_svids_ordered_with_hints_and_federated_bundles(harness: Harness) -> None:
    fed, other = TestCA(FED), TestCA(OTHER)
    _federated_state(harness, fed, other)
    with WorkloadApiClient(harness.socket_path) as c:
        resp = c.fetch_x509_svid()
        x = c.fetch_x509_bundles()
        j = c.fetch_jwt_bundles()
    # Stable order (by SPIFFE ID); a duplicate hint is dropped from the later one.
    assert [(s.spiffe_id, s.hint) for s in resp.svids] == [(API, "internal"), (WEB, "")]
    assert all(s.bundle == harness.ca.bundle().x509_der() for s in resp.svids)
    assert dict(resp.federated_bundles) == {"spiffe://partner.org": fed.bundle().x509_der()}
    assert dict(x.bundles) == {
        "spiffe://example.org": harness.ca.bundle().x509_der(),
        "spiffe://partner.org": fed.bundle().x509_der(),
    }
    assert dict(j.bundles) == {
        "spiffe://example.org": harness.ca.bundle().jwt_jwks(),
        "spiffe://partner.org": fed.bundle().jwt_jwks(),
    }


def test_fetch_jwt_svid_for_every_identity_or_the_one_asked(harness: Harness) -> None:
    fed, other = TestCA(FED), TestCA(OTHER)
    _federated_state(harness, fed, other)
    with WorkloadApiClient(harness.socket_path) as c:
        both = c.fetch_jwt_svid(["db", "cache"])
        one = c.fetch_jwt_svid(["db"], WEB)
        denied = _code(lambda: c.fetch_jwt_svid(["db"], "spiffe://example.org/not-mine"))
    assert [s.spiffe_id for s in both.svids] == [API, WEB]
    for s in both.svids:
        # Every requested audience is in aud (py-spiffe requires all of them).
        assert sorted(parse_insecure(s.svid, audience=["db"]).audience) == ["cache", "db"]
    assert [s.spiffe_id for s in one.svids] == [WEB]
    assert denied == (grpc.StatusCode.PERMISSION_DENIED, "no identity issued")


# -- ValidateJWTSVID (§6.4: InvalidArgument with the reason) ----------------------------


def _token(ca: TestCA, sub: str, aud: Sequence[str], *, expires_in: float = 300,
           key: object = None, kid: str | None = None) -> str:
    now = dt.datetime.now(dt.UTC)
    return sign_jwt_svid(
        spiffe_id=SpiffeId.parse(sub),
        audience=list(aud),
        key=key or ca.jwt_key,  # type: ignore[arg-type]
        key_id=kid or ca.jwt_kid,
        issued_at=now - dt.timedelta(seconds=600),
        expires_at=now + dt.timedelta(seconds=expires_in),
    )


def test_validate_jwt_svid_local_and_federated(harness: Harness) -> None:
    fed, other = TestCA(FED), TestCA(OTHER)
    _federated_state(harness, fed, other)
    with WorkloadApiClient(harness.socket_path) as c:
        local = c.validate_jwt_svid(_token(harness.ca, WEB, ["svc"]), "svc")
        federated = c.validate_jwt_svid(_token(fed, "spiffe://partner.org/x", ["svc"]), "svc")
        # stranger.org's bundle is in the agent, but this workload does not federate
        # with it: the token is from an unknown trust domain as far as it is concerned.
        stranger = _code(lambda: c.validate_jwt_svid(
            _token(other, "spiffe://stranger.org/x", ["svc"]), "svc"))
    assert local.spiffe_id == WEB
    assert local.claims["sub"] == WEB and list(local.claims["aud"]) == ["svc"]
    assert federated.spiffe_id == "spiffe://partner.org/x"
    assert stranger == (
        grpc.StatusCode.INVALID_ARGUMENT, "no JWT bundle found for trust domain stranger.org"
    )


def test_validate_jwt_svid_bad_tokens(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    rogue = generate_private_key()
    cases = {
        "malformed": ("not-a-jwt", "token is not a JWS compact serialization"),
        "expired": (_token(harness.ca, WEB, ["svc"], expires_in=-60), "token has expired"),
        "unknown key": (
            _token(harness.ca, WEB, ["svc"], key=rogue, kid=key_id(rogue.public_key())),
            f"no JWT authority '{key_id(rogue.public_key())}' found for trust domain example.org",
        ),
        "known kid, wrong key": (
            _token(harness.ca, WEB, ["svc"], key=rogue),
            f"token signature does not verify with JWT authority '{harness.ca.jwt_kid}'",
        ),
        "other audience": (
            _token(harness.ca, WEB, ["other"]), "expected audience 'svc' not in token aud"
        ),
    }
    with WorkloadApiClient(harness.socket_path) as c:
        for name, (token, reason) in cases.items():
            code, details = _code(lambda t=token: c.validate_jwt_svid(t, "svc"))  # type: ignore[misc]
            assert code == grpc.StatusCode.INVALID_ARGUMENT, name
            assert details.startswith(reason), (name, details)
        assert _code(lambda: c.validate_jwt_svid("", "svc")) == (
            grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        assert _code(lambda: c.validate_jwt_svid("x.y.z", "")) == (
            grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")


# -- Bad input -------------------------------------------------------------------------


def test_audience_lists_empty_or_huge_send_nothing_to_the_server(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    signer = _signer(harness)
    with WorkloadApiClient(harness.socket_path) as c:
        assert _code(lambda: c.fetch_jwt_svid([])) == (
            grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        assert _code(lambda: c.fetch_jwt_svid(["", ""])) == (
            grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        # 10,000 one-letter-ish audiences fit in a request; the count is refused.
        many = [str(i % 10_000) for i in range(10_000)]
        assert _code(lambda: c.fetch_jwt_svid(many)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"too many audiences: 10000 (at most {MAX_AUDIENCES})",
        )
        assert _code(lambda: c.fetch_jwt_svid(["a" * 4096])) == (
            grpc.StatusCode.INVALID_ARGUMENT, "audience longer than 2048 bytes")
        # 1 MiB: grpc refuses the message before our code sees it.
        code, _ = _code(lambda: c.fetch_jwt_svid(["a" * (1 << 20)]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The agent still answers, and only this last call reached the "server".
        assert c.fetch_jwt_svid(["ok"]).svids[0].spiffe_id == WEB
    assert signer.calls == [("e1", ("ok",))]


def test_unknown_fields_are_ignored_and_unknown_methods_unimplemented(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    # Field 99 (varint 1) and field 100 (bytes "x"): unknown to every message here.
    unknown = b"\x98\x06\x01" + b"\xa2\x06\x01x"
    channel = grpc.insecure_channel(f"unix:{harness.socket_path}")
    try:
        stream = channel.unary_stream(
            method("FetchX509SVID"), request_serializer=lambda b: b,
            response_deserializer=pb.X509SVIDResponse.FromString,
        )(unknown, metadata=DEFAULT_METADATA, timeout=10)
        assert next(stream).svids[0].spiffe_id == WEB
        stream.cancel()
        jwt = channel.unary_unary(
            method("FetchJWTSVID"), request_serializer=lambda b: b,
            response_deserializer=pb.JWTSVIDResponse.FromString,
        )(pb.JWTSVIDRequest(audience=["a"]).SerializeToString() + unknown,
          metadata=DEFAULT_METADATA, timeout=10)
        assert jwt.svids[0].spiffe_id == WEB
        nothing = channel.unary_unary(
            "/SpiffeWorkloadAPI/FetchEverything", request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        assert _code(lambda: nothing(b"", metadata=DEFAULT_METADATA, timeout=10))[0] == (
            grpc.StatusCode.UNIMPLEMENTED)
        other_service = channel.unary_unary(
            "/sigil.admin.v1.Admin/ListEntries", request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        assert _code(lambda: other_service(b"", metadata=DEFAULT_METADATA, timeout=10))[0] == (
            grpc.StatusCode.UNIMPLEMENTED)
    finally:
        channel.close()


# -- JWT-SVID caching (one server call for many fetches) --------------------------------


def test_many_concurrent_jwt_fetches_make_one_server_call(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    signer = _signer(harness)
    tokens: list[str] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            with WorkloadApiClient(harness.socket_path) as c:
                # Audience order and duplicates do not make another cache key.
                tokens.append(c.fetch_jwt_svid(["b", "a", "b"]).svids[0].svid)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with WorkloadApiClient(harness.socket_path) as c:
        for _ in range(20):
            tokens.append(c.fetch_jwt_svid(["a", "b"]).svids[0].svid)
        c.fetch_jwt_svid(["c"])
    assert len(tokens) == 60 and len(set(tokens)) == 1
    assert signer.calls == [("e1", ("a", "b")), ("e1", ("c",))]
