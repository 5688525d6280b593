"""ReorderBuffer: observations of several workers released in time order."""

from __future__ import annotations

import asyncio
import time

from takeover_console.reorder import ReorderBuffer


def observation(name: str, t: float) -> dict:
    return {"type": "event", "t": t, "name": name}


async def released_after(buffer: ReorderBuffer, batches: list, count: int, timeout: float = 2.0) -> list[str]:
    """Wait until ``count`` observations were released; return their names in release order."""
    async with asyncio.timeout(timeout):
        while sum(len(batch) for batch in batches) < count:
            await asyncio.sleep(0.005)
    return [item["name"] for batch in batches for item in batch]


def test_late_arrival_released_in_time_order():
    """An older observation that arrives second is still released first."""

    async def scenario() -> list[str]:
        batches: list[list[dict]] = []
        buffer = ReorderBuffer(batches.append, delay=0.05)
        now = time.monotonic()
        buffer.add(observation("killed", now))
        buffer.add(observation("channel down", now - 0.03))
        buffer.add(observation("accepted", now - 0.01))
        return await released_after(buffer, batches, 3)

    assert asyncio.run(scenario()) == ["channel down", "accepted", "killed"]


def test_held_until_delay_passes():
    """Nothing is released before its delay has passed."""

    async def scenario() -> tuple[int, list[str]]:
        batches: list[list[dict]] = []
        buffer = ReorderBuffer(batches.append, delay=0.2)
        buffer.add(observation("new", time.monotonic()))
        await asyncio.sleep(0.05)
        early = sum(len(batch) for batch in batches)
        return early, await released_after(buffer, batches, 1)

    early, names = asyncio.run(scenario())
    assert early == 0
    assert names == ["new"]


def test_stale_observation_released_at_once():
    """An observation older than the delay goes out without waiting."""

    async def scenario() -> list[str]:
        batches: list[list[dict]] = []
        buffer = ReorderBuffer(batches.append, delay=10.0)
        buffer.add(observation("old", time.monotonic() - 11.0))
        return await released_after(buffer, batches, 1, timeout=1.0)

    assert asyncio.run(scenario()) == ["old"]


def test_flush_releases_everything_sorted():
    """flush() releases what is queued, oldest first, and leaves nothing behind."""

    async def scenario() -> tuple[list[list[dict]], int]:
        batches: list[list[dict]] = []
        buffer = ReorderBuffer(batches.append, delay=60.0)
        now = time.monotonic()
        buffer.add(observation("b", now))
        buffer.add(observation("a", now - 1.0))
        buffer.flush()
        return batches, len(buffer)

    batches, left = asyncio.run(scenario())
    assert [[item["name"] for item in batch] for batch in batches] == [["a", "b"]]
    assert left == 0


def test_equal_times_keep_arrival_order():
    """Observations with the same time leave in the order they came."""

    async def scenario() -> list[str]:
        batches: list[list[dict]] = []
        buffer = ReorderBuffer(batches.append, delay=0.01)
        now = time.monotonic()
        for name in ("first", "second", "third"):
            buffer.add(observation(name, now))
        return await released_after(buffer, batches, 3)

    assert asyncio.run(scenario()) == ["first", "second", "third"]


def test_batches_interleave_by_time():
    """Batches of two workers, each in its own order, come out merged by time; equal times keep arrival order."""

    async def scenario() -> list[str]:
        batches: list[list[dict]] = []
        buffer = ReorderBuffer(batches.append, delay=0.05)
        now = time.monotonic()
        buffer.extend([observation("server accepted", now - 0.004), observation("server taken", now - 0.001)])
        buffer.extend([observation("forwarder taken", now - 0.002), observation("forwarder closed", now - 0.001)])
        buffer.extend([])
        return await released_after(buffer, batches, 4)

    assert asyncio.run(scenario()) == ["server accepted", "forwarder taken", "server taken", "forwarder closed"]


def test_later_arrivals_wait_their_turn():
    """What is not yet due stays queued across releases and comes out after what was due before it."""

    async def scenario() -> tuple[list[str], list[str]]:
        batches: list[list[dict]] = []
        buffer = ReorderBuffer(batches.append, delay=0.1)
        now = time.monotonic()
        buffer.extend([observation("late", now + 0.1), observation("due", now - 0.2)])
        first = await released_after(buffer, batches, 1)
        assert len(buffer) == 1
        buffer.add(observation("older", now - 0.15))
        return first, await released_after(buffer, batches, 3)

    first, names = asyncio.run(scenario())
    assert first == ["due"]
    assert names == ["due", "older", "late"]
