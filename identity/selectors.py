"""Selectors: ``type:value`` facts about a node or a workload.

A selector's type is the name of the attestor that produced it (``unix``, ``k8s``,
``join_token``, ``spiffe_id``…); its value is attestor-specific and may contain
colons (``unix:uid:1000``, ``k8s:pod-label:app:web``), so we split at the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from identity.errors import InvalidSelectorError

MAX_SELECTOR_LENGTH = 1024
_TYPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """One selector. Both parts are validated on construction."""

    type: str
    value: str

    def __post_init__(self) -> None:
        if not self.type:
            raise InvalidSelectorError("selector type cannot be empty")
        bad = sorted(set(self.type) - _TYPE_CHARS)
        if bad:
            raise InvalidSelectorError(
                f"selector type {self.type!r} has {bad[0]!r}: types are lowercase letters, "
                "digits, '_' and '-'"
            )
        if not self.value:
            raise InvalidSelectorError(f"selector {self.type!r} has an empty value")
        if len(self.type) + 1 + len(self.value) > MAX_SELECTOR_LENGTH:
            raise InvalidSelectorError(
                f"selector is longer than {MAX_SELECTOR_LENGTH} characters"
            )
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in self.value):
            raise InvalidSelectorError(
                f"selector {self.type!r} value contains a control character"
            )

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse ``type:value``.

        Raises:
            InvalidSelectorError: no colon, or an empty or malformed part.
        """
        type_, sep, value = text.partition(":")
        if not sep:
            raise InvalidSelectorError(
                f"selector {text!r} must have the form type:value (for example unix:uid:1000)"
            )
        return cls(type_, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def selectors_match(required: Iterable[Selector], available: Iterable[Selector]) -> bool:
    """True when every selector in ``required`` is among ``available``.

    This is the rule that gives a workload an entry's identity: the entry's
    selectors must all be among the workload's (DESIGN flow 5). An entry with no
    selectors never matches, so an empty entry cannot hand out an identity to all.
    """
    req = set(required)
    return bool(req) and req <= set(available)
