"""When each run is polled: one timer heap, one poll at most in flight per run.

Runs in a transitional status come round every `fast_poll_interval`, others every
`poll_interval`; every delay carries ±10 % jitter so thousands of runs spread out instead of
firing in lockstep. A run whose polls keep failing backs off exponentially (capped), and an
API that asked for patience with Retry-After gets it. Each poll is its own task, so a slow or
failing run never holds up the others; the global limits on concurrency and request rate
live in the API client, around each HTTP attempt.

A poll waiting for one of those slots holds its task, its frames and its retry state, about
7 kB; when the API (or the machine) is slower than the schedule, every run would be waiting
at once (10,000 runs: some 70 MB). So at most `max_started` polls are under way: past that,
due runs stay in the heap (under 100 bytes each) and start, most overdue first, as polls end.
The bound leaves room beyond the connections for polls that sleep between retries, so a
flaky API does not starve the others.
"""

from __future__ import annotations

import asyncio
import heapq
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

# A failing run is still polled at least this often (plus jitter): alerts that watch polls
# (deploy/prometheus/alerts.yml; tests/test_deploy.py checks the windows) must see a recovery,
# a fixed key or a fresh failure well within their windows, never after them.
MAX_BACKOFF = 120.0
JITTER = 0.1
TICK = 1.0  # the loop wakes at least this often, which is what /healthz watches
# Polls due within this much (at most a fiftieth of the fast interval) start together: one
# wake-up for several lets the event loop batch their I/O, about a fifth less CPU per poll.
COALESCE = 0.1
# Polls under way beyond the connections in flight: those waiting for a slot or sleeping
# between retries. With every run failing, 512 polls of about 5 s of retries each still
# reach 10,000 runs within MAX_BACKOFF.
WAITING_POLLS = 512


def loop_time() -> float:
    """The clock the running event loop's timeouts run on, or time.monotonic() outside one.

    On a standard loop the two are the same clock. Due times read from the loop's own clock
    keep the schedule and its waits in step under a loop whose time is virtual (in tests).
    """
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


@dataclass(frozen=True, slots=True)
class Cadence:
    """What a finished poll says about when to poll that run next."""

    fast: bool
    failures: int = 0
    retry_after: float | None = None


def next_delay(
    cadence: Cadence, poll_interval: float, fast_poll_interval: float, rng: random.Random
) -> float:
    base = fast_poll_interval if cadence.fast else poll_interval
    if cadence.failures > 1:
        ceiling = max(MAX_BACKOFF, poll_interval)
        base = min(max(base, poll_interval) * 2 ** min(cadence.failures - 1, 20), ceiling)
    if cadence.retry_after is not None:
        base = max(base, cadence.retry_after)
    return base * rng.uniform(1 - JITTER, 1 + JITTER)


class Scheduler:
    def __init__(
        self,
        poll: Callable[[str], Awaitable[Cadence]],
        *,
        poll_interval: float,
        fast_poll_interval: float,
        max_concurrency: int = 16,
        clock: Callable[[], float] = loop_time,
        rng: random.Random | None = None,
    ) -> None:
        self._poll = poll
        self.max_started = max_concurrency + WAITING_POLLS
        self._poll_interval = poll_interval
        self._fast_interval = fast_poll_interval
        self._coalesce = min(COALESCE, fast_poll_interval / 50)
        self._clock = clock
        self._rng = rng or random.Random()
        self._heap: list[tuple[float, int, str]] = []
        self._generation: dict[str, int] = {}  # watched runs; a re-added run gets a new number
        self._counter = 0
        self._inflight: dict[str, float] = {}  # run_id -> when its poll started
        # run_id -> the delay a reschedule asked for while that run's poll was in flight
        self._after_poll: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self.heartbeat = clock()

    @property
    def run_ids(self) -> list[str]:
        return list(self._generation)

    def add(self, run_id: str, *, spread: float = 0.0, after: float = 0.0) -> bool:
        """Poll a run `after` seconds from now, plus up to `spread`; False if already watched."""
        if run_id in self._generation:
            return False
        self._counter += 1
        self._generation[run_id] = self._counter
        self._push(run_id, after + self._rng.uniform(0, spread))
        return True

    def remove(self, run_id: str) -> bool:
        # Its heap entry or in-flight poll finds the generation gone and lapses.
        self._after_poll.pop(run_id, None)
        return self._generation.pop(run_id, None) is not None

    def reschedule(self, run_id: str, delay: float) -> None:
        """Move a run's next individual poll, e.g. after its status arrived another way.

        A run whose poll is in flight gets the delay when that poll ends: dropped, a list and
        that run's polls, both a poll interval apart, kept meeting and the run was polled on
        its own every interval however often the list covered it."""
        if run_id in self._inflight:
            self._after_poll[run_id] = delay
        elif run_id in self._generation:
            self._counter += 1
            self._generation[run_id] = self._counter
            self._push(run_id, delay)

    def silent_for(self) -> float:
        """Seconds since the loop last woke; it wakes at least every TICK while it runs."""
        return self._clock() - self.heartbeat

    def oldest_poll_age(self) -> float:
        """Seconds the longest-running poll has been in flight (0 when none is)."""
        if not self._inflight:
            return 0.0
        return self._clock() - min(self._inflight.values())

    def _push(self, run_id: str, delay: float) -> None:
        due = self._clock() + delay
        heapq.heappush(self._heap, (due, self._generation[run_id], run_id))
        if self._heap[0][2] == run_id:
            self._wake.set()

    async def run(self) -> None:
        """Poll until cancelled; cancelling also cancels every poll in flight."""
        try:
            while True:
                now = self.heartbeat = self._clock()
                while (
                    self._heap
                    and self._heap[0][0] <= now + self._coalesce
                    and len(self._inflight) < self.max_started
                ):
                    _due, generation, run_id = heapq.heappop(self._heap)
                    if self._generation.get(run_id) == generation and run_id not in self._inflight:
                        self._start(run_id, generation)
                full = len(self._inflight) >= self.max_started
                timeout = min(self._heap[0][0] - now, TICK) if self._heap and not full else TICK
                self._wake.clear()
                try:
                    async with asyncio.timeout(max(timeout, 0.0)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, run_id: str, generation: int) -> None:
        self._inflight[run_id] = self._clock()
        task = asyncio.create_task(self._run_poll(run_id, generation), name=f"poll {run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_poll(self, run_id: str, generation: int) -> None:
        try:
            cadence = await self._poll(run_id)
        except Exception:
            # A bug in handling one poll must not stop this run being polled, nor the others.
            structlog.get_logger().exception("poll_crashed", run_id=run_id)
            cadence = Cadence(fast=False, failures=1)
        finally:
            del self._inflight[run_id]
            if len(self._inflight) == self.max_started - 1:
                self._wake.set()  # a due run may have been waiting for this one to end
        asked = self._after_poll.pop(run_id, None)
        if self._generation.get(run_id) == generation:
            if asked is None:
                asked = next_delay(cadence, self._poll_interval, self._fast_interval, self._rng)
            self._push(run_id, asked)
