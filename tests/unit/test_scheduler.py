"""Scheduling: cadence by status, back-off, jitter, and one poll per run at a time."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from watcher.scheduler import MAX_BACKOFF, Cadence, Scheduler, next_delay


def fixed_rng() -> random.Random:
    return random.Random(42)


@pytest.mark.parametrize(
    ("cadence", "low", "high"),
    [
        (Cadence(fast=False), 27, 33),
        (Cadence(fast=True), 4.5, 5.5),
        (Cadence(fast=False, failures=1), 27, 33),
        (Cadence(fast=False, failures=2), 54, 66),
        (Cadence(fast=False, failures=3), 108, 132),
        (Cadence(fast=False, failures=50), MAX_BACKOFF * 0.9, MAX_BACKOFF * 1.1),
        (Cadence(fast=False, retry_after=45), 40.5, 49.5),
    ],
)
def test_next_delay(cadence: Cadence, low: float, high: float) -> None:
    delays = [next_delay(cadence, 30, 5, fixed_rng()) for _ in range(20)]
    assert all(low <= delay <= high for delay in delays)


def test_jitter_spreads_runs() -> None:
    rng = fixed_rng()
    delays = {round(next_delay(Cadence(fast=False), 30, 5, rng), 3) for _ in range(100)}
    assert len(delays) > 90


@pytest.mark.looptime
async def test_each_run_polled_repeatedly_never_twice_at_once() -> None:
    inflight: set[str] = set()
    polls: Counter[str] = Counter()
    overlaps: list[str] = []

    async def poll(run_id: str) -> Cadence:
        if run_id in inflight:
            overlaps.append(run_id)
        inflight.add(run_id)
        polls[run_id] += 1
        # The slow run takes far longer than its interval.
        await asyncio.sleep(0.5 if run_id == "slow" else 0.001)
        inflight.discard(run_id)
        return Cadence(fast=True)

    scheduler = Scheduler(poll, poll_interval=0.05, fast_poll_interval=0.02)
    for run_id in ("a", "b", "slow"):
        scheduler.add(run_id)
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.6)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert overlaps == []
    assert polls["slow"] <= 2
    # A slow run does not hold the others up.
    assert polls["a"] >= 10
    assert polls["b"] >= 10


@pytest.mark.looptime
async def test_removed_run_stops_and_readded_run_restarts() -> None:
    polls: Counter[str] = Counter()

    async def poll(run_id: str) -> Cadence:
        polls[run_id] += 1
        return Cadence(fast=True)

    scheduler = Scheduler(poll, poll_interval=0.05, fast_poll_interval=0.02)
    scheduler.add("a")
    assert not scheduler.add("a")
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.2)
    assert scheduler.remove("a")
    before = polls["a"]
    await asyncio.sleep(0.2)
    assert polls["a"] <= before + 1  # at most the poll that was already in flight
    scheduler.add("a")
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert polls["a"] > before + 3


@pytest.mark.looptime
async def test_crashing_poll_is_contained() -> None:
    calls: Counter[str] = Counter()

    async def poll(run_id: str) -> Cadence:
        calls[run_id] += 1
        if run_id == "bad":
            raise RuntimeError("bug")
        return Cadence(fast=True)

    scheduler = Scheduler(poll, poll_interval=0.02, fast_poll_interval=0.02)
    scheduler.add("bad")
    scheduler.add("good")
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.2)
    assert not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert calls["bad"] >= 2
    assert calls["good"] >= 5


@pytest.mark.looptime
async def test_cancel_stops_polls_in_flight_and_heartbeat_moves() -> None:
    cancelled = asyncio.Event()

    async def poll(run_id: str) -> Cadence:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Cadence(fast=False)

    scheduler = Scheduler(poll, poll_interval=1, fast_poll_interval=1)
    scheduler.add("a")
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.05)
    assert scheduler.oldest_poll_age() > 0
    assert scheduler.silent_for() < 1.5
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert cancelled.is_set()


@pytest.mark.looptime
async def test_polls_under_way_are_bounded_and_the_most_overdue_start_first() -> None:
    """An API slower than the schedule leaves due runs in the heap, not as waiting tasks."""
    release = asyncio.Event()
    under_way: set[str] = set()
    most = 0
    started: list[str] = []

    async def poll(run_id: str) -> Cadence:
        nonlocal most
        under_way.add(run_id)
        most = max(most, len(under_way))
        started.append(run_id)
        await release.wait()
        under_way.discard(run_id)
        return Cadence(fast=False)

    scheduler = Scheduler(poll, poll_interval=3600, fast_poll_interval=3600, max_concurrency=2)
    limit = scheduler.max_started
    runs = [f"r{n:04d}" for n in range(limit + 50)]
    for number, run_id in enumerate(runs):
        scheduler.add(run_id, after=number * 0.001)  # due in this order
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(1.0)
    assert len(under_way) == limit
    assert started == runs[:limit]
    release.set()
    await asyncio.sleep(1.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert most == limit
    assert started == runs  # the waiting ones came next, oldest due first, each once


@pytest.mark.looptime
async def test_a_reschedule_while_its_poll_is_in_flight_applies_when_the_poll_ends() -> None:
    loop = asyncio.get_running_loop()
    started: list[float] = []

    async def poll(run_id: str) -> Cadence:
        started.append(loop.time())
        await asyncio.sleep(0.1)
        return Cadence(fast=False)

    scheduler = Scheduler(poll, poll_interval=1.0, fast_poll_interval=0.5, rng=fixed_rng())
    scheduler.add("a")
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.05)
    scheduler.reschedule("a", 10.0)  # a list read the run while its own poll was under way
    await asyncio.sleep(5.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(started) == 1, started  # not once a poll interval after that poll
