"""``sigil-server``: run the server and administer it over its admin socket.

Every admin command talks to a running server through the admin Unix socket
(``--socket-path``, default from SIGIL_SERVER_SOCKET or the built-in default).
Errors print one line, ``Error: <reason>``, on stderr and exit with code 2.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import grpc

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.types.v1 import types_pb2
from ca import log
from ca.config import DEFAULT_SOCKET_PATH, load_config
from identity.errors import SigilError

EXIT_ERROR = 2
ADMIN_TIMEOUT = 30.0
T = TypeVar("T")


class CliError(click.ClickException):
    """An error shown as one ``Error: <reason>`` line, exit code 2."""

    exit_code = EXIT_ERROR


def _fail(message: str) -> NoReturn:
    raise CliError(" ".join(message.split()))


def _default_socket() -> str:
    return os.environ.get("SIGIL_SERVER_SOCKET") or DEFAULT_SOCKET_PATH


socket_option = click.option(
    "--socket-path", type=click.Path(dir_okay=False), default=_default_socket,
    show_default="$SIGIL_SERVER_SOCKET or " + DEFAULT_SOCKET_PATH,
    help="The server's admin socket.",
)
output_option = click.option(
    "--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="Output format; json keys are stable.",
)


@contextmanager
def _admin(socket_path: str) -> Iterator[admin_pb2_grpc.AdminStub]:
    channel = grpc.insecure_channel(f"unix:{socket_path}")
    try:
        yield admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
    finally:
        channel.close()


def _call(socket_path: str, fn: Callable[[admin_pb2_grpc.AdminStub], T]) -> T:
    if not Path(socket_path).exists():
        _fail(f"cannot reach the server: admin socket {socket_path} does not exist "
              "(is the server running? pass --socket-path)")
    with _admin(socket_path) as stub:
        try:
            return fn(stub)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                _fail(f"cannot reach the server at {socket_path}: {exc.details()}")
            _fail(f"{exc.details()} ({code.name})")


def _unix_to_rfc3339(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def entry_json(e: types_pb2.Entry) -> dict[str, Any]:
    """An entry as stable JSON keys."""
    return {
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": [{"type": s.type, "value": s.value} for s in e.selectors],
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": list(e.dns_names),
        "federates_with": list(e.federates_with),
        "hint": e.hint,
        "revision": e.revision,
        "created_at": _unix_to_rfc3339(e.created_at) if e.created_at else None,
    }


def _entry_text(e: types_pb2.Entry) -> str:
    lines = [
        f"Entry ID      : {e.id}",
        f"SPIFFE ID     : {e.spiffe_id}",
        f"Parent ID     : {e.parent_id}",
        f"X509-SVID TTL : {e.x509_svid_ttl or 'default'}",
        f"JWT-SVID TTL  : {e.jwt_svid_ttl or 'default'}",
    ]
    lines += [f"Selector      : {s.type}:{s.value}" for s in e.selectors]
    lines += [f"DNS name      : {n}" for n in e.dns_names]
    lines += [f"Federates with: {td}" for td in e.federates_with]
    if e.hint:
        lines.append(f"Hint          : {e.hint}")
    return "\n".join(lines)


def _emit_json(doc: object) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=False))


def _parse_selectors(values: Sequence[str]) -> list[types_pb2.Selector]:
    from identity.selectors import Selector

    out = []
    for text in values:
        try:
            sel = Selector.parse(text)
        except SigilError as exc:
            _fail(str(exc))
        out.append(types_pb2.Selector(type=sel.type, value=sel.value))
    return out


def _check_spiffe_id(value: str | None, flag: str) -> None:
    from identity.spiffeid import SpiffeId

    if value is None:
        return
    try:
        SpiffeId.parse(value)
    except SigilError as exc:
        _fail(f"{flag}: {exc}")


# ---- the command tree -----------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Sigil server: the certificate authority of one SPIFFE trust domain.

    Start it with `sigil-server run --trust-domain example.org`, then register
    workloads and create join tokens for agents with the other commands, which
    talk to the running server over its admin socket.
    """


@cli.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML config file (see docs/configuration.md).")
@click.option("--trust-domain", help="Trust domain, e.g. example.org (required somewhere).")
@click.option("--data-dir", help="Where the datastore and keys live.")
@click.option("--bind-address", help="HOST:PORT of the agent API (TLS); port 0 picks one.")
@click.option("--socket-path", help="Path of the admin Unix socket.")
@click.option("--database-url", help="SQLAlchemy URL; default SQLite in the data dir.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["text", "json"]))
@click.option("--health-address",
              help='HOST:PORT of /live, /ready and /metrics (HTTP); "" turns it off.')
@click.option("--worker-processes",
              help="Agent API processes sharing the port; 0 = one per core.")
def run(config_file: str | None, **flags: str | None) -> None:
    """Run the server until SIGTERM or SIGINT.

    \b
    Example:
      sigil-server run --trust-domain example.org --data-dir ./data \\
          --bind-address 127.0.0.1:8081 --socket-path /tmp/sigil/admin.sock
    """
    from ca.server import SigilServer

    try:
        config = load_config(Path(config_file) if config_file else None,
                             env=os.environ, overrides=flags)
    except SigilError as exc:
        _fail(str(exc))
    log.configure(level=config.log_level, fmt=config.log_format)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.event("shutdown requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = SigilServer(config)
    try:
        server.start()
    except SigilError as exc:
        server.stop(0)
        _fail(str(exc))
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.stop(grace=5.0)


@cli.group()
def token() -> None:
    """Join tokens: single-use credentials an agent attests with."""


@token.command("generate")
@click.option("--spiffe-id", help="Alias for the agent: entries may use it as their parent.")
@click.option("--ttl", type=click.IntRange(min=1), help="Lifetime in seconds (default 600).")
@socket_option
@output_option
def token_generate(spiffe_id: str | None, ttl: int | None, socket_path: str, output: str) -> None:
    """Create a single-use join token and print it.

    \b
    Example:
      sigil-server token generate --spiffe-id spiffe://example.org/node/web-1
      sigil-agent run --join-token <printed token> ...
    """
    _check_spiffe_id(spiffe_id, "--spiffe-id")
    req = admin_pb2.CreateJoinTokenRequest(ttl=ttl or 0, spiffe_id=spiffe_id or "")
    tok = _call(socket_path, lambda s: s.CreateJoinToken(req, timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json({"token": tok.token, "spiffe_id": tok.spiffe_id,
                    "expires_at": _unix_to_rfc3339(tok.expires_at), "agent_id": tok.agent_id})
    else:
        click.echo(f"Token: {tok.token}")
        click.echo(f"Agent ID: {tok.agent_id}")
        if tok.spiffe_id:
            click.echo(f"Alias: {tok.spiffe_id}")
        click.echo(f"Expires at: {_unix_to_rfc3339(tok.expires_at)}")


@cli.group()
def entry() -> None:
    """Registration entries: which workloads get which SPIFFE IDs."""


@entry.command("create")
@click.option("--spiffe-id", required=True, help="The SPIFFE ID workloads get.")
@click.option("--parent-id", required=True,
              help="The agent (or node alias) whose workloads may get it.")
@click.option("--selector", "selectors", multiple=True, required=True,
              help="TYPE:VALUE a workload must carry; repeat for several.")
@click.option("--x509-svid-ttl", type=int, default=0, help="Seconds; 0 is the server default.")
@click.option("--jwt-svid-ttl", type=int, default=0, help="Seconds; 0 is the server default.")
@click.option("--dns-name", "dns_names", multiple=True, help="DNS SAN; repeatable.")
@click.option("--federates-with", multiple=True, help="Trust domain whose bundle to add.")
@click.option("--hint", default="", help="A hint for workloads with several identities.")
@socket_option
@output_option
def entry_create(
    spiffe_id: str, parent_id: str, selectors: tuple[str, ...], x509_svid_ttl: int,
    jwt_svid_ttl: int, dns_names: tuple[str, ...], federates_with: tuple[str, ...],
    hint: str, socket_path: str, output: str,
) -> None:
    """Register a workload identity.

    \b
    Example:
      sigil-server entry create --spiffe-id spiffe://example.org/web \\
          --parent-id spiffe://example.org/sigil/agent/join_token/0123abcd0123abcd \\
          --selector unix:uid:1000 --dns-name web.example.org
    """
    _check_spiffe_id(spiffe_id, "--spiffe-id")
    _check_spiffe_id(parent_id, "--parent-id")
    for flag, value in (("--x509-svid-ttl", x509_svid_ttl), ("--jwt-svid-ttl", jwt_svid_ttl)):
        if value < 0 or value > 2**31 - 1:
            _fail(f"{flag} {value} must be a number of seconds, 0 or more")
    msg = types_pb2.Entry(
        spiffe_id=spiffe_id, parent_id=parent_id, selectors=_parse_selectors(selectors),
        x509_svid_ttl=x509_svid_ttl, jwt_svid_ttl=jwt_svid_ttl, dns_names=list(dns_names),
        federates_with=list(federates_with), hint=hint,
    )
    created = _call(socket_path, lambda s: s.CreateEntry(
        admin_pb2.CreateEntryRequest(entry=msg), timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json(entry_json(created))
    else:
        click.echo(_entry_text(created))


@entry.command("show")
@click.option("--id", "entry_id", help="Show only the entry with this id.")
@click.option("--spiffe-id", help="Filter: exact SPIFFE ID.")
@click.option("--parent-id", help="Filter: exact parent ID.")
@click.option("--selector", "selectors", multiple=True,
              help="Filter: entries with exactly these selectors; repeatable.")
@socket_option
@output_option
def entry_show(
    entry_id: str | None, spiffe_id: str | None, parent_id: str | None,
    selectors: tuple[str, ...], socket_path: str, output: str,
) -> None:
    """List entries (all, or those matching every filter given).

    With --output json, prints a JSON list of entries.

    \b
    Example:
      sigil-server entry show --parent-id spiffe://example.org/node/web-1 --output json
    """
    _check_spiffe_id(spiffe_id, "--spiffe-id")
    _check_spiffe_id(parent_id, "--parent-id")
    sels = _parse_selectors(selectors)
    if entry_id:
        entries = [_call(socket_path, lambda s: s.GetEntry(
            admin_pb2.GetEntryRequest(id=entry_id), timeout=ADMIN_TIMEOUT))]
    else:
        req = admin_pb2.ListEntriesRequest(spiffe_id=spiffe_id or "", parent_id=parent_id or "",
                                           selectors=sels)
        entries = list(_call(socket_path, lambda s: s.ListEntries(
            req, timeout=ADMIN_TIMEOUT)).entries)
    if output == "json":
        _emit_json([entry_json(e) for e in entries])
        return
    click.echo(f"Found {len(entries)} {'entry' if len(entries) == 1 else 'entries'}")
    for e in entries:
        click.echo("")
        click.echo(_entry_text(e))


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


@cli.group()
def bundle() -> None:
    """The trust domain's bundle: the CA certificates and JWT keys to trust."""


@bundle.command("show")
@click.option("--format", "fmt", type=click.Choice(["pem", "spiffe"]), default="pem",
              show_default=True, help="pem: CA certificates; spiffe: SPIFFE bundle (JWKS).")
@socket_option
def bundle_show(fmt: str, socket_path: str) -> None:
    """Print the trust bundle.

    \b
    Example:
      sigil-server bundle show > bundle.pem
      sigil-agent run --trust-bundle bundle.pem ...
    """
    from cryptography import x509

    from identity.bundle import Bundle, JwtAuthority
    from identity.keys import load_public_key_der
    from identity.spiffeid import TrustDomain

    msg = _call(socket_path, lambda s: s.GetBundle(admin_pb2.GetBundleRequest(),
                                                   timeout=ADMIN_TIMEOUT))
    b = Bundle(
        trust_domain=TrustDomain(msg.trust_domain),
        x509_authorities=tuple(x509.load_der_x509_certificate(d) for d in msg.x509_authorities),
        jwt_authorities=tuple(
            JwtAuthority(key_id=k.key_id, public_key=load_public_key_der(k.public_key),
                         expires_at=dt.datetime.fromtimestamp(k.expires_at, dt.UTC)
                         if k.expires_at else None)
            for k in msg.jwt_authorities),
        sequence_number=msg.sequence_number,
        refresh_hint=msg.refresh_hint or None,
    )
    if fmt == "pem":
        click.echo(b.x509_pem().decode(), nl=False)
    else:
        click.echo(b.to_json().decode())


@cli.command()
@socket_option
@output_option
def healthcheck(socket_path: str, output: str) -> None:
    """Exit 0 when the server answers on its admin socket and is serving.

    \b
    Example:
      sigil-server healthcheck --socket-path /tmp/sigil-server/private/admin.sock
    """
    resp = _call(socket_path, lambda s: s.Health(admin_pb2.HealthRequest(), timeout=10))
    if not resp.serving:
        _fail("server is not serving")
    if output == "json":
        _emit_json({"serving": True, "trust_domain": resp.trust_domain,
                    "bundle_sequence": resp.bundle_sequence})
    else:
        click.echo("Server is healthy.")


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point: every error, click's usage errors included, is
    one ``Error: <reason>`` line on stderr and exit code 2."""
    try:
        code = cli.main(args=argv, prog_name="sigil-server", standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"Error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(EXIT_ERROR)
    except click.Abort:
        click.echo("Error: aborted", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
