"""Records <-> protobuf messages."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from api.protos.sigil.admin.v1 import admin_pb2
from api.protos.sigil.types.v1 import types_pb2
from ca.authority import CertificateAuthority
from ca.datastore.records import EntryRecord, NodeRecord
from identity.bundle import Bundle
from identity.keys import public_key_der
from identity.selectors import Selector
from identity.spiffeid import SpiffeId


def selector_to_proto(sel: Selector) -> types_pb2.Selector:
    """A Selector message."""
    return types_pb2.Selector(type=sel.type, value=sel.value)


def entry_to_proto(entry: EntryRecord) -> types_pb2.Entry:
    """An Entry message."""
    return types_pb2.Entry(
        id=entry.id,
        spiffe_id=str(entry.spiffe_id),
        parent_id=str(entry.parent_id),
        selectors=[selector_to_proto(s) for s in entry.selectors],
        x509_svid_ttl=entry.x509_svid_ttl,
        jwt_svid_ttl=entry.jwt_svid_ttl,
        dns_names=list(entry.dns_names),
        federates_with=[td.name for td in entry.federates_with],
        hint=entry.hint,
        admin=entry.admin,
        downstream=entry.downstream,
        expires_at=entry.expires_at,
        revision=entry.revision,
        created_at=entry.created_at,
        updated_at=entry.updated_at,
    )


def agent_to_proto(node: NodeRecord) -> admin_pb2.Agent:
    """An admin Agent message (serials in hex, as openssl prints them)."""
    return admin_pb2.Agent(
        id=str(node.spiffe_id),
        attestor=node.attestor,
        selectors=[selector_to_proto(s) for s in node.selectors],
        serial=format(node.serial, "x"),
        expires_at=node.expires_at,
        banned=node.banned,
        can_reattest=node.can_reattest,
        created_at=node.created_at,
        updated_at=node.updated_at,
        new_serial="" if node.new_serial is None else format(node.new_serial, "x"),
    )


def _unix(value: dt.datetime | None) -> int:
    return 0 if value is None else int(value.timestamp())


def bundle_to_proto(bundle: Bundle) -> types_pb2.Bundle:
    """A Bundle message."""
    return types_pb2.Bundle(
        trust_domain=bundle.trust_domain.name,
        x509_authorities=[c.public_bytes(Encoding.DER) for c in bundle.x509_authorities],
        jwt_authorities=[
            types_pb2.JWTKey(key_id=a.key_id, public_key=public_key_der(a.public_key),
                             expires_at=_unix(a.expires_at))
            for a in bundle.jwt_authorities
        ],
        wit_authorities=[
            types_pb2.JWTKey(key_id=a.key_id, public_key=public_key_der(a.public_key),
                             expires_at=_unix(a.expires_at))
            for a in bundle.wit_authorities
        ],
        sequence_number=bundle.sequence_number or 0,
        refresh_hint=bundle.refresh_hint or 0,
    )


def own_bundle_to_proto(authority: CertificateAuthority) -> types_pb2.Bundle:
    """Our trust domain's Bundle message, with the tainted authorities agents act on."""
    msg = bundle_to_proto(authority.bundle())
    msg.tainted_x509_authorities.extend(
        c.public_bytes(Encoding.DER) for c in authority.tainted_x509_authorities())
    msg.tainted_jwt_key_ids.extend(authority.tainted_jwt_key_ids())
    return msg


def svid_to_proto(spiffe_id: SpiffeId, chain: Sequence[x509.Certificate], *,
                  into: types_pb2.X509SVID | None = None) -> types_pb2.X509SVID:
    """An X509SVID message (no key: the requester made it).

    Args:
        spiffe_id: the SVID's ID.
        chain: leaf first.
        into: an empty message to fill (one inside a response, so it is not copied
            there afterwards); None: a new one.
    """
    svid = types_pb2.X509SVID() if into is None else into
    svid.spiffe_id = str(spiffe_id)
    svid.cert_chain.extend(c.public_bytes(Encoding.DER) for c in chain)
    svid.expires_at = int(chain[0].not_valid_after_utc.timestamp())
    return svid
