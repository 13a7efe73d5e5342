"""agent.memory: malloc_trim after a connection burst (glibc), a no-op elsewhere."""

from __future__ import annotations

import asyncio

from agent import memory
from agent.memory import TrimAfterBurst


class FakeGlibc:
    def __init__(self) -> None:
        self.trim_calls: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.trim_calls.append(pad)
        return 1


class NotGlibc:
    """A C library without malloc_trim (musl, macOS)."""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trim_is_a_no_op_without_glibc(monkeypatch) -> None:
    monkeypatch.setattr(memory, "glibc", lambda: None)
    for trim in (TrimAfterBurst(), TrimAfterBurst(libc=NotGlibc())):
        assert not trim.enabled

        async def burst(trim: TrimAfterBurst = trim) -> None:
            for n in (100, 0):
                trim.connections(n)
            await asyncio.sleep(0.01)

        asyncio.run(burst())
        assert trim.trims == 0


async def _settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0.005)


def test_trims_once_when_the_count_falls_after_a_burst() -> None:
    libc, clock = FakeGlibc(), Clock()
    trim = TrimAfterBurst(high=10, low=2, min_interval=5.0, libc=libc, clock=clock)

    async def scenario() -> None:
        for n in (1, 5, 9, 3, 2, 0):  # never above high: no burst, no trim
            trim.connections(n)
        await _settle()
        assert libc.trim_calls == []
        for n in range(1, 20):
            trim.connections(n)
        for n in range(19, 2, -1):  # falling, still above low
            trim.connections(n)
        await _settle()
        assert libc.trim_calls == []
        trim.connections(2)  # at the low mark: the burst is over
        trim.connections(1)
        trim.connections(0)
        await _settle()
        assert libc.trim_calls == [0]
        trim.connections(1)  # no new burst: nothing more
        trim.connections(0)
        await _settle()
        assert libc.trim_calls == [0]

    asyncio.run(scenario())
    assert trim.trims == 1


def test_a_second_burst_sooner_than_min_interval_waits() -> None:
    libc, clock = FakeGlibc(), Clock()
    trim = TrimAfterBurst(high=10, low=2, min_interval=0.2, libc=libc, clock=clock)

    async def scenario() -> None:
        trim.connections(11)
        trim.connections(0)
        await _settle()
        assert libc.trim_calls == [0]
        trim.connections(11)
        trim.connections(0)  # 0 s after the last trim by the clock: deferred
        await asyncio.sleep(0.05)
        assert libc.trim_calls == [0]
        await asyncio.sleep(0.3)
        assert libc.trim_calls == [0, 0]

    asyncio.run(scenario())


def test_a_burst_during_the_wait_is_trimmed_after_it_ends() -> None:
    libc, clock = FakeGlibc(), Clock()
    trim = TrimAfterBurst(high=10, low=2, min_interval=0.2, libc=libc, clock=clock)

    async def scenario() -> None:
        trim.connections(11)
        trim.connections(0)
        await _settle()
        assert libc.trim_calls == [0]
        trim.connections(11)
        trim.connections(0)  # deferred 0.2 s
        trim.connections(50)  # a new burst while it waits
        await asyncio.sleep(0.3)
        assert libc.trim_calls == [0]  # not in the middle of the burst
        trim.connections(1)  # it ended: trimmed min_interval after the last
        await asyncio.sleep(0.35)
        assert libc.trim_calls == [0, 0]

    asyncio.run(scenario())
