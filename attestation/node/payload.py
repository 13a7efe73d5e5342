"""Decoding an attestor's JSON payload, network input every attestor shares."""

from __future__ import annotations

import json
from typing import Any

from attestation.node.errors import MalformedAttestationError


def load_json(payload: bytes, attestor: str) -> Any:
    """The payload's JSON document.

    Raises:
        MalformedAttestationError: not UTF-8 JSON, or nested too deeply for the
            decoder (``json.loads`` raises RecursionError, not ValueError, on
            ``[[[[...``).
    """
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedAttestationError(f"{attestor} payload is not JSON") from None
