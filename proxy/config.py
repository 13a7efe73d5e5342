"""The proxy's settings: listeners from flags and from a TOML file, validated at load.

File format (docs/proxy.md has the whole story)::

    socket_path = "unix:///run/sigil-agent/public/api.sock"
    spiffe_id = "spiffe://example.org/web"      # which of the SVIDs to use
    metrics_address = "127.0.0.1:9464"
    # Or, as a broker, present the fronted program's SVID (Broker API):
    # broker_socket = "unix:///run/sigil-agent/broker/broker.sock"
    # broker_pidfile = "/run/web.pid"             # or broker_pid = 1234

    [[inbound]]
    name = "web"
    listen = "0.0.0.0:8443"
    forward = "127.0.0.1:8080"
    allow_ids = ["spiffe://example.org/frontend"]
    allow_trust_domains = ["partner.example"]
    allow_path_prefixes = ["spiffe://example.org/ns/prod"]

    [[outbound]]
    name = "db"
    listen = "127.0.0.1:5433"
    connect = "db.example.org:8443"
    allow_ids = ["spiffe://example.org/db"]

Every error names the file and, where the value can be found, its line.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from identity.configvalues import parse_duration, parse_host_port
from identity.errors import InvalidValueError
from proxy.errors import ConfigError, PolicyError
from proxy.policy import Policy, parse_id, parse_prefix, parse_trust_domain

Mode = Literal["inbound", "outbound"]

# A policy file is a few kilobytes; refuse anything absurd before parsing it.
MAX_FILE_BYTES = 1024 * 1024

_TOP_KEYS = {
    "socket_path", "spiffe_id", "metrics_address", "handshake_timeout", "connect_timeout",
    "max_connections", "log_level", "log_format", "inbound", "outbound",
    "broker_socket", "broker_pid", "broker_pidfile",
}
_LISTENER_KEYS = {"name", "listen", "allow_ids", "allow_trust_domains", "allow_path_prefixes"}
_TARGET_KEY: dict[Mode, str] = {"inbound": "forward", "outbound": "connect"}


@dataclass(frozen=True)
class Address:
    """A ``HOST:PORT`` (the brackets of an IPv6 host removed)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, listening: bool) -> Address:
        """Parse ``HOST:PORT``; a listening address may use port 0.

        Raises:
            ConfigError: naming the value.
        """
        try:
            host, port = parse_host_port(text, allow_port_zero=listening)
        except InvalidValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(host.removeprefix("[").removesuffix("]"), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Listener:
    """One listener.

    Attributes:
        name: shown in logs and metrics (``listener=...``).
        mode: ``inbound`` (TLS in, plain out) or ``outbound`` (plain in, TLS out).
        listen: where it accepts connections.
        target: where it forwards them.
        policy: the peers allowed (inbound: clients; outbound: servers).
        from_file: True when it came from the config file (its policy reloads).
    """

    name: str
    mode: Mode
    listen: Address
    target: Address
    policy: Policy
    from_file: bool = False


def parse_pair(text: str, mode: Mode) -> tuple[Address, Address]:
    """``LISTEN=TARGET`` from ``--inbound``/``--outbound``.

    Raises:
        ConfigError: naming the flag and the value.
    """
    listen, sep, target = text.partition("=")
    if not sep:
        raise ConfigError(
            f"--{mode} {text!r}: expected LISTEN=TARGET, for example "
            + ("0.0.0.0:8443=127.0.0.1:8080" if mode == "inbound"
               else "127.0.0.1:9000=backend.example.org:8443")
        )
    try:
        return Address.parse(listen, listening=True), Address.parse(target, listening=False)
    except ConfigError as exc:
        raise ConfigError(f"--{mode} {text!r}: {exc}") from None


@dataclass(frozen=True)
class FileConfig:
    """What a config file holds: top-level settings and its listeners."""

    settings: Mapping[str, Any]
    listeners: tuple[Listener, ...]


def _line_of(text: str, needle: str, *, after: int = 0) -> int | None:
    """The 1-based number of the first line from ``after`` holding ``needle`` quoted."""
    for number, line in enumerate(text.splitlines(), start=1):
        if number > after and (f'"{needle}"' in line or f"'{needle}'" in line):
            return number
    return None


def _table_lines(text: str, mode: Mode) -> list[int]:
    pattern = re.compile(rf"^\s*\[\[\s*{mode}\s*\]\]")
    return [n for n, line in enumerate(text.splitlines(), start=1) if pattern.match(line)]


def _where(path: Path, line: int | None) -> str:
    return f"{path} line {line}" if line else str(path)


def load_file(path: Path) -> FileConfig:
    """Read and validate a config file.

    Raises:
        ConfigError: unreadable, not TOML, an unknown key, a bad value; the message
            is one line naming the file and, when known, the line.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a config file")
    try:
        text = raw.decode("utf-8")
        doc = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        line = int(found.group(1)) if found else None
        raise ConfigError(f"{_where(path, line)}: not valid TOML: {message}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        line = next((n for n, s in enumerate(text.splitlines(), 1)
                     if s.strip().startswith(unknown[0])), None)
        raise ConfigError(f"{_where(path, line)}: unknown key {unknown[0]!r}")
    listeners: list[Listener] = []
    for mode in ("inbound", "outbound"):
        tables = doc.get(mode, [])
        if not isinstance(tables, list):
            raise ConfigError(f"{path}: {mode} must be an array of tables ([[{mode}]])")
        starts = _table_lines(text, mode)
        for index, table in enumerate(tables):
            start = starts[index] if index < len(starts) else 0
            listeners.append(_listener(path, text, mode, table, start))
    names = [listener.name for listener in listeners]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{path}: two listeners named {name!r}")
    settings = {k: v for k, v in doc.items() if k not in ("inbound", "outbound")}
    return FileConfig(settings, tuple(listeners))


def _listener(path: Path, text: str, mode: Mode, table: object, start: int) -> Listener:
    where = _where(path, start or None)
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [[{mode}]] must be a table")
    target_key = _TARGET_KEY[mode]
    unknown = sorted(set(table) - _LISTENER_KEYS - {target_key})
    if unknown:
        line = next((n for n, s in enumerate(text.splitlines(), 1)
                     if n > start and s.strip().startswith(unknown[0])), None)
        raise ConfigError(f"{_where(path, line)}: unknown key {unknown[0]!r} in [[{mode}]]")
    addresses: list[Address] = []
    for key, listening in (("listen", True), (target_key, False)):
        value = table.get(key)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: [[{mode}]] needs {key} = \"HOST:PORT\"")
        try:
            addresses.append(Address.parse(value, listening=listening))
        except ConfigError as exc:
            raise ConfigError(f"{_where(path, _line_of(text, value, after=start))}: "
                              f"{key}: {exc}") from None
    name = table.get("name", f"{mode}:{addresses[0]}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string")
    policy = policy_from_table(path, text, table, start)
    return Listener(name, mode, addresses[0], addresses[1], policy, from_file=True)


def policy_from_table(path: Path, text: str, table: Mapping[str, Any], start: int) -> Policy:
    """The allow lists of one listener table; errors name the line of the bad value.

    Raises:
        PolicyError: a list that is not a list of strings, or a bad entry.
    """
    parsed: dict[str, list[Any]] = {}
    for key, parse in (("allow_ids", parse_id), ("allow_trust_domains", parse_trust_domain),
                       ("allow_path_prefixes", parse_prefix)):
        values = table.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise PolicyError(f"{_where(path, start or None)}: {key} must be a list of strings")
        items: list[Any] = []
        for value in values:
            try:
                items.append(parse(value))
            except PolicyError as exc:
                line = _line_of(text, value, after=start)
                raise PolicyError(f"{_where(path, line)}: {key}: {exc}") from None
        parsed[key] = items
    return Policy(frozenset(parsed["allow_ids"]), frozenset(parsed["allow_trust_domains"]),
                  frozenset(parsed["allow_path_prefixes"]))


def setting(settings: Mapping[str, Any], key: str, kind: type, path: Path | None) -> Any:
    """A top-level setting of the expected type, or None.

    Raises:
        ConfigError: a value of another type.
    """
    value = settings.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ConfigError(f"{path}: {key} must be a {kind.__name__}")
    return value


def duration_seconds(value: str, what: str) -> float:
    """A positive duration (``"10s"``, ``"500ms"``) in seconds.

    Raises:
        ConfigError: naming ``what``.
    """
    try:
        seconds = parse_duration(value).total_seconds()
    except InvalidValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if seconds <= 0:
        raise ConfigError(f"{what}: must be longer than 0")
    return seconds


def check_unique(listeners: Sequence[Listener]) -> None:
    """Refuse two listeners on one address or with one name.

    Raises:
        ConfigError: naming the duplicate.
    """
    seen: dict[Address, str] = {}
    names: set[str] = set()
    for listener in listeners:
        if listener.name in names:
            raise ConfigError(f"two listeners named {listener.name!r}")
        names.add(listener.name)
        if listener.listen.port and listener.listen in seen:
            raise ConfigError(
                f"listeners {seen[listener.listen]!r} and {listener.name!r} both listen on "
                f"{listener.listen}"
            )
        seen[listener.listen] = listener.name
