"""The quick start's first command: the demo runs to the end and says what it did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_completes_mutual_tls() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "demo.py")],
        capture_output=True, text=True, timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "[backend] got X.509-SVID spiffe://demo.sigil.test/backend" in out
    assert "[frontend] got X.509-SVID spiffe://demo.sigil.test/frontend" in out
    td = "spiffe://demo.sigil.test"
    assert f"[frontend] TLS handshake done; server proved SPIFFE ID {td}/backend" in out
    assert f"[backend] TLS handshake done; peer proved SPIFFE ID {td}/frontend" in out
    assert "JWT-SVID in the request validated by the agent" in out
    # Step 6: curl -> sigil-proxy -> sigil-proxy -> http.server, and a refused stranger.
    assert "6. Plain HTTP through two sigil-proxy sidecars" in out
    assert "  ->  hello from an unmodified HTTP server" in out
    assert "  ->  refused (the connection is closed)" in out
    assert ("warning connection denied listener=inbound:127.0.0.1:" in out
            and f"peer_id={td}/sidecar/stranger reason=not_allowed "
            f'detail="not in the allow list ({td}/sidecar/client)"' in out), out
    assert "Done:" in out
