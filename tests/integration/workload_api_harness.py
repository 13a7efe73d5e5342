"""A real Workload API (front + servicer on Unix sockets) over an in-memory cache.

The agent's event loop runs in a background thread, so blocking clients (grpc
sync stubs, py-spiffe) can call it from the test thread. Certificates and
JWT-SVIDs are real, made with the identity helpers.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agent.cache import Cache, CachedEntry
from agent.workload_api.server import WorkloadApiServer
from attestation.workload import DEFAULT_PROC_ROOT, WorkloadAttestor
from attestation.workload.unix import UnixAttestor
from identity.bundle import Bundle, JwtAuthority
from identity.jwtsvid import JwtSvid, parse_insecure, sign_jwt_svid
from identity.keys import generate_private_key, key_id
from identity.selectors import Selector
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate

T = TypeVar("T")
TD = TrustDomain("example.org")
AGENT_ID = SpiffeId.parse("spiffe://example.org/sigil/agent/join_token/test")


class TestCA:
    """A trust domain's CA and JWT key."""

    __test__ = False

    def __init__(self, td: TrustDomain = TD) -> None:
        self.td = td
        now = dt.datetime.now(dt.UTC)
        self.key = generate_private_key()
        self.cert = new_ca_certificate(
            trust_domain=td,
            public_key=self.key.public_key(),
            signer_key=self.key,
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + dt.timedelta(days=1),
        )
        self.jwt_key = generate_private_key()
        self.jwt_kid = key_id(self.jwt_key.public_key())

    def bundle(self) -> Bundle:
        return Bundle(
            trust_domain=self.td,
            x509_authorities=(self.cert,),
            jwt_authorities=(JwtAuthority(self.jwt_kid, self.jwt_key.public_key()),),
        )

    def svid(
        self, spiffe_id: SpiffeId | str, *, ttl: dt.timedelta = dt.timedelta(hours=1)
    ) -> X509Svid:
        sid = SpiffeId.parse(spiffe_id) if isinstance(spiffe_id, str) else spiffe_id
        key = generate_private_key()
        now = dt.datetime.now(dt.UTC)
        cert = new_svid_certificate(
            spiffe_id=sid,
            public_key=key.public_key(),
            ca_cert=self.cert,
            ca_key=self.key,
            not_before=now - dt.timedelta(seconds=10),
            not_after=now + ttl,
        )
        return X509Svid(sid, (cert,), key)

    async def sign_jwt(self, entry: CachedEntry, audience: Sequence[str]) -> JwtSvid:
        now = dt.datetime.now(dt.UTC)
        token = sign_jwt_svid(
            spiffe_id=entry.spiffe_id,
            audience=list(audience),
            key=self.jwt_key,
            key_id=self.jwt_kid,
            issued_at=now,
            expires_at=now + dt.timedelta(minutes=5),
        )
        return parse_insecure(token, audience=list(audience))


def entry(entry_id: str, spiffe_id: str, *selectors: str, hint: str = "") -> CachedEntry:
    return CachedEntry(
        id=entry_id,
        spiffe_id=SpiffeId.parse(spiffe_id),
        parent_id=AGENT_ID,
        selectors=frozenset(Selector.parse(s) for s in selectors),
        hint=hint,
    )


class Harness:
    """Runs a WorkloadApiServer on a loop in a background thread."""

    def __init__(
        self,
        *,
        first_response_timeout: float = 2.0,
        request_sync: Callable[[Harness], Coroutine[Any, Any, None]] | None = None,
        attestors: Sequence[WorkloadAttestor] | None = None,
        proc_root: Path | None = None,
        max_connections: int | None = None,
        **limits: Any,
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sg-wl-", dir="/tmp"))
        self.root.chmod(0o755)
        self.socket_path = self.root / "public" / "api.sock"
        self.ca = TestCA()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.cache: Cache = self.run(self._make_cache())
        self.server = WorkloadApiServer(
            socket_path=self.socket_path,
            cache=self.cache,
            attestors=list(attestors) if attestors is not None else [
                UnixAttestor(proc_root=proc_root or DEFAULT_PROC_ROOT)
            ],
            proc_root=proc_root or DEFAULT_PROC_ROOT,
            **({"max_connections": max_connections} if max_connections else {}),
            **limits,
            first_response_timeout=first_response_timeout,
            request_sync=(lambda: request_sync(self)) if request_sync else None,
        )
        self.run(self.server.start())

    async def _make_cache(self) -> Cache:
        return Cache(trust_domain=TD, jwt_signer=self.ca.sign_jwt)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the agent's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the agent's loop (cache mutations must)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def set_state(
        self, entries: Sequence[CachedEntry], *, sign: bool = True, bundles: bool = True
    ) -> dict[str, X509Svid]:
        """Install entries, bundles and (unless ``sign`` is false) fresh SVIDs."""
        svids = {e.id: self.ca.svid(e.spiffe_id) for e in entries} if sign else {}

        def apply() -> None:
            if bundles:
                self.cache.set_bundles({TD: self.ca.bundle()})
            self.cache.set_entries(entries)
            for entry_id, svid in svids.items():
                self.cache.set_x509_svid(entry_id, svid)

        self.call(apply)
        return svids

    def close(self) -> None:
        try:
            self.run(self.server.stop(grace=0.1))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)
