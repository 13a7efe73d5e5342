"""identity.logfmt: the text and JSON lines both services write."""

from __future__ import annotations

import json
import logging

import pytest

from identity import logfmt


def _record(message: str, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("sigil.test", logging.WARNING, __file__, 1, message, None, None)
    record.fields = fields
    return record


def test_format_value_quotes_only_ambiguous_values() -> None:
    assert logfmt.format_value("plain") == "plain"
    assert logfmt.format_value(42) == "42"
    assert logfmt.format_value("") == '""'
    assert logfmt.format_value("two words") == '"two words"'
    assert logfmt.format_value('a"b') == '"a\\"b"'
    assert logfmt.format_value("k=v") == '"k=v"'


def test_text_line() -> None:
    line = logfmt.TextFormatter().format(_record("agent attested", id="x", reason="a b"))
    assert line == 'warning agent attested id=x reason="a b"'


def test_json_line() -> None:
    doc = json.loads(logfmt.JsonFormatter().format(_record("sync", n=3, ok=True, td="x")))
    assert doc == {"level": "warning", "event": "sync", "n": 3, "ok": True, "td": "x"}


def test_configure_and_event(capsys: pytest.CaptureFixture[str]) -> None:
    name = "sigil.logfmt-test"
    logger = logging.getLogger(name)
    try:
        logfmt.configure(name, level="debug", fmt="json")
        assert logger.level == logging.DEBUG and not logger.propagate
        logfmt.event(logger, "thing happened", level=logging.DEBUG, count=2)
        doc = json.loads(capsys.readouterr().err)
        assert doc == {"level": "debug", "event": "thing happened", "count": 2}
        logfmt.configure(name, level="warning", fmt="text")
        assert len(logger.handlers) == 1
        logfmt.event(logger, "ignored", level=logging.INFO)
        logfmt.event(logger, "kept", level=logging.ERROR, message="x y")
        assert capsys.readouterr().err == 'error kept message="x y"\n'
    finally:
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
