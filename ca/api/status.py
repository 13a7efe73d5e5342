"""The one table that turns our errors into gRPC status codes, and the decorator
every servicer method uses.

Domain code raises SigilError subclasses; here, and only here, they become codes.
An exception not in the table is a bug: INTERNAL, with its traceback logged and
no detail sent to the caller.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc

from attestation.node.errors import (
    AttestationError,
    AttestorUnavailableError,
    MalformedAttestationError,
    UnknownAttestorError,
)
from ca.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from ca.log import event
from ca.metrics import count_error
from ca.ratelimit import RateLimitedError
from identity.errors import InvalidKeyError, InvalidSelectorError, InvalidSpiffeIdError
from identity.refusal import REASON_KEY

STATUS_TABLE: Mapping[type[BaseException], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSpiffeIdError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidSelectorError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidKeyError: grpc.StatusCode.INVALID_ARGUMENT,
    MalformedAttestationError: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownAttestorError: grpc.StatusCode.PERMISSION_DENIED,
    AttestationError: grpc.StatusCode.PERMISSION_DENIED,
    # The attestor's backend (a cluster's API) is down: not the agent's fault, retry.
    AttestorUnavailableError: grpc.StatusCode.UNAVAILABLE,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    ConflictError: grpc.StatusCode.ABORTED,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    RateLimitedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: its most specific class in the table."""
    for cls in type(exc).__mro__:
        code = STATUS_TABLE.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])


def grpc_method(api: str) -> Callable[[F], F]:
    """Wrap a servicer method: map raised errors to a status and log the outcome once."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(self, request, context)
            except Exception as exc:
                code = status_for(exc)
                count_error(api, fn.__name__, code.name)
                if code is grpc.StatusCode.INTERNAL:
                    event("request failed", level=logging.ERROR, exc_info=True, api=api,
                          method=fn.__name__, code=code.name)
                    context.abort(code, "internal error")
                event("request refused", level=logging.WARNING, api=api, method=fn.__name__,
                      code=code.name, reason=str(exc))
                if isinstance(exc, PermissionDeniedError) and exc.reason is not None:
                    # The message is for people; the agent acts on this token.
                    context.set_trailing_metadata(((REASON_KEY, exc.reason.value),))
                context.abort(code, str(exc))

        return wrapper  # type: ignore[return-value]

    return decorate
