"""identity.configvalues: the duration and HOST:PORT forms both configurations use."""

from __future__ import annotations

import datetime as dt

import pytest

from identity.configvalues import layer_settings, parse_duration, parse_host_port
from identity.errors import InvalidValueError, SigilError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", dt.timedelta(milliseconds=500)),
        ("90s", dt.timedelta(seconds=90)),
        ("5m", dt.timedelta(minutes=5)),
        ("1h30m", dt.timedelta(minutes=90)),
        ("2d", dt.timedelta(days=2)),
        ("1s500ms", dt.timedelta(milliseconds=1500)),
        ("3ms", dt.timedelta(milliseconds=3)),
        ("600", dt.timedelta(seconds=600)),
        (60, dt.timedelta(seconds=60)),
    ],
)
def test_durations(text: str | int, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid"),
        ("0", "greater than zero"),
        ("-10", "invalid"),
        ("1.5h", "invalid"),
        ("-5m", "invalid"),
        ("1h ", "invalid"),
        ("0s", "greater than zero"),
        ("0ms", "greater than zero"),
        (1.5, "must be a string"),
        (True, "must be a string"),
    ],
)
def test_bad_durations(text: object, message: str) -> None:
    with pytest.raises(InvalidValueError, match=message) as info:
        parse_duration(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SigilError)


@pytest.mark.parametrize("text", ["500ms", "1s500ms", "10ms"])
def test_milliseconds_can_be_refused(text: str) -> None:
    with pytest.raises(InvalidValueError, match="unit s, m, h or d"):
        parse_duration(text, allow_milliseconds=False)
    assert parse_duration("1h30m", allow_milliseconds=False) == dt.timedelta(minutes=90)


def test_host_port() -> None:
    assert parse_host_port("0.0.0.0:8081", allow_port_zero=False) == ("0.0.0.0", 8081)
    assert parse_host_port("[::1]:443", allow_port_zero=False) == ("[::1]", 443)
    assert parse_host_port("h:0", allow_port_zero=True) == ("h", 0)
    assert parse_host_port("h:65535", allow_port_zero=True) == ("h", 65535)


@pytest.mark.parametrize(
    ("text", "allow_zero", "message"),
    [
        ("nope", True, "HOST:PORT"),
        (":8081", True, "HOST:PORT"),
        ("h:", True, "HOST:PORT"),
        ("h:-1", True, "HOST:PORT"),
        ("h:70000", True, "outside 0..65535"),
        ("h:0", False, "outside 1..65535"),
    ],
)
def test_bad_host_port(text: str, allow_zero: bool, message: str) -> None:
    with pytest.raises(InvalidValueError, match=message):
        parse_host_port(text, allow_port_zero=allow_zero)


def test_layer_settings_precedence() -> None:
    raw = layer_settings(
        {"a": "default", "b": "default", "c": "default", "d": "default"},
        {"b": "file", "c": "file", "d": "file"},
        env={"X_C": "env", "X_D": "env", "X_A": "", "OTHER": "ignored"},
        env_vars={"X_A": "a", "X_C": "c", "X_D": "d"},
        overrides={"d": "flag", "a": None},
        known_keys={"a", "b", "c", "d"},
    )
    assert raw == {"a": "default", "b": "file", "c": "env", "d": "flag"}
    assert layer_settings({"a": 1}, {}, env=None, env_vars={"X_A": "a"}, overrides=None,
                          known_keys={"a"}) == {"a": 1}


def test_layer_settings_refuses_unknown_override() -> None:
    with pytest.raises(InvalidValueError, match="unknown setting 'zz'"):
        layer_settings({}, {}, env=None, env_vars={}, overrides={"zz": 1}, known_keys={"a"})
