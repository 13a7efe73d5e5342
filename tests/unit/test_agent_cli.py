"""sigil-agent's command line: bad input is one line ``Error: ...`` and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main


def invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--server-address", "a:1"], "trust_domain is required"),
        (["run", "--trust-domain", "example.org", "--server-address", "a:1",
          "--trust-bundle", "b.pem", "--insecure-bootstrap"], "mutually exclusive"),
        (["run", "--trust-domain", "BAD", "--server-address", "a:1"], "trust_domain"),
        (["api", "fetch", "jwt", "--socket-path", "/nonexistent.sock"], "--audience is required"),
        (["api", "fetch", "x509", "--socket-path", "tcp://127.0.0.1:1"], "tcp is not supported"),
        (["healthcheck", "--socket-path", "unix:opaque"], "must not be opaque"),
        (["api", "fetch", "x509", "--bogus"], "No such option"),
        (["run", "--config", "/nonexistent.toml", "--trust-domain", "x.org"],
         "cannot read config file"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]


def test_spiffe_endpoint_socket_env_is_used(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sock"
    result = invoke("healthcheck", env={"SPIFFE_ENDPOINT_SOCKET": f"unix://{missing}"})
    assert result.exit_code == 1
    assert str(missing) in result.stderr
    bad = invoke("healthcheck", env={"SPIFFE_ENDPOINT_SOCKET": "unix://host/x"})
    assert bad.exit_code == 2


def test_help_has_examples() -> None:
    for args in (["--help"], ["run", "--help"], ["api", "fetch", "x509", "--help"],
                 ["api", "fetch", "jwt", "--help"], ["healthcheck", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    assert "Examples:" in invoke("run", "--help").output


def test_healthcheck_help_lists_each_exit_code() -> None:
    from agent.health import EXIT_CODES

    text = invoke("healthcheck", "--help").output
    for state, code in EXIT_CODES.items():
        assert f"  {code}  {state.value}" in text
    for code, what in ((1, "the agent does not answer"), (2, "bad input")):
        assert f"  {code}  {what}" in text
