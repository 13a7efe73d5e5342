"""The agent's ``[sds]`` table: defaults, values, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import SdsSettings, load_config
from agent.errors import ConfigError

BASE = 'trust_domain = "example.org"\nserver_address = "sigil-server:8081"\n'


def _load(tmp_path: Path, table: str) -> SdsSettings:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + table)
    return load_config(path).sds


def test_defaults_are_spires_names(tmp_path: Path) -> None:
    assert _load(tmp_path, "") == SdsSettings(
        enabled=True, default_svid_name="default", default_bundle_name="ROOTCA",
        default_all_bundles_name="ALL", disable_spiffe_cert_validation=False)


def test_every_key(tmp_path: Path) -> None:
    got = _load(tmp_path, """
[sds]
enabled = false
default_svid_name = "svid"
default_bundle_name = "ca"
default_all_bundles_name = "all-of-them"
disable_spiffe_cert_validation = true
""")
    assert got == SdsSettings(False, "svid", "ca", "all-of-them", True)


@pytest.mark.parametrize(("table", "message"), [
    ("[sds]\nenable = true\n", "unknown key 'sds.enable'"),
    ("sds = 1\n", "sds must be a table"),
    ("[sds]\nenabled = \"yes\"\n", "sds.enabled must be true or false"),
    ("[sds]\ndefault_svid_name = \"\"\n", "sds.default_svid_name must be a non-empty string"),
    ("[sds]\ndefault_bundle_name = 3\n", "sds.default_bundle_name must be a non-empty string"),
    ("[sds]\ndefault_bundle_name = \"ALL\"\n", "must differ"),
    ("[sds]\ndisable_spiffe_cert_validation = 1\n",
     "sds.disable_spiffe_cert_validation must be true or false"),
])
def test_refused(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, table)
