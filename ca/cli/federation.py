"""``sigil-server federation create | list | show | update | delete | refresh``.

Registered on the ``sigil-server`` command group by :mod:`ca.cli`, which passes
itself in (it may run as ``__main__``, so this module cannot import it): the same
admin-socket helpers, so errors are the same one ``Error: ...`` line, exit 2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import click

from api.protos.sigil.admin.v1 import admin_pb2
from ca.config.relationship import MAX_BOOTSTRAP_BYTES, PROFILES
from ca.errors import InvalidArgumentError
from ca.registry.foreign_bundles import parse_trust_domain

base: Any = None  # the ca.cli module, set by make_group
TIMEOUT = 60.0

_Command = Callable[..., Any]


def _fail(message: str) -> NoReturn:
    base._fail(message)
    raise AssertionError("unreachable")  # base is typed Any: say it never returns


def relationship_json(r: admin_pb2.FederationRelationship) -> dict[str, Any]:
    """A relationship as stable JSON keys (times RFC 3339 UTC, null when unset)."""
    ts = base._unix_to_rfc3339
    return {
        "trust_domain": r.trust_domain,
        "bundle_endpoint_url": r.bundle_endpoint_url,
        "profile": r.profile,
        "endpoint_spiffe_id": r.endpoint_spiffe_id or None,
        "bundle_sequence": r.bundle_sequence if r.has_bundle else None,
        "last_refresh": r.last_refresh or None,
        "last_refresh_message": r.last_refresh_message or None,
        "next_refresh_at": ts(r.next_refresh_at) if r.next_refresh_at else None,
        "created_at": ts(r.created_at) if r.created_at else None,
        "updated_at": ts(r.updated_at) if r.updated_at else None,
    }


def _text(r: admin_pb2.FederationRelationship) -> str:
    lines = [
        f"Trust domain        : {r.trust_domain}",
        f"Bundle endpoint URL : {r.bundle_endpoint_url}",
        f"Profile             : {r.profile}",
    ]
    if r.endpoint_spiffe_id:
        lines.append(f"Endpoint SPIFFE ID  : {r.endpoint_spiffe_id}")
    lines.append(f"Bundle held         : "
                 f"{f'sequence {r.bundle_sequence}' if r.has_bundle else 'none yet'}")
    if r.last_refresh:
        detail = "" if r.last_refresh == "ok" else f" ({r.last_refresh_message})"
        lines.append(f"Last refresh        : {r.last_refresh}{detail}")
    return "\n".join(lines)


def _emit(r: admin_pb2.FederationRelationship, output: str) -> None:
    if output == "json":
        base._emit_json(relationship_json(r))
    else:
        click.echo(_text(r))


def _td(text: str) -> str:
    try:
        return parse_trust_domain(text, "--trust-domain").name
    except InvalidArgumentError as exc:
        _fail(str(exc))


def _read_bootstrap(path: str | None) -> bytes:
    if path is None:
        return b""
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(MAX_BOOTSTRAP_BYTES + 1)
    except OSError as exc:
        _fail(f"--bootstrap-bundle {path}: {exc.strerror}")
    if len(data) > MAX_BOOTSTRAP_BYTES:
        _fail(f"--bootstrap-bundle {path} is larger than {MAX_BOOTSTRAP_BYTES} bytes")
    return data


def _relationship_options(fn: _Command) -> _Command:
    fn = click.option("--bootstrap-bundle", "bootstrap", type=click.Path(dir_okay=False),
                      help="https_spiffe, endpoint in the foreign trust domain: that trust "
                           "domain's bundle (SPIFFE JSON or PEM) for the first fetch.")(fn)
    fn = click.option("--endpoint-spiffe-id", default="",
                      help="https_spiffe: the SPIFFE ID the endpoint's certificate must "
                           "carry.")(fn)
    fn = click.option("--profile", required=True, type=click.Choice(list(PROFILES)),
                      help="How the endpoint is authenticated: https_web (Web PKI "
                           "certificate) or https_spiffe (an X509-SVID).")(fn)
    fn = click.option("--bundle-endpoint-url", required=True,
                      help="The foreign bundle endpoint, an https:// URL.")(fn)
    return click.option("--trust-domain", required=True,
                        help="The foreign trust domain, e.g. b.example.")(fn)


def _request(trust_domain: str, bundle_endpoint_url: str, profile: str,
             endpoint_spiffe_id: str, bootstrap: str | None
             ) -> admin_pb2.FederationRelationshipRequest:
    return admin_pb2.FederationRelationshipRequest(
        relationship=admin_pb2.FederationRelationship(
            trust_domain=trust_domain, bundle_endpoint_url=bundle_endpoint_url,
            profile=profile, endpoint_spiffe_id=endpoint_spiffe_id),
        bootstrap_bundle=_read_bootstrap(bootstrap))


@click.group("federation")
def federation() -> None:
    """Federation relationships: foreign trust domains whose bundles this server fetches.

    A relationship names a foreign trust domain, its bundle endpoint URL and how the
    endpoint is authenticated (https_web or https_spiffe). The server fetches the
    bundle on its refresh hint and hands it to agents whose entries federate with
    that trust domain (`entry create --federates-with`). Relationships are one-way:
    the other side creates one for us too. See docs/federation.md.

    \b
    Example:
      sigil-server federation create --trust-domain b.example \\
          --bundle-endpoint-url https://sigil.b.example:8443/ --profile https_spiffe \\
          --endpoint-spiffe-id spiffe://b.example/sigil/server \\
          --bootstrap-bundle b.example.json
    """


def _add_commands(group: click.Group) -> None:
    socket_option: Callable[[_Command], _Command] = base.socket_option
    output_option: Callable[[_Command], _Command] = base.output_option

    @group.command("create")
    @_relationship_options
    @socket_option
    @output_option
    def create(trust_domain: str, bundle_endpoint_url: str, profile: str,
               endpoint_spiffe_id: str, bootstrap: str | None, socket_path: str,
               output: str) -> None:
        """Trust a foreign trust domain: fetch its bundle from its bundle endpoint.

        https_spiffe needs --endpoint-spiffe-id; when that ID is in the foreign trust
        domain itself, also --bootstrap-bundle (get it from the other side with
        `sigil-server bundle show --format spiffe`). Nothing is inferred: the trust
        domain is not taken from the URL, and no profile falls back to the other.

        \b
        Example:
          sigil-server federation create --trust-domain b.example \\
              --bundle-endpoint-url https://sigil.b.example:8443/ \\
              --profile https_spiffe \\
              --endpoint-spiffe-id spiffe://b.example/sigil/server \\
              --bootstrap-bundle b.example.json
          sigil-server federation create --trust-domain c.example \\
              --bundle-endpoint-url https://bundles.c.example/ --profile https_web
        """
        req = _request(trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id,
                       bootstrap)
        _emit(base._call(socket_path, lambda s: s.CreateFederationRelationship(
            req, timeout=TIMEOUT)), output)

    @group.command("update")
    @_relationship_options
    @socket_option
    @output_option
    def update(trust_domain: str, bundle_endpoint_url: str, profile: str,
               endpoint_spiffe_id: str, bootstrap: str | None, socket_path: str,
               output: str) -> None:
        """Replace a relationship's URL, profile and endpoint ID (give them all).

        A --bootstrap-bundle is stored only if no bundle of that trust domain is held.

        \b
        Example:
          sigil-server federation update --trust-domain b.example \\
              --bundle-endpoint-url https://sigil2.b.example:8443/ \\
              --profile https_spiffe \\
              --endpoint-spiffe-id spiffe://b.example/sigil/server
        """
        req = _request(trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id,
                       bootstrap)
        _emit(base._call(socket_path, lambda s: s.UpdateFederationRelationship(
            req, timeout=TIMEOUT)), output)

    @group.command("list")
    @socket_option
    @output_option
    def list_(socket_path: str, output: str) -> None:
        """List every relationship with the state of its foreign bundle.

        \b
        Example:
          sigil-server federation list --output json
        """
        resp = base._call(socket_path, lambda s: s.ListFederationRelationships(
            admin_pb2.ListFederationRelationshipsRequest(), timeout=TIMEOUT))
        if output == "json":
            base._emit_json({"relationships": [relationship_json(r)
                                               for r in resp.relationships]})
            return
        if not resp.relationships:
            click.echo("No federation relationships.")
        click.echo("\n\n".join(_text(r) for r in resp.relationships), nl=bool(resp.relationships))

    @group.command("show")
    @click.option("--trust-domain", required=True, help="The foreign trust domain.")
    @socket_option
    @output_option
    def show(trust_domain: str, socket_path: str, output: str) -> None:
        """Show one relationship: endpoint, profile, bundle held, latest refresh.

        \b
        Example:
          sigil-server federation show --trust-domain b.example
        """
        name = admin_pb2.FederationRelationshipName(trust_domain=_td(trust_domain))
        _emit(base._call(socket_path, lambda s: s.GetFederationRelationship(
            name, timeout=TIMEOUT)), output)

    @group.command("delete")
    @click.option("--trust-domain", required=True, help="The foreign trust domain.")
    @socket_option
    @output_option
    def delete(trust_domain: str, socket_path: str, output: str) -> None:
        """Stop fetching a foreign trust domain's bundle.

        The bundle held stays until `sigil-server bundle delete`, so workloads keep
        trusting it until then.

        \b
        Example:
          sigil-server federation delete --trust-domain b.example
          sigil-server bundle delete --trust-domain b.example
        """
        name = admin_pb2.FederationRelationshipName(trust_domain=_td(trust_domain))
        base._call(socket_path, lambda s: s.DeleteFederationRelationship(name, timeout=TIMEOUT))
        if output == "json":
            base._emit_json({"deleted": name.trust_domain})
        else:
            click.echo(f"Deleted the federation relationship with {name.trust_domain}.")

    @group.command("refresh")
    @click.option("--trust-domain", required=True, help="The foreign trust domain.")
    @socket_option
    @output_option
    def refresh(trust_domain: str, socket_path: str, output: str) -> None:
        """Fetch a foreign bundle now, instead of waiting for its refresh hint.

        Exits 2 with the reason when the endpoint's answer is refused (the bundle held
        is kept).

        \b
        Example:
          sigil-server federation refresh --trust-domain b.example
        """
        name = admin_pb2.FederationRelationshipName(trust_domain=_td(trust_domain))
        resp = base._call(socket_path, lambda s: s.RefreshFederatedBundle(name, timeout=TIMEOUT))
        if not resp.ok:
            _fail(f"refresh of {name.trust_domain} failed ({resp.reason}): {resp.message}")
        if output == "json":
            base._emit_json({"trust_domain": name.trust_domain, "changed": resp.changed,
                             "sequence": resp.sequence})
        else:
            what = "updated" if resp.changed else "unchanged"
            click.echo(f"Bundle of {name.trust_domain} {what} (sequence {resp.sequence}).")


def make_group(cli_module: ModuleType) -> click.Group:
    """The ``federation`` group, using ``cli_module``'s helpers."""
    global base
    base = cli_module
    _add_commands(federation)
    return federation
