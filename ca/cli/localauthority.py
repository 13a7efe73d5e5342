"""``sigil-server localauthority x509|jwt show|prepare|activate|taint|revoke``.

Registered on the ``sigil-server`` command group by :mod:`ca.cli`, which passes
itself in (it may run as ``__main__``, so this module cannot import it): the same
admin-socket helpers, so errors are the same one ``Error: ...`` line, exit 2.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import click

from api.protos.sigil.admin.v1 import admin_pb2

base: Any = None  # the ca.cli module, set by make_group


def authority_json(a: admin_pb2.LocalAuthority) -> dict[str, Any]:
    """An authority as stable JSON keys."""
    return {
        "kind": a.kind,
        "authority_id": a.authority_id,
        "status": a.status,
        "not_after": base._unix_to_rfc3339(a.not_after),
        "owner": a.owner,
        "signed_until": base._unix_to_rfc3339(a.signed_until) if a.signed_until else None,
        "upstream_authority_id": a.upstream_authority_id or None,
        "not_before": base._unix_to_rfc3339(a.not_before) if a.not_before else None,
        "drops_at": base._unix_to_rfc3339(a.drops_at) if a.drops_at else None,
        "owner_hostname": a.owner_hostname or None,
    }


def _text(a: admin_pb2.LocalAuthority) -> str:
    line = (f"{a.status:<9} {a.authority_id}  not after {base._unix_to_rfc3339(a.not_after)}"
            f"  server {a.owner or '-'}")
    if a.upstream_authority_id:
        line += f"  upstream {a.upstream_authority_id}"
    return line


def _emit(a: admin_pb2.LocalAuthority, output: str) -> None:
    if output == "json":
        base._emit_json(authority_json(a))
    else:
        click.echo(_text(a))


@click.group("localauthority")
def localauthority() -> None:
    """Show this trust domain's signing authorities and force rotation steps.

    The server rotates on its own (prepare at 1/2 of the CA lifetime, activate at
    5/6, drop the old one once what it signed has expired); these commands let an
    operator do each step now, e.g. after a key compromise:

    \b
      sigil-server localauthority x509 prepare    # new CA, published in the bundle
      (wait until agents have synced the bundle: a few sync intervals)
      sigil-server localauthority x509 activate   # new CA signs; old one is "old"
      sigil-server localauthority x509 taint <old-authority-id>
      (agents re-issue SVIDs signed by the tainted CA at their next sync)
      sigil-server localauthority x509 revoke <old-authority-id>
    """


_Command = Callable[..., None]


def _kind_group(kind: str, label: str) -> click.Group:
    socket_option: Callable[[_Command], _Command] = base.socket_option
    output_option: Callable[[_Command], _Command] = base.output_option

    @click.group(kind, help=f"The {label} authorities (see `localauthority --help`).")
    def group() -> None:
        pass

    def request(authority_id: str = "", force: bool = False) -> admin_pb2.LocalAuthorityRequest:
        return admin_pb2.LocalAuthorityRequest(kind=kind, authority_id=authority_id,
                                               force=force)

    @group.command("show")
    @socket_option
    @output_option
    def show(socket_path: str, output: str) -> None:
        resp = base._call(socket_path, lambda s: s.ListLocalAuthorities(request(), timeout=30))
        if output == "json":
            base._emit_json({"authorities": [authority_json(a) for a in resp.authorities]})
            return
        for a in resp.authorities:
            click.echo(_text(a))

    show.help = (f"List the {label} authorities with their status (prepared, active, "
                 f"old, tainted), id and end of life.\n\n\b\nExample:\n"
                 f"  sigil-server localauthority {kind} show --output json")

    @group.command("prepare")
    @socket_option
    @output_option
    def prepare(socket_path: str, output: str) -> None:
        _emit(base._call(socket_path,
                         lambda s: s.PrepareLocalAuthority(request(), timeout=60)), output)

    prepare.help = (f"Create the next {label} authority now and publish it in the bundle "
                    f"(it does not sign yet). Fails if one is already prepared.\n\n\b\n"
                    f"Example:\n  sigil-server localauthority {kind} prepare")

    @group.command("activate")
    @socket_option
    @output_option
    def activate(socket_path: str, output: str) -> None:
        _emit(base._call(socket_path,
                         lambda s: s.ActivateLocalAuthority(request(), timeout=60)), output)

    activate.help = (f"Make the prepared {label} authority the one that signs; the "
                     f"current one becomes old. Fails if nothing is prepared.\n\n\b\n"
                     f"Example:\n  sigil-server localauthority {kind} activate")

    @group.command("taint")
    @click.argument("authority_id", required=False)
    @authority_id_option
    @socket_option
    @output_option
    def taint(authority_id: str | None, authority_id_flag: str | None, socket_path: str,
              output: str) -> None:
        chosen = _one_authority_id(authority_id, authority_id_flag)
        _emit(base._call(socket_path, lambda s: s.TaintLocalAuthority(
            request(chosen), timeout=60)), output)

    effect = ("agents re-issue every SVID it signed at their next sync" if kind == "x509"
              else "sync carries it as tainted; agents replace the tokens it signed at "
                   "their next rotation (half their lifetime)")
    taint.help = (f"Mark an old {label} authority tainted: {effect}. AUTHORITY_ID is from "
                  f"`show`; give it as "
                  f"--authority-id when it starts with '-'.\n\n\b\n"
                  f"Example:\n  sigil-server localauthority {kind} taint 3f2a...")

    @group.command("revoke")
    @click.argument("authority_id", required=False)
    @authority_id_option
    @click.option("--force", is_flag=True,
                  help="Remove it even though SVIDs it signed are still valid (they break).")
    @socket_option
    @output_option
    def revoke(authority_id: str | None, authority_id_flag: str | None, force: bool,
               socket_path: str, output: str) -> None:
        chosen = _one_authority_id(authority_id, authority_id_flag)
        _emit(base._call(socket_path, lambda s: s.RevokeLocalAuthority(
            request(chosen, force), timeout=60)), output)

    revoke.help = (f"Remove a tainted {label} authority from the bundle. Refused while "
                   f"SVIDs it signed are still valid, unless --force. AUTHORITY_ID as for "
                   f"`taint`.\n\n\b\n"
                   f"Example:\n  sigil-server localauthority {kind} revoke 3f2a...")
    return group


authority_id_option = click.option(
    "--authority-id", "authority_id_flag", metavar="ID",
    help="The authority, as `show` prints it (instead of AUTHORITY_ID; JWT key ids may "
         "start with '-', which the shell form cannot take).")


def _one_authority_id(positional: str | None, flag: str | None) -> str:
    """The authority ID given either way; exactly one way."""
    if positional and flag:
        base._fail("give the authority ID once: as AUTHORITY_ID or as --authority-id")
    chosen = positional or flag
    if not chosen:
        base._fail("an authority ID is required (AUTHORITY_ID or --authority-id; "
                   "see `show`)")
    assert chosen is not None  # _fail does not return
    return chosen


def make_group(cli_module: ModuleType) -> click.Group:
    """The ``localauthority`` group, using ``cli_module``'s helpers."""
    global base
    base = cli_module
    localauthority.add_command(_kind_group("x509", "X.509 CA"))
    localauthority.add_command(_kind_group("jwt", "JWT signing"))
    localauthority.add_command(_kind_group("wit", "WIT-SVID signing"))
    return localauthority
