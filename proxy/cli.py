"""``sigil-proxy``: the command line.

Bad input (a flag, an address, a config file) is one line ``Error: ...`` on
stderr and exit code 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from identity.logfmt import LOG_FORMATS, LOG_LEVELS
from proxy import log
from proxy.broker import MAX_PID, BrokerSource, broker_target
from proxy.config import (
    Address,
    FileConfig,
    Listener,
    check_unique,
    duration_seconds,
    load_file,
    parse_pair,
    setting,
)
from proxy.errors import ConfigError, WatcherStopped
from proxy.metrics import Metrics
from proxy.policy import Policy, from_rules, parse_id
from proxy.server import Proxy, Settings
from proxy.workload import socket_target


def _usage_error(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns click's usage errors into the one-line ``Error: ...`` + exit 2 form."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Abort:
            sys.exit(130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" or exc.message.startswith(
                    "Missing command"):
                click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
                sys.exit(2)
            _usage_error(exc.format_message().replace("\n", " "))
        except click.ClickException as exc:
            _usage_error(exc.format_message())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Sigil proxy: mutual TLS with SPIFFE IDs for programs that speak plain TCP.

    It gets its X.509-SVID and trust bundles from the SPIFFE Workload API (the
    Sigil agent's socket), like any workload, and follows their rotation. With
    --broker-pid or --broker-pidfile it acts as a SPIFFE broker instead: it
    fetches the SVID of the program it fronts from the agent's Broker API and
    presents that.

    \b
    inbound   TLS in, plain TCP out: put it in front of a server. It requires a
              client certificate, checks the client's SPIFFE ID against the
              allow list, then forwards the bytes to the local server.
    outbound  plain TCP in, TLS out: a local client connects to it, it connects
              to the remote proxy or server with mutual TLS and checks the
              server's SPIFFE ID.

    \b
    sigil-proxy run            run the proxy
    sigil-proxy check-config   validate a config file and exit
    """


_EPILOG_RUN = """\b
Examples:
  # In front of a local HTTP server on 8080: only the frontend may call it
  sigil-proxy run --socket-path /run/sigil-agent/public/api.sock \\
      --inbound 0.0.0.0:8443=127.0.0.1:8080 --allow spiffe://example.org/frontend

\b
  # Beside a client: it talks plain TCP to 127.0.0.1:9000, the proxy does mTLS
  # to the backend's proxy and checks that it is spiffe://example.org/backend
  sigil-proxy run --outbound 127.0.0.1:9000=backend.example.org:8443 \\
      --expect spiffe://example.org/backend

\b
Allow rules (--allow, --expect, and the config file's lists):
  spiffe://example.org/web      exactly this SPIFFE ID
  spiffe://example.org          any ID of this trust domain
  spiffe://example.org/ns/prod/*  any ID under this path (whole segments)
Nothing is allowed unless a rule allows it.
"""


@main.command(epilog=_EPILOG_RUN)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML file with listeners and their allow lists; re-read when it "
              "changes (a bad version is refused and the previous policy stays).")
@click.option("--socket-path", envvar="SPIFFE_ENDPOINT_SOCKET", show_envvar=True,
              help="The Workload API socket (unix:///path or /path).")
@click.option("--spiffe-id", help="Which of the SVIDs the Workload API offers to present "
              "(default: the first, the workload's default identity).")
@click.option("--broker-pid", type=int, metavar="PID",
              help="Broker mode: present the SVID of the program with this PID (the one "
              "the proxy fronts), fetched from the agent's Broker API, not the proxy's own.")
@click.option("--broker-pidfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Broker mode, with the PID read from this file (again on every "
              "reconnection, so a restarted program is found).")
@click.option("--broker-socket", envvar="SPIFFE_BROKER_SOCKET", show_envvar=True,
              help="The agent's Broker API socket (unix:///path), in broker mode.")
@click.option("--inbound", "inbounds", multiple=True, metavar="LISTEN=FORWARD",
              help="Accept mTLS on LISTEN, forward plain TCP to FORWARD. Repeatable.")
@click.option("--allow", "allows", multiple=True, metavar="RULE",
              help="Client SPIFFE IDs the --inbound listeners accept. Repeatable.")
@click.option("--outbound", "outbounds", multiple=True, metavar="LISTEN=CONNECT",
              help="Accept plain TCP on LISTEN, connect with mTLS to CONNECT. Repeatable.")
@click.option("--expect", "expects", multiple=True, metavar="RULE",
              help="Server SPIFFE IDs the --outbound listeners accept. Repeatable.")
@click.option("--metrics-address", metavar="HOST:PORT",
              help="Serve Prometheus metrics on http://HOST:PORT/metrics.")
@click.option("--handshake-timeout", metavar="DURATION",
              help="How long a TLS handshake may take (default 10s).")
@click.option("--connect-timeout", metavar="DURATION",
              help="How long connecting to a target may take (default 10s).")
@click.option("--max-connections", type=int, metavar="N",
              help="Connections open at once over all listeners (default 1024); "
              "more are closed at once.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Default: info.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), help="Default: text.")
def run(config_path: Path | None, socket_path: str | None, spiffe_id: str | None,
        broker_pid: int | None, broker_pidfile: Path | None, broker_socket: str | None,
        inbounds: tuple[str, ...], allows: tuple[str, ...], outbounds: tuple[str, ...],
        expects: tuple[str, ...], metrics_address: str | None,
        handshake_timeout: str | None, connect_timeout: str | None,
        max_connections: int | None, log_level: str | None, log_format: str | None) -> None:
    """Run the proxy until SIGTERM or SIGINT.

    It listens only once it holds an SVID; until then it retries the Workload
    API with backoff. If the Workload API goes away later, it keeps using the
    SVID it holds until that expires.
    """
    try:
        settings, file_settings = _settings(
            config_path, socket_path, spiffe_id, inbounds, allows, outbounds, expects,
            metrics_address, handshake_timeout, connect_timeout, max_connections,
            (broker_pid, broker_pidfile, broker_socket))
    except ConfigError as exc:
        _usage_error(str(exc))
    level = log_level or file_settings.get("log_level") or "info"
    fmt = log_format or file_settings.get("log_format") or "text"
    if level not in LOG_LEVELS or fmt not in LOG_FORMATS:
        _usage_error(f"{config_path}: log_level must be one of {', '.join(LOG_LEVELS)} and "
                     f"log_format one of {', '.join(LOG_FORMATS)}")
    log.configure(level=level, fmt=fmt)
    _raise_fd_limit(settings.max_connections)
    metrics = Metrics()
    if settings.metrics_address is not None:
        try:
            metrics.serve(settings.metrics_address)
        except OSError as exc:
            _usage_error(f"--metrics-address {settings.metrics_address}: {exc.strerror or exc}")
    proxy = Proxy(settings, metrics)
    try:
        asyncio.run(_run(proxy))
    except ConfigError as exc:  # a listening address that cannot be bound
        _usage_error(str(exc))
    except WatcherStopped:  # logged (one line) by the proxy
        sys.exit(1)


def _raise_fd_limit(max_connections: int) -> None:
    # Each relayed connection holds two descriptors; a default soft limit of 1024
    # would make accept() fail (EMFILE) long before the connection cap.
    want = 2 * max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        log.event("file descriptor limit is below what max_connections needs",
                  level=logging.WARNING, limit=new, max_connections=max_connections,
                  needed=want)


async def _run(proxy: Proxy) -> None:
    await proxy.run()


def _settings(config_path: Path | None, socket_path: str | None, spiffe_id: str | None,
              inbounds: tuple[str, ...], allows: tuple[str, ...],
              outbounds: tuple[str, ...], expects: tuple[str, ...],
              metrics_address: str | None, handshake_timeout: str | None,
              connect_timeout: str | None, max_connections: int | None,
              broker_flags: tuple[int | None, Path | None, str | None] = (None, None, None),
              ) -> tuple[Settings, dict[str, Any]]:
    file = FileConfig({}, ()) if config_path is None else load_file(config_path)
    fs = dict(file.settings)

    def pick(flag: object, key: str, kind: type) -> Any:
        return flag if flag is not None else setting(fs, key, kind, config_path)

    listeners: list[Listener] = list(file.listeners)
    if allows and not inbounds:
        raise ConfigError("--allow applies to --inbound listeners; there is none")
    if expects and not outbounds:
        raise ConfigError("--expect applies to --outbound listeners; there is none")
    allow_policy = _cli_policy("--allow", allows)
    expect_policy = _cli_policy("--expect", expects)
    for text in inbounds:
        listen, target = parse_pair(text, "inbound")
        if allow_policy.empty:
            raise ConfigError(f"--inbound {text}: give at least one --allow (nobody is "
                              "allowed by default)")
        listeners.append(Listener(f"inbound:{listen}", "inbound", listen, target, allow_policy))
    for text in outbounds:
        listen, target = parse_pair(text, "outbound")
        if expect_policy.empty:
            raise ConfigError(f"--outbound {text}: give at least one --expect (the server's "
                              "SPIFFE ID)")
        listeners.append(Listener(f"outbound:{listen}", "outbound", listen, target,
                                  expect_policy))
    if not listeners:
        raise ConfigError("nothing to do: give --inbound, --outbound or a --config file "
                          "with [[inbound]] or [[outbound]] tables")
    check_unique(listeners)
    pid, pidfile, broker_socket = broker_flags
    broker = _broker(pick(pid, "broker_pid", int), pick(pidfile, "broker_pidfile", str),
                     pick(broker_socket, "broker_socket", str))
    socket_value = pick(socket_path, "socket_path", str)
    if not socket_value and broker is None:
        raise ConfigError("no Workload API socket: give --socket-path or set "
                          "SPIFFE_ENDPOINT_SOCKET")
    want_text = pick(spiffe_id, "spiffe_id", str)
    try:
        want = parse_id(want_text) if want_text else None
    except ConfigError as exc:
        raise ConfigError(f"--spiffe-id: {exc}") from None
    metrics_text = pick(metrics_address, "metrics_address", str)
    handshake = pick(handshake_timeout, "handshake_timeout", str) or "10s"
    connect = pick(connect_timeout, "connect_timeout", str) or "10s"
    cap = pick(max_connections, "max_connections", int)
    cap = 1024 if cap is None else cap
    if cap < 1:
        raise ConfigError(f"max connections must be at least 1, got {cap}")
    settings = Settings(
        # In broker mode the proxy's own Workload API identity is not used.
        socket_target=socket_target(socket_value) if broker is None else "",
        spiffe_id=want,
        listeners=tuple(listeners),
        config_path=config_path,
        metrics_address=Address.parse(metrics_text, listening=True) if metrics_text else None,
        handshake_timeout=duration_seconds(handshake, "handshake timeout"),
        connect_timeout=duration_seconds(connect, "connect timeout"),
        max_connections=cap,
        reload_interval=float(os.environ.get("SIGIL_PROXY_RELOAD_INTERVAL", "1")),
        broker=broker,
    )
    return settings, fs


def _broker(pid: int | None, pidfile: str | Path | None,
            socket: str | None) -> BrokerSource | None:
    """Broker mode's settings, or None when neither a PID nor a pidfile is given.

    Raises:
        ConfigError: both, a PID outside 1..2**31-1, a relative pidfile, or no broker socket.
    """
    if pid is None and not pidfile:
        return None
    if pid is not None and pidfile:
        raise ConfigError("give --broker-pid or --broker-pidfile, not both")
    if pid is not None and not 1 <= pid <= MAX_PID:
        raise ConfigError(f"--broker-pid must be a positive PID (at most {MAX_PID}), not {pid}")
    path = Path(pidfile) if pidfile else None
    if path is not None and not path.is_absolute():
        raise ConfigError(f"--broker-pidfile must be an absolute path, not {str(path)!r}")
    if not socket:
        raise ConfigError("broker mode needs the agent's Broker API socket: give "
                          "--broker-socket or set SPIFFE_BROKER_SOCKET")
    return BrokerSource(target=broker_target(socket), pid=pid, pidfile=path)


def _cli_policy(flag: str, rules: tuple[str, ...]) -> Policy:
    try:
        return from_rules(rules)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


@main.command("check-config")
@click.argument("config_path", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a config file: exit 0 and list its listeners, or exit 2 naming the line."""
    try:
        loaded = load_file(config_path)
        check_unique(loaded.listeners)
    except ConfigError as exc:
        _usage_error(str(exc))
    for listener in loaded.listeners:
        click.echo(f"{listener.name}: {listener.mode} {listener.listen} -> {listener.target} "
                   f"allow {listener.policy.describe()}")
