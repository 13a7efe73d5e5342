"""``sigil-server svid revoke|list-revoked``: cut issued SVIDs off before expiry.

Registered on the ``sigil-server`` command group by :mod:`ca.cli`, which passes
itself in (as :mod:`ca.cli.localauthority` does): the same admin-socket helpers,
so errors are the same one ``Error: ...`` line, exit 2. Flags are checked before
the server is asked, so a bad one writes nothing.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import click

from api.protos.sigil.admin.v1 import admin_pb2
from api.protos.sigil.types.v1 import types_pb2

base: Any = None  # the ca.cli module, set by make_group

_FLAGS = (("serial", "--serial"), ("spiffe_id", "--spiffe-id"), ("jti", "--jti"),
          ("key_id", "--key-id"))


def revocation_json(r: types_pb2.Revocation) -> dict[str, Any]:
    """A revocation as stable JSON keys (times RFC 3339 UTC, null when unset)."""
    return {
        "id": r.id,
        "kind": r.kind,
        "value": r.value,
        "not_before_max": base._unix_to_rfc3339(r.not_before_max) if r.not_before_max else None,
        "expires_at": base._unix_to_rfc3339(r.expires_at) if r.expires_at else None,
        "created_at": base._unix_to_rfc3339(r.created_at),
    }


def _text(r: types_pb2.Revocation) -> str:
    line = f"{r.id:>6} {r.kind:<14} {r.value}"
    if r.not_before_max:
        line += f"  notBefore <= {base._unix_to_rfc3339(r.not_before_max)}"
    until = base._unix_to_rfc3339(r.expires_at) if r.expires_at else "kept"
    return f"{line}  until {until}"


def _request(chosen: dict[str, str | None]) -> admin_pb2.RevokeSVIDRequest:
    """The request for exactly one flag, checked here first (a bad one sends nothing)."""
    given = [(name, flag) for name, flag in _FLAGS if chosen[name] is not None]
    names = ", ".join(flag for _, flag in _FLAGS)
    if len(given) != 1:
        base._fail(f"give exactly one of {names}"
                   + ("" if not given else f", not {' and '.join(f for _, f in given)}"))
    name, flag = given[0]
    value = str(chosen[name])
    if name == "serial":
        from identity.errors import SigilError
        from identity.revocation import parse_serial

        try:
            parse_serial(value)
        except SigilError as exc:
            base._fail(f"{flag}: {exc}")
        return admin_pb2.RevokeSVIDRequest(x509_serial=value)
    if name == "spiffe_id":
        base._check_spiffe_id(value, flag)
        return admin_pb2.RevokeSVIDRequest(spiffe_id=value)
    if not value:
        base._fail(f"{flag} must not be empty")
    if name == "jti":
        return admin_pb2.RevokeSVIDRequest(jwt_id=value)
    return admin_pb2.RevokeSVIDRequest(jwt_key_id=value)


@click.group("svid")
def svid() -> None:
    """Revoke issued SVIDs before they expire, and list what is revoked.

    Agents learn revocations at their next sync: they stop serving a revoked
    X.509-SVID and fetch a new one at once, and ValidateJWTSVID refuses a revoked
    JWT-SVID. Revocations are kept until what they name has expired.
    """


@svid.command("revoke")
@click.option("--serial", help="An X.509-SVID serial number in hex, as openssl prints it.")
@click.option("--spiffe-id", help="Every X.509-SVID issued for this SPIFFE ID until now.")
@click.option("--jti", help="A JWT-SVID by its jti claim.")
@click.option("--key-id", help="Every JWT-SVID signed with this JWT key (its kid).")
def revoke(serial: str | None, spiffe_id: str | None, jti: str | None, key_id: str | None,
           socket_path: str, output: str) -> None:
    """Revoke X.509-SVIDs (by serial or SPIFFE ID) or JWT-SVIDs (by jti or key id).

    \b
    Examples:
      sigil-server svid revoke --serial 4f:1a:09:...
      sigil-server svid revoke --spiffe-id spiffe://example.org/payments
      sigil-server svid revoke --jti 3q2-7wz... --output json
    """
    request = _request({"serial": serial, "spiffe_id": spiffe_id, "jti": jti,
                        "key_id": key_id})
    found = base._call(socket_path, lambda s: s.RevokeSVID(request, timeout=30))
    if output == "json":
        base._emit_json(revocation_json(found))
    else:
        click.echo(f"Revoked: {_text(found).strip()}")


@svid.command("list-revoked")
def list_revoked(socket_path: str, output: str) -> None:
    """List the revocations not yet past their expiry, oldest first.

    \b
    Example:
      sigil-server svid list-revoked --output json
    """
    resp = base._call(socket_path,
                      lambda s: s.ListRevokedSVIDs(admin_pb2.ListRevokedSVIDsRequest(),
                                                   timeout=30))
    if output == "json":
        base._emit_json({"version": resp.version,
                         "revocations": [revocation_json(r) for r in resp.revocations]})
        return
    for r in resp.revocations:
        click.echo(_text(r))
    count = len(resp.revocations)
    click.echo(f"{count} revocation{'' if count == 1 else 's'}")


def make_group(cli_module: ModuleType) -> click.Group:
    """The ``svid`` group, using ``cli_module``'s helpers."""
    global base
    base = cli_module
    for command in (revoke, list_revoked):
        base.output_option(command)
        base.socket_option(command)
    return svid
