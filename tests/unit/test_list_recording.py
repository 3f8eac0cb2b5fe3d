"""A large list is recorded in slices: the event loop (probes, scrapes, polls) runs between them.

Counted, not timed: a probe coroutine notes how far the recording got each time it runs. With
the recording done in one go it would run once, before or after, however long that took.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from support import FAKE_KEY, FakeClock
from support.factories import make_run

from watcher.config import load_settings
from watcher.daemon import Watcher
from watcher.listing import FIRST_LIST, RECORD_SLICE
from watcher.model import Fetched, RunList

RUNS = 10_000


def listed(status: str, requested: float) -> Fetched[RunList]:
    runs = [make_run(status, f"r{number:06d}") for number in range(RUNS)]
    return Fetched(RunList(runs, []), 1, "200", requested=requested)


async def record_watched(
    watcher: Watcher, outcome: Fetched[RunList], status: str
) -> list[tuple[int, int, bool]]:
    """Record one list while a probe runs whenever it can: (runs watched, runs in `status`,
    ready) each turn."""
    runs, seen = watcher.tracker.runs, []
    recording = asyncio.create_task(watcher.listing.record(outcome))
    while not recording.done():
        recorded = sum(record.status == status for record in runs.values())
        seen.append((len(runs), recorded, watcher.probes.readiness()[0]))
        await asyncio.sleep(0)
    await recording
    return seen


@pytest.mark.parametrize("discover", [True, False], ids=["discovered", "configured"])
async def test_a_large_list_lets_the_event_loop_in_while_it_is_recorded(discover: bool) -> None:
    clock = FakeClock()
    argv = ["--discover", "org"] if discover else []
    run_ids = [] if discover else [f"--run-id=r{number:06d}" for number in range(RUNS)]
    settings = load_settings([*argv, *run_ids], {"BASETEN_API_KEY": FAKE_KEY}, stdout_is_tty=False)
    watcher = Watcher(settings, registry=CollectorRegistry(), clock=clock)
    watcher.sync_runs(watcher.watchlist.desired(), spread=0.0)
    watcher.recorder.first_round.add(FIRST_LIST)
    watcher.recorder.begin()

    with capture_logs() as logs:
        first = await record_watched(watcher, listed("SCALED_TO_ZERO", clock.now), "SCALED_TO_ZERO")
        clock.now += 30.0
        again = await record_watched(watcher, listed("WAKING_UP", clock.now), "WAKING_UP")

    for seen in (first, again):
        # The probe ran between every slice and saw the list half recorded...
        assert len(seen) >= RUNS // RECORD_SLICE
        for column in (0, 1):  # runs discovered, then runs recorded
            steps = [later[column] - earlier[column] for earlier, later in itertools.pairwise(seen)]
            assert max(steps, default=RUNS) <= RECORD_SLICE
        assert any(0 < recorded < RUNS for _, recorded, _ in seen)
    if discover:
        assert any(0 < watched < RUNS for watched, _, _ in first)
    # ...but readiness waited for the whole first list, and holds from then on.
    assert not any(ready for _, _, ready in first)
    assert all(ready for _, _, ready in again)
    # Every run recorded once per list, in the list's order.
    observed = [e["run_id"] for e in logs if e["event"] == "sampler_status_observed"]
    changed = [e["run_id"] for e in logs if e["event"] == "sampler_status_changed"]
    expected = [f"r{number:06d}" for number in range(RUNS)]
    assert observed == expected
    assert changed == expected
    assert all(record.polls == {"ok": 2} for record in watcher.tracker.runs.values())


async def test_a_gradual_sync_leaves_off_when_a_newer_sync_ran_meanwhile() -> None:
    settings = load_settings(
        ["--discover", "org"], {"BASETEN_API_KEY": FAKE_KEY}, stdout_is_tty=False
    )
    watcher = Watcher(settings, registry=CollectorRegistry(), clock=FakeClock())
    discovered = dict.fromkeys(f"r{number:06d}" for number in range(RUNS))
    gradual = asyncio.create_task(watcher.sync_gradually(discovered, spread=0.0))
    await asyncio.sleep(0)  # its first slice
    assert 0 < len(watcher.tracker.runs) < RUNS
    watcher.sync_runs({"k4q95w5": None}, spread=0.0)  # e.g. the run-IDs file, reloaded
    await gradual
    assert list(watcher.tracker.runs) == ["k4q95w5"]
    assert watcher.scheduler.run_ids == ["k4q95w5"]
