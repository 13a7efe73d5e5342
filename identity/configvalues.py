"""What the server's and the agent's configurations share: layering, durations, ``HOST:PORT``.

Pure functions (reading the file stays with each configuration); they raise
:class:`~identity.errors.InvalidValueError` naming the bad value and the rule it
broke. Each configuration module wraps them to raise its own ``ConfigError``,
with the key name in front where there is one.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Collection, Mapping
from typing import Any

from identity.errors import InvalidValueError

_DURATION_RE = re.compile(r"(\d+)(ms|[dhms])")
_SECONDS_RE = re.compile(r"[0-9]+")
_UNIT_MILLISECONDS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
MAX_PORT = 65535


def parse_duration(text: object, *, allow_milliseconds: bool = True) -> dt.timedelta:
    """Parse ``"500ms"``, ``"90s"``, ``"5m"``, ``"1h"``, ``"2d"`` or combinations (``"1h30m"``).

    A number without a unit (``600``, or ``"600"``) is seconds, so every duration,
    flag or configuration key, takes the same forms.

    Args:
        text: the value as written in the configuration or on the command line.
        allow_milliseconds: accept the unit ``ms``; without it only s, m, h and d.

    Raises:
        InvalidValueError: not a string or whole number, not in that form, or not
            greater than zero.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise InvalidValueError(
            f"duration must be a string like \"1h\" or \"90s\", or seconds, not {text!r}"
        )
    shown = text
    if _SECONDS_RE.fullmatch(text):
        text += "s"
    pos = 0
    total_ms = 0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos or (match.group(2) == "ms" and not allow_milliseconds):
            break
        total_ms += int(match.group(1)) * _UNIT_MILLISECONDS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        units = "ms, s, m, h or d" if allow_milliseconds else "s, m, h or d"
        raise InvalidValueError(
            f"duration {shown!r} is invalid: use seconds or a number and a unit {units} "
            "(for example \"600\", \"90s\", \"5m\", \"1h30m\")"
        )
    if total_ms <= 0:
        raise InvalidValueError(f"duration {shown!r} must be greater than zero")
    return dt.timedelta(milliseconds=total_ms)


def parse_host_port(text: str, *, allow_port_zero: bool) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6; the brackets stay on the host).

    Args:
        text: the address.
        allow_port_zero: accept port 0 ("any free port", for a listening address).

    Raises:
        InvalidValueError: no host, no port, or a port outside the allowed range.
    """
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise InvalidValueError(
            f"address {text!r} must have the form HOST:PORT (for example "
            "127.0.0.1:8081 or [::1]:8081)"
        )
    port = int(port_s)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= MAX_PORT:
        raise InvalidValueError(
            f"address {text!r}: port {port} is outside {lowest}..{MAX_PORT}"
        )
    return host, port


def layer_settings(
    defaults: Mapping[str, Any],
    document: Mapping[str, Any],
    *,
    env: Mapping[str, str] | None,
    env_vars: Mapping[str, str],
    overrides: Mapping[str, Any] | None,
    known_keys: Collection[str],
) -> dict[str, Any]:
    """Merge the layers of a configuration, lowest first.

    defaults < ``document`` (the config file) < the environment < ``overrides``
    (command-line flags).

    Args:
        defaults: the built-in values by key.
        document: the config file's values by key (already checked for unknown keys).
        env: the environment; only the variables of ``env_vars`` are read, and an
            empty value counts as unset. None reads nothing.
        env_vars: environment variable -> config key.
        overrides: flag values by key; None values are "not given".
        known_keys: the keys an override may name.

    Raises:
        InvalidValueError: an override names an unknown setting.
    """
    raw: dict[str, Any] = {**defaults, **document}
    for var, key in env_vars.items():
        if env is not None and env.get(var):
            raw[key] = env[var]
    for key, value in (overrides or {}).items():
        if key not in known_keys:
            raise InvalidValueError(f"unknown setting {key!r}")
        if value is not None:
            raw[key] = value
    return raw
