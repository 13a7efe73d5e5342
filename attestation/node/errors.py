"""Errors of the node attestation plugins."""

from __future__ import annotations

from identity.errors import SigilError


class AttestationError(SigilError):
    """Attestation data was rejected. The message says why, without secrets."""


class MalformedAttestationError(AttestationError, ValueError):
    """The attestation payload could not be parsed at all."""


class UnknownAttestorError(AttestationError):
    """No attestor of that name is enabled."""


class AttestorUnavailableError(AttestationError):
    """The attestor could not check the data right now (its backend is unreachable).

    Not the agent's fault: it may retry.
    """
