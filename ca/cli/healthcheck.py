"""``sigil-server healthcheck``: is the server up (over its admin socket)."""

from __future__ import annotations

import click

from api.protos.sigil.admin.v1 import admin_pb2
from ca.cli.common import (
    _call,
    _emit_json,
    _fail,
    output_option,
    sigil_version,
    socket_option,
)


@click.command()
@socket_option
@output_option
def healthcheck(socket_path: str, output: str) -> None:
    """Exit 0 when the server answers on its admin socket and is serving.

    \b
    Example:
      sigil-server healthcheck --socket-path /run/sigil-server/private/admin.sock
    """
    resp = _call(socket_path, lambda s: s.Health(admin_pb2.HealthRequest(), timeout=10))
    if not resp.serving:
        _fail("server is not serving")
    if output == "json":
        _emit_json({"serving": True, "trust_domain": resp.trust_domain,
                    "bundle_sequence": resp.bundle_sequence,
                    # The server's own version (an older server sends none: ours).
                    "version": resp.version or sigil_version()})
    else:
        click.echo("Server is healthy.")
