"""attestation.relay: per-connection bound sockets, peer records, cleanup."""

from __future__ import annotations

import asyncio
import stat
import sys
from pathlib import Path

import pytest

from attestation import relay as relay_module
from attestation.relay import ConnectionRelay


def _grpc_peer(peername: str | bytes) -> str:
    """What grpcio's ``context.peer()`` reports for a Unix peer with this address."""
    if isinstance(peername, bytes):  # abstract: a leading NUL, then the name
        assert peername.startswith(b"\0")
        return "unix-abstract:" + peername[1:].decode()
    return f"unix:{peername}"


async def _no_connections_left(relay: ConnectionRelay[str]) -> None:
    for _ in range(200):
        if relay.connection_count == 0:
            break
        await asyncio.sleep(0.01)
    assert relay.connection_count == 0


async def _scenario() -> None:
    relay: ConnectionRelay[str] = ConnectionRelay(internal_socket_name="grpc.sock",
                                                  prefix="sigil-test-")
    relay.prepare_private_dir()
    private = relay.private_dir
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    seen: list[str | None] = []

    # The "internal server": an echo that looks its caller up the way a servicer does.
    async def internal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(relay.lookup(_grpc_peer(writer.get_extra_info("peername"))))
        while (data := await reader.read(1024)) and data != b"bye":
            writer.write(data)
            await writer.drain()
        writer.close()

    inner = await asyncio.start_unix_server(internal, path=str(relay.internal_socket))

    # The "front": accepts on a public socket and relays as peer "alice".
    async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with relay.tracked():
                await relay.relay(reader, writer, "alice")
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()

    public = private.parent / (private.name + "-public.sock")
    outer = await asyncio.start_unix_server(front, path=str(public))
    try:
        reader, writer = await asyncio.open_unix_connection(str(public))
        writer.write(b"ping")
        await writer.drain()
        assert await reader.readexactly(4) == b"ping"
        assert seen == ["alice"]
        # Far more than any socket or transport buffer, both ways at once: the
        # relay must pause and resume each side as the other's buffer fills.
        blob = bytes(range(256)) * (32 * 1024)  # 8 MiB

        async def send() -> None:
            writer.write(blob)
            await writer.drain()

        sender = asyncio.create_task(send())
        assert await reader.readexactly(len(blob)) == blob
        await sender
        assert relay.connection_count == 1
        # Nothing is left in the directory (an abstract name, or a bound path
        # unlinked once connected): only the internal socket.
        assert sorted(p.name for p in private.iterdir()) == ["grpc.sock"]
        writer.close()
        await _no_connections_left(relay)

        # The internal server closing ends the relay: the client sees EOF.
        reader, writer = await asyncio.open_unix_connection(str(public))
        writer.write(b"bye")  # the echo server closes after "bye"
        assert await reader.read() == b""
        writer.close()
        await _no_connections_left(relay)

        # A client that half-closes ends its relay too, whenever its EOF arrives
        # (here with its first bytes, before the relay has taken the transport).
        reader, writer = await asyncio.open_unix_connection(str(public))
        writer.write(b"half")
        writer.write_eof()
        await reader.read()  # the relay ends and the front closes the connection
        writer.close()
        await _no_connections_left(relay)

        # A connection that stays open is ended by cancel_all.
        reader, writer = await asyncio.open_unix_connection(str(public))
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        await relay.cancel_all()
        assert relay.connection_count == 0
        assert await reader.read() == b""
        writer.close()
    finally:
        outer.close()
        inner.close()
        await outer.wait_closed()
        await inner.wait_closed()
        public.unlink(missing_ok=True)
        relay.remove_private_dir()
    assert not private.exists()


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract-names", "bound-paths"])
def test_relay_records_peer_and_cleans_up(monkeypatch: pytest.MonkeyPatch, abstract: bool) -> None:
    if abstract and sys.platform != "linux":
        pytest.skip("abstract socket names are Linux only")
    monkeypatch.setattr(relay_module, "ABSTRACT_ADDRESSES", abstract)
    asyncio.run(_scenario())


def test_unknown_peers_are_not_found(tmp_path: Path) -> None:
    relay: ConnectionRelay[str] = ConnectionRelay(internal_socket_name="grpc.sock",
                                                  private_dir=tmp_path / "p")
    relay.prepare_private_dir()
    assert relay.lookup("unix:") is None
    assert relay.lookup(f"unix:{relay.connection_path(1)}") is None
    assert relay.lookup("unix-abstract:sigil-1") is None
    assert relay.lookup("ipv4:127.0.0.1:1") is None
    relay.remove_private_dir()  # not ours: left in place
    assert (tmp_path / "p").is_dir()
