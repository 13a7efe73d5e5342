"""``sigil-server localauthority``: through a real server's admin socket.

A whole cycle prepare -> activate -> taint -> revoke, every bad sequence answered
with one ``Error: ... (FAILED_PRECONDITION)`` line and exit 2, changing nothing.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from cryptography import x509

from tests.integration.conftest import RunningServer


def _json(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def _show(srv: RunningServer, kind: str) -> list[dict[str, str]]:
    doc = _json(srv.cli("localauthority", kind, "show", "--output", "json"))
    auths = doc["authorities"]
    assert isinstance(auths, list)
    return auths


def _fails(srv: RunningServer, *args: str, message: str) -> None:
    kind = args[0]
    before = _show(srv, kind)
    proc = srv.cli("localauthority", *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("Error: ")
    assert proc.stderr.count("\n") == 1
    assert message in proc.stderr, proc.stderr
    assert _show(srv, kind) == before


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["x509", "jwt"])
def test_cycle_and_bad_sequences(sigil_server: RunningServer, kind: str) -> None:
    srv = sigil_server
    (first,) = _show(srv, kind)
    assert first["status"] == "active"
    _fails(srv, kind, "activate", message=f"no {kind} authority is prepared")
    _fails(srv, kind, "taint", "--authority-id", first["authority_id"],
           message=f"only an old {kind} authority can be tainted")
    _fails(srv, kind, "revoke", "--authority-id", first["authority_id"],
           message="only a tainted one")
    _fails(srv, kind, "taint", "0000", message=f"no {kind} authority 0000 (NOT_FOUND)")

    prepared = _json(srv.cli("localauthority", kind, "prepare", "--output", "json"))
    assert prepared["status"] == "prepared"
    _fails(srv, kind, "prepare", message="activate it first (FAILED_PRECONDITION)")
    bundle = srv.cli("bundle", "show", "--format", "pem")
    if kind == "x509":  # published in the bundle before it signs anything
        assert bundle.stdout.count("BEGIN CERTIFICATE") == 2

    active = _json(srv.cli("localauthority", kind, "activate", "--output", "json"))
    assert active["authority_id"] == prepared["authority_id"]
    assert [a["status"] for a in _show(srv, kind)] == ["old", "active"]

    tainted = _json(srv.cli("localauthority", kind, "taint", "--authority-id",
                            first["authority_id"], "--output", "json"))
    assert tainted["status"] == "tainted"
    # The old authority signed the server's TLS certificate (x509) a moment ago:
    # revoke must wait for it unless forced.
    if kind == "x509":
        _fails(srv, kind, "revoke", "--authority-id", first["authority_id"],
               message="signed SVIDs valid until")
    revoked = srv.cli("localauthority", kind, "revoke", "--authority-id", first["authority_id"],
                      "--force")
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith("revoked ")
    assert [a["authority_id"] for a in _show(srv, kind)] == [prepared["authority_id"]]
    if kind == "x509":
        pem = srv.cli("bundle", "show", "--format", "pem").stdout
        (root,) = x509.load_pem_x509_certificates(pem.encode())
        ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        assert ski.value.digest.hex() == prepared["authority_id"]


def test_bad_kind_and_missing_argument(sigil_server: RunningServer) -> None:
    proc = sigil_server.cli("localauthority", "x509", "taint")
    assert proc.returncode == 2
    assert proc.stderr == ("Error: an authority ID is required (AUTHORITY_ID or "
                           "--authority-id; see `show`)\n")
    proc = sigil_server.cli("localauthority", "jwt", "revoke", "a", "--authority-id", "b")
    assert proc.returncode == 2
    assert proc.stderr == ("Error: give the authority ID once: as AUTHORITY_ID or as "
                           "--authority-id\n")
    # An ID that starts with "-" (JWT key ids may) goes through --authority-id.
    proc = sigil_server.cli("localauthority", "jwt", "taint", "--authority-id", "-nosuch")
    assert proc.returncode == 2
    assert "no jwt authority -nosuch (NOT_FOUND)" in proc.stderr
    proc = sigil_server.cli("localauthority", "rsa", "show")
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: No such command 'rsa'")
