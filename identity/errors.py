"""The root of Sigil's error tree and the errors of the identity vocabulary.

Every error Sigil raises on purpose derives from :class:`SigilError`. The edges
(gRPC servicers, HTTP handlers, the CLIs) map these to status codes in one table
each; domain code never picks a status code.
"""

from __future__ import annotations


class SigilError(Exception):
    """Base of every error Sigil raises on purpose."""


class InvalidSpiffeIdError(SigilError, ValueError):
    """A SPIFFE ID or trust domain name breaks a rule of the SPIFFE ID standard."""


class InvalidSelectorError(SigilError, ValueError):
    """A selector is not of the form ``type:value`` or has a bad type or value."""


class InvalidKeyError(SigilError, ValueError):
    """A key is malformed, of an unsupported type, or too weak."""


class X509SvidError(SigilError):
    """An X.509-SVID (or a CSR for one) is malformed or fails verification."""


class JwtSvidError(SigilError):
    """A JWT-SVID is malformed or fails validation."""


class BundleError(SigilError):
    """A trust bundle document is malformed."""


class InvalidValueError(SigilError, ValueError):
    """A configuration value (a duration, an address) is not in its documented form."""


class WitSvidError(SigilError):
    """A WIT-SVID, or the proof of possession presented with it, fails validation."""
