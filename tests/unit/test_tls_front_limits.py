"""The agent API's connection cap fitted to the open-file limit (no sockets)."""

from __future__ import annotations

import resource

import pytest

from ca.api import tls_front
from ca.api.tls_front import FDS_PER_CONNECTION, RESERVED_FDS

INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(("soft", "hard", "wanted", "cap", "raised_to"), [
    # Room enough: nothing changes.
    (100_000, 100_000, 4096, 4096, None),
    (INF, INF, 4096, 4096, None),
    # The soft limit is raised as far as needed, within the hard one.
    (1024, 100_000, 4096, 4096, 4096 * FDS_PER_CONNECTION + RESERVED_FDS),
    (1024, INF, 4096, 4096, 4096 * FDS_PER_CONNECTION + RESERVED_FDS),
    # The hard limit is too low: raised to it, and the cap lowered to fit.
    (1024, 4096, 4096, (4096 - RESERVED_FDS) // FDS_PER_CONNECTION, 4096),
    (400, 400, 4096, (400 - RESERVED_FDS) // FDS_PER_CONNECTION, None),
    # Never below one connection.
    (100, 100, 4096, 1, None),
])
def test_cap_fits_the_open_file_limit(monkeypatch: pytest.MonkeyPatch, soft: int, hard: int,
                                      wanted: int, cap: int, raised_to: int | None) -> None:
    limits = {"now": (soft, hard)}
    set_to: list[int] = []

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE and value[1] == hard
        set_to.append(value[0])
        limits["now"] = value

    monkeypatch.setattr(tls_front.resource, "getrlimit", lambda _which: limits["now"])
    monkeypatch.setattr(tls_front.resource, "setrlimit", setrlimit)
    assert tls_front._fit_to_open_file_limit(wanted) == cap
    assert set_to == ([] if raised_to is None else [raised_to])
