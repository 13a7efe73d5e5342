"""``sigil-server config check``: validate a config file without a server.

It loads the file directly (no admin API): the exception ca/cli/ makes by design."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ca.cli.common import (
    _fail,
)
from identity.errors import SigilError


@click.group()
def config() -> None:
    """Check a configuration file without starting the server."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate FILE as `sigil-server run --config FILE` would (with the SIGIL_*
    environment variables); start nothing, write nothing.

    Exit 0 and one line when it is valid; 2 and one `Error:` line naming the key
    when it is not.

    \b
    Example:
      sigil-server config check /etc/sigil/server.toml
    """
    from ca.config.server import load_config

    if not Path(path).exists():
        _fail(f"{path} does not exist")
    try:
        cfg = load_config(Path(path), env=os.environ)
    except SigilError as exc:
        _fail(str(exc))
    click.echo(f"{path}: valid (trust domain {cfg.trust_domain.name}, agent API "
               f"{cfg.bind_address}, admin socket {cfg.socket_path})")
