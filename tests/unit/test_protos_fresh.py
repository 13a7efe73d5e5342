"""The committed generated protobuf code matches the .proto files.

Regenerates every proto into a temporary folder with the same command that
produced the committed files (api/protos/generate.py) and compares byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from api.protos import generate
from tests.support.require import require_module

require_module("grpc_tools", "grpcio-tools")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    produced = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert produced, "protoc produced nothing"
    stale = []
    for rel in produced:
        committed = generate.ROOT / rel
        if not committed.exists() or committed.read_bytes() != (tmp_path / rel).read_bytes():
            stale.append(str(rel))
    assert not stale, (
        f"generated code is stale for {stale}; run: python -m api.protos.generate"
    )


def test_workload_messages_live_in_our_package_but_wire_names_are_bare() -> None:
    from api.protos import workload_pb2

    # Our package keeps py-spiffe's package-less descriptors importable alongside.
    assert workload_pb2.X509SVIDRequest.DESCRIPTOR.full_name == "sigil.workload.v1.X509SVIDRequest"
    fields = {f.name: f.number for f in workload_pb2.X509SVID.DESCRIPTOR.fields}
    assert fields == {"spiffe_id": 1, "x509_svid": 2, "x509_svid_key": 3, "bundle": 4, "hint": 5}
    resp = {f.name: f.number for f in workload_pb2.X509SVIDResponse.DESCRIPTOR.fields}
    assert resp == {"svids": 1, "crl": 2, "federated_bundles": 3}
    jwt_req = {f.name: f.number for f in workload_pb2.JWTSVIDRequest.DESCRIPTOR.fields}
    assert jwt_req == {"audience": 1, "spiffe_id": 2}


def test_py_spiffe_and_our_messages_share_a_process() -> None:
    spiffe_pb2 = require_module("spiffe._proto.workload_pb2", "py-spiffe")
    from api.protos import workload_pb2

    ours = workload_pb2.X509SVID(spiffe_id="spiffe://td/w", x509_svid=b"\x01", hint="h")
    theirs = spiffe_pb2.X509SVID.FromString(ours.SerializeToString())
    assert (theirs.spiffe_id, theirs.x509_svid, theirs.hint) == ("spiffe://td/w", b"\x01", "h")
