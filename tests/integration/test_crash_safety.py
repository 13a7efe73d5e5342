"""A SIGKILLed server loses no acknowledged entry and leaves nothing half-written.

A real ``sigil-server run`` on SQLite, PostgreSQL and MariaDB; several threads create
entries through the admin API as fast as they can; once enough have been
acknowledged the server is killed with SIGKILL while writes are in flight. It is
then restarted on the same datastore, and the datastore is checked row by row.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text

from api.protos.sigil.admin.v1 import admin_pb2, admin_pb2_grpc
from api.protos.sigil.types.v1 import types_pb2
from tests.integration.conftest import RunningServer

TRUST_DOMAIN = "crash.sigil.test"
PARENT = f"spiffe://{TRUST_DOMAIN}/node-a"
WRITERS = 4
ACKED_BEFORE_KILL = 40


def _entry(writer: int, n: int) -> types_pb2.Entry:
    name = f"w{writer}-{n}"
    return types_pb2.Entry(
        spiffe_id=f"spiffe://{TRUST_DOMAIN}/svc/{name}",
        parent_id=PARENT,
        selectors=[types_pb2.Selector(type="unix", value=f"uid:{1000 + n}"),
                   types_pb2.Selector(type="unix", value=f"gid:{writer}"),
                   types_pb2.Selector(type="k8s", value=f"ns:{name}")],
        dns_names=[f"{name}.crash.test", f"{name}.alt.crash.test"],
    )


class Writers:
    """Threads creating entries until the server stops answering."""

    def __init__(self, socket_path: Path) -> None:
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._stub = admin_pb2_grpc.AdminStub(self._channel)
        self.acked: dict[str, types_pb2.Entry] = {}  # id -> what we sent
        self.errors: list[grpc.StatusCode] = []
        self._lock = threading.Lock()
        self.enough = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(WRITERS)]

    def _run(self, writer: int) -> None:
        n = 0
        while True:
            sent = _entry(writer, n)
            n += 1
            try:
                got = self._stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=sent), timeout=10)
            except grpc.RpcError as exc:
                with self._lock:
                    self.errors.append(exc.code())
                return
            with self._lock:
                self.acked[got.id] = sent
                if len(self.acked) >= ACKED_BEFORE_KILL:
                    self.enough.set()

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        for t in self._threads:
            t.join(timeout=30)
        self._channel.close()


@pytest.fixture
def server(server_root: Path, database_url: str) -> Iterator[RunningServer]:
    srv = RunningServer(
        trust_domain=TRUST_DOMAIN,
        data_dir=server_root / "data",
        socket_path=server_root / "admin" / "admin.sock",
        extra_args=("--database-url", database_url),
    )
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            code = srv.stop()
            assert code == 0, f"server exited with {code}:\n{srv.log}"


@pytest.mark.slow
def test_sigkill_during_entry_creation_loses_nothing(
    server: RunningServer, database_url: str
) -> None:
    server.start()
    assert server.proc is not None
    with Writers(server.socket_path) as writers:
        assert writers.enough.wait(120), f"too few entries acknowledged:\n{server.log}"
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
    assert server.proc.returncode == -signal.SIGKILL
    # Every writer was cut off by the kill, not by a refusal.
    assert set(writers.errors) <= {grpc.StatusCode.UNAVAILABLE,
                                   grpc.StatusCode.DEADLINE_EXCEEDED}, writers.errors
    acked = dict(writers.acked)

    server.start()  # same data dir, same datastore: migrates (no-op) and serves

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                assert conn.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
                assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
            entries = {r.id: r for r in conn.execute(text(
                "SELECT id, spiffe_id, parent_id, revision FROM registration_entries"))}
            selectors: dict[str, set[tuple[str, str]]] = {}
            for r in conn.execute(text("SELECT entry_id, type, value FROM entry_selectors")):
                selectors.setdefault(r.entry_id, set()).add((r.type, r.value))
            dns: dict[str, set[str]] = {}
            for r in conn.execute(text("SELECT entry_id, name FROM entry_dns_names")):
                dns.setdefault(r.entry_id, set()).add(r.name)
            events = conn.execute(text(
                "SELECT id, kind, entry_id FROM change_events ORDER BY id")).all()
    finally:
        engine.dispose()

    # Every acknowledged entry is there, whole.
    missing = sorted(set(acked) - set(entries))
    assert missing == [], f"{len(missing)} acknowledged entries lost"
    for entry_id, sent in acked.items():
        row = entries[entry_id]
        assert (row.spiffe_id, row.parent_id) == (sent.spiffe_id, sent.parent_id)
        assert selectors.get(entry_id) == {(s.type, s.value) for s in sent.selectors}
        assert dns.get(entry_id) == set(sent.dns_names)
    # Nothing half-written: no entry without its children, no orphan child rows.
    # (An entry committed just before the kill whose answer never arrived may
    # exist unacknowledged; it must be whole too.)
    assert set(selectors) <= set(entries) and set(dns) <= set(entries)
    for entry_id in entries:
        assert len(selectors.get(entry_id, ())) == 3, entry_id
        assert len(dns.get(entry_id, ())) == 2, entry_id
    # One creation event per entry, and each entry's revision is its event.
    assert [e.kind for e in events] == ["entry_created"] * len(entries)
    assert {e.entry_id: e.id for e in events} == {i: r.revision for i, r in entries.items()}

    # The restarted server serves reads and writes.
    with grpc.insecure_channel(f"unix:{server.socket_path}") as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        listed = stub.ListEntries(admin_pb2.ListEntriesRequest(parent_id=PARENT), timeout=30)
        assert {e.id for e in listed.entries} >= set(acked)
        created = stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=_entry(99, 0)), timeout=10)
        assert created.revision > max(r.revision for r in entries.values())
    assert server.cli("healthcheck").returncode == 0
