"""``sigil-server agent list | show | ban | evict | count | purge``: attested agents."""

from __future__ import annotations

from typing import Any

import click

from api.protos.sigil.admin.v1 import admin_pb2
from ca.cli.common import (
    ADMIN_TIMEOUT,
    DURATION,
    _all_pages,
    _call,
    _check_spiffe_id,
    _emit_count,
    _emit_json,
    _emit_list,
    _unix_to_rfc3339,
    output_option,
    socket_option,
)


def agent_json(a: admin_pb2.Agent) -> dict[str, Any]:
    """An attested agent as stable JSON keys."""
    return {
        "id": a.id,
        "attestor": a.attestor,
        "selectors": [{"type": s.type, "value": s.value} for s in a.selectors],
        "serial": a.serial,
        "expires_at": _unix_to_rfc3339(a.expires_at) if a.expires_at else None,
        "banned": a.banned,
        "can_reattest": a.can_reattest,
        "created_at": _unix_to_rfc3339(a.created_at) if a.created_at else None,
        "updated_at": _unix_to_rfc3339(a.updated_at) if a.updated_at else None,
    }


def _agent_text(a: admin_pb2.Agent) -> str:
    lines = [
        f"Agent ID     : {a.id}",
        f"Attestor     : {a.attestor}",
        f"SVID serial  : {a.serial}",
        f"SVID expires : {_unix_to_rfc3339(a.expires_at) if a.expires_at else '-'}",
        f"Banned       : {'yes' if a.banned else 'no'}",
    ]
    lines += [f"Selector     : {s.type}:{s.value}" for s in a.selectors]
    return "\n".join(lines)


def _emit_agent(a: admin_pb2.Agent, output: str) -> None:
    if output == "json":
        _emit_json(agent_json(a))
    else:
        click.echo(_agent_text(a))


agent_id_option = click.option("--id", "agent_id", required=True,
                               help="The agent's SPIFFE ID (see `agent list`).")


@click.group()
def agent() -> None:
    """Attested agents (nodes): list them, ban, evict or purge them."""


@agent.command("list")
@socket_option
@output_option
def agent_list(socket_path: str, output: str) -> None:
    """List every attested agent, with its attestor, selectors, SVID and ban status.

    \b
    Example:
      sigil-server agent list --output json
    """
    agents = _all_pages(socket_path, lambda stub, page_token: stub.ListAgents(
        admin_pb2.ListAgentsRequest(page_token=page_token), timeout=ADMIN_TIMEOUT), "agents")
    _emit_list(agents, output, agent_json, _agent_text, "agent", "agents")


@agent.command("show")
@agent_id_option
@socket_option
@output_option
def agent_show(agent_id: str, socket_path: str, output: str) -> None:
    """Show one attested agent.

    \b
    Example:
      sigil-server agent show --id spiffe://example.org/sigil/agent/join_token/0123abcd0123abcd
    """
    _check_spiffe_id(agent_id, "--id")
    _emit_agent(_call(socket_path, lambda s: s.GetAgent(
        admin_pb2.GetAgentRequest(id=agent_id), timeout=ADMIN_TIMEOUT)), output)


@agent.command("ban")
@agent_id_option
@socket_option
@output_option
def agent_ban(agent_id: str, socket_path: str, output: str) -> None:
    """Ban an agent: the server refuses it from its next call on, and refuses it if
    it attests again under the same ID. `agent evict` lifts the ban (the agent must
    then attest again).

    \b
    Example:
      sigil-server agent ban --id spiffe://example.org/sigil/agent/join_token/0123abcd0123abcd
    """
    _check_spiffe_id(agent_id, "--id")
    _emit_agent(_call(socket_path, lambda s: s.BanAgent(
        admin_pb2.BanAgentRequest(id=agent_id), timeout=ADMIN_TIMEOUT)), output)


@agent.command("evict")
@agent_id_option
@socket_option
@output_option
def agent_evict(agent_id: str, socket_path: str, output: str) -> None:
    """Delete an agent's record: its SVID stops working at once and it must attest
    again (with a new join token, for join-token agents).

    \b
    Example:
      sigil-server agent evict --id spiffe://example.org/sigil/agent/join_token/0123abcd0123abcd
    """
    _check_spiffe_id(agent_id, "--id")
    _call(socket_path, lambda s: s.EvictAgent(admin_pb2.EvictAgentRequest(id=agent_id),
                                              timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json({"id": agent_id, "evicted": True})
    else:
        click.echo(f"Evicted agent {agent_id}")


@agent.command("count")
@socket_option
@output_option
def agent_count(socket_path: str, output: str) -> None:
    """Print how many agents have attested (and are not evicted).

    \b
    Example:
      sigil-server agent count
    """
    resp = _call(socket_path, lambda s: s.CountAgents(admin_pb2.CountAgentsRequest(),
                                                      timeout=ADMIN_TIMEOUT))
    _emit_count(resp.count, output, "agent", "agents")


@agent.command("purge")
@click.option("--expired-for", type=DURATION, default="24h", show_default=True,
              help="Remove agents whose SVID expired at least this long ago (e.g. 12h, 7d).")
@click.option("--dry-run", is_flag=True, help="Only list the agents that would be removed.")
@socket_option
@output_option
def agent_purge(expired_for: int, dry_run: bool, socket_path: str, output: str) -> None:
    """Remove agents whose SVIDs expired long ago (nodes that are gone for good).

    \b
    Example:
      sigil-server agent purge --expired-for 7d --dry-run
    """
    resp = _call(socket_path, lambda s: s.PurgeAgents(
        admin_pb2.PurgeAgentsRequest(expired_for=expired_for, dry_run=dry_run),
        timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json({"ids": list(resp.ids), "dry_run": dry_run})
        return
    verb = "Would remove" if dry_run else "Removed"
    click.echo(f"{verb} {len(resp.ids)} {'agent' if len(resp.ids) == 1 else 'agents'}")
    for agent_spiffe_id in resp.ids:
        click.echo(agent_spiffe_id)
