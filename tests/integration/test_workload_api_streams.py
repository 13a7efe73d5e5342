"""Streams: who hears about a change, and who does not (SPIFFE-NOTES §6.5).

Two workload processes with different selectors keep FetchX509SVID streams open.
Their selectors come from a test attestor that reads one variable from the
process's environment, so both can run as the same user.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestation.workload import ProcessInfo, WorkloadAttestationError
from identity.bundle import Bundle
from identity.selectors import Selector
from tests.integration.workload_api_harness import TD, Harness, TestCA, entry

REPO = Path(__file__).resolve().parents[2]
WEB = "spiffe://example.org/web"
API = "spiffe://example.org/api"
EXTRA = "spiffe://example.org/web-extra"
# Long enough for a message already on its way to arrive on a loaded machine; a
# slow machine only makes the "nothing arrives" checks weaker, never fail.
QUIET = 1.0
ARRIVAL = 20.0
# The promised bound from a change in the cache to the stream's client.
PROMPT = 1.0

_CLIENT = r"""
import hashlib, sys
import grpc
from agent.workload_api.client import WorkloadApiClient
from api.protos import workload_pb2 as pb
c = WorkloadApiClient(sys.argv[1])
try:
    for m in c.stream("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse):
        ids = ",".join(s.spiffe_id for s in m.svids)
        print("MSG", ids, hashlib.sha256(m.SerializeToString()).hexdigest()[:12], flush=True)
except grpc.RpcError as e:
    print("END", e.code().name, flush=True)
"""


class EnvAttestor:
    """``test:workload:<name>`` from SIGIL_TEST_WORKLOAD in the process's environment."""

    name = "test"

    def attest(self, process: ProcessInfo) -> list[Selector]:
        """The selector, or none for a process without the variable."""
        try:
            env = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        except OSError as exc:
            raise WorkloadAttestationError(str(exc)) from exc
        for item in env:
            if item.startswith(b"SIGIL_TEST_WORKLOAD="):
                return [Selector("test", "workload:" + item.split(b"=", 1)[1].decode())]
        return []


class Workload:
    """A FetchX509SVID stream in a child process; its lines arrive on a queue."""

    def __init__(self, harness: Harness, name: str) -> None:
        env = dict(os.environ, SIGIL_TEST_WORKLOAD=name, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, str(harness.socket_path)],
            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next(self, timeout: float = ARRIVAL) -> str:
        """The next line; fails the test if none arrives in ``timeout`` seconds."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no stream message in {timeout} s") from None

    def silent(self) -> bool:
        """True when nothing arrives for QUIET seconds."""
        try:
            line = self.lines.get(timeout=QUIET)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected stream message: {line}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(attestors=[EnvAttestor()])
    try:
        yield h
    finally:
        h.close()


def test_changes_reach_the_affected_stream_only(harness: Harness) -> None:
    e_a = entry("ea", WEB, "test:workload:a")
    e_b = entry("eb", API, "test:workload:b")
    harness.set_state([e_a, e_b])
    a, b = Workload(harness, "a"), Workload(harness, "b")
    try:
        assert a.next().startswith(f"MSG {WEB} ")
        assert b.next().startswith(f"MSG {API} ")

        # Rotation of a's SVID: a hears, b does not.
        harness.call(lambda: harness.cache.set_x509_svid("ea", harness.ca.svid(WEB)))
        assert a.next().startswith(f"MSG {WEB} ")
        assert b.silent()

        # An entry added for a (with its SVID): a gets both identities.
        e_extra = entry("ex", EXTRA, "test:workload:a")
        harness.call(lambda: harness.cache.set_entries([e_a, e_b, e_extra]))
        harness.call(lambda: harness.cache.set_x509_svid("ex", harness.ca.svid(EXTRA)))
        assert a.next().startswith(f"MSG {WEB},{EXTRA} ")
        assert b.silent()

        # An entry of a changed in a way a sees (hint): a hears, b does not.
        e_a2 = dataclasses.replace(e_a, hint="front")
        harness.call(lambda: harness.cache.set_entries([e_a2, e_b, e_extra]))
        assert a.next().startswith(f"MSG {WEB},{EXTRA} ")
        assert b.silent()

        # The same state again, or a change no one's response shows: nothing is resent.
        harness.call(lambda: harness.cache.set_entries([e_a2, e_b, e_extra]))
        harness.call(lambda: harness.cache.set_bundles(
            {TD: dataclasses.replace(harness.ca.bundle(), sequence_number=7)}
        ))
        assert a.silent() and b.silent()

        # A CA prepared (a second X.509 authority in the bundle): everyone hears.
        nxt = TestCA()
        prepared = Bundle(
            trust_domain=TD,
            x509_authorities=(harness.ca.cert, nxt.cert),
            jwt_authorities=harness.ca.bundle().jwt_authorities,
        )
        harness.call(lambda: harness.cache.set_bundles({TD: prepared}))
        assert a.next().startswith("MSG ") and b.next().startswith("MSG ")
        # ... and revoked again.
        harness.call(lambda: harness.cache.set_bundles({TD: harness.ca.bundle()}))
        assert a.next().startswith("MSG ") and b.next().startswith("MSG ")

        # a's last entry removed: its stream ends with PermissionDenied; b's goes on.
        harness.call(lambda: harness.cache.set_entries([e_b]))
        assert a.next() == "END PERMISSION_DENIED"
        assert b.silent()
        assert b.proc.poll() is None
    finally:
        a.close()
        b.close()


def test_update_arrives_promptly(harness: Harness) -> None:
    """A rotation reaches an open stream in under 1 s (PROMPT).

    Measured from the moment the cache holds the new SVID (made beforehand, so its
    key generation is not counted) to the child's line for the new message;
    bench/workload_api.py measures the latency properly.
    """
    harness.set_state([entry("ea", WEB, "test:workload:a")])
    a = Workload(harness, "a")
    try:
        first = a.next()
        assert first.startswith(f"MSG {WEB} "), first
        rotated = harness.ca.svid(WEB)
        start = time.monotonic()
        harness.call(lambda: harness.cache.set_x509_svid("ea", rotated))
        update = a.next()
        elapsed = time.monotonic() - start
        print(f"rotation reached the stream in {elapsed:.3f} s")
        assert update.startswith(f"MSG {WEB} ") and update != first, update
        assert elapsed < PROMPT, f"rotation took {elapsed:.3f} s to reach the stream"
    finally:
        a.close()
