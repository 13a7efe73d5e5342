"""``sigil-agent``: run the node agent, and talk to a running one's Workload API.

Exit codes: 0 success; 1 the operation failed (agent unreachable, no identity);
2 bad input (one line ``Error: <reason>`` on stderr); ``healthcheck`` also 3, 4
and 5 (degraded, evicted, banned: agent/health.py).
"""

from __future__ import annotations

# isort: off
from attestation import quietgrpc  # noqa: F401  (before anything imports grpc)
# isort: on

import asyncio
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import grpc

from agent import log
from agent.config import DEFAULT_SOCKET_PATH, load_config
from agent.endpoint import ENV_VAR, parse_endpoint_address
from agent.errors import (
    AgentError,
    ConfigError,
    EndpointAddressError,
    TrustDomainMismatchError,
)
from agent.health import EXIT_CODES, HealthReport, HealthState
from agent.health import METHOD as HEALTH_METHOD
from agent.workload_api.client import WorkloadApiClient
from api.protos import workload_pb2 as pb
from identity.errors import SigilError
from identity.jwtsvid import parse_insecure
from identity.x509svid import X509Svid, certificates_to_pem, load_certificates_der

F = TypeVar("F", bound=Callable[..., Any])

_EPILOG_RUN = """\b
Examples:
  # First start: attest with a join token, verify the server with its CA bundle
  sigil-server bundle show --format pem > bundle.pem
  sigil-agent run --trust-domain example.org --server-address sigil-server:8081 \\
      --join-token "$(sigil-server token generate)" --trust-bundle bundle.pem

  # Later starts reuse the SVID stored in --data-dir (no token needed)
  sigil-agent run --config /etc/sigil/agent.toml

\b
  # A VM fleet: prove the node with its own certificate instead of a token.
  # In the config file, either (docs/attestation.md):
  #   [node_attestor.x509pop]  certificate_path, private_key_path,
  #                            intermediates_path (optional)
  #   [node_attestor.sshpop]   host_key_path, host_cert_path
  #                            [/etc/ssh/ssh_host_rsa_key, ...-cert.pub]
  sigil-agent run --config /etc/sigil/agent.toml --trust-bundle bundle.pem
"""


def _usage_error(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


def _failure(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def spire_flag_hint(args: list[str]) -> str | None:
    """For the first SPIRE-style single-dash flag (``-socketPath``) in ``args``: a
    sentence naming Sigil's spelling (``--socket-path``); None when there is none."""
    for arg in args:
        if arg == "--":
            break
        if re.fullmatch(r"-[A-Za-z][A-Za-z0-9]+", arg):
            flag = "--" + re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", arg[1:]).lower()
            return f"{arg} is SPIRE's spelling: use {flag}"
    return None


class _Group(click.Group):
    """Turns click's usage errors into the one-line ``Error: ...`` + exit 2 form."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        argv = list(kwargs.get("args") or (args[0] if args else None) or sys.argv[1:])
        try:
            return super().main(*args, **kwargs)
        except click.NoSuchOption as exc:
            _usage_error(spire_flag_hint(argv) or exc.format_message().replace("\n", " "))
        except click.exceptions.Abort:
            sys.exit(130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            # A bare group ("sigil-agent api") shows its help, as click would.
            if type(exc).__name__ == "NoArgsIsHelpError" or exc.message.startswith(
                "Missing command"
            ):
                click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
                sys.exit(2)
            _usage_error(exc.format_message().replace("\n", " "))
        except click.ClickException as exc:
            _usage_error(exc.format_message())


def sigil_version() -> str:
    """The installed distribution's version ("unknown" when run from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sigil")
    except PackageNotFoundError:
        return "unknown"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=None, package_name="sigil", prog_name="sigil-agent",
                      message="%(prog)s %(version)s")
def main() -> None:
    """Sigil node agent: gets SVIDs from the Sigil server and serves them to the
    workloads on this node over the SPIFFE Workload API (a Unix socket).

    \b
    sigil-agent run            run the agent
    sigil-agent api fetch ...  fetch SVIDs and bundles from a running agent
    sigil-agent api validate   validate a JWT-SVID, or a WIT-SVID with its proof
    sigil-agent api watch      print X.509-SVID updates as they arrive
    sigil-agent helper         keep svid.pem/svid.key/bundle.pem files current
    sigil-agent healthcheck    exit 0 if the agent answers and gets new SVIDs
    """


# -- run --------------------------------------------------------------------------------


@main.command(epilog=_EPILOG_RUN)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file (keys: docs/configuration.md, Agent).")
@click.option("--trust-domain", help="Trust domain, e.g. example.org.")
@click.option("--server-address", help="The server's agent API, HOST:PORT.")
@click.option("--data-dir", help="Where the agent keeps its SVID and key [./.sigil-agent].")
@click.option("--socket-path", help=f"Workload API socket [{DEFAULT_SOCKET_PATH}].")
@click.option("--join-token", help="Single-use token from `sigil-server token generate`.")
@click.option("--trust-bundle", help="PEM file of the server's CA certificates.")
@click.option("--insecure-bootstrap", is_flag=True, default=None,
              help="Trust the server's CA on first use (testing only; not with --trust-bundle).")
@click.option("--health-address",
              help='HOST:PORT of /live, /ready and /metrics (HTTP) [off; e.g. 127.0.0.1:8089].')
def run(config_path: Path | None, trust_domain: str | None, server_address: str | None,
        data_dir: str | None, socket_path: str | None, join_token: str | None,
        trust_bundle: str | None, insecure_bootstrap: bool | None,
        health_address: str | None) -> None:
    """Run the agent: attest to the server, keep SVIDs fresh, serve the Workload API.

    Stops cleanly on SIGTERM or SIGINT, removing its sockets.
    """
    if trust_bundle and insecure_bootstrap:
        _usage_error("--trust-bundle and --insecure-bootstrap are mutually exclusive")
    overrides: dict[str, Any] = {
        "trust_domain": trust_domain, "server_address": server_address,
        "data_dir": data_dir, "socket_path": socket_path, "join_token": join_token,
        "trust_bundle_path": trust_bundle, "insecure_bootstrap": insecure_bootstrap,
        "health_address": health_address,
    }
    if trust_bundle:
        # A flag beats the file: --trust-bundle cancels insecure_bootstrap from TOML.
        overrides["insecure_bootstrap"] = False
    try:
        config = load_config(config_path, env=os.environ, overrides=overrides)
    except ConfigError as exc:
        _usage_error(str(exc))
    if config.trust_bundle_path is not None:
        # Refused now, not as a TLS failure after the first connection attempt.
        from agent.trustbundle import load_trust_bundle

        try:
            load_trust_bundle(config.trust_bundle_path, config.trust_domain)
        except AgentError as exc:
            _usage_error(str(exc))
    log.configure(level=config.log_level, fmt=config.log_format)
    from agent.workload_api.front import claim_socket_path

    try:
        # Before attesting: a socket path we cannot serve on must not cost a join token.
        claim_socket_path(config.socket_path)
    except AgentError as exc:
        _failure(str(exc))
    from agent.agent import Agent

    async def runner() -> None:
        agent = Agent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    try:
        asyncio.run(runner())
    except TrustDomainMismatchError as exc:
        # A configuration error, found before anything was sent: exit 2, one line.
        _usage_error(str(exc))
    except AgentError as exc:
        if config.log_format == "json":
            # For a log collector; on a terminal the Error line alone says it.
            log.event("agent failed", level=logging.ERROR, reason=str(exc))
        _failure(str(exc))
    except SigilError as exc:
        _failure(str(exc))


# -- config check -----------------------------------------------------------------------


@main.group()
def config() -> None:
    """Check a configuration file without starting the agent."""


@config.command("check", epilog="""\b
Examples:
  sigil-agent config check /etc/sigil/agent.toml
  SIGIL_AGENT_SERVER_ADDRESS=sigil:8081 sigil-agent config check agent.toml
""")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def config_check(path: Path) -> None:
    """Validate FILE as `sigil-agent run --config FILE` would (with the SIGIL_AGENT_*
    environment variables), and the trust bundle it names; start nothing.

    Exit 0 and one line when it is valid; 2 and one `Error:` line naming the key
    when it is not.
    """
    if not path.exists():
        _usage_error(f"{path} does not exist")
    try:
        cfg = load_config(path, env=os.environ)
    except ConfigError as exc:
        _usage_error(str(exc))
    if cfg.trust_bundle_path is not None:
        from agent.trustbundle import load_trust_bundle

        try:
            load_trust_bundle(cfg.trust_bundle_path, cfg.trust_domain)
        except AgentError as exc:
            _usage_error(str(exc))
    click.echo(f"{path}: valid (trust domain {cfg.trust_domain.name}, server "
               f"{cfg.server_address}, socket {cfg.socket_path})")


# -- Workload API client commands ---------------------------------------------------------


def _resolve_socket(value: str | None) -> str:
    """--socket-path, else $SPIFFE_ENDPOINT_SOCKET, else the default; URI forms allowed.

    A socket that does not exist fails here, with where the path came from and how
    to give another (exit 1)."""
    raw = value or os.environ.get(ENV_VAR) or DEFAULT_SOCKET_PATH
    try:
        path = parse_endpoint_address(raw)
    except EndpointAddressError as exc:
        _usage_error(str(exc))
    check_client_socket(path)
    if not Path(path).exists():
        _failure(f"agent is not running: {path} does not exist ({_socket_origin(value)}; "
                 f"set {ENV_VAR} or pass --socket-path to use another)")
    return path


def _socket_origin(value: str | None) -> str:
    if value:
        return "from --socket-path"
    if os.environ.get(ENV_VAR):
        return f"from {ENV_VAR}"
    return "the default"


def _unreachable(path: str) -> NoReturn:
    _failure(f"agent is not running: nobody answers on {path} (set {ENV_VAR} or pass "
             "--socket-path to use another)")


def check_client_socket(path: str) -> None:
    """Refuse a socket whose directory another user controls: they could serve a
    fake Workload API there and collect what we send (a JWT-SVID to validate) or
    feed us their bundles. A missing directory is left to the call to report."""
    from attestation.socketdir import check_socket_directory

    try:
        check_socket_directory(Path(path), client=True)
    except SigilError as exc:
        _failure(str(exc))
    except FileNotFoundError:
        return
    except OSError as exc:
        _failure(f"cannot check socket {path}: {exc.strerror}")


def _socket_option(f: F) -> F:
    return click.option(
        "--socket-path",
        help=f"Agent socket: a path or unix:///path [${ENV_VAR}, else {DEFAULT_SOCKET_PATH}].",
    )(f)


def _rpc_failure(exc: grpc.RpcError, what: str, path: str | None = None) -> NoReturn:
    code = exc.code()
    details = exc.details()
    if code == grpc.StatusCode.UNAVAILABLE and path is not None:
        _unreachable(path)
    _failure(f"{what}: {code.name if code else 'UNKNOWN'}: {details}")


@main.group()
def api() -> None:
    """Talk to a running agent's Workload API (as the workload this process is)."""


@api.group()
def fetch() -> None:
    """Fetch SVIDs from the agent."""


_EPILOG_X509 = """\b
Examples:
  sigil-agent api fetch x509
  sigil-agent api fetch x509 --write /run/svid     # svid.pem, svid.key, bundle.pem
  SPIFFE_ENDPOINT_SOCKET=unix:///run/sigil/api.sock sigil-agent api fetch x509 --output json
"""


@fetch.command("x509", epilog=_EPILOG_X509)
@_socket_option
@click.option("--write", "write_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write svid.pem (chain), svid.key (0600) and bundle.pem into DIR.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds.")
def fetch_x509(socket_path: str | None, write_dir: Path | None, output: str,
               timeout: float) -> None:
    """Fetch this process's X.509-SVIDs (the first is the default identity)."""
    path = _resolve_socket(socket_path)
    try:
        with WorkloadApiClient(path, timeout=timeout) as client:
            resp = client.fetch_x509_svid()
    except grpc.RpcError as exc:
        _rpc_failure(exc, "FetchX509SVID failed", path)
    rows = []
    for i, s in enumerate(resp.svids):
        try:
            svid = X509Svid.parse_raw(s.x509_svid, s.x509_svid_key)
            bundle = load_certificates_der(s.bundle)
        except SigilError as exc:
            _failure(f"the agent sent an unusable SVID: {exc}")
        rows.append({"spiffe_id": str(svid.spiffe_id),
                     "expires_at": svid.expires_at.isoformat(), "hint": s.hint})
        if write_dir is not None and i == 0:
            # Imported here: agent.state pulls in the agent's cache (only `run` needs it).
            from agent.state import write_file_atomic

            write_dir.mkdir(parents=True, exist_ok=True)
            write_file_atomic(write_dir / "svid.pem", svid.chain_pem(), mode=0o644)
            write_file_atomic(write_dir / "svid.key", svid.key_pem(), mode=0o600)
            write_file_atomic(write_dir / "bundle.pem", certificates_to_pem(bundle), mode=0o644)
    if output == "json":
        click.echo(json.dumps({"svids": rows}, indent=2))
        return
    for row in rows:
        hint = f" hint={row['hint']}" if row["hint"] else ""
        click.echo(f"{row['spiffe_id']} expires_at={row['expires_at']}{hint}")
    if write_dir is not None:
        click.echo(f"wrote {write_dir}/svid.pem, svid.key, bundle.pem")


_EPILOG_JWT = """\b
Examples:
  sigil-agent api fetch jwt --audience spiffe://example.org/db
  sigil-agent api fetch jwt --audience api --spiffe-id spiffe://example.org/web --output json
"""


@fetch.command("jwt", epilog=_EPILOG_JWT)
@_socket_option
@click.option("--audience", "audience", multiple=True,
              help="Audience the token is for (repeat for several). Required.")
@click.option("--spiffe-id", default="", help="Only this identity (default: all of them).")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds.")
def fetch_jwt(socket_path: str | None, audience: tuple[str, ...], spiffe_id: str, output: str,
              timeout: float) -> None:
    """Fetch JWT-SVIDs for an audience; prints one token a line."""
    if not audience:
        _usage_error("--audience is required (who the token is for)")
    path = _resolve_socket(socket_path)
    try:
        with WorkloadApiClient(path, timeout=timeout) as client:
            resp = client.fetch_jwt_svid(list(audience), spiffe_id)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            _usage_error(str(exc.details()))
        _rpc_failure(exc, "FetchJWTSVID failed", path)
    rows = []
    for s in resp.svids:
        expires = ""
        try:
            expires = parse_insecure(s.svid, audience=list(audience)).expires_at.isoformat()
        except SigilError:
            expires = ""
        rows.append({"spiffe_id": s.spiffe_id, "token": s.svid, "expires_at": expires,
                     "hint": s.hint})
    if output == "json":
        click.echo(json.dumps({"svids": rows}, indent=2))
    else:
        for row in rows:
            click.echo(row["token"])


_EPILOG_HEALTHCHECK = """\b
Exit codes:
  0  healthy: the Workload API answers and the last sync with the server succeeded
  1  the agent does not answer (not running, or its socket is not served)
  2  bad input (a bad --socket-path)
  3  degraded: the last sync failed (server unreachable, or refused)
  4  evicted: the server no longer knows the agent and it could not attest again
  5  banned: the server refuses the agent
In 3, 4 and 5 the agent serves the SVIDs it holds until they expire, and gets
no new ones.

\b
Examples:
  sigil-agent healthcheck --socket-path /run/sigil/api.sock
  sigil-agent healthcheck --output json
"""

_NOT_HEALTHY = {
    HealthState.DEGRADED: "agent is degraded: the last sync with the server failed",
    HealthState.EVICTED: "agent is evicted: the server no longer knows it",
    HealthState.BANNED: "agent is banned: the server refuses it",
}


def _health_report(path: str, timeout: float) -> HealthReport | None:
    """The agent's own report (agent/health.py); None from an agent without one."""
    with grpc.insecure_channel(f"unix:{path}") as channel:
        check = channel.unary_unary(HEALTH_METHOD)
        try:
            data = check(b"", timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            _rpc_failure(exc, "agent is not healthy", path)
    try:
        return HealthReport.from_json(data)
    except ValueError as exc:
        _failure(f"the agent sent an unusable health report: {exc}")


@main.command(epilog=_EPILOG_HEALTHCHECK)
@_socket_option
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="Seconds.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def healthcheck(socket_path: str | None, timeout: float, output: str) -> None:
    """Exit 0 if the agent answers and gets new SVIDs; 3, 4, 5 if it only serves
    those it holds (degraded, evicted, banned).

    Asks for X.509 bundles as this process: an answer, or PermissionDenied (this
    process has no identity), both prove the Workload API is served. Then asks
    the agent for its state on the same socket.
    """
    path = _resolve_socket(socket_path)
    try:
        with WorkloadApiClient(path, timeout=timeout) as client:
            client.fetch_x509_bundles()
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
            _rpc_failure(exc, "agent is not healthy", path)
    report = _health_report(path, timeout)
    if report is None:
        # An agent that does not report its state: that it answers is all we know.
        if output == "json":
            click.echo(json.dumps({"healthy": True, "socket_path": path,
                                   "version": sigil_version()}))
            return
        click.echo(f"agent is healthy ({dt.datetime.now(dt.UTC):%H:%M:%S} UTC)")
        return
    healthy = report.state is HealthState.HEALTHY
    if output == "json":
        click.echo(json.dumps({
            "healthy": healthy, "state": report.state.value, "reason": report.reason,
            "last_sync": report.last_sync, "svids": report.svids,
            "next_expiry": report.next_expiry, "socket_path": path,
            "version": sigil_version(),
        }))
    elif healthy:
        click.echo(f"agent is healthy ({dt.datetime.now(dt.UTC):%H:%M:%S} UTC)")
    else:
        held = (f"{report.svids} held, the first expires at {report.next_expiry}"
                if report.svids else "none held")
        click.echo(f"{_NOT_HEALTHY[report.state]}; serving the SVIDs it holds until they "
                   f"expire ({held}); last successful sync: {report.last_sync or 'none'}; "
                   f"reason: {report.reason or 'unknown'}")
    sys.exit(EXIT_CODES[report.state])


# -- more Workload API commands: jwt-bundles, validate, watch --------------------------


_EPILOG_JWT_BUNDLES = """\b
Examples:
  sigil-agent api fetch jwt-bundles
  sigil-agent api fetch jwt-bundles --output json > jwks.json
"""


@fetch.command("jwt-bundles", epilog=_EPILOG_JWT_BUNDLES)
@_socket_option
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds.")
def fetch_jwt_bundles(socket_path: str | None, output: str, timeout: float) -> None:
    """Fetch the JWT bundles (JWKS) this process may use to validate JWT-SVIDs."""
    path = _resolve_socket(socket_path)
    try:
        with WorkloadApiClient(path, timeout=timeout) as client:
            resp = client.fetch_jwt_bundles()
    except grpc.RpcError as exc:
        _rpc_failure(exc, "FetchJWTBundles failed", path)
    bundles: dict[str, Any] = {}
    for td, jwks in sorted(resp.bundles.items()):
        try:
            bundles[td] = json.loads(jwks)
        except ValueError:
            _failure(f"the agent sent a JWT bundle for {td} that is not JSON")
    if output == "json":
        click.echo(json.dumps(bundles, indent=2))
        return
    for td, doc in bundles.items():
        kids = [str(k.get("kid", "")) for k in doc.get("keys", [])]
        click.echo(f"{td} keys={len(kids)} kid={','.join(kids)}")


@api.group()
def validate() -> None:
    """Validate credentials through the agent."""


_EPILOG_VALIDATE = """\b
Examples:
  sigil-agent api validate jwt --audience spiffe://example.org/db --svid "$TOKEN"
  sigil-agent api validate jwt --audience db --svid "$TOKEN" --output json
"""


@validate.command("jwt", epilog=_EPILOG_VALIDATE)
@_socket_option
@click.option("--audience", default="", help="The audience you expect (you). Required.")
@click.option("--svid", "token", default="", help="The JWT-SVID to validate. Required.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds.")
def validate_jwt(socket_path: str | None, audience: str, token: str, output: str,
                 timeout: float) -> None:
    """Check a JWT-SVID's signature, expiry and audience; print its SPIFFE ID and claims.

    Exit 0 when valid; 2 (with the reason) when the token is malformed, expired,
    signed by an unknown key or meant for another audience.
    """
    if not audience:
        _usage_error("--audience is required (the audience the token must be for)")
    if not token.strip():
        _usage_error("--svid is required (the JWT-SVID to validate)")
    path = _resolve_socket(socket_path)
    try:
        with WorkloadApiClient(path, timeout=timeout) as client:
            resp = client.validate_jwt_svid(token.strip(), audience)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            _usage_error(f"the JWT-SVID is not valid: {exc.details()}")
        _rpc_failure(exc, "ValidateJWTSVID failed", path)
    from google.protobuf.json_format import (  # type: ignore[import-untyped,unused-ignore]
        MessageToDict,
    )

    claims = MessageToDict(resp.claims)
    if output == "json":
        click.echo(json.dumps({"spiffe_id": resp.spiffe_id, "claims": claims}, indent=2))
        return
    click.echo(f"valid: {resp.spiffe_id}")
    for key in sorted(claims):
        click.echo(f"  {key}: {json.dumps(claims[key])}")


# -- WIT-SVIDs (WIT-SVID profile of the Workload API) -----------------------------------


_EPILOG_FETCH_WIT = """\b
Examples:
  sigil-agent api fetch wit
  sigil-agent api fetch wit --write /run/wit     # wit.jwt, wit.key.json (0600)
  sigil-agent api fetch wit --spiffe-id spiffe://example.org/web --output json
"""


@fetch.command("wit", epilog=_EPILOG_FETCH_WIT)
@_socket_option
@click.option("--spiffe-id", default="", help="Only this identity (default: all of them).")
@click.option("--write", "write_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write wit.jwt and wit.key.json (the private JWK, 0600) into DIR.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds.")
def fetch_wit(socket_path: str | None, spiffe_id: str, write_dir: Path | None, output: str,
              timeout: float) -> None:
    """Fetch this process's WIT-SVIDs (the first is the default identity).

    Prints the SPIFFE IDs and expiry times, never the keys; --write saves the first
    token and its private key for a program that makes proofs with it.
    """
    from identity.witsvid import parse_wit_svid_insecure

    path = _resolve_socket(socket_path)
    try:
        with WorkloadApiClient(path, timeout=timeout) as client:
            resp = client.fetch_wit_svid(spiffe_id)
    except grpc.RpcError as exc:
        _rpc_failure(exc, "FetchWITSVID failed")
    rows = []
    for i, s in enumerate(resp.svids):
        try:
            wit = parse_wit_svid_insecure(s.wit_svid)
        except SigilError as exc:
            _failure(f"the agent sent an unusable WIT-SVID: {exc}")
        rows.append({"spiffe_id": str(wit.spiffe_id), "expires_at": wit.expires_at.isoformat(),
                     "jti": wit.jti, "hint": s.hint})
        if write_dir is not None and i == 0:
            from agent.state import write_file_atomic

            write_dir.mkdir(parents=True, exist_ok=True)
            write_file_atomic(write_dir / "wit.jwt", s.wit_svid.encode(), mode=0o644)
            write_file_atomic(write_dir / "wit.key.json", s.wit_svid_key.encode(), mode=0o600)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        hint = f" hint={row['hint']}" if row["hint"] else ""
        click.echo(f"{row['spiffe_id']} expires_at={row['expires_at']}{hint}")
    if write_dir is not None:
        click.echo(f"wrote {write_dir}/wit.jwt, wit.key.json")


_EPILOG_VALIDATE_WIT = """\b
Examples:
  sigil-agent api validate wit --audience https://db.example.org/orders \\
      --svid "$WIT" --proof "$WPT"
  sigil-agent api validate wit --audience https://db.example.org/ --svid "$WIT" \\
      --proof "$WPT" --output json
"""


@validate.command("wit", epilog=_EPILOG_VALIDATE_WIT)
@_socket_option
@click.option("--audience", "audience", multiple=True,
              help="What the proof's aud must name: you, e.g. your URL (repeat for aliases). "
                   "Required.")
@click.option("--svid", "token", default="", help="The WIT-SVID. Required.")
@click.option("--proof", default="",
              help="The Workload Proof Token (typ wpt+jwt) presented with it. Required: "
                   "a WIT-SVID is never a bearer token.")
@click.option("--max-proof-lifetime", type=click.FloatRange(min=1), default=300.0,
              show_default=True, help="Seconds a proof's exp may lie ahead.")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds.")
def validate_wit(socket_path: str | None, audience: tuple[str, ...], token: str, proof: str,
                 max_proof_lifetime: float, output: str, timeout: float) -> None:
    """Check a WIT-SVID and its proof of possession against the agent's WIT bundles.

    The Workload API has no ValidateWITSVID: this fetches the WIT bundles this
    process may use (FetchWITBundles) and checks here: the token (typ wit+jwt,
    kid, signature by a wit-svid key of its trust domain, expiry, cnf.jwk) and
    the proof (typ wpt+jwt, alg = cnf.jwk.alg, signed by the cnf key, aud, short
    exp, wth = the token's hash, jti). Exit 0 when valid; 2 with the reason when
    not, or when --proof is missing.
    """
    from identity.bundle import Bundle, BundleSet
    from identity.spiffeid import TrustDomain
    from identity.witsvid import ReplayCache, verify_presentation

    if not audience:
        _usage_error("--audience is required (what the proof's aud must name)")
    if not token.strip():
        _usage_error("--svid is required (the WIT-SVID to validate)")
    if not proof.strip():
        _usage_error("--proof is required: a WIT-SVID must be presented with a proof of "
                     "possession (WIT-SVID §5), never as a bearer token")
    path = _resolve_socket(socket_path)
    try:
        with WorkloadApiClient(path, timeout=timeout) as client:
            resp = client.fetch_wit_bundles()
    except grpc.RpcError as exc:
        _rpc_failure(exc, "FetchWITBundles failed")
    bundles = []
    for td_id, jwks in resp.bundles.items():
        try:
            td = TrustDomain.parse(td_id.removeprefix("spiffe://"))
            bundles.append(Bundle.from_jwks(td, jwks))
        except SigilError as exc:
            _failure(f"the agent sent an unusable WIT bundle for {td_id}: {exc}")
    try:
        wit = verify_presentation(
            token.strip(), proof.strip(), bundles=BundleSet(bundles), audience=audience,
            now=dt.datetime.now(dt.UTC), replay_cache=ReplayCache(),
            max_proof_lifetime=dt.timedelta(seconds=max_proof_lifetime),
        )
    except SigilError as exc:
        _usage_error(f"the WIT-SVID is not valid: {exc}")
    claims = dict(wit.claims)
    if output == "json":
        click.echo(json.dumps({"spiffe_id": str(wit.spiffe_id), "claims": claims}, indent=2))
        return
    click.echo(f"valid: {wit.spiffe_id}")
    for key in sorted(claims):
        click.echo(f"  {key}: {json.dumps(claims[key])}")


_EPILOG_WATCH = """\b
Examples:
  sigil-agent api watch                     # until Ctrl-C
  sigil-agent api watch --count 2 --output json   # the first two updates, then exit
"""


def _update_row(resp: Any) -> dict[str, Any]:
    svids = []
    for s in resp.svids:
        try:
            svid = X509Svid.parse_raw(s.x509_svid, s.x509_svid_key)
        except SigilError as exc:
            _failure(f"the agent sent an unusable SVID: {exc}")
        svids.append({"spiffe_id": str(svid.spiffe_id), "serial": f"{svid.leaf.serial_number:x}",
                      "expires_at": svid.expires_at.isoformat(), "hint": s.hint})
    return {"received_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "svids": svids, "federated_bundles": sorted(resp.federated_bundles)}


@api.command("watch", epilog=_EPILOG_WATCH)
@_socket_option
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after N updates (for scripts and tests).")
@click.option("--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: one object a line.")
def watch(socket_path: str | None, count: int | None, output: str) -> None:
    """Print each X.509-SVID update as the agent sends it (rotations, entry changes).

    Runs until interrupted (or --count updates). The first update comes at once.
    """
    path = _resolve_socket(socket_path)
    seen = 0
    client = WorkloadApiClient(path)
    stream = client.stream("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
    try:
        for resp in stream:
            row = _update_row(resp)
            seen += 1
            if output == "json":
                click.echo(json.dumps(row), nl=True)
            else:
                ids = " ".join(
                    f"{r['spiffe_id']}(serial={r['serial']},expires_at={r['expires_at']})"
                    for r in row["svids"]
                )
                click.echo(f"update {seen} at {row['received_at']}: {ids}")
            sys.stdout.flush()
            if count is not None and seen >= count:
                return
    except grpc.RpcError as exc:
        _rpc_failure(exc, "FetchX509SVID stream ended", path)
    except KeyboardInterrupt:
        return
    finally:
        stream.cancel()  # type: ignore[attr-defined]
        client.close()


# -- helper -------------------------------------------------------------------------------

_EPILOG_HELPER = """\b
Writes into DIR on every update: svid.pem (chain), svid.key (0600),
bundle.pem, and federated_bundle_<trust domain>.pem per federated trust
domain; with --bundle-map-file, also a SPIFFE bundle map of all those trust
domains in one file; with --wit-svid-file and --wit-svid-key-file, also the
WIT-SVID and its private key (JWK, 0600) on every WIT-SVID rotation; each
atomically (temporary file, fsync, rename). Then runs
--cmd, or sends --signal to the PID in --pid-file.

\b
Examples:
  # nginx: reload on every rotation
  sigil-agent helper --socket-path /run/sigil/api.sock --dir /etc/nginx/spiffe \\
      --signal HUP --pid-file /run/nginx.pid
  # any program: run a command
  sigil-agent helper --socket-path /run/sigil/api.sock --dir /run/svid \\
      --cmd 'systemctl reload myapp'
  # from the [helper] table of a TOML file (flags override it)
  sigil-agent helper --config /etc/sigil/helper.toml
"""


@main.command("helper", epilog=_EPILOG_HELPER)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file with a [helper] table (keys: docs/agent.md).")
@click.option("--socket-path", help="The agent's Workload API socket (path or unix:///path).")
@click.option("--dir", "directory", help="Directory to write the files into.")
@click.option("--cmd", help="Command to run after each update (no shell).")
@click.option("--signal", "sig", help="Signal to send after each update (HUP, USR1, ...).")
@click.option("--pid-file", help="File with the PID to send --signal to.")
@click.option("--bundle-map-file",
              help="Also write a SPIFFE bundle map (JSON) of every trust domain here "
                   "(relative: inside --dir).")
@click.option("--wit-svid-file",
              help="Also write the WIT-SVID (the token) here; needs --wit-svid-key-file "
                   "(relative: inside --dir).")
@click.option("--wit-svid-key-file",
              help="Write the WIT-SVID's private key here, as a JWK (JSON), mode 0600.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Exit after N updates (of each stream, with WIT-SVIDs) (for scripts "
                   "and tests).")
def helper(config_path: Path | None, socket_path: str | None, directory: str | None,
           cmd: str | None, sig: str | None, pid_file: str | None,
           bundle_map_file: str | None, wit_svid_file: str | None,
           wit_svid_key_file: str | None, count: int | None) -> None:
    """Keep SVID and bundle files current for a program that reads files (nginx, ...).

    Streams X.509-SVID updates from the agent until SIGTERM/SIGINT (or --count).
    """
    from agent.helper import Helper, build_config, load_config_file

    flags = {"socket_path": socket_path or os.environ.get(ENV_VAR) or None, "dir": directory,
             "cmd": cmd, "signal": sig, "pid_file": pid_file,
             "bundle_map_file": bundle_map_file, "wit_svid_file": wit_svid_file,
             "wit_svid_key_file": wit_svid_key_file}
    try:
        if config_path is not None:
            config = load_config_file(config_path, flags)
        else:
            config = build_config({k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        _usage_error(str(exc))
    # A fake agent could hand the program its own bundle to trust.
    check_client_socket(str(config.socket_path))
    log.configure(level="info", fmt="text")
    runner: Helper

    def counted(_svid: object) -> None:
        if count is not None and runner.updates >= count and (
                not config.writes_wit or runner.wit_updates >= count):
            runner.stop()

    runner = Helper(config, on_update=counted, on_wit_update=counted)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda _n, _f: runner.stop())
    runner.run()
    if count is not None and runner.notify_failures:
        # A script that waits for the first files must learn the program was not reloaded.
        _failure(f"files written, but the reload failed: {runner.notify_failures[-1]}")
