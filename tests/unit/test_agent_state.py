"""The agent's own SVID on disk: one 0600 file, replaced in one rename."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from agent.state import SVID_FILE, AgentState
from identity.keys import generate_private_key
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import X509Svid, new_ca_certificate, new_svid_certificate

TD = TrustDomain("state.test")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _svid(name: str) -> X509Svid:
    ca_key = generate_private_key()
    ca = new_ca_certificate(
        trust_domain=TD, public_key=ca_key.public_key(), signer_key=ca_key,
        not_before=NOW, not_after=NOW + dt.timedelta(days=1),
    )
    key = generate_private_key()
    sid = SpiffeId.parse(f"spiffe://state.test/sigil/agent/join_token/{name}")
    leaf = new_svid_certificate(
        spiffe_id=sid, public_key=key.public_key(), ca_cert=ca, ca_key=ca_key,
        not_before=NOW, not_after=NOW + dt.timedelta(hours=1),
    )
    return X509Svid(sid, (leaf,), key)


def test_svid_and_key_round_trip_in_one_private_file(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "data")
    state.prepare()
    assert state.load_svid() is None
    first = _svid("one")
    state.save_svid(first)
    path = tmp_path / "data" / SVID_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [SVID_FILE]
    loaded = state.load_svid()
    assert loaded is not None
    assert loaded.spiffe_id == first.spiffe_id
    assert loaded.key_der() == first.key_der()

    second = _svid("two")
    state.save_svid(second)
    again = state.load_svid()
    assert again is not None and again.spiffe_id == second.spiffe_id
    assert again.key_der() == second.key_der()


def test_unusable_file_is_ignored_not_fatal(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    (tmp_path / SVID_FILE).write_bytes(
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    assert state.load_svid() is None
