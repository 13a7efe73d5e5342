"""``sigil-server entry create | show | update | count | delete``: registration entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import grpc

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.types.v1 import types_pb2
from ca.cli.common import (
    ADMIN_TIMEOUT,
    DURATION_OR_DEFAULT,
    _all_pages,
    _call,
    _check_spiffe_id,
    _emit_count,
    _emit_json,
    _emit_list,
    _entry_text,
    _fail,
    _parse_selectors,
    _refuse_token_secret,
    entry_json,
    output_option,
    socket_option,
)
from identity.errors import SigilError


@click.group()
def entry() -> None:
    """Registration entries: which workloads get which SPIFFE IDs."""


def _expires_at(value: str | None) -> int:
    from ca.cli.entryfile import parse_time

    try:
        return parse_time(value, "--expires-at")
    except SigilError as exc:
        _fail(str(exc))


def _node_parent(spiffe_id: str) -> str:
    from ca.cli.entryfile import server_id_for

    try:
        return server_id_for(spiffe_id)
    except SigilError as exc:
        _fail(f"--spiffe-id: {exc}")


def _create_batch(data_file: str, socket_path: str, output: str, *, force: bool) -> None:
    from ca.cli.entryfile import load_batch

    try:
        entries = load_batch(Path(data_file).read_bytes(), source=data_file)
    except OSError as exc:
        _fail(f"cannot read {data_file}: {exc.strerror}")
    except SigilError as exc:
        _fail(str(exc))
    for i, msg in enumerate(entries):
        _refuse_token_secret(f"{data_file}: entry {i}: parent_id", msg.parent_id)
        _parse_selectors([f"{s.type}:{s.value}" for s in msg.selectors], check_types=True,
                         force=force)
    resp = _call(socket_path, lambda s: s.BatchCreateEntry(
        admin_pb2.BatchCreateEntryRequest(entries=entries), timeout=ADMIN_TIMEOUT))
    failed = 0
    docs: list[dict[str, Any]] = []
    for msg, result in zip(entries, resp.results, strict=True):
        if result.status.code == 0:
            docs.append({"status": "created", "entry": entry_json(result.entry)})
        else:
            failed += 1
            docs.append({"status": "error", "code": grpc.StatusCode(
                _code_tuple(result.status.code)).name, "message": result.status.message,
                "spiffe_id": msg.spiffe_id})
    if output == "json":
        _emit_json({"results": docs})
    else:
        for i, doc in enumerate(docs):
            if doc["status"] == "created":
                e = doc["entry"]
                click.echo(f"Created entry {e['id']} ({e['spiffe_id']})")
            else:
                click.echo(f"Not created: entry {i} ({doc['spiffe_id']}): {doc['message']}")
    if failed:
        _fail(f"{failed} of {len(entries)} entries were not created")


def _code_tuple(code: int) -> tuple[int, str]:
    for member in grpc.StatusCode:
        if member.value[0] == code:
            return member.value  # type: ignore[no-any-return]
    return grpc.StatusCode.UNKNOWN.value  # type: ignore[no-any-return]


@entry.command("create")
@click.option("--spiffe-id", help="The SPIFFE ID workloads get.")
@click.option("--parent-id",
              help="The agent (or node alias) whose workloads may get it.")
@click.option("--node", is_flag=True,
              help="A node-alias entry: its parent is the server, its selectors pick agents.")
@click.option("--selector", "selectors", multiple=True,
              help="TYPE:VALUE a workload must carry; repeat for several.")
@click.option("--x509-svid-ttl", type=DURATION_OR_DEFAULT, default=0,
              help="600, 10m, 1h; 0 is the server default.")
@click.option("--jwt-svid-ttl", type=DURATION_OR_DEFAULT, default=0,
              help="300, 5m; 0 is the server default.")
@click.option("--dns-name", "dns_names", multiple=True, help="DNS SAN; repeatable.")
@click.option("--federates-with", multiple=True, help="Trust domain whose bundle to add.")
@click.option("--hint", default="", help="A hint for workloads with several identities.")
@click.option("--admin", is_flag=True, help="Workloads may call the admin API with its SVID.")
@click.option("--downstream", is_flag=True, help="The identity of a downstream server.")
@click.option("--expires-at", help="When the entry stops applying: RFC 3339 or unix seconds.")
@click.option("--data", "data_file", type=click.Path(dir_okay=False),
              help='JSON file with many entries: a list, or {"entries": [...]}.')
@click.option("--force", is_flag=True,
              help="Register selectors of a type no attestor knows (with a warning).")
@socket_option
@output_option
def entry_create(
    spiffe_id: str | None, parent_id: str | None, node: bool, selectors: tuple[str, ...],
    x509_svid_ttl: int, jwt_svid_ttl: int, dns_names: tuple[str, ...],
    federates_with: tuple[str, ...], hint: str, admin: bool, downstream: bool,
    expires_at: str | None, data_file: str | None, force: bool, socket_path: str,
    output: str,
) -> None:
    """Register a workload identity (or, with --data, many at once).

    With --data, every entry in the file is validated first (one invalid entry:
    nothing is created), then each is created on its own; the output lists each
    entry's outcome, and the command fails if any was not created. Entries in the
    file use the keys of `entry show --output json`, selectors as "type:value" or
    {"type": ..., "value": ...}, and "node": true for node aliases.

    \b
    Examples:
      sigil-server entry create --spiffe-id spiffe://example.org/web \\
          --parent-id spiffe://example.org/sigil/agent/join_token/0123abcd0123abcd \\
          --selector unix:uid:1000 --dns-name web.example.org
      sigil-server entry create --node --spiffe-id spiffe://example.org/nodes/rack-1 \\
          --selector join_token:0123abcd0123abcd
      sigil-server entry create --data entries.json
    """
    if data_file is not None:
        if spiffe_id or parent_id or node or selectors:
            _fail("--data cannot be combined with --spiffe-id, --parent-id, --node or "
                  "--selector")
        _create_batch(data_file, socket_path, output, force=force)
        return
    if not spiffe_id:
        _fail("Missing option '--spiffe-id' (or --data FILE)")
    if node and parent_id:
        _fail("give --parent-id or --node, not both")
    if not node and not parent_id:
        _fail("Missing option '--parent-id' (or --node for a node-alias entry)")
    if not selectors:
        _fail("Missing option '--selector'")
    _check_spiffe_id(spiffe_id, "--spiffe-id")
    _check_spiffe_id(parent_id, "--parent-id")
    parent = _node_parent(spiffe_id) if node else parent_id
    msg = types_pb2.Entry(
        spiffe_id=spiffe_id, parent_id=parent,
        selectors=_parse_selectors(selectors, check_types=True, force=force),
        x509_svid_ttl=x509_svid_ttl, jwt_svid_ttl=jwt_svid_ttl, dns_names=list(dns_names),
        federates_with=list(federates_with), hint=hint, admin=admin, downstream=downstream,
        expires_at=_expires_at(expires_at),
    )
    created = _call(socket_path, lambda s: s.CreateEntry(
        admin_pb2.CreateEntryRequest(entry=msg), timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json(entry_json(created))
    else:
        click.echo(_entry_text(created))


_MATCH_CHOICES = {"exact": admin_pb2.MATCH_EXACT, "subset": admin_pb2.MATCH_SUBSET,
                  "superset": admin_pb2.MATCH_SUPERSET, "any": admin_pb2.MATCH_ANY}


@entry.command("show")
@click.option("--id", "entry_id", help="Show only the entry with this id.")
@click.option("--spiffe-id", help="Filter: exact SPIFFE ID.")
@click.option("--parent-id", help="Filter: exact parent ID.")
@click.option("--selector", "selectors", multiple=True,
              help="Filter: TYPE:VALUE, compared by --match; repeatable.")
@click.option("--match", "match", type=click.Choice(list(_MATCH_CHOICES)), default="superset",
              show_default=True,
              help="exact: the same selectors; subset: entries whose selectors are all "
                   "among these; superset: entries with all of these; any: at least one.")
@click.option("--federates-with", multiple=True,
              help="Filter: trust domain, compared by --federates-with-match; repeatable.")
@click.option("--federates-with-match", type=click.Choice(list(_MATCH_CHOICES)),
              default="superset", show_default=True, help="Like --match, for --federates-with.")
@click.option("--hint", help="Filter: exact hint.")
@socket_option
@output_option
def entry_show(
    entry_id: str | None, spiffe_id: str | None, parent_id: str | None,
    selectors: tuple[str, ...], match: str, federates_with: tuple[str, ...],
    federates_with_match: str, hint: str | None, socket_path: str, output: str,
) -> None:
    """List entries (all, or those matching every filter given).

    The server answers in pages; this command fetches them all. With --output
    json, prints a JSON list of entries.

    \b
    Examples:
      sigil-server entry show --parent-id spiffe://example.org/node/web-1 --output json
      sigil-server entry show --selector unix:uid:1000 --match any
    """
    _check_spiffe_id(spiffe_id, "--spiffe-id")
    _check_spiffe_id(parent_id, "--parent-id")
    sels = _parse_selectors(selectors)
    if entry_id:
        entries = [_call(socket_path, lambda s: s.GetEntry(
            admin_pb2.GetEntryRequest(id=entry_id), timeout=ADMIN_TIMEOUT))]
    else:
        def list_page(stub: admin_pb2_grpc.AdminStub, page_token: str) -> Any:
            return stub.ListEntries(admin_pb2.ListEntriesRequest(
                spiffe_id=spiffe_id or "", parent_id=parent_id or "", selectors=sels,
                selector_match=_MATCH_CHOICES[match], federates_with=list(federates_with),
                federates_with_match=_MATCH_CHOICES[federates_with_match], hint=hint or "",
                page_token=page_token), timeout=ADMIN_TIMEOUT)

        entries = _all_pages(socket_path, list_page, "entries")
    _emit_list(entries, output, entry_json, _entry_text, "entry", "entries")


@entry.command("update")
@click.option("--id", "entry_id", required=True, help="The entry to change (see `entry show`).")
@click.option("--spiffe-id", help="New SPIFFE ID.")
@click.option("--parent-id", help="New parent ID.")
@click.option("--node", is_flag=True, help="Make it a node alias (parent = the server).")
@click.option("--selector", "selectors", multiple=True,
              help="New selectors (replace all); repeatable.")
@click.option("--x509-svid-ttl", type=DURATION_OR_DEFAULT,
              help="600, 10m, 1h; 0 is the server default.")
@click.option("--jwt-svid-ttl", type=DURATION_OR_DEFAULT,
              help="300, 5m; 0 is the server default.")
@click.option("--dns-name", "dns_names", multiple=True, help="New DNS SANs (replace all).")
@click.option("--clear-dns-names", is_flag=True, help="Remove every DNS SAN.")
@click.option("--federates-with", multiple=True, help="New federated trust domains (replace).")
@click.option("--clear-federates-with", is_flag=True, help="Federate with no trust domain.")
@click.option("--hint", help="New hint ('' removes it).")
@click.option("--admin/--no-admin", default=None, help="Set or clear the admin flag.")
@click.option("--downstream/--no-downstream", default=None, help="Set or clear downstream.")
@click.option("--expires-at", help="RFC 3339, unix seconds, or 'never'.")
@click.option("--force", is_flag=True,
              help="Accept selectors of a type no attestor knows (with a warning).")
@socket_option
@output_option
def entry_update(
    entry_id: str, spiffe_id: str | None, parent_id: str | None, node: bool,
    selectors: tuple[str, ...], x509_svid_ttl: int | None, jwt_svid_ttl: int | None,
    dns_names: tuple[str, ...], clear_dns_names: bool, federates_with: tuple[str, ...],
    clear_federates_with: bool, hint: str | None, admin: bool | None, downstream: bool | None,
    expires_at: str | None, force: bool, socket_path: str, output: str,
) -> None:
    """Change some fields of an entry; the others keep their values.

    The entry's revision goes up, and agents pick up the change at their next sync.

    \b
    Example:
      sigil-server entry update --id 6f1c2a0e-1b7d-4c5e-9a51-2b3c4d5e6f70 \\
          --selector unix:uid:1001 --x509-svid-ttl 600
    """
    patch = types_pb2.Entry(id=entry_id)
    fields: list[str] = []
    if spiffe_id is not None:
        _check_spiffe_id(spiffe_id, "--spiffe-id")
        patch.spiffe_id = spiffe_id
        fields.append("spiffe_id")
    if node and parent_id is not None:
        _fail("give --parent-id or --node, not both")
    if node:
        if spiffe_id is None:
            current = _call(socket_path, lambda s: s.GetEntry(
                admin_pb2.GetEntryRequest(id=entry_id), timeout=ADMIN_TIMEOUT))
            spiffe_id = current.spiffe_id
        parent_id = _node_parent(spiffe_id)
    if parent_id is not None:
        _check_spiffe_id(parent_id, "--parent-id")
        patch.parent_id = parent_id
        fields.append("parent_id")
    if selectors:
        patch.selectors.extend(_parse_selectors(selectors, check_types=True, force=force))
        fields.append("selectors")
    for name, ttl in (("x509_svid_ttl", x509_svid_ttl), ("jwt_svid_ttl", jwt_svid_ttl)):
        if ttl is not None:
            setattr(patch, name, ttl)
            fields.append(name)
    if dns_names and clear_dns_names:
        _fail("give --dns-name or --clear-dns-names, not both")
    if dns_names or clear_dns_names:
        patch.dns_names.extend(dns_names)
        fields.append("dns_names")
    if federates_with and clear_federates_with:
        _fail("give --federates-with or --clear-federates-with, not both")
    if federates_with or clear_federates_with:
        patch.federates_with.extend(federates_with)
        fields.append("federates_with")
    if hint is not None:
        patch.hint = hint
        fields.append("hint")
    if admin is not None:
        patch.admin = admin
        fields.append("admin")
    if downstream is not None:
        patch.downstream = downstream
        fields.append("downstream")
    if expires_at is not None:
        patch.expires_at = _expires_at(expires_at)
        fields.append("expires_at")
    if not fields:
        _fail("nothing to change: give at least one field option (see --help)")
    updated = _call(socket_path, lambda s: s.UpdateEntry(
        admin_pb2.UpdateEntryRequest(entry=patch, fields=fields), timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json(entry_json(updated))
    else:
        click.echo(_entry_text(updated))


@entry.command("count")
@socket_option
@output_option
def entry_count(socket_path: str, output: str) -> None:
    """Print how many entries there are.

    \b
    Example:
      sigil-server entry count
    """
    resp = _call(socket_path, lambda s: s.CountEntries(admin_pb2.CountEntriesRequest(),
                                                       timeout=ADMIN_TIMEOUT))
    _emit_count(resp.count, output, "entry", "entries")


@entry.command("delete")
@click.option("--id", "entry_id", required=True, help="The entry's id (see `entry show`).")
@socket_option
@output_option
def entry_delete(entry_id: str, socket_path: str, output: str) -> None:
    """Delete an entry; agents stop handing out its identity at their next sync.

    \b
    Example:
      sigil-server entry delete --id 6f1c2a0e-1b7d-4c5e-9a51-2b3c4d5e6f70
    """
    _call(socket_path, lambda s: s.DeleteEntry(
        admin_pb2.DeleteEntryRequest(id=entry_id), timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json({"id": entry_id, "deleted": True})
    else:
        click.echo(f"Deleted entry {entry_id}")
