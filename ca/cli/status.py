"""``sigil-server status``: one view of the trust domain.

Registered on the ``sigil-server`` command group by :mod:`ca.cli`, which passes
itself in (as for ``localauthority``): the same admin-socket helpers and errors.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import click

from api.protos.sigil.admin.v1 import admin_pb2

base: Any = None  # the ca.cli module, set by make_command
TIMEOUT = 30.0


def _schedule(authorities: list[admin_pb2.LocalAuthority]) -> dict[str, int | None]:
    """When this server's rotation next prepares and activates an authority of one
    kind (ca/authority: prepare at 1/2 of the active one's life, activate the
    prepared one at 5/6); None for a step that is not pending."""
    active = [a for a in authorities if a.status == "active"]
    prepared = any(a.status == "prepared" for a in authorities)
    if not active or not active[0].not_before:
        return {"prepare_at": None, "activate_at": None}
    a = active[0]
    life = a.not_after - a.not_before
    return {"prepare_at": None if prepared else a.not_before + life // 2,
            "activate_at": a.not_before + life * 5 // 6}


def status_doc(health: admin_pb2.HealthResponse, x509: list[admin_pb2.LocalAuthority],
               jwt: list[admin_pb2.LocalAuthority], agents: int, entries: int,
               relationships: list[admin_pb2.FederationRelationship]) -> dict[str, Any]:
    """The status as stable JSON keys."""
    from ca.cli.federation import relationship_json
    from ca.cli.localauthority import authority_json

    ts = base._unix_to_rfc3339

    def held_by(a: admin_pb2.LocalAuthority) -> str:
        if a.owner == health.instance_id and health.hostname:
            return health.hostname
        if a.owner_hostname:
            return a.owner_hostname
        return f"instance {a.owner}" if a.owner else "unknown"

    def authorities(items: list[admin_pb2.LocalAuthority]) -> dict[str, Any]:
        schedule = _schedule(items)
        return {
            "authorities": [{**authority_json(a), "held_by": held_by(a)} for a in items],
            "next_prepare_at": ts(schedule["prepare_at"]) if schedule["prepare_at"] else None,
            "next_activate_at": (ts(schedule["activate_at"]) if schedule["activate_at"]
                                 else None),
        }

    return {
        "trust_domain": health.trust_domain,
        "bundle_sequence": health.bundle_sequence,
        "server": {"hostname": health.hostname, "instance_id": health.instance_id,
                   "version": health.version},
        "x509": authorities(x509),
        "jwt": authorities(jwt),
        "agents": agents,
        "entries": entries,
        "federation": [relationship_json(r) for r in relationships],
    }


def _text(doc: dict[str, Any]) -> str:
    server = doc["server"]
    lines = [
        f"Trust domain : {doc['trust_domain']} (bundle sequence {doc['bundle_sequence']})",
        f"Server       : {server['hostname']} (instance {server['instance_id']}, "
        f"version {server['version']})",
    ]
    for kind, label in (("x509", "X.509 CA"), ("jwt", "JWT keys")):
        section = doc[kind]
        for i, a in enumerate(section["authorities"]):
            extra = ""
            if a["signed_until"]:
                extra += f", signed until {a['signed_until']}"
            if a["drops_at"]:
                extra += f", leaves the bundle at {a['drops_at']}"
            lines.append(f"{label if i == 0 else '':<13}: {a['status']:<8} "
                         f"{a['authority_id']} not after {a['not_after']}{extra}; "
                         f"held by {a['held_by']}")
        steps = [f"prepare at {section['next_prepare_at']}" if section["next_prepare_at"]
                 else "", f"activate at {section['next_activate_at']}"
                 if section["next_activate_at"] else ""]
        if any(steps):
            lines.append(f"{'':<13}  next: {', '.join(s for s in steps if s)}")
    lines.append(f"Agents       : {doc['agents']}")
    lines.append(f"Entries      : {doc['entries']}")
    if not doc["federation"]:
        lines.append("Federation   : none")
    for i, r in enumerate(doc["federation"]):
        last = r["last_refresh"] or "not yet"
        if r["last_refresh_message"]:
            last += f" ({r['last_refresh_message']})"
        lines.append(f"{'Federation' if i == 0 else '':<13}: {r['trust_domain']} "
                     f"({r['profile']}): last refresh {last}, next "
                     f"{r['next_refresh_at'] or '-'}, bundle sequence "
                     f"{r['bundle_sequence'] if r['bundle_sequence'] is not None else '-'}")
    return "\n".join(lines)


def make_command(cli_module: ModuleType) -> click.Command:
    """The ``status`` command, bound to ``ca.cli``'s helpers."""
    global base
    base = cli_module

    socket_option: Callable[[Callable[..., None]], Callable[..., None]] = base.socket_option
    output_option: Callable[[Callable[..., None]], Callable[..., None]] = base.output_option

    @click.command("status")
    @socket_option
    @output_option
    def status(socket_path: str, output: str) -> None:
        """One view of the trust domain: CA and JWT authorities, the next rotation
        steps, agent and entry counts, federation, and which server holds what.

        \b
        Example:
          sigil-server status
          sigil-server status --output json
        """
        def call(stub: Any) -> dict[str, Any]:
            def kind(k: str) -> list[admin_pb2.LocalAuthority]:
                return list(stub.ListLocalAuthorities(
                    admin_pb2.LocalAuthorityRequest(kind=k), timeout=TIMEOUT).authorities)

            return status_doc(
                stub.Health(admin_pb2.HealthRequest(), timeout=TIMEOUT), kind("x509"),
                kind("jwt"),
                stub.CountAgents(admin_pb2.CountAgentsRequest(), timeout=TIMEOUT).count,
                stub.CountEntries(admin_pb2.CountEntriesRequest(), timeout=TIMEOUT).count,
                list(stub.ListFederationRelationships(
                    admin_pb2.ListFederationRelationshipsRequest(),
                    timeout=TIMEOUT).relationships))

        doc = base._call(socket_path, call)
        if output == "json":
            base._emit_json(doc)
        else:
            click.echo(_text(doc))

    return status
