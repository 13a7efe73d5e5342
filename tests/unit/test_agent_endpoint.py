"""Workload API endpoint addresses (SPIFFE Workload Endpoint standard)."""

from __future__ import annotations

import pytest

from agent.endpoint import parse_endpoint_address
from agent.errors import EndpointAddressError


@pytest.mark.parametrize(
    ("address", "path"),
    [
        ("unix:///run/sigil/api.sock", "/run/sigil/api.sock"),
        ("unix:///tmp/a.sock", "/tmp/a.sock"),
        ("/run/sigil/api.sock", "/run/sigil/api.sock"),
        ("/run/sigil/../sigil/api.sock", "/run/sigil/api.sock"),
        ("unix:///a%20b.sock", "/a%20b.sock"),
    ],
)
def test_valid(address: str, path: str) -> None:
    assert parse_endpoint_address(address) == path


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "is empty"),
        ("tcp://127.0.0.1:8000", "tcp is not supported"),
        ("tcp://127.0.0.1:8000/foo", "tcp is not supported"),
        ("http://localhost/x", 'must have a "tcp" or "unix" scheme'),
        ("unix:opaque", "must not be opaque"),
        ("unix:relative/path", "must not be opaque"),
        ("unix://", "must include a path"),
        ("unix://foo", "must not have an authority"),
        ("unix://foo/bar.sock", "must not have an authority"),
        ("unix://user@/x.sock", "must not include user info"),
        ("unix:///x.sock?a=b", "must not include query values"),
        ("unix:///x.sock?", "must not include query values"),
        ("unix:///x.sock#frag", "must not include a fragment"),
        ("relative/api.sock", "must be unix:///absolute/path"),
        ("api.sock", "must be unix:///absolute/path"),
    ],
)
def test_invalid(address: str, message: str) -> None:
    with pytest.raises(EndpointAddressError, match=message):
        parse_endpoint_address(address)
