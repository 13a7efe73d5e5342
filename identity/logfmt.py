"""Structured log lines: one event a line, ``level event words key=value ...`` or JSON.

The server and the agent log the same way; each binds its own logger name in a
thin module (``ca.log``, ``agent.log``) that calls :func:`configure` and
:func:`event` here. Never pass a key or a token as a field; log a token's id only.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

# What a configuration may ask for: the level names configure() accepts and its formats.
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def format_value(value: object) -> str:
    """A field value for a text line, quoted where a naive key=value splitter would misread it."""
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``level event words key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [record.levelname.lower(), record.getMessage()]
        parts += [f"{k}={format_value(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``{"level": ..., "event": ..., fields...}``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        doc: dict[str, Any] = {"level": record.levelname.lower(), "event": record.getMessage()}
        doc.update(
            {k: v if isinstance(v, int | float | bool) else str(v) for k, v in fields.items()}
        )
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(logger_name: str, *, level: str = "info", fmt: str = "text") -> None:
    """Send the records of ``logger_name`` (and its children) to stderr in ``fmt``.

    Args:
        logger_name: the logger to configure; it stops propagating to the root.
        level: a logging level name (``debug``, ``info``, ...).
        fmt: ``json`` for JSON lines, anything else for text lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def event(logger: logging.Logger, message: str, /, *, level: int = logging.INFO,
          exc_info: bool = False, **fields: object) -> None:
    """Log one event on ``logger``: a fixed lowercase phrase plus key=value fields."""
    logger.log(level, message, extra={"fields": fields}, exc_info=exc_info)
