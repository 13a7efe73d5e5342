"""A federation relationship: which foreign trust domain we trust, and where its bundle is.

SPIFFE Federation §5.3: the trust domain, the bundle endpoint URL and the profile,
plus for ``https_spiffe`` the endpoint's SPIFFE ID and, for a self-serving endpoint
(its ID is in the foreign trust domain), a bootstrap bundle. None of them is
inferred from another: the trust domain is not the URL's host, a profile never
falls back to the other, the endpoint ID is not guessed.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ca.errors import InvalidArgumentError
from identity.bundle import Bundle
from identity.errors import BundleError, InvalidSpiffeIdError, SigilError
from identity.spiffeid import SpiffeId, TrustDomain

PROFILE_HTTPS_WEB = "https_web"
PROFILE_HTTPS_SPIFFE = "https_spiffe"
PROFILES = (PROFILE_HTTPS_WEB, PROFILE_HTTPS_SPIFFE)
MAX_URL_LENGTH = 2048
MAX_BOOTSTRAP_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Relationship:
    """A validated relationship; build it with :func:`new_relationship`.

    Attributes:
        trust_domain: the foreign trust domain.
        bundle_endpoint_url: where its bundle is served (https, no userinfo).
        profile: :data:`PROFILE_HTTPS_WEB` or :data:`PROFILE_HTTPS_SPIFFE`.
        endpoint_spiffe_id: https_spiffe: the ID the endpoint's SVID must carry.
        created_at: unix seconds (set by the datastore).
        updated_at: unix seconds (set by the datastore).
    """

    trust_domain: TrustDomain
    bundle_endpoint_url: str
    profile: str
    endpoint_spiffe_id: SpiffeId | None = None
    created_at: int = 0
    updated_at: int = 0

    @property
    def self_serving(self) -> bool:
        """https_spiffe with the endpoint's ID in the foreign trust domain itself."""
        return (self.endpoint_spiffe_id is not None
                and self.endpoint_spiffe_id.trust_domain == self.trust_domain)


def check_url(url: str) -> str:
    """Check a bundle endpoint URL: ``https://host[:port][/path]``, no userinfo.

    Raises:
        InvalidArgumentError: naming the rule the URL broke.
    """
    if len(url) > MAX_URL_LENGTH:
        raise InvalidArgumentError(f"bundle_endpoint_url is longer than {MAX_URL_LENGTH} "
                                   "characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgumentError(f"bundle_endpoint_url {url!r} is not a URL: {exc}") from None
    if parts.scheme != "https":
        raise InvalidArgumentError(
            f"bundle_endpoint_url {url!r} must use https (SPIFFE Federation §5.1)")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidArgumentError(f"bundle_endpoint_url {url!r} must not carry userinfo")
    if not parts.hostname:
        raise InvalidArgumentError(f"bundle_endpoint_url {url!r} has no host")
    if parts.fragment:
        raise InvalidArgumentError(f"bundle_endpoint_url {url!r} must not have a fragment")
    if port == 0:
        raise InvalidArgumentError(f"bundle_endpoint_url {url!r} has port 0")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidArgumentError("bundle_endpoint_url contains spaces or control characters")
    return url


def new_relationship(
    *, trust_domain: str, bundle_endpoint_url: str, profile: str, endpoint_spiffe_id: str,
    own_trust_domain: TrustDomain, has_bootstrap: bool, created_at: int = 0,
    updated_at: int = 0,
) -> Relationship:
    """Validate the parts of a relationship given as text.

    Args:
        has_bootstrap: a bootstrap bundle comes with it, or we already hold a bundle
            of that trust domain (both are the operator's word, not an inference).

    Raises:
        InvalidArgumentError: naming the bad value and the rule it broke.
    """
    if not trust_domain:
        raise InvalidArgumentError("trust_domain is required")
    try:
        td = TrustDomain.parse(trust_domain)
    except InvalidSpiffeIdError as exc:
        raise InvalidArgumentError(f"trust_domain: {exc}") from None
    if td == own_trust_domain:
        raise InvalidArgumentError(f"trust_domain {td} is our own trust domain")
    if not bundle_endpoint_url:
        raise InvalidArgumentError("bundle_endpoint_url is required")
    check_url(bundle_endpoint_url)
    if profile not in PROFILES:
        raise InvalidArgumentError(f"profile {profile!r} must be one of: {', '.join(PROFILES)}")
    endpoint_id: SpiffeId | None = None
    if profile == PROFILE_HTTPS_WEB:
        # §5.2: https_web takes no extra parameter; one given is a mistake to report.
        if endpoint_spiffe_id:
            raise InvalidArgumentError("endpoint_spiffe_id is only for profile https_spiffe")
        if has_bootstrap:
            raise InvalidArgumentError("a bootstrap bundle is only for profile https_spiffe")
    else:
        if not endpoint_spiffe_id:
            raise InvalidArgumentError("profile https_spiffe needs endpoint_spiffe_id")
        try:
            endpoint_id = SpiffeId.parse(endpoint_spiffe_id)
        except InvalidSpiffeIdError as exc:
            raise InvalidArgumentError(f"endpoint_spiffe_id: {exc}") from None
        if not endpoint_id.has_path:
            raise InvalidArgumentError(
                f"endpoint_spiffe_id {endpoint_id} must name a workload (it needs a path)")
        if endpoint_id.trust_domain == td and not has_bootstrap:
            raise InvalidArgumentError(
                f"endpoint {endpoint_id} is in {td} itself (self-serving): give a bootstrap "
                f"bundle of {td} to authenticate the first fetch")
    return Relationship(trust_domain=td, bundle_endpoint_url=bundle_endpoint_url,
                        profile=profile, endpoint_spiffe_id=endpoint_id,
                        created_at=created_at, updated_at=updated_at)


def parse_bootstrap_bundle(trust_domain: TrustDomain, data: bytes) -> Bundle:
    """A bootstrap bundle: a SPIFFE bundle document (JSON) or PEM CA certificates.

    Raises:
        InvalidArgumentError: too large, neither form, or no X.509 authority.
    """
    if len(data) > MAX_BOOTSTRAP_BYTES:
        raise InvalidArgumentError(f"bootstrap bundle is larger than {MAX_BOOTSTRAP_BYTES} bytes")
    text = data.lstrip()
    try:
        if text.startswith(b"{"):
            bundle = Bundle.from_jwks(trust_domain, data)
        elif text.startswith(b"-----BEGIN"):
            bundle = Bundle.from_x509_pem(trust_domain, data)
        else:
            raise InvalidArgumentError(
                "bootstrap bundle is neither a SPIFFE bundle (JSON) nor PEM certificates")
    except (BundleError, SigilError) as exc:
        if isinstance(exc, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"bootstrap bundle: {exc}") from None
    if not bundle.x509_authorities:
        raise InvalidArgumentError("bootstrap bundle has no X.509 authority")
    return bundle


def load_bootstrap_bundle(trust_domain: TrustDomain, path: Path) -> Bundle:
    """Read and parse a bootstrap bundle file (see :func:`parse_bootstrap_bundle`).

    Raises:
        InvalidArgumentError: unreadable or invalid, naming the file.
    """
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_BOOTSTRAP_BYTES + 1)
    except OSError as exc:
        raise InvalidArgumentError(f"bootstrap_bundle_file {path}: {exc.strerror}") from None
    try:
        return parse_bootstrap_bundle(trust_domain, data)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"bootstrap_bundle_file {path}: {exc}") from None
