"""A broker in a process of its own: calls the SPIFFE Broker API by hand.

``python broker_client.py SOCKET METHOD TYPE_URL REF [--no-header] [--follow]``
calls ``/spiffe.broker.API/METHOD`` (SubscribeToX509SVID or FetchJWTSVID) with a
reference whose ``Any`` carries TYPE_URL and a packed ``WorkloadPIDReference``
with PID REF, or, when REF is a JSON object, a packed
``KubernetesObjectReference`` (keys plural, group, namespace, name, uid; TYPE_URL
``-`` sends no reference at all), using a raw grpc channel and the generated
broker messages. It prints one JSON line per response
(``{"ids": [...]}``) and, when the call ends with a status, ``{"code": NAME,
"details": ..., "reason": ...}``, the reason being that of the google.rpc.ErrorInfo
in the ``grpc-status-details-bin`` trailer (decoded with googleapis' own
messages), or "" without one.
Without ``--follow`` it stops after the first response.
"""

from __future__ import annotations

import json
import sys

import grpc
from google.rpc import error_details_pb2, status_pb2

from api.protos import broker_pb2 as bpb


def main(argv: list[str]) -> None:
    socket_path, method, type_url, pid = argv[:4]
    header = "--no-header" not in argv
    follow = "--follow" in argv
    metadata = (("broker.spiffe.io", "true"),) if header else ()
    reference = None
    if type_url != "-":
        reference = bpb.WorkloadReference()
        reference.reference.type_url = type_url
        if pid.startswith("{"):
            doc = json.loads(pid)
            k8s = bpb.KubernetesObjectReference(uid=doc.get("uid", ""))
            k8s.type.plural = doc.get("plural", "")
            k8s.type.group = doc.get("group", "")
            if "name" in doc:
                k8s.key.name = doc["name"]
                k8s.key.namespace = doc.get("namespace", "")
            reference.reference.value = k8s.SerializeToString()
        else:
            reference.reference.value = bpb.WorkloadPIDReference(
                pid=int(pid)).SerializeToString()
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        try:
            if method == "FetchJWTSVID":
                call = channel.unary_unary(
                    "/spiffe.broker.API/FetchJWTSVID",
                    request_serializer=bpb.FetchJWTSVIDRequest.SerializeToString,
                    response_deserializer=bpb.FetchJWTSVIDResponse.FromString)
                jwt = call(bpb.FetchJWTSVIDRequest(reference=reference, audience=["aud"]),
                           metadata=metadata, timeout=20)
                print(json.dumps({"ids": [s.spiffe_id for s in jwt.svids]}), flush=True)
                return
            stream = channel.unary_stream(
                "/spiffe.broker.API/SubscribeToX509SVID",
                request_serializer=bpb.SubscribeToX509SVIDRequest.SerializeToString,
                response_deserializer=bpb.SubscribeToX509SVIDResponse.FromString)
            for message in stream(bpb.SubscribeToX509SVIDRequest(reference=reference),
                                  metadata=metadata, timeout=30):
                print(json.dumps({"ids": [s.spiffe_id for s in message.svids],
                                  "keys": all(s.x509_svid_key for s in message.svids)}),
                      flush=True)
                if not follow:
                    return
        except grpc.RpcError as exc:
            print(json.dumps({"code": exc.code().name, "details": exc.details(),
                              "reason": _reason(exc)}), flush=True)


def _reason(exc: grpc.RpcError) -> str:
    trailer = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    raw = trailer.get("grpc-status-details-bin")
    if raw is None:
        return ""
    status = status_pb2.Status.FromString(raw)
    assert status.code == exc.code().value[0]  # type: ignore[attr-defined]
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "spiffe.io", info.domain
            return str(info.reason)
    return ""


if __name__ == "__main__":
    main(sys.argv[1:])
