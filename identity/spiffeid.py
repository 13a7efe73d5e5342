"""SPIFFE IDs and trust domains, parsed by every rule of the SPIFFE ID standard.

The grammar is the strict one (SPIFFE ID standard §2; go-spiffe ``spiffeid``):

    spiffe-id    = "spiffe://" trust-domain [ path ]
    trust-domain = 1*( a-z / 0-9 / "." / "-" / "_" )
    path         = 1*( "/" segment )
    segment      = 1*( a-z / A-Z / 0-9 / "." / "-" / "_" ), but not "." or ".."

Because the character sets leave out ``@ : ? # % [ ]``, the whitelist alone
rejects user info, ports, queries, fragments, percent-encoding and IPv6 literals;
we still name those cases in the error so an operator knows what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from identity.errors import InvalidSpiffeIdError

SCHEME_PREFIX = "spiffe://"

# SPIFFE ID standard §2.3: implementations MUST accept IDs up to 2048 bytes and a
# trust domain is at most 255 bytes (the RFC 3986 host limit).
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _explain_bad_td_char(name: str, ch: str) -> str:
    if ch == ":":
        return f"trust domain {name!r} must not have a port"
    if ch == "@":
        return f"trust domain {name!r} must not have user info"
    if ch == "%":
        return f"trust domain {name!r} must not be percent-encoded"
    if ch in "[]":
        return f"trust domain {name!r} must not be an IPv6 literal"
    if ch.isupper():
        return f"trust domain {name!r} must be lowercase"
    return (
        f"trust domain {name!r} has character {ch!r}: trust domain characters are limited "
        "to lowercase letters, numbers, dots, dashes, and underscores"
    )


def _check_trust_domain_name(name: str) -> None:
    if not name:
        raise InvalidSpiffeIdError("trust domain is missing")
    if len(name.encode()) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidSpiffeIdError(
            f"trust domain is {len(name.encode())} bytes long; at most "
            f"{MAX_TRUST_DOMAIN_LENGTH} are allowed"
        )
    for ch in name:
        if ch not in _TD_CHARS:
            raise InvalidSpiffeIdError(_explain_bad_td_char(name, ch))


def _check_path(path: str) -> None:
    """Validate a path that is either empty or starts with '/'."""
    if not path:
        return
    if not path.startswith("/"):
        raise InvalidSpiffeIdError(f"path {path!r} must have a leading slash")
    segments = path[1:].split("/")
    for i, seg in enumerate(segments):
        if seg == "":
            if i == len(segments) - 1:
                raise InvalidSpiffeIdError(f"path {path!r} cannot have a trailing slash")
            raise InvalidSpiffeIdError(f"path {path!r} cannot contain empty segments")
        if seg in (".", ".."):
            raise InvalidSpiffeIdError(f"path {path!r} cannot contain dot segments")
        for ch in seg:
            if ch not in _PATH_CHARS:
                if ch == "?":
                    why = "must not have a query"
                elif ch == "#":
                    why = "must not have a fragment"
                elif ch == "%":
                    why = "must not be percent-encoded"
                else:
                    why = (
                        f"has character {ch!r}: path segment characters are limited to "
                        "letters, numbers, dots, dashes, and underscores"
                    )
                raise InvalidSpiffeIdError(f"path {path!r} {why}")


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """The trust domain part of SPIFFE IDs, e.g. ``example.org``.

    Construct with :meth:`parse`; the constructor validates too, so an instance is
    always valid.
    """

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(self.name)

    @classmethod
    def parse(cls, value: str) -> TrustDomain:
        """Parse a trust domain name, or take the trust domain of a SPIFFE ID.

        Args:
            value: ``example.org`` or ``spiffe://example.org[/path]``.

        Returns:
            The trust domain.

        Raises:
            InvalidSpiffeIdError: the name (or the ID) breaks a rule of the standard.
        """
        if ":/" in value:
            return SpiffeId.parse(value).trust_domain
        return cls(value)

    def id(self) -> SpiffeId:
        """The SPIFFE ID of the trust domain itself (``spiffe://name``, no path)."""
        return SpiffeId(self, "")

    def id_string(self) -> str:
        """``spiffe://name``: the form the Workload API uses as a bundle map key."""
        return SCHEME_PREFIX + self.name

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain plus a path (``""`` or ``/seg/seg``)."""

    trust_domain: TrustDomain
    path: str = ""

    def __post_init__(self) -> None:
        _check_path(self.path)
        length = len(SCHEME_PREFIX) + len(self.trust_domain.name.encode()) + len(
            self.path.encode()
        )
        if length > MAX_ID_LENGTH:
            raise InvalidSpiffeIdError(
                f"SPIFFE ID is {length} bytes long; at most {MAX_ID_LENGTH} are allowed"
            )

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse a SPIFFE ID by the strict grammar of the standard.

        Args:
            value: e.g. ``spiffe://example.org/ns/default/sa/api``.

        Returns:
            The SPIFFE ID.

        Raises:
            InvalidSpiffeIdError: with a message naming the rule the value broke.
        """
        if not isinstance(value, str):
            raise InvalidSpiffeIdError(f"SPIFFE ID must be a string, not {type(value).__name__}")
        if value == "":
            raise InvalidSpiffeIdError("SPIFFE ID cannot be empty")
        if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_LENGTH:
            raise InvalidSpiffeIdError(
                f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes"
            )
        if not value.startswith(SCHEME_PREFIX):
            raise InvalidSpiffeIdError(
                f"{value!r}: scheme is missing or invalid (a SPIFFE ID starts with 'spiffe://')"
            )
        rest = value[len(SCHEME_PREFIX):]
        slash = rest.find("/")
        td_name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if not td_name:
            raise InvalidSpiffeIdError(f"{value!r}: trust domain is missing")
        try:
            td = TrustDomain(td_name)
            return cls(td, path)
        except InvalidSpiffeIdError as exc:
            raise InvalidSpiffeIdError(f"{value!r}: {exc}") from None

    @classmethod
    def from_segments(cls, trust_domain: TrustDomain, *segments: str) -> SpiffeId:
        """Build an ID from path segments, each validated.

        Raises:
            InvalidSpiffeIdError: a segment is empty, a dot segment, or has a bad character.
        """
        for seg in segments:
            if seg == "":
                raise InvalidSpiffeIdError("path cannot contain empty segments")
            if "/" in seg:
                raise InvalidSpiffeIdError(f"path segment {seg!r} must not contain '/'")
        return cls(trust_domain, "".join("/" + s for s in segments))

    @property
    def has_path(self) -> bool:
        """True when the ID names something inside the trust domain (a leaf ID)."""
        return self.path != ""

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        """True when this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain.name + self.path
