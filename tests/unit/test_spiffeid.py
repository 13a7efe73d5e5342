"""SPIFFE ID and trust domain parsing, by the table of the SPIFFE ID standard.

Rows come from the standard's grammar (standards/SPIFFE-ID.md §2) and the cases
go-spiffe tests in spiffeid/id_test.go; each invalid row names the rule broken,
and the test checks our error message mentions it.
"""

from __future__ import annotations

import pytest

from identity.errors import InvalidSpiffeIdError, SigilError
from identity.spiffeid import SpiffeId, TrustDomain

VALID = [
    ("spiffe://trustdomain", "trustdomain", ""),
    ("spiffe://trustdomain/path", "trustdomain", "/path"),
    ("spiffe://trustdomain/pathA", "trustdomain", "/pathA"),
    ("spiffe://trustdomain/.path", "trustdomain", "/.path"),
    ("spiffe://trustdomain/..path", "trustdomain", "/..path"),
    ("spiffe://trustdomain/...", "trustdomain", "/..."),
    ("spiffe://trustdomain/a/b/c/d", "trustdomain", "/a/b/c/d"),
    ("spiffe://1.2.3.4/path", "1.2.3.4", "/path"),
    ("spiffe://trust_domain-1.example.org/ns/staging/sa/default",
     "trust_domain-1.example.org", "/ns/staging/sa/default"),
    ("spiffe://example.org/Upper/CASE_ok-1.2", "example.org", "/Upper/CASE_ok-1.2"),
    ("spiffe://a/b", "a", "/b"),
    ("spiffe://x.y/" + "a" * 2000, "x.y", "/" + "a" * 2000),
]

INVALID = [
    ("", "cannot be empty"),
    ("s", "scheme"),
    ("spiffe:/", "scheme"),
    ("Spiffe://", "scheme"),
    ("SPIFFE://trustdomain/path", "scheme"),
    ("spiffe:/trustdomain/path", "scheme"),
    ("http://trustdomain/path", "scheme"),
    ("spiffe//trustdomain/path", "scheme"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///", "trust domain is missing"),
    ("spiffe:///path", "trust domain is missing"),
    ("spiffe://trustdomain/", "trailing slash"),
    ("spiffe://trustdomain/path/", "trailing slash"),
    ("spiffe://trustdomain//", "empty segments"),
    ("spiffe://trustdomain//path", "empty segments"),
    ("spiffe://trustdomain/a//b", "empty segments"),
    ("spiffe://trustdomain/.", "dot segments"),
    ("spiffe://trustdomain/./path", "dot segments"),
    ("spiffe://trustdomain/path/./other", "dot segments"),
    ("spiffe://trustdomain/path/..", "dot segments"),
    ("spiffe://trustdomain/../path", "dot segments"),
    ("spiffe://trustdomain/path/../other", "dot segments"),
    ("spiffe://%F0%9F%A4%AF/path", "percent-encoded"),
    ("spiffe://%62%61%64/path", "percent-encoded"),
    ("spiffe://trustdomain/%62%61%64", "percent-encoded"),
    ("spiffe://trust$domain", "trust domain characters are limited"),
    ("spiffe://trustdomain/path$", "path segment characters are limited"),
    ("spiffe://trustdomainA/path", "lowercase"),
    ("spiffe://TRUSTDOMAIN/path", "lowercase"),
    ("spiffe://trustdomain/p\u00e4th", "path segment characters are limited"),
    ("spiffe://tr\u00fcstdomain/path", "trust domain characters are limited"),
    ("spiffe://trustdomain:8080/path", "port"),
    ("spiffe://trustdomain:/path", "port"),
    ("spiffe://user@trustdomain/path", "user info"),
    ("spiffe://user:pass@trustdomain/path", "port"),
    ("spiffe://trustdomain/path?x=1", "query"),
    ("spiffe://trustdomain?x=1", "trust domain characters are limited"),
    ("spiffe://trustdomain/path#frag", "fragment"),
    ("spiffe://[::1]/path", "IPv6"),
    ("spiffe://trustdomain/a b", "path segment characters are limited"),
    ("spiffe://trust domain/a", "trust domain characters are limited"),
    ("spiffe://trustdomain/a\\b", "path segment characters are limited"),
    ("spiffe://trustdomain/a\nb", "path segment characters are limited"),
    ("spiffe://" + "a" * 256 + "/path", "at most 255"),
    ("spiffe://x.y/" + "a" * 2100, "longer than 2048"),
    (" spiffe://trustdomain/path", "scheme"),
    ("spiffe://trustdomain/path ", "path segment characters are limited"),
]


def test_table_has_at_least_forty_invalid_cases() -> None:
    assert len(INVALID) >= 40


@pytest.mark.parametrize(("text", "td", "path"), VALID)
def test_valid_ids_parse_and_round_trip(text: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain.name == td
    assert sid.path == path
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_invalid_ids_name_the_rule(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as err:
        SpiffeId.parse(text)
    assert reason in str(err.value)
    assert isinstance(err.value, SigilError)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("example.org", "example.org"),
        ("spiffe://example.org", "example.org"),
        ("spiffe://example.org/a/b", "example.org"),
        ("1.2.3.4", "1.2.3.4"),
    ],
)
def test_trust_domain_parse(text: str, name: str) -> None:
    td = TrustDomain.parse(text)
    assert td.name == name
    assert td.id_string() == f"spiffe://{name}"
    assert str(td.id()) == f"spiffe://{name}"
    assert not td.id().has_path


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "trust domain is missing"),
        ("Example.org", "lowercase"),
        ("example.org:443", "port"),
        ("exa mple.org", "trust domain characters are limited"),
        ("spiffe://example.org/a/", "trailing slash"),
        ("a" * 256, "at most 255"),
    ],
)
def test_trust_domain_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeIdError, match=reason):
        TrustDomain.parse(text)


def test_from_segments_validates_each_segment() -> None:
    td = TrustDomain("example.org")
    assert str(SpiffeId.from_segments(td, "ns", "default", "sa", "api")) == (
        "spiffe://example.org/ns/default/sa/api"
    )
    for bad, reason in [("a/b", "must not contain '/'"), ("..", "dot segments"),
                        ("", "empty segments"), ("a?b", "query")]:
        with pytest.raises(InvalidSpiffeIdError, match=reason):
            SpiffeId.from_segments(td, bad)


def test_membership_and_ordering() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")
    b = SpiffeId.parse("spiffe://example.org/b")
    assert a.is_member_of(TrustDomain("example.org"))
    assert not a.is_member_of(TrustDomain("other.org"))
    assert sorted([b, a]) == [a, b]
    assert a.has_path
    assert hash(a) == hash(SpiffeId.parse("spiffe://example.org/a"))


def test_constructor_validates_too() -> None:
    with pytest.raises(InvalidSpiffeIdError):
        TrustDomain("Bad")
    with pytest.raises(InvalidSpiffeIdError):
        SpiffeId(TrustDomain("ok"), "no-leading-slash")


def test_non_string_is_rejected() -> None:
    with pytest.raises(InvalidSpiffeIdError, match="must be a string"):
        SpiffeId.parse(b"spiffe://x/y")  # type: ignore[arg-type]
