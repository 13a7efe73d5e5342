"""sigil-proxy's broker mode: its settings, the pidfile, the Broker API message."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from api.protos import broker_pb2 as bpb
from proxy.broker import BrokerSource, pid_reference, read_pidfile
from proxy.cli import _settings, main
from proxy.errors import ConfigError, WorkloadApiError
from proxy.workload import parse_response
from tests.unit.test_proxy_workload import _CA

INBOUND = ("127.0.0.1:0=127.0.0.1:8080",)
ALLOW = ("spiffe://example.org/frontend",)


def _broker(pid: int | None, pidfile: Path | None, socket: str | None) -> BrokerSource | None:
    settings, _ = _settings(None, None, None, INBOUND, ALLOW, (), (), None, None, None, None,
                            (pid, pidfile, socket))
    return settings.broker


def test_broker_mode_needs_no_workload_api_socket(tmp_path: Path) -> None:
    assert _broker(1234, None, "unix:///run/b.sock") == BrokerSource(
        target="unix:/run/b.sock", pid=1234)
    assert _broker(None, tmp_path / "web.pid", "/run/b.sock") == BrokerSource(
        target="unix:/run/b.sock", pidfile=tmp_path / "web.pid")


def test_off_without_a_pid() -> None:
    with pytest.raises(ConfigError, match="no Workload API socket"):
        _broker(None, None, "unix:///run/b.sock")


@pytest.mark.parametrize(("pid", "pidfile", "socket", "message"), [
    (12, Path("/run/web.pid"), "/run/b.sock", "not both"),
    (0, None, "/run/b.sock", "positive PID"),
    (None, Path("web.pid"), "/run/b.sock", "absolute path"),
    (12, None, None, "--broker-socket or set SPIFFE_BROKER_SOCKET"),
    (12, None, "tcp://127.0.0.1:8200", "Unix socket only"),
    (12, None, "http://x/b.sock", "expected unix:///"),
    (12, None, "b.sock", "absolute path"),
])
def test_bad_broker_settings_are_refused(pid: int | None, pidfile: Path | None,
                                         socket: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _broker(pid, pidfile, socket)


def test_the_cli_says_it_in_one_line() -> None:
    result = CliRunner().invoke(main, [
        "run", "--broker-pid", "7", "--broker-socket", "tcp://127.0.0.1:1",
        "--inbound", INBOUND[0], "--allow", ALLOW[0]], env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")


def test_broker_keys_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('broker_socket = "unix:///run/b.sock"\nbroker_pid = 42\n'
                      '[[inbound]]\nlisten = "127.0.0.1:0"\nforward = "127.0.0.1:8080"\n'
                      'allow_ids = ["spiffe://example.org/frontend"]\n')
    settings, _ = _settings(config, None, None, (), (), (), (), None, None, None, None)
    assert settings.broker == BrokerSource(target="unix:/run/b.sock", pid=42)


@pytest.mark.parametrize(("content", "expected"), [
    (b"1234\n", 1234), (b"  77 ", 77),
    (b"", None), (b"abc", None), (b"-3", None), (b"0", None), (b"1" * 80, None),
])
def test_pidfile(tmp_path: Path, content: bytes, expected: int | None) -> None:
    path = tmp_path / "web.pid"
    path.write_bytes(content)
    if expected is None:
        with pytest.raises(WorkloadApiError, match="pidfile"):
            read_pidfile(path)
    else:
        assert read_pidfile(path) == expected


def test_missing_pidfile(tmp_path: Path) -> None:
    with pytest.raises(WorkloadApiError, match="pidfile"):
        read_pidfile(tmp_path / "gone.pid")


def test_pid_reference_is_the_standards_any() -> None:
    ref = pid_reference(99)
    assert ref.reference.type_url == "type.googleapis.com/spiffe.broker.WorkloadPIDReference"
    assert bpb.WorkloadPIDReference.FromString(ref.reference.value).pid == 99


def test_a_broker_response_becomes_the_proxy_state() -> None:
    ca = _CA("example.org")
    web = ca.svid("/web")
    message = bpb.SubscribeToX509SVIDResponse(svids=[bpb.X509SVID(
        spiffe_id=str(web.spiffe_id), x509_svid=web.chain_der(),
        x509_svid_key=web.key_der(), bundle=ca.bundle().x509_der())])
    state = parse_response(message, None)
    assert state.svid.spiffe_id == web.spiffe_id
    assert [b.trust_domain for b in state.bundles] == [ca.td]
