"""The agent's ``[broker]`` table (the SPIFFE Broker API): defaults, values, refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import BrokerSettings, load_config
from agent.errors import ConfigError
from identity.spiffeid import SpiffeId

BASE = 'trust_domain = "example.org"\nserver_address = "sigil-server:8081"\n'


def _load(tmp_path: Path, table: str) -> BrokerSettings:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + table)
    return load_config(path).broker


def test_off_by_default(tmp_path: Path) -> None:
    got = _load(tmp_path, "")
    assert got == BrokerSettings(socket_path=None, listen_address=None, authorized=())
    assert not got.enabled


def test_every_key(tmp_path: Path) -> None:
    got = _load(tmp_path, """
[broker]
socket_path = "/run/sigil-agent/broker/broker.sock"
authorized = ["spiffe://example.org/csi", "spiffe://example.org/proxy"]
""")
    assert got == BrokerSettings(
        socket_path=Path("/run/sigil-agent/broker/broker.sock"),
        authorized=(SpiffeId.parse("spiffe://example.org/csi"),
                    SpiffeId.parse("spiffe://example.org/proxy")))


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:8200", ("127.0.0.1", 8200)),
    ("[::1]:8200", ("::1", 8200)),
    ("10.0.0.5:0", ("10.0.0.5", 0)),
])
def test_tcp_only(tmp_path: Path, value: str, expected: tuple[str, int]) -> None:
    got = _load(tmp_path, f'[broker]\nlisten_address = "{value}"\n'
                          'authorized = ["spiffe://example.org/proxy"]\n')
    assert got == BrokerSettings(socket_path=None, listen_address=expected,
                                 authorized=(SpiffeId.parse("spiffe://example.org/proxy"),))
    assert got.enabled


@pytest.mark.parametrize(("table", "message"), [
    ("[broker]\nsocket = \"/x.sock\"\n", "unknown key 'broker.socket'"),
    ("[broker]\nsocket_path = \"/x.sock\"\n", "at least one SPIFFE ID"),
    ("[broker]\nsocket_path = \"x.sock\"\nauthorized = [\"spiffe://example.org/b\"]\n",
     "absolute path"),
    ("[broker]\nsocket_path = \"/x.sock\"\nauthorized = [\"not-an-id\"]\n",
     "broker.authorized"),
    ("[broker]\nsocket_path = \"/x.sock\"\nauthorized = \"spiffe://example.org/b\"\n",
     "list of SPIFFE IDs"),
    ('socket_path = "/run/a.sock"\n[broker]\nsocket_path = "/run/a.sock"\n'
     'authorized = ["spiffe://example.org/b"]\n', "must differ from socket_path"),
    ('[broker]\nlisten_address = "127.0.0.1:8200"\n', "at least one SPIFFE ID"),
    ('[broker]\nlisten_address = "localhost:8200"\nauthorized = ["spiffe://example.org/b"]\n',
     "broker.listen_address: the host must be an IP address, not 'localhost'"),
    ('[broker]\nlisten_address = "127.0.0.1"\nauthorized = ["spiffe://example.org/b"]\n',
     "broker.listen_address: "),
    ('[broker]\nlisten_address = "127.0.0.1:70000"\nauthorized = ["spiffe://example.org/b"]\n',
     "broker.listen_address: "),
    ('[broker]\nlisten_address = 8200\nauthorized = ["spiffe://example.org/b"]\n',
     "broker.listen_address must be a string"),
])
def test_refused(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        _load(tmp_path, table)
    assert "\n" not in str(caught.value)  # one line
