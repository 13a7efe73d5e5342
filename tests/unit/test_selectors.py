"""Selector parsing and the entry-to-workload matching rule."""

from __future__ import annotations

import pytest

from identity.errors import InvalidSelectorError
from identity.selectors import Selector, selectors_match


@pytest.mark.parametrize(
    ("text", "type_", "value"),
    [
        ("unix:uid:1000", "unix", "uid:1000"),
        ("k8s:pod-label:app:web", "k8s", "pod-label:app:web"),
        ("spiffe_id:spiffe://td/sigil/agent/x", "spiffe_id", "spiffe://td/sigil/agent/x"),
        ("join_token:abc", "join_token", "abc"),
    ],
)
def test_parse_splits_at_first_colon(text: str, type_: str, value: str) -> None:
    sel = Selector.parse(text)
    assert (sel.type, sel.value) == (type_, value)
    assert str(sel) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("unix", "must have the form type:value"),
        (":value", "type cannot be empty"),
        ("unix:", "empty value"),
        ("UNIX:uid:1", "types are lowercase"),
        ("un ix:uid:1", "types are lowercase"),
        ("unix:uid:\n1", "control character"),
        ("unix:" + "x" * 1100, "longer than 1024"),
    ],
)
def test_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(InvalidSelectorError, match=reason):
        Selector.parse(text)


def test_match_requires_every_entry_selector() -> None:
    uid = Selector("unix", "uid:1000")
    gid = Selector("unix", "gid:1000")
    other = Selector("unix", "uid:0")
    assert selectors_match([uid], [uid, gid])
    assert selectors_match([uid, gid], [uid, gid])
    assert not selectors_match([uid, gid], [uid])
    assert not selectors_match([other], [uid, gid])


def test_empty_entry_selectors_never_match() -> None:
    assert not selectors_match([], [Selector("unix", "uid:1")])
