"""The issuance policy through the real ``sigil-server``: a refused ``entry create``
(exit code and message), ``entry check`` (text, JSON, exit codes), and the stored
violations a restarted server reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import RunningServer

TD = "it.sigil.test"
RACKS = f"""\
trust_domain = "{TD}"

[[policy.rule]]
name = "racks-batch"
parent_ids = ["/nodes/rack-*"]
allow_paths = ["/batch"]
"""
NO_WEB = RACKS + """
[[policy.rule]]
name = "no-web"
deny_paths = ["/web"]
"""


@pytest.fixture
def server(server_root: Path) -> Iterator[RunningServer]:
    conf = server_root / "server.toml"
    conf.write_text(RACKS)
    srv = RunningServer(trust_domain=TD, data_dir=server_root / "data",
                        socket_path=server_root / "admin" / "admin.sock",
                        extra_args=("--config", str(conf)))
    srv.start()
    try:
        yield srv
    finally:
        code = srv.stop()
        assert code == 0, srv.log
        assert "Traceback" not in srv.log, srv.log


def _create(srv: RunningServer, spiffe_path: str, parent_path: str) -> tuple[int, str, str]:
    done = srv.cli("entry", "create", "--spiffe-id", f"spiffe://{TD}{spiffe_path}",
                   "--parent-id", f"spiffe://{TD}{parent_path}", "--selector", "unix:uid:1000")
    return done.returncode, done.stdout, done.stderr


def test_refused_create_entry_check_and_the_report_at_start(
    server: RunningServer, server_root: Path,
) -> None:
    code, out, err = _create(server, "/web", "/nodes/rack-1")
    assert code == 2, (out, err)
    assert err.splitlines()[0] == (
        'Error: policy rule "racks-batch" (server.toml line 3): spiffe://it.sigil.test/web is '
        "not under /batch/ for parents matching /nodes/rack-* (INVALID_ARGUMENT)")
    assert out == ""
    count = server.cli("entry", "count", "--output", "json")
    assert json.loads(count.stdout) == {"count": 0}
    # /nodes/racks is not /nodes/rack-*: the rule does not apply.
    assert _create(server, "/batch/job-1", "/nodes/rack-1")[0] == 0
    assert _create(server, "/web", "/nodes/racks")[0] == 0
    assert server.stop() == 0, server.log

    data = ["--data-dir", str(server.data_dir)]
    ok = server.cli("entry", "check", "--config", str(server_root / "server.toml"), *data,
                    socket=False)
    assert (ok.returncode, ok.stdout) == (
        0, "No entry breaks the policy (1 rule, 2 entries checked).\n"), ok.stderr

    stricter = server_root / "stricter.toml"
    stricter.write_text(NO_WEB)
    found = server.cli("entry", "check", "--config", str(stricter), *data, socket=False)
    assert found.returncode == 1, found.stderr
    line, summary = found.stdout.splitlines()
    entry_id = line.split()[0]
    assert line == (f'{entry_id} spiffe://it.sigil.test/web: policy rule "no-web" '
                    "(stricter.toml line 8): spiffe://it.sigil.test/web is under the denied /web/")
    assert summary == "1 of 2 entries break the policy"
    as_json = server.cli("entry", "check", "--config", str(stricter), *data, "--output",
                         "json", socket=False)
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)
    assert doc == {"rules": 2, "entries": 2, "count": 1, "violations": [{
        "entry_id": entry_id, "spiffe_id": "spiffe://it.sigil.test/web",
        "parent_id": "spiffe://it.sigil.test/nodes/racks", "rule": "no-web",
        "message": line.split(": ", 1)[1]}]}

    # A config with a mistake: one Error line naming the line, exit 2.
    broken = server_root / "broken.toml"
    broken.write_text(NO_WEB.replace('deny_paths = ["/web"]', 'deny_paths = ["web"]'))
    bad = server.cli("entry", "check", "--config", str(broken), *data, socket=False)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [
        f"Error: config file {broken} line 10: policy.rule 'no-web': deny_paths: 'web' must "
        "start with / (a SPIFFE ID path)"]

    # Restarted with the stricter policy: the entry is reported, one line and a count.
    server.extra_args = ("--config", str(stricter))
    server.log_lines.clear()
    server.start()
    reported = [ln for ln in server.log.splitlines() if "entry violates policy" in ln]
    assert len(reported) == 1 and f"entry_id={entry_id}" in reported[0]
    assert "rule=no-web" in reported[0]
    assert any("policy checked" in ln and "violations=1" in ln for ln in server.log.splitlines())
