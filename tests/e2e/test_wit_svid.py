"""WIT-SVIDs end to end: a real sigil-server and sigil-agent, a raw gRPC workload.

The workload is a generic grpc channel calling ``/SpiffeWorkloadAPI/FetchWITSVID``
and ``/SpiffeWorkloadAPI/FetchWITBundles`` with hand-serialised bytes (the
messages of spiffe/spiffe ``standards/workloadapiwitsvid.proto``, field numbers
as there), header ``workload.spiffe.io: true``. The token it gets was signed by
the server over the agent API for the workload key the agent made; the relying
party checks it and a proof of possession with the agent CLI.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from api.protos import workload_pb2 as pb
from identity.bundle import Bundle
from identity.keys import public_keys_equal
from identity.spiffeid import TrustDomain
from identity.witsvid import load_private_jwk, sign_wpt, validate_wit_svid
from tests.e2e.conftest import Stack, _tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HEADER = (("workload.spiffe.io", "true"),)


def _first(stack: Stack, method: str, request: bytes) -> bytes:
    with grpc.insecure_channel(f"unix:{stack.agent_socket}") as channel:
        call = channel.unary_stream(f"/SpiffeWorkloadAPI/{method}")
        stream = call(request, metadata=HEADER, timeout=10)
        try:
            return next(stream)  # type: ignore[no-any-return]
        finally:
            stream.cancel()


def _wait_for_wit(stack: Stack, timeout: float = 30.0) -> pb.WITSVIDResponse:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return pb.WITSVIDResponse.FromString(
                _first(stack, "FetchWITSVID", pb.WITSVIDRequest().SerializeToString()))
        except grpc.RpcError as exc:  # PermissionDenied until the entry syncs
            last = exc
            time.sleep(0.3)
    raise AssertionError(f"no WIT-SVID within {timeout}s (last error: {last})")


def test_wit_svid_from_a_real_agent(stack: Stack, uid_selector: str) -> None:
    td = TrustDomain.parse("e2e.sigil.test")
    workload_id = "spiffe://e2e.sigil.test/web"
    stack.create_entry(workload_id, uid_selector)
    resp = _wait_for_wit(stack)
    (svid,) = resp.svids
    assert svid.spiffe_id == workload_id
    bundles = pb.WITBundlesResponse.FromString(
        _first(stack, "FetchWITBundles", pb.WITBundlesRequest().SerializeToString()))
    jwks = json.loads(bundles.bundles["spiffe://e2e.sigil.test"])
    assert jwks["keys"] and {k["use"] for k in jwks["keys"]} == {"wit-svid"}
    # The WIT bundle is the server's published one (same kids as `bundle show`).
    published = Bundle.from_jwks(td, stack.server_cli("bundle", "show", "--format",
                                                      "spiffe").stdout)
    assert {a.key_id for a in published.wit_authorities} == {k["kid"] for k in jwks["keys"]}
    now = dt.datetime.now(dt.UTC)
    wit = validate_wit_svid(svid.wit_svid, bundles=Bundle.from_jwks(td, jwks), now=now)
    key = load_private_jwk(svid.wit_svid_key)
    assert public_keys_equal(key.public_key(), wit.confirmation_key)

    aud = "https://db.e2e.sigil.test/"
    proof = sign_wpt(wit_token=svid.wit_svid, key=key, audience=aud,
                     expires_at=now + dt.timedelta(seconds=60))
    ok = stack.agent_cli("api", "validate", "wit", "--audience", aud, "--svid", svid.wit_svid,
                         "--proof", proof)
    assert ok.stdout.startswith(f"valid: {workload_id}"), ok.stderr
    bare = stack.agent_cli("api", "validate", "wit", "--audience", aud, "--svid",
                           svid.wit_svid, check=False)
    assert bare.returncode == 2 and "--proof is required" in bare.stderr


def test_helper_writes_wit_files_from_a_real_agent(stack: Stack, uid_selector: str,
                                                   tmp_path: Path) -> None:
    """``sigil-agent helper --wit-svid-file ... --wit-svid-key-file ... --count 1``
    against the real agent: a WIT-SVID the server signed, its key as a JWK, 0600."""
    td = TrustDomain.parse("e2e.sigil.test")
    workload_id = "spiffe://e2e.sigil.test/helper"
    stack.create_entry(workload_id, uid_selector)
    _wait_for_wit(stack)
    out = tmp_path / "out"
    done = subprocess.run(
        [_tool("sigil-agent"), "helper", "--socket-path", str(stack.agent_socket),
         "--dir", str(out), "--wit-svid-file", "wit_svid.token",
         "--wit-svid-key-file", "wit_svid_key.json", "--count", "1"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "helper wit-svid written" in done.stderr
    token = (out / "wit_svid.token").read_text()
    key_path = out / "wit_svid_key.json"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    published = Bundle.from_jwks(td, stack.server_cli("bundle", "show", "--format",
                                                      "spiffe").stdout)
    now = dt.datetime.now(dt.UTC)
    wit = validate_wit_svid(token, bundles=published, now=now)
    assert str(wit.spiffe_id) == workload_id
    key = load_private_jwk(key_path.read_text())
    assert public_keys_equal(key.public_key(), wit.confirmation_key)
    aud = "https://db.e2e.sigil.test/"
    proof = sign_wpt(wit_token=token, key=key, audience=aud,
                     expires_at=now + dt.timedelta(seconds=60))
    ok = stack.agent_cli("api", "validate", "wit", "--audience", aud, "--svid", token,
                         "--proof", proof)
    assert ok.stdout.startswith(f"valid: {workload_id}"), ok.stderr
    # The X.509 files came with it, as always.
    assert (out / "svid.pem").exists() and (out / "svid.key").exists()
