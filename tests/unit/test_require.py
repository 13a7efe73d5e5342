"""tests/support/require.py: a missing required part skips locally and fails in CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import require as req

REPO = Path(__file__).resolve().parents[2]


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """("failed" | "skipped" | "passed", message): a skip must not skip *this* test."""
    try:
        call()
    except pytest.fail.Exception as exc:
        return "failed", str(exc)
    except pytest.skip.Exception as exc:
        return "skipped", str(exc)
    return "passed", ""


@pytest.fixture
def ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")


@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)


@pytest.mark.parametrize(("value", "expected"), [
    (None, False), ("", False), ("false", False), ("0", False), ("no", False),
    ("true", True), ("TRUE", True), ("1", True), ("yes", True),
])
def test_in_ci_reads_the_ci_variable(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert req.in_ci() is expected


@pytest.mark.usefixtures("ci")
def test_missing_part_fails_in_ci() -> None:
    kind, message = outcome(lambda: req.require(False, "openssl is gone"))
    assert kind == "failed" and message.startswith("CI requires it: openssl is gone"), message


@pytest.mark.usefixtures("local")
def test_missing_part_skips_locally() -> None:
    kind, message = outcome(lambda: req.require(False, "openssl is gone"))
    assert kind == "skipped" and message.startswith("openssl is gone"), message
    assert "docs/development.md" in message


@pytest.mark.parametrize("env", ["ci", "local"])
def test_present_part_neither_skips_nor_fails(request: pytest.FixtureRequest, env: str) -> None:
    request.getfixturevalue(env)
    assert outcome(lambda: req.require(True, "never said")) == ("passed", "")
    assert req.require_module("json").__name__ == "json"
    assert req.require_program("sh").endswith("/sh")


@pytest.mark.usefixtures("ci")
def test_missing_module_and_program_fail_in_ci() -> None:
    kind, message = outcome(lambda: req.require_module("sigil_no_such_module", "no-such-dist"))
    assert kind == "failed" and "no-such-dist is not installed" in message, message
    kind, message = outcome(lambda: req.require_program("sigil-no-such-program"))
    assert kind == "failed" and "sigil-no-such-program is not installed" in message, message


@pytest.mark.usefixtures("local")
def test_missing_module_and_program_skip_locally() -> None:
    kind, message = outcome(lambda: req.require_module("sigil_no_such_module", "no-such-dist"))
    assert kind == "skipped" and "no-such-dist is not installed" in message, message
    kind, message = outcome(lambda: req.require_program("sigil-no-such-program"))
    assert kind == "skipped" and "sigil-no-such-program is not installed" in message, message


@pytest.mark.parametrize(("ci_value", "outcome"), [("true", "failed"), ("", "skipped")])
def test_module_level_requirement_fails_the_run_only_in_ci(
    tmp_path: Path, ci_value: str, outcome: str
) -> None:
    """As test modules use it (``spiffe = require_module("spiffe")``), in a real pytest run."""
    (tmp_path / "test_needs_it.py").write_text(
        "from tests.support.require import require_module\n"
        "require_module('sigil_no_such_module', 'no-such-dist')\n"
        "def test_it():\n    pass\n"
    )
    (tmp_path / "test_other.py").write_text("def test_other():\n    pass\n")
    env = {**os.environ, "CI": ci_value, "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "-p", "no:xdist", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    out = done.stdout + done.stderr
    assert "no-such-dist is not installed" in out, out
    if outcome == "failed":
        assert done.returncode != 0, out
        assert "CI requires it" in out and "1 error" in out, out
    else:
        assert done.returncode == 0, out
        assert "1 passed, 1 skipped" in out, out


# The skips that stay plain pytest.skip: optional by nature, never a missing part.
# docs/development.md, "Required and optional parts", explains each.
OPTIONAL_SKIPS = {
    "tests/integration/test_datastore.py": ["SQLite only", "SQLite only: the other"],
    "tests/integration/test_migrations.py": ["collations are a MariaDB/MySQL matter"],
    "tests/integration/test_workload_api_attestation.py": [
        "other processes kept taking the PID", "this kernel has no SO_PEERPIDFD",
        "this kernel has neither SO_PEERPIDFD nor pidfd_open"],
    "tests/unit/test_relay.py": ["abstract socket names are Linux only"],
}
_SKIP = re.compile(r"pytest\.skip\(|importorskip\(|mark\.skip(if)?\b|xfail\(|mark\.xfail\b")


def test_every_other_skip_goes_through_require() -> None:
    """A new skip of a required part that bypasses the helper would skip silently in CI."""
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in ("tests/support/require.py", "tests/unit/test_require.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _SKIP.search(line):
                found.setdefault(rel, []).append(f"{number}: {line.strip()}")
    unexpected = {
        rel: [line for line in lines
              if not any(reason in line for reason in OPTIONAL_SKIPS.get(rel, []))]
        for rel, lines in found.items()
    }
    unexpected = {rel: lines for rel, lines in unexpected.items() if lines}
    assert not unexpected, (
        "skip a missing required part with tests.support.require (fails in CI), or add a "
        f"genuinely optional skip to OPTIONAL_SKIPS and docs/development.md: {unexpected}")
    gone = {rel: reasons for rel, reasons in OPTIONAL_SKIPS.items()
            if any(not any(r in line for line in found.get(rel, [])) for r in reasons)}
    assert not gone, f"OPTIONAL_SKIPS names skips that no longer exist: {gone}"
