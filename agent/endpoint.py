"""Workload API endpoint addresses (SPIFFE Workload Endpoint standard §4).

``SPIFFE_ENDPOINT_SOCKET`` and ``--socket-path`` name the agent's socket as an RFC
3986 URI (``unix:///run/sigil/api.sock``); we also accept a bare absolute path, as
py-spiffe does. Sigil serves the Workload API on a Unix socket only (callers are
identified by the kernel's peer credentials, which TCP cannot give), so ``tcp://``
is rejected with a reason rather than half-supported.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from agent.errors import EndpointAddressError

ENV_VAR = "SPIFFE_ENDPOINT_SOCKET"


def parse_endpoint_address(address: str) -> str:
    """The filesystem path of a Workload API socket address.

    Args:
        address: ``unix:///abs/path`` or ``/abs/path``.

    Returns:
        The absolute socket path.

    Raises:
        EndpointAddressError: empty, another scheme, a relative or opaque form, an
            authority, user info, a query or a fragment.
    """
    if not address:
        raise EndpointAddressError("workload endpoint socket address is empty")
    if address.startswith("/"):
        return _check_path(address, address)
    parts = urlsplit(address)
    if not parts.scheme:
        raise EndpointAddressError(
            f"workload endpoint socket address {address!r} must be unix:///absolute/path "
            "or an absolute path"
        )
    if parts.scheme == "tcp":
        raise EndpointAddressError(
            f"workload endpoint socket address {address!r}: tcp is not supported; the "
            "Sigil agent serves the Workload API on a Unix socket (unix:///path)"
        )
    if parts.scheme != "unix":
        raise EndpointAddressError(
            f"workload endpoint socket URI {address!r} must have a \"tcp\" or \"unix\" scheme"
        )
    if not address.startswith("unix://"):
        raise EndpointAddressError(
            f"workload endpoint unix socket URI {address!r} must not be opaque "
            "(write unix:///absolute/path)"
        )
    if "@" in parts.netloc:
        raise EndpointAddressError(
            f"workload endpoint unix socket URI {address!r} must not include user info"
        )
    if parts.netloc:
        raise EndpointAddressError(
            f"workload endpoint unix socket URI {address!r} must not have an authority "
            f"({parts.netloc!r}); write unix:///absolute/path"
        )
    if parts.query or address.endswith("?"):
        raise EndpointAddressError(
            f"workload endpoint unix socket URI {address!r} must not include query values"
        )
    if parts.fragment or "#" in address:
        raise EndpointAddressError(
            f"workload endpoint unix socket URI {address!r} must not include a fragment"
        )
    if not parts.path:
        raise EndpointAddressError(
            f"workload endpoint unix socket URI {address!r} must include a path"
        )
    return _check_path(address, parts.path)


def _check_path(address: str, path: str) -> str:
    if "\x00" in path:
        raise EndpointAddressError(f"workload endpoint address {address!r} contains NUL")
    return os.path.normpath(path)
