"""``sigil-server token generate``: join tokens for agents."""

from __future__ import annotations

import sys

import click

from api.protos.sigil.admin.v1 import admin_pb2
from ca.cli.common import (
    ADMIN_TIMEOUT,
    DURATION,
    _call,
    _check_spiffe_id,
    _emit_json,
    _unix_to_rfc3339,
    output_option,
    socket_option,
)


@click.group()
def token() -> None:
    """Join tokens: single-use credentials an agent attests with."""


@token.command("generate")
@click.option("--spiffe-id", help="Alias for the agent: entries may use it as their parent.")
@click.option("--ttl", type=DURATION,
              help="Lifetime: seconds or 10m, 1h (default: the server's join_token_ttl).")
@click.option("--quiet", "-q", is_flag=True, help="Print only the token (as on a pipe).")
@socket_option
@output_option
def token_generate(spiffe_id: str | None, ttl: int | None, quiet: bool, socket_path: str,
                   output: str) -> None:
    """Create a single-use join token and print it.

    On a terminal it prints the token, the agent ID it gives and when it expires;
    on a pipe (or with --quiet) only the token, so that
    `--join-token "$(sigil-server token generate)"` works.

    \b
    Example:
      sigil-server token generate --spiffe-id spiffe://example.org/node/web-1
      sigil-agent run --join-token "$(sigil-server token generate)" ...
    """
    _check_spiffe_id(spiffe_id, "--spiffe-id")
    req = admin_pb2.CreateJoinTokenRequest(ttl=ttl or 0, spiffe_id=spiffe_id or "")
    tok = _call(socket_path, lambda s: s.CreateJoinToken(req, timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json({"token": tok.token, "spiffe_id": tok.spiffe_id,
                    "expires_at": _unix_to_rfc3339(tok.expires_at), "agent_id": tok.agent_id})
    elif quiet or not sys.stdout.isatty():
        click.echo(tok.token)
    else:
        click.echo(f"Token: {tok.token}")
        click.echo(f"Agent ID: {tok.agent_id}")
        if tok.spiffe_id:
            click.echo(f"Alias: {tok.spiffe_id}")
        click.echo(f"Expires at: {_unix_to_rfc3339(tok.expires_at)}")
