"""``sigil-server entry check``: stored entries against the issuance policy.

Unlike the other entry commands it does not ask the running server: it reads the
config file (and the environment and flags, as ``run`` does) and the datastore
itself, so an edited ``[policy]`` can be checked before a server loads it.
Exit code 0: no entry breaks the policy; 1: some do (listed); 2: an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from identity.errors import SigilError

EXIT_VIOLATIONS = 1


def _fail(message: str) -> None:
    raise click.ClickException(" ".join(message.split()))


@click.command("check")
@click.option("--config", "config_file", required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="The server's TOML config file: its [policy] and its datastore.")
@click.option("--database-url", help="Override the config's database_url.")
@click.option("--data-dir", help="Override the config's data_dir (default SQLite path).")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format; json keys are stable.")
def check(config_file: str, database_url: str | None, data_dir: str | None,
          output: str) -> None:
    """List stored entries that break the issuance policy ([policy] in the config).

    Exits 1 when any does, 0 when none does. Such entries get no SVIDs until they
    are fixed (`entry update`) or deleted, or the policy changes.

    \b
    Example:
      sigil-server entry check --config /etc/sigil/server.toml --output json
    """
    from ca.config.server import load_config
    from ca.datastore import Datastore
    from ca.registry.policycheck import find_violations

    try:
        config = load_config(Path(config_file), env=os.environ,
                             overrides={"database_url": database_url, "data_dir": data_dir})
        with Datastore(config.database_url) as datastore:
            found = find_violations(datastore, config.policy)
            checked = datastore.count_entries()
    except SigilError as exc:
        _fail(str(exc))
        return
    except Exception as exc:  # a datastore that cannot be read: one Error line
        _fail(f"cannot read the datastore: {exc.__class__.__name__}: {exc}")
        return
    if output == "json":
        doc: dict[str, Any] = {
            "rules": len(config.policy.rules), "entries": checked, "count": len(found),
            "violations": [{"entry_id": v.entry.id, "spiffe_id": str(v.entry.spiffe_id),
                            "parent_id": str(v.entry.parent_id), "rule": v.violation.rule,
                            "message": v.violation.message} for v in found],
        }
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        for v in found:
            click.echo(f"{v.entry.id} {v.entry.spiffe_id}: {v.violation.message}")
        rules = len(config.policy.rules)
        if found:
            click.echo(f"{len(found)} of {checked} entries break the policy")
        else:
            click.echo(f"No entry breaks the policy ({rules} rule{'' if rules == 1 else 's'}"
                       f", {checked} entr{'y' if checked == 1 else 'ies'} checked).")
    if found:
        click.get_current_context().exit(EXIT_VIOLATIONS)


def add_commands(group: click.Group) -> None:
    """Add ``check`` to the ``entry`` group."""
    group.add_command(check)
