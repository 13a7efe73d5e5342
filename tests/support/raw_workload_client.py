"""A Workload API call made by hand, as another Unix user.

``python raw_workload_client.py UID SOCKET`` drops to UID (it must start as root)
and calls FetchX509SVID over HTTP/2 with the standard library only, printing
OK, DENIED, CLOSED or RESET. It is a fresh process rather than a fork of the
test process, because forking a process that runs grpc threads is unsafe (the
child can die silently), and it imports everything before dropping privileges
because the interpreter may live in a directory only root can enter.
"""

from __future__ import annotations

import os
import socket
import sys


def raw_fetch_x509(path: str) -> bytes:
    """FetchX509SVID by hand over HTTP/2, with the standard library only.

    Returns b"OK" when a message arrives, b"DENIED" when the call ends without
    one, b"CLOSED" or b"RESET" when the connection or stream is cut.
    """

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        head = len(payload).to_bytes(3, "big") + bytes([kind, flags])
        return head + stream.to_bytes(4, "big") + payload

    def literal(name: bytes, value: bytes) -> bytes:  # HPACK literal, no indexing, no Huffman
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    headers = b"".join(literal(n, v) for n, v in (
        (b":method", b"POST"), (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"), (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"workload.spiffe.io", b"true"),
    ))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
                  + frame(1, 4, 1, headers) + frame(0, 1, 1, b"\x00" * 5))
        buf = b""
        while True:
            while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
                chunk = s.recv(65536)
                if not chunk:
                    return b"CLOSED"
                buf += chunk
            size = int.from_bytes(buf[:3], "big")
            kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload, buf = buf[9:9 + size], buf[9 + size:]
            if kind == 4 and not flags & 1:
                s.sendall(frame(4, 1, 0, b""))  # acknowledge the server's SETTINGS
            elif kind == 0 and stream == 1 and len(payload) > 5:
                return b"OK"
            elif kind == 1 and stream == 1 and flags & 1:
                return b"DENIED"
            elif kind in (3, 7):
                return b"RESET"


def main() -> int:
    uid, path = int(sys.argv[1]), sys.argv[2]
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    sys.stdout.write(raw_fetch_x509(path).decode())
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
