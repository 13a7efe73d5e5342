"""The server's error tree.

Domain code raises these; the gRPC edge (``ca.api.status``) maps each class to a
status code in one table, and the CLI maps them to exit codes.
"""

from __future__ import annotations

from identity.errors import SigilError
from identity.refusal import RefusalReason


class ServerError(SigilError):
    """Base of every error the server raises on purpose."""


class ConfigError(ServerError, ValueError):
    """The configuration (file, environment or flags) is invalid."""


class InvalidArgumentError(ServerError, ValueError):
    """A request carries a malformed or out-of-range value."""


class NotFoundError(ServerError):
    """The named record does not exist."""


class AlreadyExistsError(ServerError):
    """A record with the same identity already exists."""


class ConflictError(ServerError):
    """The record changed concurrently; the caller may read it again and retry."""


class PermissionDeniedError(ServerError):
    """The caller is known but not allowed to do this.

    Attributes:
        reason: why, as a token the agent acts on (sent in the trailing metadata
            by ``ca.api.status``); None when no agent needs to tell it apart.
    """

    def __init__(self, message: str, *, reason: RefusalReason | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class UnauthenticatedError(ServerError):
    """The caller did not prove who it is."""


class DatastoreError(ServerError):
    """The datastore failed in a way the caller cannot fix."""


class KeyManagerError(ServerError):
    """A key could not be created, stored or loaded."""


class FailedPreconditionError(ServerError):
    """The request is valid but the system is not in a state that allows it."""
