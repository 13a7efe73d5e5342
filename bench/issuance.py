"""X.509-SVID issuance through the agent API: per call and per SVID, against two floors.

Usage:
    python bench/issuance.py [--seconds 10] [--batches 0,1,10,100] [--workers 0]
                             [--clients N] [--connections 4] [--no-floor]

(--seconds is per phase: about 9 x --seconds in all, plus start-up.)

1. Raw limit: one ECDSA P-256 sign plus one verify (SHA-256) per certificate, with
   ``cryptography``, on every core at once (one process per core), for the same
   duration. That is the least work a CA must do per SVID: verify the CSR's
   signature, sign the certificate.
2. Server: ``sigil-server run`` with ``worker_processes`` (default 0: one per core),
   on SQLite in a temporary directory, the signing rate limit on (at a rate no
   client reaches: its check is part of every call's cost). Each client process
   attests its own agent with a join token, gets an entry parented to it,
   pre-generates its CSRs, then sends ``BatchNewX509SVID`` over mTLS with the agent
   SVID as client certificate, exactly as the agent does: one phase per batch size,
   the same connections throughout. A batch of 0 is a whole authenticated call
   (TLS front, relay, gRPC, authentication, node lookup, rate limit) that signs
   nothing: the fixed cost of a call in our server.
3. SVID floor: the same job in ``cryptography``'s own calls, in a loop, one
   process per core, for the same duration: load a DER CSR and check its
   signature and take its key (``x509.load_der_x509_csr``,
   ``is_signature_valid``, ``public_key()``), build a certificate with an
   X.509-SVID's extensions and sign it with the CA key
   (``x509.CertificateBuilder`` ... ``.sign(ca_key, SHA256)``), serialize it (DER).
   No RPC, no checks of ours, no database: what the server's rate is held to
   (issuance / SVID floor, goal >= 0.75, batches of 100). It runs before the
   server phases and again after them; the ratio uses the mean of the two.
4. Per-SVID breakdown, in this process: each in-process step of one SVID (CSR
   check; certificate build, sign and DER; protobuf) ours beside the floor's, in
   turns, best of 30 rounds (see :func:`breakdown`); after the server phases, what
   a server SVID costs beyond those steps (the call, gRPC, TLS and relay).
5. Call floors (unless --no-floor): the same stack with nothing of ours in it,
   each server in a process of its own, answering BatchNewX509SVID with an empty
   message without reading the request (the same clients send it the batch-of-1
   request): the server's TLS front (``ca.api.tls_front.TlsFront``: handshake,
   client certificate, relay to the internal socket) in front of a gRPC server
   built as the server builds it; and that gRPC server terminating TLS itself
   (what the front costs is the difference). Then the *RPC floor* of the largest
   batch: the front and gRPC server again, now parsing the request and answering
   with a ready-made response of the same size as the server's (a real SVID per
   CSR), so the same bytes cross the same stack and nothing is signed.

For each phase it prints SVIDs/s, calls/s and the server's CPU time per call and
per SVID (CPU-seconds of every server process over the phase, from /proc, and
the kernel's share of it: sockets, context switches, lock waits), and
then the ratios: issuance / raw limit (goal >= 0.5, batches of 100), issuance /
SVID floor (goal >= 0.75, batches of 100), and the CPU
of an SVID in a batch of 1 against one in a batch of 100 (goal <= 2). Client and
server share the machine's cores, as they would not in production.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import queue
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import server  # noqa: E402
from bench.server import TARGET  # noqa: E402

TD = "bench.sigil.test"
AGENT_SERVICE = "sigil.agent.v1.Agent"


# ---- raw limit -----------------------------------------------------------------------


def _raw_worker(seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    # About the size of an SVID's to-be-signed part.
    data = os.urandom(400)
    algo = ec.ECDSA(hashes.SHA256())
    n = 0
    start_cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            sig = key.sign(data, algo)
            pub.verify(sig, data, algo)
        n += 50
    out.put((n, time.process_time() - start_cpu))


def raw_rate(seconds: float, procs: int) -> tuple[float, float]:
    """Sign+verify pairs per second on ``procs`` processes, and CPU-seconds per pair."""
    return _rate(_raw_worker, seconds, procs)


def _rate(worker: Any, seconds: float, procs: int) -> tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ps = [ctx.Process(target=worker, args=(seconds, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    done = [out.get() for _ in ps]
    for p in ps:
        p.join()
    total = sum(n for n, _ in done)
    return float(total) / seconds, sum(cpu for _, cpu in done) / total


class _FloorCA:
    """The floor's job for one SVID in ``cryptography``'s own calls, nothing of ours.

    :meth:`csr_key`: load a DER CSR, check its signature, take its key.
    :meth:`leaf_der`: build a certificate with an X.509-SVID's extensions (empty
    subject, critical URI SAN, CA flag off, digitalSignature, server and client
    auth, SKI, AKI), sign it with the CA's P-256 key (SHA-256) and serialize it as
    DER. The floor loop and the per-SVID breakdown both run these.
    """

    def __init__(self, ca_key: Any, ca_name: Any) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID

        # Kept, so the loop pays no import lookups the floor's own calls would not.
        self._x509 = x509
        self._der = serialization.Encoding.DER
        self.ca_key = ca_key
        self.ca_name = ca_name
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
        self.ku = x509.KeyUsage(digital_signature=True, content_commitment=False,
                                key_encipherment=False, data_encipherment=False,
                                key_agreement=False, key_cert_sign=False, crl_sign=False,
                                encipher_only=False, decipher_only=False)
        self.eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                          ExtendedKeyUsageOID.CLIENT_AUTH])
        self.sha256 = hashes.SHA256()

    def csr_key(self, der: bytes) -> Any:
        csr = self._x509.load_der_x509_csr(der)
        if not csr.is_signature_valid:
            raise SystemExit("CSR signature invalid")
        return csr.public_key()

    def leaf_der(self, pub: Any, uri: str, not_before: dt.datetime,
                 not_after: dt.datetime) -> bytes:
        x509 = self._x509
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_name)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self.ku, critical=True)
            .add_extension(self.eku, critical=False)
            .add_extension(self.aki, critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri)]), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .sign(self.ca_key, self.sha256)
        ).public_bytes(self._der)


def _floor_worker(seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """The job of one SVID in ``cryptography``'s own calls (:class:`_FloorCA`), in a loop."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    floor = _FloorCA(ec.generate_private_key(ec.SECP256R1()),
                     x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bench")]))
    uris = [f"spiffe://{TD}/w/{i}" for i in range(100)]
    # Distinct CSRs, as the clients send them (pre-generated, like theirs).
    csrs = [
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(uri)]), critical=False)
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
        for uri in uris
    ]
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(hours=1)
    n = 0
    start_cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for uri, der in zip(uris, csrs, strict=True):
            floor.leaf_der(floor.csr_key(der), uri, now, not_after)
        n += len(csrs)
    out.put((n, time.process_time() - start_cpu))


def floor_rate(seconds: float, procs: int) -> tuple[float, float]:
    """SVIDs per second in ``cryptography``'s own calls on ``procs`` processes, and
    CPU-seconds per SVID (each process's own CPU clock: other load does not count)."""
    return _rate(_floor_worker, seconds, procs)


# ---- per-SVID breakdown --------------------------------------------------------------


@dataclass(frozen=True)
class Breakdown:
    """Microseconds of CPU per SVID for each step, best of many rounds, one process."""

    floor_csr: float
    floor_cert: float
    csr: float
    cert: float
    proto: float

    @property
    def floor(self) -> float:
        return self.floor_csr + self.floor_cert

    @property
    def ours(self) -> float:
        return self.csr + self.cert + self.proto


def breakdown(rounds: int = 30) -> Breakdown:
    """Each step of one SVID, ours beside ``cryptography``'s own calls, in this process.

    The steps run in turns (each over the same 100 CSRs, all for one SPIFFE ID as
    the server phases send them) and each keeps its best round, so a busy machine
    slows every step alike. Ours: :func:`identity.x509svid.csr_public_key` (load,
    signature and key strength), :meth:`identity.x509svid.SvidSigner.sign` with
    the clamp and template of the server's CA slot plus the certificate's DER, and
    the protobuf result and response as ``BatchNewX509SVID`` builds them.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from api.protos.sigil.agent.v1 import agent_pb2
    from ca.api.convert import svid_to_proto
    from identity.spiffeid import SpiffeId, TrustDomain
    from identity.x509svid import SvidSigner, csr_public_key, new_ca_certificate

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = new_ca_certificate(trust_domain=TrustDomain(TD), public_key=ca_key.public_key(),
                            signer_key=ca_key, not_before=now - dt.timedelta(hours=1),
                            not_after=now + dt.timedelta(days=1))
    signer = SvidSigner(ca, ca_key, verify_signatures=False)
    spiffe_id = SpiffeId.parse(f"spiffe://{TD}/w/0")
    csrs = [
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
        for _ in range(100)
    ]
    keys = [csr_public_key(der) for der in csrs]
    floor = _FloorCA(ca_key, ca.subject)
    not_after = now + dt.timedelta(hours=1)
    leaves = [signer.sign(spiffe_id=spiffe_id, public_key=k, not_before=now,
                          not_after=not_after) for k in keys]

    def floor_csr() -> None:
        for der in csrs:
            floor.csr_key(der)

    def floor_cert() -> None:
        uri = str(spiffe_id)
        for pub in keys:
            floor.leaf_der(pub, uri, now, not_after)

    def our_csr() -> None:
        for der in csrs:
            csr_public_key(der)

    def our_cert() -> None:
        for pub in keys:
            at = dt.datetime.now(dt.UTC)
            signer.sign(spiffe_id=spiffe_id, public_key=pub, not_before=at,
                        not_after=at + dt.timedelta(hours=1)
                        ).public_bytes(serialization.Encoding.DER)

    def our_proto() -> None:
        # svid_to_proto encodes the DER again: our_cert's DER is the floor's, so
        # this step counts the encoding twice, and the breakdown stays an upper bound.
        response = agent_pb2.BatchNewX509SVIDResponse()
        for leaf in leaves:
            result = response.results.add()
            result.entry_id = "e"
            result.status.code = 0
            svid_to_proto(spiffe_id, (leaf,), into=result.svid)
        response.SerializeToString()

    steps = {"floor_csr": floor_csr, "floor_cert": floor_cert, "csr": our_csr,
             "cert": our_cert, "proto": our_proto}
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.process_time()
            step()
            best[name] = min(best[name], (time.process_time() - start) / 100 * 1e6)
    return Breakdown(**best)


def _print_breakdown(b: Breakdown) -> None:
    print("per SVID in one process, best of 30 rounds (µs of CPU):")
    print(f"  {'step':<44} {'ours':>6} {'floor':>6}")
    print(f"  {'CSR: load, check signature, take key':<44} {b.csr:>6.1f} {b.floor_csr:>6.1f}")
    print(f"  {'certificate: build, sign, DER':<44} {b.cert:>6.1f} {b.floor_cert:>6.1f}")
    print(f"  {'protobuf: result, response encoding':<44} {b.proto:>6.1f} {'-':>6}")
    print(f"  {'in-process total':<44} {b.ours:>6.1f} {b.floor:>6.1f}"
          f"   (floor / ours {b.floor / b.ours:.3f})")


# ---- clients -------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """How a client authenticates: a join token to attest with, or a ready key and chain."""

    token: str = ""
    key_pem: bytes = b""
    chain_pem: bytes = b""


@dataclass(frozen=True)
class ClientPlan:
    """What one client process does."""

    address: str
    roots: bytes
    credentials: Credentials
    batches: tuple[int, ...]
    seconds: float
    connections: int


def _attest(plan: ClientPlan) -> tuple[bytes, bytes, str]:
    """Attest with the plan's token: (key PEM, chain PEM, agent ID)."""
    import grpc
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
    from attestation.node.join_token import make_attestation
    from identity.keys import generate_private_key, private_key_to_pem
    from identity.x509svid import new_csr

    key = generate_private_key()
    kind, payload = make_attestation(plan.credentials.token)
    opts = [("grpc.ssl_target_name_override", TARGET)]
    with grpc.secure_channel(plan.address, grpc.ssl_channel_credentials(plan.roots),
                             options=opts) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)  # type: ignore[no-untyped-call]
        resp = stub.AttestAgent(agent_pb2.AttestAgentRequest(
            data=agent_pb2.AttestationData(type=kind, payload=payload), csr=new_csr(key)),
            timeout=30)
    chain_pem = b"".join(x509.load_der_x509_certificate(d).public_bytes(Encoding.PEM)
                         for d in resp.svid.cert_chain)
    return private_key_to_pem(key), chain_pem, str(resp.svid.spiffe_id)


def _client(plan: ClientPlan, agent_q: Any, entry_q: Any, warm_q: Any,
            starts: Sequence[Any], out: Any) -> None:
    """One client process: attest (or not), then one measured phase per batch size."""
    import grpc

    from api.protos.sigil.agent.v1 import agent_pb2, agent_pb2_grpc
    from identity.keys import generate_private_key
    from identity.x509svid import new_csr

    if plan.credentials.token:
        key_pem, chain_pem, agent_id = _attest(plan)
        agent_q.put(agent_id)
        entry_id = str(entry_q.get())
    else:
        key_pem, chain_pem, entry_id = plan.credentials.key_pem, plan.credentials.chain_pem, "-"
    # Pre-generated: the client's own key generation must not limit the measurement.
    csrs = [new_csr(generate_private_key()) for _ in range(16)]
    creds = grpc.ssl_channel_credentials(plan.roots, key_pem, chain_pem)
    # Several connections, as several agents would open: the kernel spreads
    # connections (not calls) over the server's processes.
    opts = [("grpc.ssl_target_name_override", TARGET), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.secure_channel(plan.address, creds, options=opts)
                for _ in range(plan.connections)]
    stubs = [agent_pb2_grpc.AgentStub(ch) for ch in channels]  # type: ignore[no-untyped-call]
    try:
        for phase, batch in enumerate(plan.batches):
            request = agent_pb2.BatchNewX509SVIDRequest(params=[
                agent_pb2.NewX509SVIDParams(entry_id=entry_id, csr=csrs[i % len(csrs)])
                for i in range(batch)])
            for stub in stubs:
                stub.BatchNewX509SVID(request, timeout=60)  # warm up (first: connect)
            warm_q.put(phase)
            starts[phase].wait()
            out.put((phase, *_phase(stubs, request, plan.seconds)))
    finally:
        for ch in channels:
            ch.close()


def _phase(stubs: list[Any], request: Any, seconds: float) -> tuple[int, int, int, float]:
    """Calls until the time is up, one in flight per connection: (issued, refused, calls,
    client CPU seconds)."""
    issued = refused = calls = 0
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()

    def send(i: int) -> None:
        future = stubs[i].BatchNewX509SVID.future(request, timeout=60)
        future.add_done_callback(lambda f: done.put((i, f)))

    for i in range(len(stubs)):
        send(i)
    in_flight = len(stubs)
    while in_flight:
        i, future = done.get()
        in_flight -= 1
        calls += 1
        for r in future.result().results:
            if r.status.code == 0:
                issued += 1
            else:
                refused += 1
        if time.perf_counter() < deadline:
            send(i)
            in_flight += 1
    return issued, refused, calls, time.process_time() - cpu


# ---- servers -------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseResult:
    """One batch size's phase."""

    batch: int
    issued: int
    refused: int
    calls: int
    seconds: float
    server_cpu: float
    server_sys: float
    """Of server_cpu, the kernel's part."""
    client_cpu: float

    @property
    def cpu_per_call(self) -> float:
        return self.server_cpu / self.calls if self.calls else float("nan")

    @property
    def cpu_per_svid(self) -> float:
        return self.server_cpu / self.issued if self.issued else float("nan")


@dataclass(frozen=True)
class Target:
    """A running server to measure: address, roots, and its processes."""

    address: str
    roots: bytes
    pids: list[int]
    token: Any  # () -> a fresh join token, or None: clients use `credentials`
    entry: Any  # (index, agent ID) -> entry id
    credentials: Credentials | None = None


def run_phases(target: Target, *, clients: int, batches: tuple[int, ...], seconds: float,
               connections: int) -> list[PhaseResult]:
    """Start the clients, run one phase per batch size, and measure each."""
    ctx = multiprocessing.get_context("spawn")
    agent_q, warm_q, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    starts = [ctx.Event() for _ in batches]
    procs, entry_qs = [], []  # each queue lives until its client has read it
    for n in range(clients):
        creds = target.credentials or Credentials(token=target.token())
        plan = ClientPlan(target.address, target.roots, creds, batches, seconds, connections)
        entry_q = ctx.Queue()
        entry_qs.append(entry_q)
        p = ctx.Process(target=_client, args=(plan, agent_q, entry_q, warm_q, starts, out))
        p.start()
        procs.append(p)
        if creds.token:
            entry_q.put(target.entry(n, agent_q.get(timeout=120)))
    results = []
    try:
        for phase, batch in enumerate(batches):
            for _ in procs:  # every connection warmed up with this phase's request
                assert warm_q.get(timeout=120) == phase
            cpu = server.cpu_split(target.pids)
            starts[phase].set()
            time.sleep(seconds)
            user, system = (b - a for a, b in zip(cpu, server.cpu_split(target.pids),
                                                  strict=True))
            got = [out.get(timeout=seconds + 120) for _ in procs]
            results.append(PhaseResult(
                batch=batch, issued=sum(g[1] for g in got), refused=sum(g[2] for g in got),
                calls=sum(g[3] for g in got), seconds=seconds, server_cpu=user + system,
                server_sys=system,
                client_cpu=sum(g[4] for g in got)))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return results


@contextlib.contextmanager
def sigil_server(workers: int) -> Iterator[Target]:
    """``sigil-server run`` (bench/server.py) with agents attesting by join token."""
    # The signing limit stays on (its check costs on every call) at a rate and
    # burst no client reaches; attestation is limited per IP and every client
    # attests from 127.0.0.1 at start, so that limit is off.
    config = ("rate_limit_attestation_per_second = 0\n"
              "rate_limit_signing_per_second = 1000000\n"
              "rate_limit_signing_burst = 1000000\n")
    with server.sigil_server(trust_domain=TD, config=config, workers=workers) as srv:

        def cli(*args: str) -> str:
            return str(json.loads(srv.cli(*args, "--output", "json"))[
                "token" if args[0] == "token" else "id"])

        def token() -> str:
            return cli("token", "generate")

        def entry(n: int, agent_id: str) -> str:
            return cli("entry", "create", "--spiffe-id", f"spiffe://{TD}/w/{n}",
                       "--parent-id", agent_id, "--selector", "unix:uid:1")

        yield Target(srv.address, srv.roots(), srv.pids, token, entry)


def _serve_floor(kind: str) -> None:
    """A call floor's server (a child process): an empty answer to every call.

    ``front``: the server's TLS front relaying to a gRPC server on a Unix socket, as
    the server runs; ``grpc``: the same gRPC server terminating TLS itself (what
    the front costs is the difference). ``front-batch``: as ``front``, but the
    request is parsed and the answer is a ready-made response of one result per
    CSR, with a real SVID each: the same bytes both ways as the server's, nothing
    signed (the RPC's own cost for a batch of that size).
    """
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from ca.api.tls_front import TlsFront
    from ca.server import GRPC_OPTIONS, WORKERS
    from identity.keys import generate_private_key, private_key_to_pem
    from identity.spiffeid import SpiffeId, TrustDomain
    from identity.x509svid import (
        certificates_to_pem,
        new_ca_certificate,
        new_svid_certificate,
    )

    now = dt.datetime.now(dt.UTC)
    td = TrustDomain(TD)
    ca_key = generate_private_key()
    ca = new_ca_certificate(trust_domain=td, public_key=ca_key.public_key(),
                            signer_key=ca_key, not_before=now - dt.timedelta(minutes=1),
                            not_after=now + dt.timedelta(days=1))

    def leaf(path: str, *dns: str) -> tuple[bytes, bytes]:
        key = generate_private_key()
        cert = new_svid_certificate(
            spiffe_id=SpiffeId.from_segments(td, *path.split("/")),
            public_key=key.public_key(), ca_cert=ca, ca_key=ca_key,
            not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=2),
            dns_names=dns)
        return private_key_to_pem(key), certificates_to_pem([cert, ca])

    server_key, server_chain = leaf("sigil/server", TARGET)
    client_key, client_chain = leaf("sigil/agent/join_token/floor")
    workdir = Path(tempfile.mkdtemp(prefix="sgf-", dir="/tmp"))
    # As the server's TlsContextSource builds its context.
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.set_alpn_protocols(["h2"])
    tls.verify_mode = ssl.CERT_OPTIONAL
    tls.load_verify_locations(cadata=certificates_to_pem([ca]).decode())
    (workdir / "key.pem").write_bytes(server_key)
    (workdir / "chain.pem").write_bytes(server_chain)
    tls.load_cert_chain(workdir / "chain.pem", workdir / "key.pem")
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS,
                                                 thread_name_prefix="agent-api"),
                              options=GRPC_OPTIONS)

    def empty(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        return b""

    handler = grpc.unary_unary_rpc_method_handler(empty)
    if kind == "front-batch":
        from api.protos.sigil.agent.v1 import agent_pb2
        from ca.api.convert import svid_to_proto

        svid_id = SpiffeId.from_segments(td, "w", "0")
        leaves = [new_svid_certificate(
            spiffe_id=svid_id, public_key=generate_private_key().public_key(), ca_cert=ca,
            ca_key=ca_key, not_before=now, not_after=now + dt.timedelta(hours=1))
            for _ in range(16)]
        canned: dict[int, bytes] = {}

        def answer(request: agent_pb2.BatchNewX509SVIDRequest,
                   _context: grpc.ServicerContext) -> bytes:
            count = len(request.params)
            if count not in canned:
                response = agent_pb2.BatchNewX509SVIDResponse()
                for i in range(count):
                    result = response.results.add()
                    result.entry_id = request.params[i].entry_id
                    svid_to_proto(svid_id, (leaves[i % len(leaves)],), into=result.svid)
                canned[count] = response.SerializeToString()
            return canned[count]

        handler = grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=agent_pb2.BatchNewX509SVIDRequest.FromString)
    grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        AGENT_SERVICE, {"BatchNewX509SVID": handler}),))
    front: TlsFront | None = None
    if kind in ("front", "front-batch"):
        front = TlsFront(host="127.0.0.1", port=0, contexts=lambda: tls)
        grpc_server.add_insecure_port(f"unix:{front.internal_socket}")
        grpc_server.start()
        front.start()
        port = front.bound_port
    else:
        port = grpc_server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(server_key, server_chain)], root_certificates=certificates_to_pem([ca]),
            require_client_auth=True))
        grpc_server.start()
    print(json.dumps({"address": f"127.0.0.1:{port}",
                      "roots": certificates_to_pem([ca]).decode(),
                      "key": client_key.decode(), "chain": client_chain.decode()}), flush=True)
    sys.stdin.read()
    if front is not None:
        front.stop()
    grpc_server.stop(0.5).wait()
    shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def floor_server(kind: str) -> Iterator[Target]:
    """A call floor (see :func:`_serve_floor`) in a child process."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve-floor", kind],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        creds = Credentials(key_pem=info["key"].encode(), chain_pem=info["chain"].encode())
        yield Target(info["address"], info["roots"].encode(), [proc.pid], None, None, creds)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- report --------------------------------------------------------------------------


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def _print_phases(results: list[PhaseResult], cores: int) -> None:
    print(f"{'batch':>5} {'SVIDs/s':>9} {'calls/s':>9} {'server CPU':>11} "
          f"{'CPU/call':>10} {'CPU/SVID':>10} {'kernel':>7}")
    for r in results:
        share = r.server_cpu / (r.seconds * cores)
        kernel = r.server_sys / r.server_cpu if r.server_cpu else float("nan")
        print(f"{r.batch:>5} {r.issued / r.seconds:>9,.0f} {r.calls / r.seconds:>9,.0f} "
              f"{share:>10.0%} {_us(r.cpu_per_call):>10} "
              f"{_us(r.cpu_per_svid) if r.issued else '-':>10} {kernel:>7.0%}")


def main() -> None:
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="per phase")
    ap.add_argument("--batches", default="0,1,10,100",
                    help="batch sizes, one phase each (0: an authenticated call, no CSR)")
    ap.add_argument("--clients", type=int, default=2 * cores)
    ap.add_argument("--workers", type=int, default=0, help="worker_processes (0: per core)")
    ap.add_argument("--connections", type=int, default=4,
                    help="connections per client process, one call in flight on each")
    ap.add_argument("--no-floor", action="store_true", help="skip the call floor")
    ap.add_argument("--serve-floor", choices=("front", "grpc", "front-batch"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_floor:
        _serve_floor(args.serve_floor)
        return
    batches = tuple(int(b) for b in args.batches.split(","))
    raw, raw_cpu = raw_rate(args.seconds, cores)
    raw_core = 1 / raw_cpu
    print(f"raw ECDSA P-256 sign+verify on {cores} cores: {raw:,.0f}/s "
          f"({_us(raw_cpu)} of CPU per pair)")
    svid_floor, floor_cpu = floor_rate(args.seconds, cores)
    svid_floor_core = 1 / floor_cpu
    floor_share = svid_floor * floor_cpu / cores
    print(f"SVID floor, cryptography's own calls (CSR load + signature check + key, "
          f"certificate build + sign + DER) on {cores} cores: {svid_floor:,.0f}/s "
          f"({_us(floor_cpu)} of CPU per SVID, {floor_share:.0%} of the cores"
          + ("; the machine is busy: compare per CPU-second" if floor_share < 0.9 else "")
          + ")")
    parts = breakdown()
    _print_breakdown(parts)
    print(f"\nserver: worker_processes={args.workers}, {args.clients} client processes x "
          f"{args.connections} connections, one call in flight on each, "
          f"{args.seconds:g} s per phase")
    with sigil_server(args.workers) as target:
        results = run_phases(target, clients=args.clients, batches=batches,
                             seconds=args.seconds, connections=args.connections)
    _print_phases(results, cores)
    # The floor again, after the server: the ratios use the mean of both loops, so a
    # machine whose speed drifts during the run (a shared VM host) moves both sides.
    after, after_cpu = floor_rate(args.seconds, cores)
    print(f"SVID floor again, after the server: {after:,.0f}/s ({_us(after_cpu)} of CPU "
          f"per SVID); the ratios use the mean of both, {(svid_floor + after) / 2:,.0f}/s")
    svid_floor, floor_cpu = (svid_floor + after) / 2, (floor_cpu + after_cpu) / 2
    svid_floor_core = 1 / floor_cpu
    if any(r.refused for r in results):
        raise SystemExit(f"{sum(r.refused for r in results)} CSRs were refused")
    floor: PhaseResult | None = None
    rpc_floor: float | None = None
    if not args.no_floor:
        floors = {}
        for kind, label in (("front", "TLS front + gRPC (as the server)"),
                            ("grpc", "gRPC with its own TLS, no front")):
            with floor_server(kind) as target:
                (floors[kind],) = run_phases(target, clients=args.clients, batches=(1,),
                                             seconds=args.seconds,
                                             connections=args.connections)
            f = floors[kind]
            print(f"call floor, {label}: {f.calls / f.seconds:,.0f} calls/s, "
                  f"{_us(f.cpu_per_call)} of CPU per call, kernel "
                  f"{f.server_sys / f.server_cpu if f.server_cpu else float('nan'):.0%} "
                  "(1 process, empty answer)")
        floor = floors["front"]
        size = max(batches)
        if size > 1:
            with floor_server("front-batch") as target:
                (rpc,) = run_phases(target, clients=args.clients, batches=(size,),
                                    seconds=args.seconds, connections=args.connections)
            rpc_floor = rpc.cpu_per_call / size
            print(f"RPC floor, batch of {size} (TLS front + gRPC, the server's bytes both "
                  f"ways, nothing signed): {rpc.calls / rpc.seconds:,.0f} calls/s, "
                  f"{_us(rpc.cpu_per_call)} of CPU per call, {_us(rpc_floor)} per SVID "
                  "(1 process)")

    by_batch = {r.batch: r for r in results}
    print()
    big = by_batch.get(max(batches))
    if big is not None and big.issued:
        rate = big.issued / big.seconds
        print(f"ratio issuance / raw (batches of {big.batch}): {rate / raw:.3f} (goal >= 0.5); "
              f"per server CPU-second {1 / big.cpu_per_svid:,.0f} SVIDs vs raw "
              f"{raw_core:,.0f}: {(1 / big.cpu_per_svid) / raw_core:.3f}")
        print(f"ratio issuance / SVID floor (batches of {big.batch}): "
              f"{rate / svid_floor:.3f} (goal >= 0.75); per server CPU-second "
              f"{1 / big.cpu_per_svid:,.0f} vs {svid_floor_core:,.0f}: "
              f"{(1 / big.cpu_per_svid) / svid_floor_core:.3f}")
        wall = big.seconds * cores
        print(f"  CPU in that phase: server {big.server_cpu / wall:.0%} of {cores} cores, "
              f"clients {big.client_cpu / wall:.0%}")
    if big is not None and big.issued:
        # The breakdown keeps each step's best round; the floor loop ran for
        # seconds on every core, like the server. So the in-process steps are
        # taken at the floor loop's CPU per SVID, scaled by ours / floor.
        per_svid = big.cpu_per_svid * 1e6
        steps = floor_cpu * 1e6 * parts.ours / parts.floor
        print(f"  server CPU per SVID (batch of {big.batch}) {per_svid:.0f} µs = in-process "
              f"steps ~{steps:.0f} µs (the floor loop's {floor_cpu * 1e6:.0f} µs x ours / "
              f"floor {parts.ours / parts.floor:.2f}) + the rest ~{per_svid - steps:.0f} µs "
              "(the call's share, gRPC, TLS front, relay, threads)"
              + (f"; the RPC floor of such a batch is {rpc_floor * 1e6:.0f} µs per SVID"
                 if rpc_floor is not None else ""))
    one = by_batch.get(1)
    if one is not None and big is not None and one.issued and big.issued and big.batch > 1:
        print(f"ratio CPU per SVID, batch of 1 / batch of {big.batch}: "
              f"{one.cpu_per_svid / big.cpu_per_svid:.2f} (goal <= 2)")
    empty = by_batch.get(0)
    if empty is not None:
        print(f"fixed cost of a call (batch of 0, authenticated): {_us(empty.cpu_per_call)}"
              + (f" = floor {_us(floor.cpu_per_call)} + ours "
                 f"{_us(empty.cpu_per_call - floor.cpu_per_call)}" if floor else ""))
        if big is not None and big.issued:
            print(f"ratio fixed cost of a call / CPU per SVID (batch of {big.batch}): "
                  f"{empty.cpu_per_call / big.cpu_per_svid:.2f} (goal <= 1)")
    if floor is not None and big is not None and big.issued:
        print(f"ratio call floor / CPU per SVID (batch of {big.batch}): "
              f"{floor.cpu_per_call / big.cpu_per_svid:.2f} (the least a call can cost "
              "on this stack)")


if __name__ == "__main__":
    main()
