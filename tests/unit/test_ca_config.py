"""ca.config.server: parsing, validation and precedence."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ca.config.server import load_config, parse_duration
from ca.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("5m", 300), ("1h", 3600), ("2d", 172800), ("1h30m", 5400), ("600", 600)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid"),
        ("10x", "invalid"),
        ("h", "invalid"),
        ("1x", "invalid"),
        ("1h ", "invalid"),
        ("-5m", "invalid"),
        ("0s", "greater than zero"),
        ("1.5h", "invalid"),
        (1.5, "must be a string"),
    ],
)
def test_bad_durations(text: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_duration(text)  # type: ignore[arg-type]


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(body)
    return path


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(overrides={"trust_domain": "example.org", "data_dir": str(tmp_path)})
    assert cfg.trust_domain.name == "example.org"
    assert cfg.bind_address == "0.0.0.0:8081"
    assert cfg.ca_ttl == dt.timedelta(hours=24)
    assert cfg.x509_svid_ttl == dt.timedelta(hours=1)
    assert cfg.jwt_svid_ttl == dt.timedelta(minutes=5)
    assert cfg.join_token_ttl == dt.timedelta(minutes=10)
    assert cfg.database_url == f"sqlite:///{tmp_path / 'datastore.sqlite3'}"
    assert str(cfg.socket_path) == "/run/sigil-server/private/admin.sock"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('trust_domain = "example.org"\nbogus = 1\n', "server.toml: unknown key 'bogus'"),
        ('trust_domain = "Example.ORG"\n', "trust_domain"),
        ('trust_domain = "example.org"\nca_ttl = "1y"\n', "ca_ttl"),
        ('trust_domain = "example.org"\nx509_svid_ttl = 1.5\n', "x509_svid_ttl"),
        ('trust_domain = "example.org"\nca_ttl = "1h"\nx509_svid_ttl = "2h"\n',
         "must not be longer than ca_ttl"),
        ('trust_domain = "example.org"\nbind_address = "nope"\n', "HOST:PORT"),
        ('trust_domain = "example.org"\nbind_address = "h:70000"\n', "outside"),
        ('trust_domain = "example.org"\nca_key_type = "dsa"\n', "ca_key_type"),
        ('trust_domain = "example.org"\nca_key_type = "ml-dsa-65"\n',
         "ca_key_type 'ml-dsa-65' is for JWT keys only"),
        ('trust_domain = "example.org"\njwt_key_type = "ml-dsa-87"\nkey_manager = "pkcs11"\n'
         '[pkcs11]\nmodule_path = "/m.so"\ntoken_label = "t"\n',
         "jwt_key_type 'ml-dsa-87' needs key_manager \"disk\" or \"memory\""),
        ('trust_domain = "example.org"\njwt_key_type = "ml-dsa-66"\n',
         "jwt_key_type 'ml-dsa-66' is not one of: .*ml-dsa-44, ml-dsa-65, ml-dsa-87"),
        ('trust_domain = "example.org"\nlog_format = "xml"\n', "log_format"),
        ('trust_domain = "example.org"\nlog_level = "loud"\n', "log_level"),
        ("data_dir = 'x'\n", "trust_domain is required"),
        ("trust_domain = \n", "not valid TOML"),
    ],
)
def test_bad_files(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, body))


@pytest.mark.parametrize("name", ["ec-p256", "ec-p384", "rsa-2048", "rsa-4096",
                                  "ml-dsa-44", "ml-dsa-65", "ml-dsa-87"])
def test_jwt_key_types(tmp_path: Path, name: str) -> None:
    cfg = load_config(_write(tmp_path, f'trust_domain = "example.org"\njwt_key_type = "{name}"\n'))
    assert cfg.jwt_key_type.value == name
    assert cfg.ca_key_type.value == "ec-p256"


def test_durations_in_seconds_or_with_a_unit(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, 'trust_domain = "example.org"\n'
                             'x509_svid_ttl = 600\njwt_svid_ttl = "120"\nca_ttl = "1h"\n'))
    assert cfg.x509_svid_ttl == dt.timedelta(minutes=10)
    assert cfg.jwt_svid_ttl == dt.timedelta(minutes=2)
    assert cfg.ca_ttl == dt.timedelta(hours=1)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_precedence(tmp_path: Path) -> None:
    path = _write(tmp_path, 'trust_domain = "file.org"\ndata_dir = "/f"\nlog_level = "debug"\n'
                  'bind_address = "127.0.0.1:1"\n')
    env = {"SIGIL_TRUST_DOMAIN": "env.org", "SIGIL_DATA_DIR": "/e", "SIGIL_UNRELATED": "x",
           "SIGIL_BIND_ADDRESS": "127.0.0.1:2"}
    cfg = load_config(path, env=env, overrides={"data_dir": "/c", "bind_address": None})
    assert cfg.trust_domain.name == "env.org"  # env beats file
    assert cfg.data_dir == Path("/c")  # flag beats env
    assert cfg.bind_address == "127.0.0.1:2"  # a None flag is "not given"
    assert cfg.log_level == "debug"  # file beats default


def test_port_zero_allowed() -> None:
    cfg = load_config(overrides={"trust_domain": "example.org", "bind_address": "127.0.0.1:0"})
    assert cfg.bind_address == "127.0.0.1:0"
