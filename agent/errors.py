"""The agent's errors. The Workload API servicer and the CLI map them to codes."""

from __future__ import annotations

from identity.errors import SigilError
from identity.refusal import RefusalReason


class AgentError(SigilError):
    """Base of the agent's own errors."""


class ConfigError(AgentError):
    """The configuration (file, environment or flags) is invalid."""


class EndpointAddressError(AgentError, ValueError):
    """A Workload API endpoint address breaks the Workload Endpoint standard."""


class BootstrapError(AgentError):
    """The agent cannot establish trust in the server or attest to it."""


class TrustDomainMismatchError(BootstrapError):
    """The server is the CA of another trust domain than the one configured.

    Found from the server's SVID during a TLS handshake, before any attestation
    data is sent: a join token is not spent on a server that cannot use it.
    """


class AttestationRefusedError(BootstrapError):
    """The server refused the attestation data itself (a spent or unknown join
    token, a token the attestor does not accept): sending it again cannot help."""


class ServerCallError(AgentError):
    """A call to the server's agent API failed.

    Attributes:
        code: the gRPC status code's name (``"PERMISSION_DENIED"``), or ``""`` when
            the failure was not a gRPC status (a malformed answer).
        reason: why the server refused the agent itself, from the status's
            trailing metadata (:mod:`identity.refusal`); None when it sent none.
            The agent acts on this, never on the words of the message.
    """

    def __init__(self, message: str, *, code: str = "",
                 reason: RefusalReason | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class NotReadyError(AgentError):
    """The agent has no SVID for an entitled entry yet."""
