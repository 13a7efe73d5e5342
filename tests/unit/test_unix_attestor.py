"""The unix workload attestor, on a fixture /proc tree and on this very process."""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
from pathlib import Path

import pytest

from attestation.workload import (
    ProcessGoneError,
    ProcessInfo,
    WorkloadAttestationError,
    process_start_time,
    unix,
)
from attestation.workload.unix import (
    FILES_CHECK_INTERVAL,
    NAME_TTL,
    UnixAttestor,
    UnixAttestorConfig,
    _NameCache,
)
from identity.selectors import Selector

PID = 4321
# uid/gid values no system maps to a name, so pwd/grp lookups are deterministic.
UID, GID, SUPP = 4000001, 4000002, 4000003


def _stat_line(pid: int, comm: str, start: int) -> str:
    # Fields 3..52 after "(comm)"; field 22 (starttime) is index 19 of those.
    rest = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(rest) + "\n"


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    d = root / str(PID)
    d.mkdir(parents=True)
    (d / "stat").write_text(_stat_line(PID, "my (odd) prog", 987654))
    (d / "status").write_text(
        f"Name:\tprog\nUid:\t{UID}\t{UID}\t{UID}\t{UID}\nGroups:\t{GID} {SUPP} 0\n"
    )
    binary = tmp_path / "bin-prog"
    binary.write_bytes(b"\x7fELF fake binary")
    (d / "exe").symlink_to(binary)
    return root


def values(selectors: list[Selector]) -> list[str]:
    assert all(s.type == "unix" for s in selectors)
    return [s.value for s in selectors]


def test_default_selectors(proc: Path) -> None:
    got = values(UnixAttestor(proc_root=proc).attest(ProcessInfo(PID, UID, GID)))
    root_group = grp.getgrgid(0).gr_name
    assert got == [
        f"uid:{UID}", f"gid:{GID}",
        f"supplementary_gid:{GID}", f"supplementary_gid:{SUPP}",
        "supplementary_gid:0", f"supplementary_group:{root_group}",
    ]


def test_user_and_group_names_when_resolvable(proc: Path) -> None:
    got = values(UnixAttestor(proc_root=proc).attest(ProcessInfo(PID, 0, 0)))
    assert f"user:{pwd.getpwuid(0).pw_name}" in got
    assert f"group:{grp.getgrgid(0).gr_name}" in got


def test_path_and_sha256_only_when_configured(proc: Path, tmp_path: Path) -> None:
    config = UnixAttestorConfig(discover_workload_path=True, workload_path_sha256=True)
    got = values(UnixAttestor(config, proc_root=proc).attest(ProcessInfo(PID, UID, GID)))
    digest = hashlib.sha256(b"\x7fELF fake binary").hexdigest()
    assert f"path:{tmp_path / 'bin-prog'}" in got
    assert f"sha256:{digest}" in got
    plain = values(UnixAttestor(proc_root=proc).attest(ProcessInfo(PID, UID, GID)))
    assert not any(v.startswith(("path:", "sha256:")) for v in plain)


def test_process_gone(proc: Path) -> None:
    with pytest.raises(ProcessGoneError):
        UnixAttestor(proc_root=proc).attest(ProcessInfo(999, UID, GID))
    with pytest.raises(ProcessGoneError):
        process_start_time(999, proc_root=proc)


def test_unreadable_exe_is_an_error(proc: Path) -> None:
    (proc / str(PID) / "exe").unlink()
    config = UnixAttestorConfig(discover_workload_path=True)
    with pytest.raises(WorkloadAttestationError):
        UnixAttestor(config, proc_root=proc).attest(ProcessInfo(PID, UID, GID))


def test_malformed_groups_line(proc: Path) -> None:
    (proc / str(PID) / "status").write_text("Groups:\tabc\n")
    with pytest.raises(WorkloadAttestationError, match="Groups"):
        UnixAttestor(proc_root=proc).attest(ProcessInfo(PID, UID, GID))


def test_start_time_survives_parentheses_in_comm(proc: Path) -> None:
    assert process_start_time(PID, proc_root=proc) == 987654


@pytest.mark.parametrize("text", ["", "4321 (x) S 1 2", "garbage"])
def test_malformed_stat(proc: Path, text: str) -> None:
    (proc / str(PID) / "stat").write_text(text)
    with pytest.raises(WorkloadAttestationError):
        process_start_time(PID, proc_root=proc)


def test_this_process() -> None:
    config = UnixAttestorConfig(discover_workload_path=True, workload_path_sha256=True)
    got = values(UnixAttestor(config).attest(ProcessInfo(os.getpid(), os.getuid(), os.getgid())))
    assert f"uid:{os.getuid()}" in got and f"gid:{os.getgid()}" in got
    exe = os.readlink(f"/proc/{os.getpid()}/exe")
    assert f"path:{exe}" in got
    with open(exe, "rb") as f:
        assert f"sha256:{hashlib.sha256(f.read()).hexdigest()}" in got
    assert process_start_time(os.getpid()) > 0


def test_names_are_kept_briefly_and_dropped_when_the_files_change(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:x:1000:1000::/:/bin/sh\n")
    names = {1000: "alice"}
    calls: list[int] = []
    now = [100.0]

    def lookup(uid: int) -> str:
        calls.append(uid)
        return names[uid]  # KeyError: no such user

    cache = _NameCache(lookup, (str(passwd),), clock=lambda: now[0])
    assert cache.name(1000) == "alice"
    assert cache.name(1000) == "alice" and calls == [1000]  # kept
    assert cache.name(1001) is None and cache.name(1001) is None
    assert calls == [1000, 1001]  # "no such user" is kept too
    # A local rename shows once the file is looked at again (within a second).
    names[1000] = "alicia"
    passwd.write_text("alicia:x:1000:1000::/:/bin/sh\n")
    now[0] += FILES_CHECK_INTERVAL
    assert cache.name(1000) == "alicia"
    # One from elsewhere (a directory service) shows once the TTL has passed.
    names[1000] = "ally"
    assert cache.name(1000) == "alicia"
    now[0] += NAME_TTL
    assert cache.name(1000) == "ally"


def test_status_groups_line_at_the_end_without_newline(proc: Path) -> None:
    (proc / str(PID) / "status").write_text("Name:\tx\nGroups:\t4 24")
    got = values(UnixAttestor(proc_root=proc).attest(ProcessInfo(PID, UID, GID)))
    assert "supplementary_gid:4" in got and "supplementary_gid:24" in got


def test_answers_without_waiting_only_from_kept_names_and_never_when_hashing(
    proc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def lookup(number: int) -> str:
        calls.append(number)
        raise KeyError(number)  # no such user or group

    monkeypatch.setattr(unix, "_users", _NameCache(lookup, ()))
    monkeypatch.setattr(unix, "_groups", _NameCache(lookup, ()))
    process = ProcessInfo(PID, UID, GID)
    attestor = UnixAttestor(proc_root=proc)
    # Names not kept yet: no answer, and no lookup (that is what may wait).
    assert attestor.attest_without_waiting(process) is None
    assert calls == []
    full = attestor.attest(process)  # in a thread, in the agent: looks up and keeps
    assert calls
    looked_up = len(calls)
    assert attestor.attest_without_waiting(process) == full
    assert len(calls) == looked_up  # answered from what is kept
    hashing = UnixAttestor(UnixAttestorConfig(workload_path_sha256=True), proc_root=proc)
    assert hashing.attest_without_waiting(process) is None


def test_a_status_file_longer_than_one_read_is_read_whole(proc: Path) -> None:
    groups = [5_000_000 + i for i in range(12_000)]  # about 96 KiB of Groups line
    (proc / str(PID) / "status").write_text(
        "Name:\tx\nGroups:\t" + " ".join(map(str, groups)) + "\nVmRSS:\t1 kB\n")
    got = values(UnixAttestor(proc_root=proc).attest(ProcessInfo(PID, UID, GID)))
    assert [v for v in got if v.startswith("supplementary_gid:")] == [
        f"supplementary_gid:{g}" for g in groups]


def test_an_oversized_status_file_is_refused(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unix, "_STATUS_LIMIT", 1024)
    (proc / str(PID) / "status").write_text("Groups:\t" + "1 " * 2000 + "\n")
    with pytest.raises(WorkloadAttestationError, match="larger than 1024 bytes"):
        UnixAttestor(proc_root=proc).attest(ProcessInfo(PID, UID, GID))
