"""The WIT-SVID profile of the Workload API over real Unix sockets (interop).

The client here is deliberately not ours: a generic grpc channel calls
``/SpiffeWorkloadAPI/FetchWITSVID`` and ``/SpiffeWorkloadAPI/FetchWITBundles``
with raw bytes, and the answers are read twice: with a small protobuf wire
decoder that knows only the field numbers of spiffe/spiffe
``standards/workloadapiwitsvid.proto`` (WITSVIDResponse.svids = 1; WITSVID
spiffe_id = 1, wit_svid = 2, wit_svid_key = 3, hint = 4; WITBundlesResponse
bundles = 1 as map<string, string>), and with our generated messages. The
token is then checked as a relying party would: WIT-SVID validation against the
WIT bundle, and a Workload Proof Token made with the key the agent handed out.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.cache import CachedEntry
from api.protos import workload_pb2 as pb
from identity.bundle import Bundle, BundleSet, JwtAuthority
from identity.errors import WitSvidError
from identity.keys import PrivateKey, generate_private_key, key_id, public_keys_equal
from identity.spiffeid import SpiffeId, TrustDomain
from identity.witsvid import (
    ReplayCache,
    WitSvid,
    load_private_jwk,
    parse_wit_svid_insecure,
    sign_wit_svid,
    sign_wpt,
    validate_wit_svid,
    verify_presentation,
)
from tests.integration.workload_api_harness import TD, Harness, entry

UID = os.getuid()
WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"
HEADER = (("workload.spiffe.io", "true"),)


# -- a protobuf wire decoder that knows nothing of our messages ---------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def wire_fields(data: bytes) -> list[tuple[int, Any]]:
    """(field number, value) pairs; length-delimited values as bytes, varints as int."""
    out: list[tuple[int, Any]] = []
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire_type == 2:
            size, pos = _varint(data, pos)
            out.append((number, data[pos:pos + size]))
            pos += size
        else:
            raise AssertionError(f"unexpected wire type {wire_type} for field {number}")
    return out


def _b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _check_es256_by_hand(token: str, jwks: dict[str, Any]) -> None:
    head, body, sig = token.split(".")
    header = json.loads(_b64d(head))
    assert header["typ"] == "wit+jwt" and header["alg"] == "ES256"
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(_b64d(jwk["x"]), "big"), int.from_bytes(_b64d(jwk["y"]), "big"),
        ec.SECP256R1()).public_key()
    raw = _b64d(sig)
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))  # raises if bad
    claims = json.loads(_b64d(body))
    assert set(claims) >= {"sub", "exp", "cnf"} and "aud" not in claims


# -- the agent: harness cache + a WIT signer made like the server's -----------------------


class WitCA:
    """Signs WIT-SVIDs with the harness CA's JWT key, as the server would."""

    def __init__(self, h: Harness, ttl: dt.timedelta = dt.timedelta(minutes=10)) -> None:
        self.h = h
        self.ttl = ttl
        self.calls = 0
        # A WIT key of its own: WIT-SVID §6.1 forbids sharing a kid with a JWT key.
        self.key = generate_private_key()
        self.kid = key_id(self.key.public_key())

    async def sign(self, e: CachedEntry) -> tuple[WitSvid, PrivateKey]:
        self.calls += 1
        key = generate_private_key()
        now = dt.datetime.now(dt.UTC)
        token = sign_wit_svid(spiffe_id=e.spiffe_id, workload_key=key.public_key(),
                              key=self.key, key_id=self.kid,
                              issued_at=now, expires_at=now + self.ttl)
        return parse_wit_svid_insecure(token), key


def wit_bundle(h: Harness, ca: WitCA) -> Bundle:
    return Bundle(TD, x509_authorities=(h.ca.cert,),
                  jwt_authorities=(JwtAuthority(h.ca.jwt_kid, h.ca.jwt_key.public_key()),),
                  wit_authorities=(JwtAuthority(ca.kid, ca.key.public_key()),))


def setup(h: Harness, entries: list[CachedEntry], ttl: dt.timedelta | None = None) -> WitCA:
    ca = WitCA(h, ttl) if ttl else WitCA(h)
    h.set_state(entries)

    def apply() -> None:
        h.cache.set_bundles({TD: wit_bundle(h, ca)})
        h.cache.set_wit_signer(ca.sign)

    h.call(apply)
    return ca


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def raw_stream(h: Harness, method: str, request: bytes,
               metadata: tuple[tuple[str, str], ...] = HEADER) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix:{h.socket_path}")
    call = channel.unary_stream(f"/SpiffeWorkloadAPI/{method}")  # no serializers: bytes
    return channel, call(request, metadata=metadata, timeout=15)


# -- tests ---------------------------------------------------------------------------------


def test_fetch_wit_svid_raw_interop(harness: Harness) -> None:
    setup(harness, [entry("e1", WEB, f"unix:uid:{UID}", hint="internal")])
    channel, stream = raw_stream(harness, "FetchWITSVID",
                                 pb.WITSVIDRequest().SerializeToString())
    with channel:
        raw = next(stream)
        stream.cancel()
    assert isinstance(raw, bytes)
    top = wire_fields(raw)
    assert [n for n, _ in top] == [1]  # svids = 1, one identity
    svid = dict(wire_fields(top[0][1]))
    assert sorted(svid) == [1, 2, 3, 4]
    assert svid[1].decode() == WEB
    token, key_jwk, hint = svid[2].decode(), json.loads(svid[3]), svid[4].decode()
    assert hint == "internal"
    # The same bytes through our generated message agree field by field.
    msg = pb.WITSVIDResponse.FromString(raw)
    assert (msg.svids[0].spiffe_id, msg.svids[0].wit_svid, msg.svids[0].hint) == (
        WEB, token, hint)

    # The bundle, also fetched raw: map<string, string> bundles = 1 keyed by TD ID.
    channel, stream = raw_stream(harness, "FetchWITBundles",
                                 pb.WITBundlesRequest().SerializeToString())
    with channel:
        braw = next(stream)
        stream.cancel()
    entries = [dict(wire_fields(v)) for n, v in wire_fields(braw) if n == 1]
    bundles = {e[1].decode(): e[2].decode() for e in entries}
    assert list(bundles) == ["spiffe://example.org"]
    jwks = json.loads(bundles["spiffe://example.org"])
    assert [k["use"] for k in jwks["keys"]] == ["wit-svid"]
    assert all(k["kid"] for k in jwks["keys"])
    bundle = Bundle.from_jwks(TD, jwks)

    # The JWS itself, checked without PyJWT: ES256 over "header.payload" with the
    # bundle's key named by kid, the signature raw r||s (RFC 7518 §3.4).
    _check_es256_by_hand(token, jwks)

    # A relying party: the WIT validates against the WIT bundle ...
    now = dt.datetime.now(dt.UTC)
    wit = validate_wit_svid(token, bundles=bundle, now=now)
    assert str(wit.spiffe_id) == WEB
    # ... the key handed out is the cnf key, as a private JWK with its alg ...
    assert key_jwk["alg"] == wit.confirmation_alg == "ES256"
    key = load_private_jwk(key_jwk)
    assert public_keys_equal(key.public_key(), wit.confirmation_key)
    # ... and the workload can prove possession with it; the bare token cannot pass.
    wpt = sign_wpt(wit_token=token, key=key, audience="https://db.example.org/",
                   expires_at=now + dt.timedelta(seconds=30))
    cache = ReplayCache()
    done = verify_presentation(token, wpt, bundles=BundleSet([bundle]),
                               audience="https://db.example.org/", now=now,
                               replay_cache=cache)
    assert str(done.spiffe_id) == WEB
    with pytest.raises(WitSvidError, match="replayed"):
        verify_presentation(token, wpt, bundles=bundle, audience="https://db.example.org/",
                            now=now, replay_cache=cache)
    with pytest.raises(WitSvidError, match="without proof"):
        verify_presentation(token, None, bundles=bundle, audience="https://db.example.org/",
                            now=now, replay_cache=cache)


def test_one_wit_per_identity_and_the_spiffe_id_filter(harness: Harness) -> None:
    setup(harness, [entry("e1", WEB, f"unix:uid:{UID}"), entry("e2", DB, f"unix:uid:{UID}"),
                    entry("e3", WEB, f"unix:uid:{UID}")])
    channel, stream = raw_stream(harness, "FetchWITSVID", b"")
    with channel:
        msg = pb.WITSVIDResponse.FromString(next(stream))
        stream.cancel()
    assert sorted(s.spiffe_id for s in msg.svids) == [DB, WEB]
    keys = {s.wit_svid_key for s in msg.svids}
    assert len(keys) == 2  # a key pair per identity
    channel, stream = raw_stream(harness, "FetchWITSVID",
                                 pb.WITSVIDRequest(spiffe_id=DB).SerializeToString())
    with channel:
        msg = pb.WITSVIDResponse.FromString(next(stream))
        stream.cancel()
    assert [s.spiffe_id for s in msg.svids] == [DB]


@pytest.mark.parametrize(
    ("method", "request_bytes", "metadata", "code"),
    [
        ("FetchWITSVID", b"", (), grpc.StatusCode.INVALID_ARGUMENT),
        ("FetchWITBundles", b"", (), grpc.StatusCode.INVALID_ARGUMENT),
        ("FetchWITSVID", pb.WITSVIDRequest(spiffe_id="spiffe://example.org/nope")
         .SerializeToString(), HEADER, grpc.StatusCode.PERMISSION_DENIED),
        ("FetchWITSVID", pb.WITSVIDRequest(spiffe_id="not an id").SerializeToString(),
         HEADER, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_refusals(harness: Harness, method: str, request_bytes: bytes,
                  metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode) -> None:
    setup(harness, [entry("e1", WEB, f"unix:uid:{UID}")])
    channel, stream = raw_stream(harness, method, request_bytes, metadata)
    with channel, pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == code


def test_no_identity_is_permission_denied(harness: Harness) -> None:
    setup(harness, [entry("e1", WEB, "unix:uid:99999")])
    channel, stream = raw_stream(harness, "FetchWITSVID", b"")
    with channel, pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_agent_that_cannot_sign_answers_unavailable(harness: Harness) -> None:
    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])  # no WIT signer installed
    channel, stream = raw_stream(harness, "FetchWITSVID", b"")
    with channel, pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_without_wit_svids_means_unimplemented(harness: Harness) -> None:
    from agent.errors import ServerCallError

    async def old_server(e: CachedEntry) -> tuple[WitSvid, PrivateKey]:
        raise ServerCallError("NewWITSVID failed: UNIMPLEMENTED: Method not found!",
                              code="UNIMPLEMENTED")

    harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
    harness.call(lambda: harness.cache.set_wit_signer(old_server))
    channel, stream = raw_stream(harness, "FetchWITSVID", b"")
    with channel, pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_stream_rotates_before_expiry_with_a_new_key(harness: Harness) -> None:
    ca = setup(harness, [entry("e1", WEB, f"unix:uid:{UID}")], ttl=dt.timedelta(seconds=4))
    channel, stream = raw_stream(harness, "FetchWITSVID", b"")
    got: list[pb.WITSVIDResponse] = []
    with channel:
        first = pb.WITSVIDResponse.FromString(next(stream))
        got.append(first)
        timer = threading.Timer(10, stream.cancel)
        timer.start()
        try:
            second = pb.WITSVIDResponse.FromString(next(stream))
        finally:
            timer.cancel()
            stream.cancel()
    a, b = first.svids[0], second.svids[0]
    assert a.wit_svid != b.wit_svid and a.wit_svid_key != b.wit_svid_key
    old, new = parse_wit_svid_insecure(a.wit_svid), parse_wit_svid_insecure(b.wit_svid)
    # Replaced between 40 % and 60 % of the 4 s lifetime (plus scheduling slack),
    # never after the old one expired.
    assert new.issued_at is not None and old.issued_at is not None
    assert new.issued_at < old.expires_at
    assert ca.calls == 2


# -- sigil-agent api fetch wit / validate wit --------------------------------------------


def _cli(h: Harness, *args: str) -> Any:
    from click.testing import CliRunner

    from agent.cli import main

    return CliRunner().invoke(main, [*args, "--socket-path", str(h.socket_path)])


def test_cli_fetch_and_validate_wit(harness: Harness, tmp_path: Any) -> None:
    setup(harness, [entry("e1", WEB, f"unix:uid:{UID}")])
    fetched = _cli(harness, "api", "fetch", "wit", "--write", str(tmp_path))
    assert fetched.exit_code == 0, fetched.output
    assert fetched.stdout.startswith(f"{WEB} expires_at=")
    assert '"d"' not in fetched.stdout  # the key goes to the file only
    token = (tmp_path / "wit.jwt").read_text()
    assert (tmp_path / "wit.key.json").stat().st_mode & 0o777 == 0o600
    key = load_private_jwk((tmp_path / "wit.key.json").read_text())
    aud = "https://db.example.org/orders"
    now = dt.datetime.now(dt.UTC)
    wpt = sign_wpt(wit_token=token, key=key, audience=aud,
                   expires_at=now + dt.timedelta(seconds=60))
    ok = _cli(harness, "api", "validate", "wit", "--audience", aud, "--svid", token,
              "--proof", wpt, "--output", "json")
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.stdout)
    assert doc["spiffe_id"] == WEB and doc["claims"]["sub"] == WEB
    other_key = generate_private_key()
    for args, message in [
        (["--audience", aud, "--svid", token], "--proof is required"),
        (["--audience", "https://elsewhere/", "--svid", token, "--proof", wpt],
         "does not name this recipient"),
        (["--audience", aud, "--svid", token, "--proof",
          sign_wpt(wit_token=token, key=other_key, audience=aud,
                   expires_at=now + dt.timedelta(seconds=60))], "cnf key"),
        (["--audience", aud, "--svid", token[:-4] + "AAAA", "--proof", wpt],
         "the WIT-SVID is not valid"),
    ]:
        bad = _cli(harness, "api", "validate", "wit", *args)
        assert bad.exit_code == 2, bad.output
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], bad.stderr


def test_wit_bundles_include_federated_ones_that_have_wit_keys(harness: Harness) -> None:
    from tests.integration.workload_api_harness import TestCA

    partner, legacy = TestCA(TrustDomain.parse("partner.org")), TestCA(
        TrustDomain.parse("legacy.org"))
    p_auth = JwtAuthority(partner.jwt_kid, partner.jwt_key.public_key())
    fed = CachedEntry(id="e1", spiffe_id=SpiffeId.parse(WEB),
                      parent_id=entry("x", WEB).parent_id,
                      selectors=entry("x", WEB, f"unix:uid:{UID}").selectors,
                      federates_with=(partner.td, legacy.td))
    ca = setup(harness, [fed])

    def add() -> None:
        harness.cache.set_bundles({
            TD: wit_bundle(harness, ca),
            partner.td: Bundle(partner.td, x509_authorities=(partner.cert,),
                               wit_authorities=(p_auth,)),
            legacy.td: legacy.bundle(),  # no wit-svid key: no WIT-SVID support
        })

    harness.call(add)
    channel, stream = raw_stream(harness, "FetchWITBundles", b"")
    with channel:
        msg = pb.WITBundlesResponse.FromString(next(stream))
        stream.cancel()
    assert sorted(msg.bundles) == ["spiffe://example.org", "spiffe://partner.org"]
    assert msg.more is False
    kids = [k["kid"] for k in json.loads(msg.bundles["spiffe://partner.org"])["keys"]]
    assert kids == [partner.jwt_kid]
