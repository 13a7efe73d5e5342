"""Structured logging: one event a line, ``event words key=value ...`` or JSON.

Call :func:`event` with a fixed lowercase phrase and fields. Never pass a key or
a token as a field; log a token's id only.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

LOGGER_NAME = "sigil.server"
_logger = logging.getLogger(LOGGER_NAME)


def _format_value(value: object) -> str:
    text = str(value)
    # Quote values a naive key=value splitter would misread.
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``LEVEL event words key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [record.levelname.lower(), record.getMessage()]
        parts += [f"{k}={_format_value(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``{"level":..., "event":..., fields...}``."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        doc: dict[str, Any] = {"level": record.levelname.lower(), "event": record.getMessage()}
        doc.update({k: v if isinstance(v, int | float | bool) else str(v)
                    for k, v in fields.items()})
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=False)


def configure(*, level: str = "info", fmt: str = "text") -> None:
    """Send server logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("sigil")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def event(message: str, *, level: int = logging.INFO, exc_info: bool = False,
          **fields: object) -> None:
    """Log one event: a fixed lowercase phrase plus key=value fields."""
    _logger.log(level, message, extra={"fields": fields}, exc_info=exc_info)
