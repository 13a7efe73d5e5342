"""Upstream authority from disk: the CA is an intermediate; openssl verifies the chain.

Also each bad ``[upstream_authority]`` file gives one clear ConfigError.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import migrations
from ca.authority import AuthorityConfig, CertificateAuthority
from ca.authority.upstream import load_upstream
from ca.config.authority import UpstreamConfig
from ca.datastore import Datastore
from ca.errors import ConfigError
from ca.keys import MemoryKeyManager
from identity.clock import SystemClock
from identity.keys import generate_private_key, private_key_to_pem
from identity.spiffeid import SpiffeId, TrustDomain
from identity.x509svid import certificates_to_pem, new_ca_certificate
from tests.support.require import require_program

TD = TrustDomain("example.org")


def _upstream_files(tmp: Path) -> UpstreamConfig:
    key = generate_private_key()
    now = dt.datetime.now(dt.UTC)
    root = new_ca_certificate(trust_domain=TD, public_key=key.public_key(), signer_key=key,
                              not_before=now - dt.timedelta(hours=1),
                              not_after=now + dt.timedelta(days=30))
    (tmp / "up.crt").write_bytes(root.public_bytes(Encoding.PEM))
    (tmp / "up.key").write_bytes(private_key_to_pem(key))
    return UpstreamConfig(cert_file=tmp / "up.crt", key_file=tmp / "up.key")


def test_svid_chain_verifies_with_openssl(tmp_path: Path) -> None:
    openssl = require_program("openssl")
    upstream = load_upstream(_upstream_files(tmp_path))
    url = f"sqlite:///{tmp_path / 'ds.sqlite3'}"
    migrations.upgrade(url)
    ca = CertificateAuthority(AuthorityConfig(
        trust_domain=TD, datastore=Datastore(url), key_manager=MemoryKeyManager(),
        clock=SystemClock(), ca_ttl=dt.timedelta(hours=24), upstream=upstream))
    ca.load_or_create()
    chain = ca.sign_x509_svid(SpiffeId.parse("spiffe://example.org/w"),
                              generate_private_key().public_key(), ttl=dt.timedelta(hours=1))
    assert len(chain) == 2  # leaf + our intermediate
    assert ca.bundle().x509_authorities == upstream.roots  # the root, not the intermediate
    (tmp_path / "bundle.pem").write_bytes(ca.bundle().x509_pem())
    (tmp_path / "inter.pem").write_bytes(certificates_to_pem(chain[1:]))
    (tmp_path / "leaf.pem").write_bytes(certificates_to_pem(chain[:1]))
    ok = subprocess.run([openssl, "verify", "-CAfile", str(tmp_path / "bundle.pem"),
                         "-untrusted", str(tmp_path / "inter.pem"), str(tmp_path / "leaf.pem")],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("leaf.pem: OK")
    # Without the intermediate the leaf does not verify: the chain is needed.
    bad = subprocess.run([openssl, "verify", "-CAfile", str(tmp_path / "bundle.pem"),
                          str(tmp_path / "leaf.pem")], capture_output=True, text=True,
                         check=False)
    assert bad.returncode != 0


def test_bad_upstream_files(tmp_path: Path) -> None:
    cfg = _upstream_files(tmp_path)
    with pytest.raises(ConfigError, match=r"upstream_authority.cert_file: cannot read"):
        load_upstream(UpstreamConfig(cert_file=tmp_path / "missing", key_file=cfg.key_file))
    (tmp_path / "junk").write_text("junk")
    with pytest.raises(ConfigError, match=r"cert_file: .*junk: cannot parse PEM certificates"):
        load_upstream(UpstreamConfig(cert_file=tmp_path / "junk", key_file=cfg.key_file))
    (tmp_path / "other.key").write_bytes(private_key_to_pem(generate_private_key()))
    with pytest.raises(ConfigError, match="key_file does not match the certificate"):
        load_upstream(UpstreamConfig(cert_file=cfg.cert_file, key_file=tmp_path / "other.key"))
    with pytest.raises(ConfigError, match=r"upstream_authority.key_file: .*junk"):
        load_upstream(UpstreamConfig(cert_file=cfg.cert_file, key_file=tmp_path / "junk"))
