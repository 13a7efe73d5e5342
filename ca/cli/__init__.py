"""``sigil-server``: run the server and administer it over its admin socket.

Every admin command talks to a running server through the admin Unix socket
(``--socket-path``, default from SIGIL_SERVER_SOCKET or the built-in default).
Errors print one line, ``Error: <reason>``, on stderr and exit with code 2.
"""

from __future__ import annotations

# isort: off
from ca import quietgrpc  # noqa: F401  (before anything imports grpc)
# isort: on

import datetime as dt
import json
import os
import re
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
from ca.config.defaults import DEFAULT_SOCKET_PATH
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
    # Whoever controls the socket's directory could serve a fake admin API there
    # (and read what we send, or hand us their join token): refuse to talk.
    from attestation.socketdir import check_socket_directory

    try:
        check_socket_directory(Path(socket_path), client=True)
    except SigilError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot check admin socket {socket_path}: {exc.strerror}")
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
    """An entry as stable JSON keys (times RFC 3339 UTC, null when unset)."""
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
        "admin": e.admin,
        "downstream": e.downstream,
        "expires_at": _unix_to_rfc3339(e.expires_at) if e.expires_at else None,
        "revision": e.revision,
        "created_at": _unix_to_rfc3339(e.created_at) if e.created_at else None,
        "updated_at": _unix_to_rfc3339(e.updated_at) if e.updated_at else None,
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


def _emit_count(count: int, output: str, one: str, many: str) -> None:
    """A count as ``{"count": n}`` or as "n things"."""
    if output == "json":
        _emit_json({"count": count})
    else:
        click.echo(f"{count} {one if count == 1 else many}")


# Selector types some attestor produces: a selector's type is its plugin's name
# (attestation/), plus the join-token agent's spiffe_id. An entry with another type
# can never match anything: it is nearly always a typo, or a missing "unix:".
KNOWN_SELECTOR_TYPES = ("join_token", "k8s", "k8s_psat", "spiffe_id", "sshpop", "unix",
                        "x509pop")
# Values of the unix and k8s workload attestors, for "did you mean" when the type is missing.
_SELECTOR_HINTS = {
    "unix": ("uid", "gid", "user", "group", "path", "sha256", "supplementary_gid",
             "supplementary_group"),
    "k8s": ("ns", "sa", "pod-uid", "pod-name", "pod-label", "pod-owner", "node-name",
            "container-name", "container-image"),
}
# A join token is "<16 hex id>.<secret>" (attestation/node/join_token.py).
_JOIN_TOKEN_RE = re.compile(r"\b([0-9a-f]{16})\.[A-Za-z0-9_-]{16,}")


def _refuse_token_secret(flag: str, value: str) -> None:
    """Refuse a value holding a whole join token: the secret part must never reach
    the datastore (nor this command's output); the agent's ID uses the token's ID."""
    match = _JOIN_TOKEN_RE.search(value)
    if match:
        _fail(f"{flag} contains a join token's secret (the part after the dot): give only "
              f"its ID, {match.group(1)} (e.g. spiffe://<trust domain>/sigil/agent/join_token/"
              f"{match.group(1)}); nothing was sent")


def _parse_selectors(values: Sequence[str], *, check_types: bool = False,
                     force: bool = False) -> list[types_pb2.Selector]:
    from identity.selectors import Selector

    out = []
    for text in values:
        _refuse_token_secret("--selector", text)
        try:
            sel = Selector.parse(text)
        except SigilError as exc:
            _fail(str(exc))
        if check_types and sel.type not in KNOWN_SELECTOR_TYPES:
            _unknown_selector_type(text, sel.type, force=force)
        out.append(types_pb2.Selector(type=sel.type, value=sel.value))
    return out


def _unknown_selector_type(text: str, kind: str, *, force: bool) -> None:
    hint = ""
    for known, values in _SELECTOR_HINTS.items():
        if kind in values:
            hint = f" (did you mean {known}:{text}?)"
    message = (f"--selector {text}: no attestor makes selectors of type {kind!r}{hint}; "
               f"known types: {', '.join(KNOWN_SELECTOR_TYPES)}")
    if not force:
        _fail(f"{message}; --force to register it anyway")
    click.echo(f"Warning: {message}", err=True)


def _check_spiffe_id(value: str | None, flag: str) -> None:
    from identity.spiffeid import SpiffeId

    if value is None:
        return
    _refuse_token_secret(flag, value)
    try:
        SpiffeId.parse(value)
    except SigilError as exc:
        _fail(f"{flag}: {exc}")


class Duration(click.ParamType):  # type: ignore[type-arg,unused-ignore]
    """A lifetime in whole seconds: ``600``, ``90s``, ``10m``, ``1h``, ``2d`` or ``1h30m``.

    Every TTL flag takes it, so one form works everywhere (config keys too:
    identity.configvalues). ``allow_zero``: ``0`` is accepted and means "the
    server's default" (the entry TTLs)."""

    name = "duration"

    def __init__(self, *, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        from identity.configvalues import parse_duration

        if isinstance(value, int):
            value = str(value)
        if self.allow_zero and value.strip() in ("0", "0s"):
            return 0
        try:
            seconds = int(parse_duration(value.strip(), allow_milliseconds=False)
                          .total_seconds())
        except SigilError as exc:
            self.fail(str(exc), param, ctx)
        if seconds > 2**31 - 1:
            self.fail(f"duration {value!r} is too long", param, ctx)
        return seconds


DURATION = Duration()
DURATION_OR_DEFAULT = Duration(allow_zero=True)


def sigil_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sigil")
    except PackageNotFoundError:
        return "unknown"


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
          --bind-address 127.0.0.1:8081 --socket-path /run/sigil-server/private/admin.sock
    """
    from ca.config.server import load_config

    try:
        config = load_config(Path(config_file) if config_file else None,
                             env=os.environ, overrides=flags)
    except SigilError as exc:
        _fail(str(exc))
    log.configure(level=config.log_level, fmt=config.log_format)
    metrics_dir = None
    if config.ops.workers > 1:
        import tempfile

        # Before anything imports prometheus_client: it picks its value store at
        # import time (multiprocess files here; see ca/metrics.py).
        metrics_dir = tempfile.mkdtemp(prefix="sigil-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from ca.ratelimit import BucketTable
    from ca.server import SigilServer
    from ca.workers import WorkerPool

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.event("shutdown requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    table = BucketTable()
    server = SigilServer(config, rate_table=table)
    pool: WorkerPool | None = None
    try:
        server.start()
        if config.ops.workers > 1:
            pool = WorkerPool(config, count=config.ops.workers - 1, table=table,
                              bind_address=server.agent_address)
            pool.start()
            server.readiness.add(pool.not_ready)
    except (SigilError, RuntimeError) as exc:
        server.stop(0)
        _fail(str(exc))
    try:
        while not stop.wait(3600):
            pass
    finally:
        if pool is not None:
            pool.stop()
        server.stop(grace=5.0)
        if metrics_dir is not None:
            import shutil

            shutil.rmtree(metrics_dir, ignore_errors=True)


@cli.group()
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


@cli.group()
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


@cli.group()
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


def _all_pages(socket_path: str, list_page: Callable[[admin_pb2_grpc.AdminStub, str], Any],
               items: str) -> list[Any]:
    """Every item of a paged admin listing: ``list_page(stub, page_token)`` per page."""
    out: list[Any] = []
    token = ""
    while True:
        page = _call(socket_path, lambda stub: list_page(stub, token))  # noqa: B023 - called now
        out.extend(getattr(page, items))
        token = page.next_page_token
        if not token:
            return out


def _emit_list(items: Sequence[Any], output: str, to_json: Callable[[Any], object],
               to_text: Callable[[Any], str], one: str, many: str) -> None:
    """A listing as ``{"<many>": [...]}`` (the shape of every list command), or
    "Found n things" and each thing's text."""
    if output == "json":
        _emit_json({many: [to_json(i) for i in items]})
        return
    click.echo(f"Found {len(items)} {one if len(items) == 1 else many}")
    for i in items:
        click.echo("")
        click.echo(to_text(i))


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


@cli.group()
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


@cli.group()
def x509() -> None:
    """X.509-SVIDs for operators."""


@x509.command("mint")
@click.option("--spiffe-id", required=True, help="The SPIFFE ID to put in the SVID.")
@click.option("--ttl", type=DURATION,
              help="Lifetime: seconds or 10m, 1h (default: the server's x509_svid_ttl).")
@click.option("--dns-name", "dns_names", multiple=True, help="DNS SAN; repeatable.")
@click.option("--write", "write_dir", type=click.Path(file_okay=False),
              help="Write svid.pem, svid.key (mode 0600) and bundle.pem into this directory.")
@socket_option
@output_option
def x509_mint(spiffe_id: str, ttl: int | None, dns_names: tuple[str, ...],
              write_dir: str | None, socket_path: str, output: str) -> None:
    """Mint an X.509-SVID for any workload SPIFFE ID of the trust domain.

    The private key is made here and never sent: the server signs a CSR. Without
    --write the SVID, its PRIVATE KEY and the bundle are printed (PEM, or JSON keys
    svid_pem, key_pem, bundle_pem with --output json): keep that output secret.

    \b
    Examples:
      sigil-server x509 mint --spiffe-id spiffe://example.org/debug --ttl 10m --write ./svid
      sigil-server x509 mint --spiffe-id spiffe://example.org/debug --output json
    """
    from cryptography import x509 as cx509

    from identity.keys import generate_private_key, private_key_to_pem
    from identity.x509svid import certificates_to_pem, new_csr

    _check_spiffe_id(spiffe_id, "--spiffe-id")
    key = generate_private_key()
    req = admin_pb2.MintX509SVIDRequest(spiffe_id=spiffe_id, csr=new_csr(key), ttl=ttl or 0,
                                        dns_names=list(dns_names))
    resp = _call(socket_path, lambda s: s.MintX509SVID(req, timeout=ADMIN_TIMEOUT))
    chain_pem = certificates_to_pem(cx509.load_der_x509_certificate(d)
                                    for d in resp.svid.cert_chain).decode()
    key_pem = private_key_to_pem(key).decode()
    bundle_pem = certificates_to_pem(cx509.load_der_x509_certificate(d)
                                     for d in resp.bundle.x509_authorities).decode()
    expires = _unix_to_rfc3339(resp.svid.expires_at)
    if write_dir is not None:
        paths = _write_svid_files(Path(write_dir), chain_pem, key_pem, bundle_pem)
        if output == "json":
            _emit_json({"spiffe_id": resp.svid.spiffe_id, "expires_at": expires,
                        "files": [str(p) for p in paths]})
        else:
            click.echo(f"Wrote {', '.join(str(p) for p in paths)} (expires {expires})")
        return
    if output == "json":
        _emit_json({"spiffe_id": resp.svid.spiffe_id, "expires_at": expires,
                    "svid_pem": chain_pem, "key_pem": key_pem, "bundle_pem": bundle_pem})
    else:
        click.echo(f"X509-SVID ({resp.svid.spiffe_id}, expires {expires}):")
        click.echo(chain_pem, nl=False)
        click.echo("Private key:")
        click.echo(key_pem, nl=False)
        click.echo("Bundle:")
        click.echo(bundle_pem, nl=False)


def _write_svid_files(directory: Path, chain_pem: str, key_pem: str,
                      bundle_pem: str) -> list[Path]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for name, text, mode in (("svid.pem", chain_pem, 0o644), ("svid.key", key_pem, 0o600),
                                 ("bundle.pem", bundle_pem, 0o644)):
            path = directory / name
            # Create with the final mode so the key is never readable by others,
            # not even for the moment between write and chmod.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fh.fileno(), mode)
                fh.write(text)
            out.append(path)
        return out
    except OSError as exc:
        _fail(f"cannot write to {directory}: {exc.strerror}")


@cli.group()
def jwt() -> None:
    """JWT-SVIDs for operators."""


@jwt.command("mint")
@click.option("--spiffe-id", required=True, help="The SPIFFE ID to put in the token (sub).")
@click.option("--audience", "audience", multiple=True, required=True,
              help="Audience (aud); repeatable.")
@click.option("--ttl", type=DURATION,
              help="Lifetime: seconds or 5m (default: the server's jwt_svid_ttl).")
@socket_option
@output_option
def jwt_mint(spiffe_id: str, audience: tuple[str, ...], ttl: int | None, socket_path: str,
             output: str) -> None:
    """Mint a JWT-SVID for any workload SPIFFE ID of the trust domain.

    The token is a bearer credential: it is printed, never logged.

    \b
    Example:
      sigil-server jwt mint --spiffe-id spiffe://example.org/debug \\
          --audience spiffe://example.org/db --ttl 2m
    """
    _check_spiffe_id(spiffe_id, "--spiffe-id")
    resp = _call(socket_path, lambda s: s.MintJWTSVID(admin_pb2.MintJWTSVIDRequest(
        spiffe_id=spiffe_id, audience=list(audience), ttl=ttl or 0), timeout=ADMIN_TIMEOUT))
    if output == "json":
        _emit_json({"token": resp.token, "spiffe_id": resp.spiffe_id,
                    "expires_at": _unix_to_rfc3339(resp.expires_at)})
    else:
        click.echo(resp.token)


@cli.group("bundle")
def bundle_group() -> None:
    """Trust bundles: ours (show) and foreign trust domains' (list, show, set, delete)."""


@cli.command()
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


def _register_subcommands() -> None:
    # Imported here: these modules use this one's helpers.
    from ca.cli import bundle as cli_bundle
    from ca.cli import federation as cli_federation
    from ca.cli import localauthority as cli_localauthority
    from ca.cli import policy as cli_policy
    from ca.cli import status as cli_status
    from ca.cli import svid as cli_svid

    cli.add_command(cli_localauthority.make_group(sys.modules[__name__]))
    cli.add_command(cli_status.make_command(sys.modules[__name__]))
    cli.add_command(cli_federation.make_group(sys.modules[__name__]))
    cli_bundle.add_commands(sys.modules[__name__], bundle_group)
    cli_policy.add_commands(entry)
    cli.add_command(cli_svid.make_group(sys.modules[__name__]))


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
