"""Proxy logs: :mod:`identity.logfmt` lines under the ``sigil.proxy`` logger.

Never pass a key as a field; SPIFFE IDs, addresses and reasons only.
"""

from __future__ import annotations

import logging

from identity import logfmt

LOGGER_NAME = "sigil.proxy"
_logger = logging.getLogger(LOGGER_NAME)


def configure(*, level: str = "info", fmt: str = "text") -> None:
    """Send proxy logs to stderr in the chosen format."""
    logfmt.configure(LOGGER_NAME, level=level, fmt=fmt)


def event(message: str, *, level: int = logging.INFO, exc_info: bool = False,
          **fields: object) -> None:
    """Log one event: a fixed lowercase phrase plus key=value fields."""
    logfmt.event(_logger, message, level=level, exc_info=exc_info, **fields)


def enabled(level: int) -> bool:
    """True when a record at ``level`` would be written (skip building costly fields)."""
    return _logger.isEnabledFor(level)
