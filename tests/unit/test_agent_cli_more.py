"""Bad input for the agent's newer commands and config keys: one-line errors, exit 2."""

from __future__ import annotations

import datetime as dt

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import load_config
from agent.errors import ConfigError

BASE = {"trust_domain": "example.org", "server_address": "s:1"}


@pytest.mark.parametrize(("args", "message"), [
    (["api", "validate", "jwt", "--svid", "x.y.z"], "--audience is required"),
    (["api", "validate", "jwt", "--audience", "db"], "--svid is required"),
    (["api", "validate", "jwt", "--audience", "db", "--svid", "  "], "--svid is required"),
    (["api", "validate", "jwt", "--audience", "db", "--svid", "t", "--socket-path",
      "tcp://1.2.3.4:5"], "tcp is not supported"),
    (["api", "watch", "--count", "0"], "0 is not in the range"),
    (["api", "watch", "--socket-path", "unix:opaque"], "must not be opaque"),
    (["api", "watch", "--output", "yaml"], "'yaml' is not one of"),
    (["api", "fetch", "jwt-bundles", "--timeout", "0"], "0.0 is not in the range"),
    (["api", "fetch", "jwt-bundles", "--socket-path", "unix://host/x"], "authority"),
    (["healthcheck", "--output", "xml"], "'xml' is not one of"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, args, env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]


def test_unreachable_agent_is_exit_1() -> None:
    result = CliRunner().invoke(main, ["api", "watch", "--socket-path", "/nonexistent/a.sock",
                                       "--count", "1"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: agent is not running: /nonexistent/a.sock does not "
                                    "exist (from --socket-path; set SPIFFE_ENDPOINT_SOCKET or "
                                    "pass --socket-path to use another)")


def test_help_of_new_commands_has_examples() -> None:
    for args in (["helper"], ["api", "watch"], ["api", "validate", "jwt"],
                 ["api", "fetch", "jwt-bundles"], ["healthcheck"]):
        result = CliRunner().invoke(main, [*args, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output, args


def test_new_config_keys_defaults_and_values() -> None:
    config = load_config(overrides=BASE)
    assert config.svid_cache_size == 1000
    assert config.sync_backoff_max == dt.timedelta(minutes=3)
    config = load_config(overrides={**BASE, "svid_cache_size": "50",
                                    "sync_backoff_max": "30s"})
    assert config.svid_cache_size == 50
    assert config.sync_backoff_max == dt.timedelta(seconds=30)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("svid_cache_size", 0, "svid_cache_size must be a whole number of at least 1"),
    ("svid_cache_size", -5, "svid_cache_size must be a whole number"),
    ("svid_cache_size", "many", "svid_cache_size must be a whole number"),
    ("svid_cache_size", True, "svid_cache_size must be a whole number"),
    ("sync_backoff_max", "soon", "sync_backoff_max:"),
    ("sync_backoff_max", "1s", "must not be shorter than sync_interval"),
])
def test_bad_new_config_values(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={**BASE, key: value})


def test_config_file_may_carry_a_helper_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "agent.toml"
    path.write_text('trust_domain = "example.org"\nserver_address = "s:1"\n'
                    'svid_cache_size = 10\n[helper]\ndir = "/x"\n')
    assert load_config(path).svid_cache_size == 10
