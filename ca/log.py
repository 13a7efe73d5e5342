"""Server logs: :mod:`identity.logfmt` lines under the ``sigil.server`` logger.

Call :func:`event` with a fixed lowercase phrase and fields. Never pass a key or
a token as a field; log a token's id only.
"""

from __future__ import annotations

import logging

from identity import logfmt

LOGGER_NAME = "sigil.server"
_logger = logging.getLogger(LOGGER_NAME)


def configure(*, level: str = "info", fmt: str = "text") -> None:
    """Send server logs to stderr in the chosen format.

    The handler goes on the ``sigil`` logger, so the records of every ``sigil.*``
    logger in the server process come out the same way.
    """
    logfmt.configure("sigil", level=level, fmt=fmt)


def event(message: str, *, level: int = logging.INFO, exc_info: bool = False,
          **fields: object) -> None:
    """Log one event: a fixed lowercase phrase plus key=value fields."""
    logfmt.event(_logger, message, level=level, exc_info=exc_info, **fields)
