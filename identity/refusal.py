"""Why the server refuses an agent: machine-readable reasons both sides share.

The server's agent API refuses an agent with PERMISSION_DENIED and a message for
people; alongside it, in the trailing metadata key :data:`REASON_KEY`, it sends
one of the fixed tokens of :class:`RefusalReason`. The agent decides what to do
(stop asking for SVIDs, attest again) on that token alone, never on the wording
of the message, so messages may change without changing behaviour.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

REASON_KEY = "sigil-reason"
"""The trailing metadata key (ASCII, lowercase) that carries a refusal reason."""


class RefusalReason(enum.StrEnum):
    """Why the server refused the agent itself; the value is what travels."""

    AGENT_BANNED = "agent_banned"
    """An operator banned the agent (``sigil-server agent ban``)."""

    AGENT_NOT_ATTESTED = "agent_not_attested"
    """No attested node has the agent's ID: never attested, or evicted."""

    SVID_NOT_CURRENT = "svid_not_current"
    """The client certificate is not the agent's current SVID (a renewal replaced it)."""


def reason_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> RefusalReason | None:
    """The refusal reason in gRPC (trailing) metadata, if there is a known one.

    Args:
        metadata: ``(key, value)`` pairs, as grpc returns them; None for none.

    Returns:
        The first value under :data:`REASON_KEY` that is a known reason; None when
        there is none (an older server, another kind of failure) or it is unknown.
    """
    for key, value in metadata or ():
        if key.lower() != REASON_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        try:
            return RefusalReason(text)
        except ValueError:
            continue
    return None
