"""``sigil-server``: run the server and administer it over its admin socket.

Every admin command talks to a running server through the admin Unix socket
(``--socket-path``, default from SIGIL_SERVER_SOCKET or the built-in default).
By design, ``run`` assembles the server in this process, and ``config check`` and
``entry check`` read the config file (and the datastore) without a server; what
this package imports from below the admin API is listed in tests/unit/test_ca_layers.py.
One module per command group; common.py holds what they share.
Errors print one line, ``Error: <reason>``, on stderr and exit with code 2.
"""

from __future__ import annotations

# isort: off
from attestation import quietgrpc  # noqa: F401  (before anything imports grpc)
# isort: on

import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

# The helpers the command modules share, also reachable here: bundle, federation,
# localauthority, status and svid take this module as their ``base``.
from ca.cli.common import (  # noqa: F401
    ADMIN_TIMEOUT,
    EXIT_ERROR,
    _call,
    _check_spiffe_id,
    _default_socket,
    _emit_json,
    _fail,
    _unix_to_rfc3339,
    output_option,
    socket_option,
)

# ---- the command tree -----------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=None, package_name="sigil", prog_name="sigil-server",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Sigil server: the certificate authority of one SPIFFE trust domain.

    Start it with `sigil-server run --trust-domain example.org`, then register
    workloads and create join tokens for agents with the other commands, which
    talk to the running server over its admin socket.
    """


@cli.group("bundle")
def bundle_group() -> None:
    """Trust bundles: ours (show) and foreign trust domains' (list, show, set, delete)."""


def _register_subcommands() -> None:
    # Imported here: the modules taking ``base`` use this one's helpers.
    from ca.cli import agent as cli_agent
    from ca.cli import bundle as cli_bundle
    from ca.cli import configcheck as cli_configcheck
    from ca.cli import entry as cli_entry
    from ca.cli import federation as cli_federation
    from ca.cli import healthcheck as cli_healthcheck
    from ca.cli import localauthority as cli_localauthority
    from ca.cli import mint as cli_mint
    from ca.cli import policy as cli_policy
    from ca.cli import run as cli_run
    from ca.cli import status as cli_status
    from ca.cli import svid as cli_svid
    from ca.cli import token as cli_token

    this = sys.modules[__name__]
    for command in (cli_run.run, cli_configcheck.config, cli_token.token, cli_entry.entry,
                    cli_agent.agent, cli_mint.x509, cli_mint.jwt, cli_healthcheck.healthcheck):
        cli.add_command(command)
    cli.add_command(cli_localauthority.make_group(this))
    cli.add_command(cli_status.make_command(this))
    cli.add_command(cli_federation.make_group(this))
    cli_bundle.add_commands(this, bundle_group)
    cli_policy.add_commands(cli_entry.entry)
    cli.add_command(cli_svid.make_group(this))


_register_subcommands()


# SPIRE's single-dash spellings whose Sigil flag is not their plain kebab-case form.
_SPIRE_FLAGS = {"-entryID": "--id", "-dns": "--dns-name", "-x509SVIDTTL": "--x509-svid-ttl",
                "-jwtSVIDTTL": "--jwt-svid-ttl", "-matchSelectorsOn": "--match",
                "-federatesWith": "--federates-with", "-storeSVID": None,
                "-dnsName": "--dns-name", "-id": "--id", "-node": "--node"}


def spire_flag_hint(args: Sequence[str]) -> str | None:
    """For the first SPIRE-style single-dash flag (``-spiffeID``) in ``args``: a
    sentence naming Sigil's spelling (``--spiffe-id``); None when there is none."""
    for arg in args:
        if arg == "--":
            break
        if not re.fullmatch(r"-[A-Za-z][A-Za-z0-9]+", arg):
            continue
        if arg in _SPIRE_FLAGS:
            flag = _SPIRE_FLAGS[arg]
            if flag is None:
                return f"{arg} is SPIRE's flag; Sigil has no equivalent (see --help)"
        else:
            flag = "--" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", arg[1:]).lower()
        return f"{arg} is SPIRE's spelling: use {flag}"
    return None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point: every error, click's usage errors included, is
    one ``Error: <reason>`` line on stderr and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = cli.main(args=args, prog_name="sigil-server", standalone_mode=False)
    except click.UsageError as exc:
        hint = spire_flag_hint(args) if isinstance(exc, click.NoSuchOption) else None
        message = hint or " ".join(exc.format_message().split())
        click.echo(f"Error: {message}", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(EXIT_ERROR)
    except click.Abort:
        click.echo("Error: aborted", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
