"""``sigil-server bundle show | list | set | delete``: our bundle and foreign ones.

Registered on the ``bundle`` group by :mod:`ca.cli`, which passes itself in (it may
run as ``__main__``, so this module cannot import it): the same admin-socket
helpers, so errors are the same one ``Error: ...`` line, exit 2.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn

import click

from api.protos.sigil.admin.v1 import admin_pb2
from api.protos.sigil.types.v1 import types_pb2
from ca.errors import InvalidArgumentError
from ca.registry.foreign_bundles import MAX_BUNDLE_BYTES, parse_trust_domain
from identity.bundle import Bundle, JwtAuthority, bundle_map_to_json, parse_bundle_map
from identity.errors import BundleError
from identity.spiffeid import TrustDomain

base: Any = None  # the ca.cli module, set by add_commands

format_option = click.option(
    "--format", "fmt", type=click.Choice(["pem", "spiffe"]), default="pem", show_default=True,
    help="pem: CA certificates only; spiffe: SPIFFE bundle document (JWKS, with JWT keys).")

MAP_FORMAT = "spiffe-map"
map_format_option = click.option(
    "--format", "fmt", type=click.Choice(["pem", "spiffe", MAP_FORMAT]), default="pem",
    show_default=True,
    help="pem: CA certificates only; spiffe: SPIFFE bundle document (JWKS, with JWT keys); "
         "spiffe-map: SPIFFE bundle map {\"trust_domains\": {name: bundle}}.")


def _td_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--trust-domain", "td_name", metavar="NAME",
                      help="The foreign trust domain, e.g. b.example.org.")(fn)
    return click.option("--id", "td_id", metavar="SPIFFE_ID",
                        help="The foreign trust domain as an ID, e.g. spiffe://b.example.org.")(fn)


def _fail(message: str) -> NoReturn:
    base._fail(message)
    raise AssertionError("unreachable")  # base is typed Any: say it never returns


def _trust_domain(td_id: str | None, td_name: str | None, *, required: bool) -> TrustDomain | None:
    if td_id and td_name:
        _fail("give either --id or --trust-domain, not both")
    text = td_id or td_name
    if not text:
        if required:
            _fail("name the foreign trust domain: --id spiffe://NAME or --trust-domain NAME")
        return None
    flag = "--id" if td_id else "--trust-domain"
    if td_id and not td_id.startswith("spiffe://"):
        _fail(f"--id {td_id!r} must look like spiffe://NAME")
    try:
        return parse_trust_domain(text, flag)
    except InvalidArgumentError as exc:
        _fail(str(exc))


def bundle_from_proto(msg: types_pb2.Bundle) -> Bundle:
    """A Bundle from the admin API's message."""
    from cryptography import x509

    from identity.keys import load_jwt_public_key_der

    return Bundle(
        trust_domain=TrustDomain(msg.trust_domain),
        x509_authorities=tuple(x509.load_der_x509_certificate(d) for d in msg.x509_authorities),
        jwt_authorities=tuple(
            JwtAuthority(key_id=k.key_id, public_key=load_jwt_public_key_der(k.public_key),
                         expires_at=dt.datetime.fromtimestamp(k.expires_at, dt.UTC)
                         if k.expires_at else None)
            for k in msg.jwt_authorities),
        sequence_number=msg.sequence_number,
        refresh_hint=msg.refresh_hint or None,
        wit_authorities=tuple(
            JwtAuthority(key_id=k.key_id, public_key=load_jwt_public_key_der(k.public_key),
                         expires_at=dt.datetime.fromtimestamp(k.expires_at, dt.UTC)
                         if k.expires_at else None)
            for k in msg.wit_authorities),
    )


def bundle_json(b: Bundle) -> dict[str, Any]:
    """A bundle as stable JSON keys; ``bundle`` is the SPIFFE bundle document."""
    return {
        "trust_domain": b.trust_domain.name,
        "sequence_number": b.sequence_number or 0,
        "refresh_hint": b.refresh_hint,
        "x509_authorities": len(b.x509_authorities),
        "jwt_authorities": len(b.jwt_authorities),
        "bundle": b.to_jwks(),
    }


def _render(b: Bundle, fmt: str) -> str:
    return b.x509_pem().decode() if fmt == "pem" else b.to_json().decode() + "\n"


def _read_input(path: str | None) -> bytes:
    try:
        if path is None or path == "-":
            data = sys.stdin.buffer.read(MAX_BUNDLE_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_BUNDLE_BYTES + 1)
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")
    if len(data) > MAX_BUNDLE_BYTES:
        _fail(f"{path or 'stdin'} is larger than {MAX_BUNDLE_BYTES} bytes: not a bundle")
    if not data.strip():
        _fail(f"{path or 'stdin'} is empty: expected a bundle")
    return data


@click.command("show")
@_td_options
@map_format_option
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="text: the bundle in --format; json: stable keys.")
@click.option("--socket-path", type=click.Path(dir_okay=False), default=None,
              help="The server's admin socket [default: $SIGIL_SERVER_SOCKET or built-in].")
def show(td_id: str | None, td_name: str | None, fmt: str, output: str,
         socket_path: str | None) -> None:
    """Print a trust bundle: ours, or a foreign trust domain's with --id/--trust-domain.

    \b
    Examples:
      sigil-server bundle show > bundle.pem
      sigil-agent run --trust-bundle bundle.pem ...
      sigil-server bundle show --format spiffe > a.example.org.bundle.json
      sigil-server bundle show --id spiffe://b.example.org --format spiffe
      sigil-server bundle show --format spiffe-map > bundles.json

    --format spiffe-map prints a SPIFFE bundle map: with --id/--trust-domain, of
    that trust domain only; otherwise of ours and every foreign bundle held.
    """
    td = _trust_domain(td_id, td_name, required=False)
    socket = socket_path or base._default_socket()
    msg = base._call(socket, lambda s: s.GetBundle(
        admin_pb2.GetBundleRequest(trust_domain=td.name if td else ""),
        timeout=base.ADMIN_TIMEOUT))
    b = bundle_from_proto(msg)
    if fmt == MAP_FORMAT:
        bundles = [b]
        if td is None:
            resp = base._call(socket, lambda s: s.ListBundles(
                admin_pb2.ListBundlesRequest(), timeout=base.ADMIN_TIMEOUT))
            bundles += [bundle_from_proto(m) for m in resp.bundles
                        if m.trust_domain != b.trust_domain.name]
        click.echo(bundle_map_to_json(bundles).decode())
        return
    if output == "json":
        base._emit_json(bundle_json(b))
    else:
        click.echo(_render(b, fmt), nl=False)


@click.command("list")
@format_option
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="text: each bundle in --format under a header; json.")
@click.option("--socket-path", type=click.Path(dir_okay=False), default=None,
              help="The server's admin socket [default: $SIGIL_SERVER_SOCKET or built-in].")
def list_(fmt: str, output: str, socket_path: str | None) -> None:
    """List the bundles of foreign trust domains (federation), by trust domain.

    \b
    Example:
      sigil-server bundle list
      sigil-server bundle list --output json
    """
    resp = base._call(socket_path or base._default_socket(), lambda s: s.ListBundles(
        admin_pb2.ListBundlesRequest(), timeout=base.ADMIN_TIMEOUT))
    bundles = [bundle_from_proto(m) for m in resp.bundles]
    if output == "json":
        base._emit_json({"bundles": [bundle_json(b) for b in bundles]})
        return
    if not bundles:
        click.echo("No foreign bundles.")
    for b in bundles:
        click.echo(f"# {b.trust_domain.id_string()} sequence {b.sequence_number or 0}")
        click.echo(_render(b, fmt), nl=False)


@click.command("set")
@_td_options
@map_format_option
@click.option("--path", type=click.Path(dir_okay=False), default=None,
              help="File holding the bundle; '-' or absent: read standard input.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format; json keys are stable.")
@click.option("--socket-path", type=click.Path(dir_okay=False), default=None,
              help="The server's admin socket [default: $SIGIL_SERVER_SOCKET or built-in].")
def set_(td_id: str | None, td_name: str | None, fmt: str, path: str | None, output: str,
         socket_path: str | None) -> None:
    """Trust a foreign trust domain: store (or replace) its bundle by hand.

    Workloads whose entries name the trust domain (entry create --federates-with)
    receive the bundle at their agent's next sync. A bundle set here replaces the
    one held whatever its sequence number; nothing is written if it does not parse.
    Use --format spiffe to include the JWT keys (for JWT-SVID validation).

    \b
    Examples (the other side ran: sigil-server bundle show --format spiffe > b.json):
      sigil-server bundle set --id spiffe://b.example.org --format spiffe --path b.json
      ssh b-server sigil-server bundle show | sigil-server bundle set --trust-domain b.example.org
      sigil-server bundle set --format spiffe-map --path bundles.json

    --format spiffe-map sets every bundle of a SPIFFE bundle map (the map names
    the trust domains: no --id) in one transaction: all of them or none. A
    duplicate trust domain, a bad name, a bad bundle, our own trust domain (the
    CA manages that bundle: remove its member) or more than 1000 members refuse
    the whole map and nothing is written. Foreign bundles held but absent from
    the map are kept.
    """
    if fmt == MAP_FORMAT:
        _set_map(td_id, td_name, path, output, socket_path)
        return
    td = _trust_domain(td_id, td_name, required=True)
    assert td is not None
    data = _read_input(path)
    if fmt == "pem" and data.lstrip().startswith(b"{"):
        # The server would say "no PEM certificate": say what the operator meant.
        base._fail(f"{path or 'standard input'} holds a JSON document, not PEM: a SPIFFE "
                   "bundle (as `bundle show --format spiffe` prints it) needs --format spiffe")
    msg = base._call(socket_path or base._default_socket(), lambda s: s.SetBundle(
        admin_pb2.SetBundleRequest(trust_domain=td.name, format=fmt, data=data),
        timeout=base.ADMIN_TIMEOUT))
    b = bundle_from_proto(msg)
    if output == "json":
        base._emit_json(bundle_json(b))
    else:
        click.echo(f"Bundle of {td.id_string()} set: sequence {b.sequence_number or 0}, "
                   f"{len(b.x509_authorities)} CA certificate(s), "
                   f"{len(b.jwt_authorities)} JWT key(s).")


def _set_map(td_id: str | None, td_name: str | None, path: str | None, output: str,
             socket_path: str | None) -> None:
    if td_id or td_name:
        _fail("a bundle map names its trust domains: drop --id/--trust-domain")
    data = _read_input(path)
    try:
        bundles = parse_bundle_map(data)
    except BundleError as exc:
        _fail(f"{path or 'stdin'}: {exc}")
    # One call, one transaction on the server: it checks every member (our own
    # trust domain, a bad bundle, too many) before the first write, and a failure
    # while writing rolls all of them back. Nothing is ever half applied.
    request = admin_pb2.BatchSetFederatedBundlesRequest(bundles=[
        admin_pb2.SetBundleRequest(trust_domain=b.trust_domain.name, format="spiffe",
                                   data=b.to_json())
        for b in bundles])
    resp = base._call(socket_path or base._default_socket(),
                      lambda s: s.BatchSetFederatedBundles(request, timeout=base.ADMIN_TIMEOUT))
    done = [bundle_from_proto(m) for m in resp.bundles]
    if output == "json":
        base._emit_json({"bundles": [bundle_json(b) for b in done]})
        return
    click.echo(f"Bundle map set: {len(done)} trust domain(s).")
    for b in done:
        click.echo(f"  {b.trust_domain.id_string()}: sequence {b.sequence_number or 0}, "
                   f"{len(b.x509_authorities)} CA certificate(s), "
                   f"{len(b.jwt_authorities)} JWT key(s)")


@click.command("delete")
@_td_options
@click.option("--socket-path", type=click.Path(dir_okay=False), default=None,
              help="The server's admin socket [default: $SIGIL_SERVER_SOCKET or built-in].")
def delete(td_id: str | None, td_name: str | None, socket_path: str | None) -> None:
    """Stop trusting a foreign trust domain: delete its bundle.

    Entries that federate with it keep the name; their workloads stop receiving
    the bundle at the next sync. A federation relationship would fetch it again:
    delete that too.

    \b
    Example:
      sigil-server bundle delete --id spiffe://b.example.org
    """
    td = _trust_domain(td_id, td_name, required=True)
    assert td is not None
    base._call(socket_path or base._default_socket(), lambda s: s.DeleteBundle(
        admin_pb2.DeleteBundleRequest(trust_domain=td.name), timeout=base.ADMIN_TIMEOUT))
    click.echo(f"Bundle of {td.id_string()} deleted.")


def add_commands(module: ModuleType, group: click.Group) -> None:
    """Add the bundle commands to ``group``, using ``module``'s admin helpers."""
    global base
    base = module
    for command in (show, list_, set_, delete):
        group.add_command(command)
