"""The certificate authority's settings: key manager, upstream authority, rotation.

Keys of the server's TOML file (documented in docs/configuration.md);
:mod:`ca.config.server` merges them with the others and stores the validated result as
``ServerConfig.ca``. Tables:

    key_manager = "disk"            # "disk" | "memory" | "pkcs11"
    [pkcs11]
    module_path = "/usr/lib/softhsm/libsofthsm2.so"
    token_label = "sigil"
    pin_env = "SIGIL_PKCS11_PIN"    # the PIN is read from this environment variable
    [upstream_authority]
    cert_file = "/etc/sigil/upstream.crt"
    key_file = "/etc/sigil/upstream.key"
    bundle_file = "/etc/sigil/upstream-roots.pem"   # optional
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ca.errors import ConfigError
from identity import configvalues
from identity.errors import InvalidValueError

KEY_MANAGERS = ("disk", "memory", "pkcs11")
DEFAULT_PIN_ENV = "SIGIL_PKCS11_PIN"

DEFAULTS: Mapping[str, object] = {
    "key_manager": "disk",
    "pkcs11": None,
    "upstream_authority": None,
    "ca_rotation_interval": "10s",
    "ca_safety_margin": "10m",
}


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """Where the PKCS#11 token is; the PIN comes from the environment, not the file."""

    module_path: str
    token_label: str
    pin_env: str = DEFAULT_PIN_ENV


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Files of the upstream CA that signs our intermediates."""

    cert_file: Path
    key_file: Path
    bundle_file: Path | None = None


@dataclass(frozen=True, slots=True)
class CaConfig:
    """Validated CA settings (defaults as in :data:`DEFAULTS`)."""

    key_manager: str = "disk"
    pkcs11: Pkcs11Config | None = None
    upstream: UpstreamConfig | None = None
    rotation_interval: dt.timedelta = dt.timedelta(seconds=10)
    safety_margin: dt.timedelta = dt.timedelta(minutes=10)


def _table(raw: Mapping[str, Any], key: str, fields: set[str],
           required: set[str]) -> dict[str, str] | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a table ([{key}]), not {value!r}")
    unknown = set(value) - fields
    if unknown:
        raise ConfigError(f"{key}: unknown key {sorted(unknown)[0]!r} "
                          f"(known: {', '.join(sorted(fields))})")
    missing = required - set(value)
    if missing:
        raise ConfigError(f"{key}: {sorted(missing)[0]} is required")
    for name, item in value.items():
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{key}.{name} must be a non-empty string, not {item!r}")
    return dict(value)


def _duration(raw: Mapping[str, Any], key: str) -> dt.timedelta:
    value = raw[key]
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a duration string like \"10s\", not {value!r}")
    try:
        return configvalues.parse_duration(value, allow_milliseconds=False)
    except InvalidValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def validate(raw: Mapping[str, Any]) -> CaConfig:
    """Check the CA keys of a merged configuration.

    Raises:
        ConfigError: naming the key and the rule its value broke.
    """
    manager = raw["key_manager"]
    if manager not in KEY_MANAGERS:
        raise ConfigError(f"key_manager {manager!r} is not one of: {', '.join(KEY_MANAGERS)}")
    p11 = _table(raw, "pkcs11", {"module_path", "token_label", "pin_env"},
                 {"module_path", "token_label"})
    if manager == "pkcs11" and p11 is None:
        raise ConfigError("key_manager \"pkcs11\" needs a [pkcs11] table with module_path "
                          "and token_label")
    up = _table(raw, "upstream_authority", {"cert_file", "key_file", "bundle_file"},
                {"cert_file", "key_file"})
    upstream = None
    if up is not None:
        upstream = UpstreamConfig(
            cert_file=Path(up["cert_file"]).expanduser().absolute(),
            key_file=Path(up["key_file"]).expanduser().absolute(),
            bundle_file=(Path(up["bundle_file"]).expanduser().absolute()
                         if "bundle_file" in up else None))
    return CaConfig(
        key_manager=str(manager),
        pkcs11=None if p11 is None else Pkcs11Config(
            module_path=p11["module_path"], token_label=p11["token_label"],
            pin_env=p11.get("pin_env", DEFAULT_PIN_ENV)),
        upstream=upstream,
        rotation_interval=_duration(raw, "ca_rotation_interval"),
        safety_margin=_duration(raw, "ca_safety_margin"),
    )


def pkcs11_pin(cfg: Pkcs11Config, env: Mapping[str, str] | None = None) -> str:
    """The token PIN from the environment variable the config names.

    Raises:
        ConfigError: the variable is not set.
    """
    value = (os.environ if env is None else env).get(cfg.pin_env)
    if not value:
        raise ConfigError(f"pkcs11: the PIN environment variable {cfg.pin_env} is not set")
    return value
