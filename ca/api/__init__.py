"""The server's gRPC edge: agent API (TLS on TCP) and admin API (Unix socket)."""
