"""The agent API's connection cap fitted to the open-file limit (no sockets)."""

from __future__ import annotations

import asyncio
import resource
import ssl
import types

import pytest

from ca.api import tls_front
from ca.api.tls_front import FDS_PER_CONNECTION, RESERVED_FDS

INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(("soft", "hard", "wanted", "cap", "raised_to"), [
    # Room enough: nothing changes.
    (100_000, 100_000, 4096, 4096, None),
    (INF, INF, 4096, 4096, None),
    # The soft limit is raised as far as needed, within the hard one.
    (1024, 100_000, 4096, 4096, 4096 * FDS_PER_CONNECTION + RESERVED_FDS),
    (1024, INF, 4096, 4096, 4096 * FDS_PER_CONNECTION + RESERVED_FDS),
    # The hard limit is too low: raised to it, and the cap lowered to fit.
    (1024, 4096, 4096, (4096 - RESERVED_FDS) // FDS_PER_CONNECTION, 4096),
    # A small limit keeps a quarter for the rest.
    (800, 800, 4096, (800 - 200) // FDS_PER_CONNECTION, None),
    # Never below one connection.
    (2, 2, 4096, 1, None),
])
def test_cap_fits_the_open_file_limit(monkeypatch: pytest.MonkeyPatch, soft: int, hard: int,
                                      wanted: int, cap: int, raised_to: int | None) -> None:
    limits = {"now": (soft, hard)}
    set_to: list[int] = []

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE and value[1] == hard
        set_to.append(value[0])
        limits["now"] = value

    monkeypatch.setattr(tls_front.resource, "getrlimit", lambda _which: limits["now"])
    monkeypatch.setattr(tls_front.resource, "setrlimit", setrlimit)
    assert tls_front._fit_to_open_file_limit(wanted) == cap
    assert set_to == ([] if raised_to is None else [raised_to])


def test_summary_logs_a_flood_in_a_few_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[tuple[str, object, object]] = []
    monkeypatch.setattr(tls_front, "event", lambda what, **fields: lines.append(
        (what, fields["count"], fields["reason"])))

    async def flood() -> None:
        # Intervals end when the test says (_tick), not by the clock.
        summary = tls_front._Summary(interval=3600)
        for _ in range(1000):
            summary.count("tls handshake failed", 20, reason="timeout")
        summary.count("agent connections refused", 30, reason="per-address limit")
        summary._tick()  # end of the first interval
        for _ in range(1000):
            summary.count("tls handshake failed", 20, reason="timeout")
        summary._tick()  # end of the second: still flooding, still quiet
        summary._tick()  # a quiet interval: the next one is news again
        summary.count("tls handshake failed", 20, reason="timeout")
        summary.flush()  # at stop

    asyncio.run(flood())
    assert lines == [
        ("tls handshake failed", 1, "timeout"),  # the first at once
        ("agent connections refused", 1, "per-address limit"),
        ("tls handshake failed", 999, "timeout"),
        ("tls handshake failed", 1000, "timeout"),
        ("tls handshake failed", 1, "timeout"),
    ]


class _Contexts:
    """A TLS context source: the given contexts in turn, then raising."""

    def __init__(self, *good: ssl.SSLContext) -> None:
        self.good = list(good)

    def __call__(self) -> ssl.SSLContext:
        if self.good:
            return self.good.pop(0)
        raise OSError("the CA cannot sign the server certificate now")


def _server_context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def test_failed_rebuild_keeps_the_last_good_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # The handshake used to go on with the context of server start (its bundle,
    # its perhaps expired certificate) whenever rebuilding the context failed.
    logged: list[str] = []
    monkeypatch.setattr(tls_front, "event", lambda what, **_fields: logged.append(what))
    at_start, newer = _server_context(), _server_context()
    front = tls_front.TlsFront(host="127.0.0.1", port=0,
                               contexts=_Contexts(at_start, newer))
    try:
        front._last_good = front._contexts()  # as start() does, without listening
        hello = types.SimpleNamespace(context=at_start)
        assert front._on_sni(hello, "server.sigil.invalid", at_start) is None  # type: ignore[arg-type]
        assert hello.context is newer
        for _ in range(3):  # the source now fails: the newest good context serves
            hello = types.SimpleNamespace(context=at_start)
            assert front._on_sni(hello, "server.sigil.invalid", at_start) is None  # type: ignore[arg-type]
            assert hello.context is newer
        assert logged.count("server tls update failed") == 1  # once per kind of failure
    finally:
        front.stop()


def test_no_good_context_fails_the_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tls_front, "event", lambda what, **_fields: None)
    front = tls_front.TlsFront(host="127.0.0.1", port=0, contexts=_Contexts())
    try:
        base = _server_context()
        hello = types.SimpleNamespace(context=base)
        assert front._on_sni(hello, None, base) == ssl.ALERT_DESCRIPTION_INTERNAL_ERROR  # type: ignore[arg-type]
    finally:
        front.stop()
