"""sigil-proxy: an mTLS sidecar for programs that speak plain TCP.

A Workload API client like any workload: it imports only :mod:`identity` and the
generated Workload API messages, never ``agent`` or ``ca`` (DESIGN.md, Layout).
"""
