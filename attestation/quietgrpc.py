"""Keep grpc's C core from writing its own lines on the terminal.

Without a setting, grpc's C core writes a line to stderr for events such as each
failed TLS handshake (``I1203 ... ssl_transport_security.cc ... Handshake
failed``): noise next to our one-line message that already names the cause and
the fix. ``GRPC_VERBOSITY`` is read once, when grpc loads, so the command-line
programs import this module before anything imports grpc. An operator who sets
``GRPC_VERBOSITY`` (debugging) keeps their value.

Both command-line programs need it (sigil-server and sigil-agent), so it lives
here, where ``ca`` and ``agent`` may both import it (DESIGN.md: they import
``attestation``, never each other), as ``relay.py`` and ``socketdir.py`` do.
Not in ``identity``: that package promises no I/O and no gRPC, and this
module's only purpose is a process-wide side effect on how gRPC behaves.
Importing it loads nothing else: ``attestation/__init__.py`` imports nothing,
so nothing here can load grpc before the setting is made.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
