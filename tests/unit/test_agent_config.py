"""Agent configuration: defaults < TOML < SIGIL_AGENT_* env < flags; errors name the key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from agent.config import DEFAULT_SOCKET_PATH, load_config, parse_duration
from agent.errors import ConfigError

BASE = {"trust_domain": "example.org", "server_address": "srv:8081"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    c = load_config(overrides=BASE)
    assert str(c.trust_domain) == "example.org"
    assert c.socket_path == Path(DEFAULT_SOCKET_PATH)
    assert c.data_dir == Path(".sigil-agent")
    assert c.sync_interval == dt.timedelta(seconds=5)
    assert not c.insecure_bootstrap and c.trust_bundle_path is None
    assert not c.unix.discover_workload_path and not c.unix.workload_path_sha256


def test_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, 'trust_domain = "file.org"\nserver_address = "a:1"\n'
                           'sync_interval = "1m30s"\nlog_level = "debug"\n'
                           "[workload_attestors.unix]\nworkload_path_sha256 = true\n")
    c = load_config(path)
    assert str(c.trust_domain) == "file.org"
    assert c.sync_interval == dt.timedelta(seconds=90)
    assert c.unix.workload_path_sha256
    env = {"SIGIL_AGENT_TRUST_DOMAIN": "env.org", "SIGIL_AGENT_SERVER_ADDRESS": "b:2",
           "SIGIL_TRUST_DOMAIN": "ignored.org"}
    c = load_config(path, env=env)
    assert str(c.trust_domain) == "env.org" and c.server_address == "b:2"
    c = load_config(path, env=env, overrides={"trust_domain": "flag.org", "server_address": None})
    assert str(c.trust_domain) == "flag.org" and c.server_address == "b:2"


def test_socket_path_accepts_uri() -> None:
    c = load_config(overrides={**BASE, "socket_path": "unix:///run/x/api.sock"})
    assert c.socket_path == Path("/run/x/api.sock")


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('bogus = 1\n', "unknown key 'bogus'"),
        ("[workload_attestors.docker]\n", "unknown key 'workload_attestors.docker'"),
        ("[workload_attestors.unix]\nfoo = true\n", "unknown key 'workload_attestors.unix.foo'"),
        ('sync_interval = 1.5\n', "sync_interval: duration must be a string"),
        ('sync_interval = "5 seconds"\n', "sync_interval: duration '5 seconds' is invalid"),
        ('sync_interval = "0s"\n', "must be greater than zero"),
        ('insecure_bootstrap = "yes"\n', "insecure_bootstrap must be true or false"),
        ('trust_bundle_path = "b.pem"\ninsecure_bootstrap = true\n', "mutually exclusive"),
        ('log_level = "loud"\n', "log_level 'loud'"),
        ('socket_path = "tcp://127.0.0.1:1"\n', "socket_path: .*tcp is not supported"),
        ("= broken", "is not valid TOML"),
    ],
)
def test_file_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, 'trust_domain = "example.org"\nserver_address = "a:1"\n' + toml
                 if not toml.startswith("=") else toml)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    if "unknown key" in message:
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"server_address": "a:1"}, "trust_domain is required .*--trust-domain"),
        ({"trust_domain": "example.org"}, "server_address is required"),
        ({**BASE, "trust_domain": "Bad.Org"}, "trust_domain: .*lowercase"),
        ({**BASE, "server_address": "noport"}, "HOST:PORT"),
        ({**BASE, "server_address": "h:99999"}, "outside 1..65535"),
    ],
)
def test_value_errors(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "seconds"), [("5s", 5), ("1m", 60), ("1h30m", 5400), ("500ms", 0.5), ("2d", 172800)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


def test_connection_limits() -> None:
    c = load_config(overrides=BASE)
    assert (c.max_connections_per_uid, c.connection_preface_timeout,
            c.connection_idle_timeout) == (256, dt.timedelta(seconds=10), dt.timedelta(minutes=5))
    c = load_config(overrides={**BASE, "max_connections_per_uid": "8",
                               "connection_preface_timeout": "500ms",
                               "connection_idle_timeout": "1h"})
    assert (c.max_connections_per_uid, c.connection_preface_timeout,
            c.connection_idle_timeout) == (8, dt.timedelta(milliseconds=500), dt.timedelta(hours=1))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("max_connections_per_uid", 0, "max_connections_per_uid must be an integer from 1 to "
                                   "1000000, not 0"),
    ("max_connections_per_uid", True, "max_connections_per_uid must be an integer"),
    ("connection_preface_timeout", "soon", "connection_preface_timeout: duration 'soon'"),
    ("connection_idle_timeout", "0s", "connection_idle_timeout: "),
])
def test_connection_limit_errors(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={**BASE, key: value})
    assert str(info.value).startswith(message)
