"""Helper mode's WIT-SVID files (``helper.wit_svid_file`` / ``wit_svid_key_file``):
the token and its private JWK from the agent's real FetchWITSVID stream over a Unix
socket, key 0600, each replaced atomically and rewritten on every rotation."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.errors import ConfigError
from agent.helper import HelperError, build_config, load_config_file, write_wit_files
from api.protos import workload_pb2 as pb
from identity.errors import WitSvidError
from identity.keys import generate_private_key, public_keys_equal
from identity.witsvid import (
    ReplayCache,
    load_private_jwk,
    parse_wit_svid_insecure,
    private_jwk,
    sign_wpt,
    validate_wit_svid,
    verify_presentation,
)
from tests.integration.test_agent_cli_helper import UID, WEB, run_helper, wait_until
from tests.integration.test_workload_api_wit import setup, wit_bundle
from tests.integration.workload_api_harness import Harness, entry


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def test_helper_writes_the_wit_svid_and_its_key(harness: Harness, tmp_path: Path) -> None:
    ca = setup(harness, [entry("w", WEB, UID)])
    out = tmp_path / "out"
    toml = tmp_path / "helper.toml"
    toml.write_text(f"[helper]\nsocket_path = '{harness.socket_path}'\ndir = '{out}'\n"
                    "wit_svid_file = 'wit_svid.token'\n"
                    f"wit_svid_key_file = '{tmp_path}/keys/wit_svid_key.json'\n")
    config = load_config_file(toml, {})
    assert (config.wit_svid_file, config.wit_svid_key_file) == (
        out / "wit_svid.token", tmp_path / "keys" / "wit_svid_key.json")
    old_umask = os.umask(0o022)
    helper, t = run_helper(config)
    try:
        wait_until(lambda: helper.wit_updates >= 1 and helper.updates >= 1)
    finally:
        helper.stop()
        t.join(timeout=10)
        os.umask(old_umask)
    assert not t.is_alive()
    token = config.wit_svid_file.read_text()  # type: ignore[union-attr]
    key_text = config.wit_svid_key_file.read_text()  # type: ignore[union-attr]
    assert stat.S_IMODE(config.wit_svid_key_file.stat().st_mode) == 0o600  # type: ignore[union-attr]
    assert stat.S_IMODE(config.wit_svid_file.stat().st_mode) == 0o644  # type: ignore[union-attr]
    # The X.509 files of the same helper, as before.
    assert (out / "svid.pem").exists() and (out / "svid.key").exists()

    # A relying party: the token validates with the WIT bundle, and a proof made
    # with the key from the file (a JWK with its alg) is accepted.
    now = dt.datetime.now(dt.UTC)
    bundle = wit_bundle(harness, ca)
    wit = validate_wit_svid(token, bundles=bundle, now=now)
    assert str(wit.spiffe_id) == WEB
    jwk = json.loads(key_text)
    assert jwk["alg"] == wit.confirmation_alg and "d" in jwk
    key = load_private_jwk(key_text)
    assert public_keys_equal(key.public_key(), wit.confirmation_key)
    proof = sign_wpt(wit_token=token, key=key, audience="https://db.example.org/",
                     expires_at=now + dt.timedelta(seconds=60))
    verified = verify_presentation(token, proof, bundles=bundle,
                                   audience="https://db.example.org/", now=now,
                                   replay_cache=ReplayCache())
    assert str(verified.spiffe_id) == WEB


def test_helper_rotates_the_wit_files_atomically_and_notifies(
        harness: Harness, tmp_path: Path) -> None:
    # A 3 s WIT-SVID rotates about every 1.5 s (half-life, jittered).
    setup(harness, [entry("w", WEB, UID)], ttl=dt.timedelta(seconds=3))
    out = tmp_path / "out"
    marks = tmp_path / "notified"
    config = build_config({
        "socket_path": str(harness.socket_path), "dir": str(out),
        "wit_svid_file": "wit.jwt", "wit_svid_key_file": "wit.jwk",
        "cmd": f"{sys.executable} -c \"open('{marks}', 'a').write('x')\""})
    helper, t = run_helper(config)
    stop = threading.Event()
    failures: list[str] = []
    reads: list[int] = []

    def read() -> None:
        # A reader polling during rotations sees a whole token and a whole key.
        while not stop.is_set():
            try:
                parse_wit_svid_insecure((out / "wit.jwt").read_text())
                load_private_jwk((out / "wit.jwk").read_text())
                reads.append(1)
            except FileNotFoundError:
                continue
            except WitSvidError as exc:
                failures.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    tokens: set[str] = set()
    keys: set[str] = set()
    try:
        def rotated() -> bool:
            if (out / "wit.jwt").exists():
                tokens.add((out / "wit.jwt").read_text())
                keys.add((out / "wit.jwk").read_text())
            return helper.wit_updates >= 3 and len(tokens) >= 3
        wait_until(rotated, timeout=30)
    finally:
        stop.set()
        reader.join(timeout=10)
        helper.stop()
        t.join(timeout=10)
    assert failures == [], failures[:3]
    assert reads
    assert len(keys) >= 3  # a new key pair with every WIT-SVID
    assert stat.S_IMODE((out / "wit.jwk").stat().st_mode) == 0o600
    # One notification per update written, X.509 and WIT alike.
    assert len(marks.read_text()) == helper.updates + helper.wit_updates
    assert helper.notify_failures == []
    # No temporary file is left behind.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_write_wit_files_refuses_a_mismatched_key_and_writes_nothing(tmp_path: Path) -> None:
    from identity.keys import key_id
    from identity.spiffeid import SpiffeId
    from identity.witsvid import sign_wit_svid

    signer, workload, other = generate_private_key(), generate_private_key(), generate_private_key()
    now = dt.datetime.now(dt.UTC)
    token = sign_wit_svid(spiffe_id=SpiffeId.parse(WEB), workload_key=workload.public_key(),
                          key=signer, key_id=key_id(signer.public_key()), issued_at=now,
                          expires_at=now + dt.timedelta(minutes=5))
    paths = {"svid_path": tmp_path / "wit.jwt", "key_path": tmp_path / "wit.jwk"}
    bad = [
        (pb.WITSVIDResponse(), "the agent sent no WIT-SVID"),
        (pb.WITSVIDResponse(svids=[pb.WITSVID(
            spiffe_id=WEB, wit_svid=token, wit_svid_key=json.dumps(private_jwk(other)))]),
         "not its cnf key"),
        (pb.WITSVIDResponse(svids=[pb.WITSVID(spiffe_id=WEB, wit_svid=token,
                                              wit_svid_key="{")]), "unusable"),
        (pb.WITSVIDResponse(svids=[pb.WITSVID(
            spiffe_id=WEB, wit_svid="a.b.c", wit_svid_key=json.dumps(private_jwk(workload)))]),
         "unusable"),
    ]
    for response, message in bad:
        with pytest.raises(HelperError, match=message):
            write_wit_files(response, **paths)
        assert list(tmp_path.iterdir()) == []
    good = pb.WITSVIDResponse(svids=[pb.WITSVID(
        spiffe_id=WEB, wit_svid=token, wit_svid_key=json.dumps(private_jwk(workload)))])
    assert write_wit_files(good, **paths).token == token
    assert (tmp_path / "wit.jwt").read_text() == token


@pytest.mark.parametrize(("extra", "message"), [
    ({"wit_svid_file": "wit.jwt"}, "go together: give both or neither"),
    ({"wit_svid_key_file": "wit.jwk"}, "go together: give both or neither"),
    ({"wit_svid_file": "svid.pem", "wit_svid_key_file": "wit.jwk"}, "would overwrite"),
    ({"wit_svid_file": "wit.jwt", "wit_svid_key_file": "svid.key"}, "would overwrite"),
    ({"wit_svid_file": "wit.jwt", "wit_svid_key_file": "wit.jwt"}, "would overwrite"),
    ({"bundle_map_file": "m.json", "wit_svid_file": "m.json", "wit_svid_key_file": "k"},
     "would overwrite"),
])
def test_wit_file_settings_are_checked(tmp_path: Path, extra: dict[str, str],
                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"socket_path": "/run/x.sock", "dir": str(tmp_path), **extra})


def test_helper_cli_flags_name_the_wit_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["helper", "--socket-path", "/nonexistent/s.sock",
                                       "--dir", str(tmp_path), "--wit-svid-file", "w.jwt"])
    assert result.exit_code == 2
    assert "go together" in result.output
    help_text = CliRunner().invoke(main, ["helper", "--help"]).output
    assert "--wit-svid-file" in help_text and "--wit-svid-key-file" in help_text
