"""Agent logs: :mod:`identity.logfmt` lines under the ``sigil.agent`` logger.

Call :func:`event` with a fixed lowercase phrase and fields. Never pass a key or
a join token as a field.
"""

from __future__ import annotations

import logging

from identity import logfmt

LOGGER_NAME = "sigil.agent"
_logger = logging.getLogger(LOGGER_NAME)


def configure(*, level: str = "info", fmt: str = "text") -> None:
    """Send agent logs to stderr in the chosen format."""
    logfmt.configure(LOGGER_NAME, level=level, fmt=fmt)


def event(message: str, *, level: int = logging.INFO, exc_info: bool = False,
          **fields: object) -> None:
    """Log one event: a fixed lowercase phrase plus key=value fields."""
    logfmt.event(_logger, message, level=level, exc_info=exc_info, **fields)
