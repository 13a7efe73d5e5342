"""sigil-proxy's broker mode: its settings, the pidfile, the Broker API message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from click.testing import CliRunner

from api.protos import broker_pb2 as bpb
from identity.bundle import BundleSet
from identity.spiffeid import SpiffeId
from proxy import server as server_module
from proxy.broker import (
    BrokerSource,
    BrokerStopped,
    BrokerWatcher,
    pid_reference,
    process_start_time,
    read_pidfile,
)
from proxy.cli import _settings, main
from proxy.errors import ConfigError, WatcherStopped, WorkloadApiError
from proxy.server import Proxy, Settings
from proxy.workload import X509State, parse_response
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
    (2**31, None, "/run/b.sock", "at most 2147483647"),
    (3000000000, None, "/run/b.sock", "at most 2147483647"),
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


def test_a_pid_beyond_int32_is_a_one_line_usage_error() -> None:
    result = CliRunner().invoke(main, [
        "run", "--broker-pid", "3000000000", "--broker-socket", "unix:///run/b.sock",
        "--inbound", INBOUND[0], "--allow", ALLOW[0]], env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
    assert "--broker-pid" in result.output


def test_a_pid_beyond_int32_in_the_config_file_too(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('broker_socket = "unix:///run/b.sock"\nbroker_pid = 3000000000\n'
                      '[[inbound]]\nlisten = "127.0.0.1:0"\nforward = "127.0.0.1:8080"\n'
                      'allow_ids = ["spiffe://example.org/frontend"]\n')
    with pytest.raises(ConfigError, match="at most 2147483647"):
        _settings(config, None, None, (), (), (), (), None, None, None, None)


def test_broker_keys_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text('broker_socket = "unix:///run/b.sock"\nbroker_pid = 42\n'
                      '[[inbound]]\nlisten = "127.0.0.1:0"\nforward = "127.0.0.1:8080"\n'
                      'allow_ids = ["spiffe://example.org/frontend"]\n')
    settings, _ = _settings(config, None, None, (), (), (), (), None, None, None, None)
    assert settings.broker == BrokerSource(target="unix:/run/b.sock", pid=42)


@pytest.mark.parametrize(("content", "expected"), [
    (b"1234\n", 1234), (b"  77 ", 77), (b"2147483647", 2**31 - 1),
    (b"", None), (b"abc", None), (b"-3", None), (b"0", None), (b"1" * 80, None),
    (b"2147483648", None), (b"3000000000\n", None), ("\u0663".encode(), None),
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


def test_pid_reference_refuses_what_an_int32_cannot_hold() -> None:
    with pytest.raises(WorkloadApiError, match="not a PID"):
        pid_reference(3000000000)


# -- pinning the fronted process and its identity ---------------------------------


def _stat(proc: Path, pid: int, started: int, comm: str = "web app) (x") -> None:
    """A fake ``/proc/<pid>/stat`` whose field 22 is ``started``."""
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    fields = ["S", *("0" for _ in range(4, 22)), str(started), "1234", "56"]
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


def test_start_time_is_field_22_after_the_last_parenthesis(tmp_path: Path) -> None:
    _stat(tmp_path, 42, 987654)
    assert process_start_time(42, tmp_path) == 987654
    assert process_start_time(43, tmp_path) is None
    (tmp_path / "44").mkdir()
    (tmp_path / "44" / "stat").write_text("44 (short) S 1 2\n")
    with pytest.raises(WorkloadApiError, match="no start time"):
        process_start_time(44, tmp_path)


def test_start_time_of_this_process_from_the_real_proc() -> None:
    import os
    started = process_start_time(os.getpid())
    assert started is not None and started > 0


class _Watcher(BrokerWatcher):
    """A BrokerWatcher whose streams are recorded, not sent."""

    def __init__(self, proc: Path, pid: Any, *, fixed: bool = False,
                 want: SpiffeId | None = None, fail: grpc.StatusCode | None = None) -> None:
        self.delivered: list[X509State] = []
        self.lost: list[str] = []
        self.sent: list[int] = []
        self._fail = fail
        super().__init__("unix:/nonexistent/broker.sock", pid=pid, want=want,
                         on_update=self.delivered.append, on_lost=self.lost.append,
                         fixed=fixed, proc_root=proc, backoff_initial=0.01,
                         backoff_max=0.01)

    def _subscribe(self, channel: grpc.aio.Channel,
                   request: bpb.SubscribeToX509SVIDRequest) -> Any:
        self.sent.append(bpb.WorkloadPIDReference.FromString(
            request.reference.reference.value).pid)
        return _Call(self._fail)


class _Call:
    def __init__(self, fail: grpc.StatusCode | None) -> None:
        self._fail = fail

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        if self._fail is not None:
            raise grpc.aio.AioRpcError(self._fail, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="gone")
        await asyncio.sleep(3600)
        yield None  # pragma: no cover


def _state(ca: _CA, path: str) -> X509State:
    return X509State(ca.svid(path), BundleSet([ca.bundle()]))


def test_a_reused_pid_is_refused_and_a_restart_under_a_new_pid_is_accepted(
        tmp_path: Path) -> None:
    ca = _CA("example.org")
    proc = tmp_path / "proc"
    pidfile = tmp_path / "web.pid"
    pidfile.write_text("100\n")
    _stat(proc, 100, 5000)
    watcher = _Watcher(proc, lambda: read_pidfile(pidfile))
    watcher._open(None)  # type: ignore[arg-type]
    assert watcher.sent == [100]
    web = _state(ca, "/web")
    watcher._checked_update(web)
    assert watcher.delivered == [web]
    assert watcher.pinned == (100, 5000)
    assert watcher.pinned_id == web.svid.spiffe_id
    # The program exits; PID 100 now names another process (another start time).
    _stat(proc, 100, 9000)
    with pytest.raises(WorkloadApiError, match="another process"):
        watcher._open(None)  # type: ignore[arg-type]
    assert watcher.sent == [100]  # no request for the other process
    assert watcher.lost and "pid 100" in watcher.lost[-1]
    # The program restarts: the pidfile names its new PID, which is accepted...
    pidfile.write_text("200\n")
    _stat(proc, 200, 9500)
    watcher._open(None)  # type: ignore[arg-type]
    assert watcher.sent == [100, 200]
    again = _state(ca, "/web")
    watcher._checked_update(again)
    assert watcher.delivered == [web, again]
    assert watcher.pinned == (200, 9500)  # ...and pinned again


def test_the_process_is_checked_again_when_the_svid_arrives(tmp_path: Path) -> None:
    ca = _CA("example.org")
    proc = tmp_path / "proc"
    _stat(proc, 100, 5000)
    watcher = _Watcher(proc, lambda: 100)
    watcher._open(None)  # type: ignore[arg-type]
    _stat(proc, 100, 6000)  # exited and reused between the request and the answer
    watcher._checked_update(_state(ca, "/other"))
    assert watcher.delivered == [] and watcher.lost
    assert watcher.pinned is None and not watcher._keep_streaming()


def test_a_missing_process_sends_no_request(tmp_path: Path) -> None:
    watcher = _Watcher(tmp_path / "proc", lambda: 100)
    with pytest.raises(WorkloadApiError, match="no such process"):
        watcher._open(None)  # type: ignore[arg-type]
    assert watcher.sent == [] and watcher.lost


def test_the_first_spiffe_id_is_pinned(tmp_path: Path) -> None:
    ca = _CA("example.org")
    proc = tmp_path / "proc"
    _stat(proc, 100, 5000)
    watcher = _Watcher(proc, lambda: 100)
    watcher._open(None)  # type: ignore[arg-type]
    web = _state(ca, "/web")
    watcher._checked_update(web)
    watcher._checked_update(_state(ca, "/web"))  # a rotation: same ID
    other = _state(ca, "/other")
    watcher._checked_update(other)
    assert len(watcher.delivered) == 2 and other not in watcher.delivered
    assert watcher.lost and "not the pinned spiffe://example.org/web" in watcher.lost[-1]
    assert not watcher._keep_streaming()


def test_a_wanted_spiffe_id_is_the_pin(tmp_path: Path) -> None:
    ca = _CA("example.org")
    proc = tmp_path / "proc"
    _stat(proc, 100, 5000)
    want = SpiffeId.parse("spiffe://example.org/web")
    watcher = _Watcher(proc, lambda: 100, want=want)
    watcher._open(None)  # type: ignore[arg-type]
    watcher._checked_update(_state(ca, "/other"))
    assert watcher.delivered == [] and watcher.pinned_id == want


def test_a_fixed_pid_stops_on_not_found(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _stat(proc, 100, 5000)
    watcher = _Watcher(proc, lambda: 100, fixed=True, fail=grpc.StatusCode.NOT_FOUND)
    with pytest.raises(BrokerStopped, match="pid 100: the program exited"):
        asyncio.run(asyncio.wait_for(watcher.run(), 10))
    assert watcher.sent == [100] and watcher.lost


def test_a_pidfile_retries_after_not_found(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _stat(proc, 100, 5000)
    pidfile = tmp_path / "web.pid"
    pidfile.write_text("100\n")
    watcher = _Watcher(proc, lambda: read_pidfile(pidfile), fail=grpc.StatusCode.NOT_FOUND)

    async def a_while() -> None:
        task = asyncio.create_task(watcher.run())
        while len(watcher.sent) < 3:
            assert not task.done()
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(a_while(), 10))


def test_a_fixed_pid_naming_another_process_stops_without_a_request(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    _stat(proc, 100, 5000)
    watcher = _Watcher(proc, lambda: 100, fixed=True)
    watcher.pinned = (100, 4000)
    with pytest.raises(BrokerStopped, match="another process"):
        asyncio.run(asyncio.wait_for(watcher.run(), 10))
    assert watcher.sent == []


def _broker_proxy(pid: int) -> Proxy:
    return Proxy(Settings(socket_target="", spiffe_id=None, listeners=(),
                          broker=BrokerSource(target="unix:/nonexistent/b.sock", pid=pid)))


def test_the_proxy_exits_when_a_fixed_pids_program_is_gone() -> None:
    # Beyond int32 (only possible without the CLI): once a silent crash of the watcher.
    for pid in (3000000000, 2**31 - 1):
        with pytest.raises(WatcherStopped, match="broker api watcher stopped"):
            asyncio.run(asyncio.wait_for(_broker_proxy(pid).run(), 10))


def test_the_proxy_exits_when_its_watcher_dies_unexpectedly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def crash(self: BrokerWatcher) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(server_module.BrokerWatcher, "run", crash)
    with pytest.raises(WatcherStopped, match="unexpected RuntimeError: boom"):
        asyncio.run(asyncio.wait_for(_broker_proxy(1).run(), 10))


def test_the_cli_exits_1_when_the_fronted_program_is_gone() -> None:
    result = CliRunner().invoke(main, [
        "run", "--broker-pid", str(2**31 - 1), "--broker-socket", "unix:///nonexistent/b.sock",
        "--inbound", "127.0.0.1:0=127.0.0.1:8080", "--allow", ALLOW[0]],
        env={"SPIFFE_ENDPOINT_SOCKET": ""})
    assert result.exit_code == 1, result.output
