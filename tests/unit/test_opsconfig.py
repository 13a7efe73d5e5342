"""Operations settings: defaults, validation with the key named, flags as strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca.config.operations import ConnectionLimits
from ca.config.server import load_config
from ca.errors import ConfigError
from ca.ratelimit import RateLimit


def _load(tmp_path: Path, text: str = "") -> object:
    cfg = tmp_path / "server.toml"
    cfg.write_text('trust_domain = "example.org"\n' + text)
    return load_config(cfg).ops


def test_defaults(tmp_path: Path) -> None:
    ops = load_config(overrides={"trust_domain": "example.org"}).ops
    assert ops.worker_processes == 1
    assert ops.workers == 1
    assert ops.health_address == "127.0.0.1:8080"
    assert ops.attestation_limit == RateLimit(5, 20)
    assert ops.signing_limit == RateLimit(500, 1000)
    assert ops.agent_api_limits == ConnectionLimits(
        max_connections=4096, max_per_ip=256, handshake_timeout=10.0, preface_timeout=10.0,
        unauthenticated_timeout=60.0)


def test_agent_api_limits_from_file(tmp_path: Path) -> None:
    ops = _load(tmp_path, "agent_api_max_connections = 50\n"
                "agent_api_max_connections_per_ip = 0\n"
                'agent_api_handshake_timeout = "3s"\nagent_api_preface_timeout = "1m"\n'
                'agent_api_unauthenticated_timeout = "2m"\n')
    assert ops.agent_api_limits == ConnectionLimits(  # type: ignore[attr-defined]
        max_connections=50, max_per_ip=0, handshake_timeout=3.0, preface_timeout=60.0,
        unauthenticated_timeout=120.0)


def test_file_values(tmp_path: Path) -> None:
    ops = _load(tmp_path, 'worker_processes = 0\nhealth_address = ""\n'
                "rate_limit_signing_per_second = 2.5\nrate_limit_signing_burst = 7\n")
    assert ops.worker_processes == 0  # type: ignore[attr-defined]
    assert ops.workers >= 1  # type: ignore[attr-defined]
    assert ops.health_address == ""  # type: ignore[attr-defined]
    assert ops.signing_limit == RateLimit(2.5, 7)  # type: ignore[attr-defined]


def test_flags_arrive_as_strings() -> None:
    ops = load_config(overrides={"trust_domain": "example.org", "worker_processes": "3",
                                 "health_address": "127.0.0.1:0"}).ops
    assert ops.worker_processes == 3
    assert ops.health_address == "127.0.0.1:0"


@pytest.mark.parametrize(("text", "message"), [
    ("worker_processes = -1", "worker_processes must be 0..256, not -1"),
    ("worker_processes = 1.5", "worker_processes must be a whole number, not 1.5"),
    ("worker_processes = true", "worker_processes must be a whole number, not True"),
    ('worker_processes = "many"', "worker_processes must be a number, not 'many'"),
    ("health_address = 8080", "health_address must be a string, not 8080"),
    ('health_address = "localhost"', "health_address: "),
    ("rate_limit_attestation_per_second = -1",
     "rate_limit_attestation_per_second must be >= 0, not -1"),
    ("rate_limit_signing_burst = 0", "rate_limit_signing_burst must be >= 1, not 0"),
    ("agent_api_max_connections = 0", "agent_api_max_connections must be >= 1, not 0"),
    ("agent_api_max_connections_per_ip = -1",
     "agent_api_max_connections_per_ip must be >= 0, not -1"),
    ("agent_api_handshake_timeout = 10",
     'agent_api_handshake_timeout must be a duration string like "10s", not 10'),
    ('agent_api_preface_timeout = "500ms"', "agent_api_preface_timeout: duration '500ms'"),
    ('worker_processes = 2\nkey_manager = "memory"',
     'key_manager "memory" keeps the CA keys in one process; worker_processes (2 processes)'),
])
def test_bad_values(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text + "\n")
    assert str(err.value).startswith(message)
