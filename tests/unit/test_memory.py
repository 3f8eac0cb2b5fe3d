"""What each watched run costs in memory, counted in bytes and allocations rather than timed.

Runs go through the watcher's real path: a body as the API sends it is parsed, recorded by
the recorder (tracker, metric blocks), scheduled, and shown by the status page's JSON, twice
over, as two polls would. tracemalloc counts what stays allocated per run. The budget is the
README's per-run figure with headroom: a change that doubled the cost of a run fails here
(`make bench` measures the whole process; this guards the part that grows with the runs).
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Iterator

import pytest
import structlog
from prometheus_client import CollectorRegistry
from support import FakeClock
from support.factories import run_json

from watcher.metrics import Metrics
from watcher.model import Fetched, parse_run_response
from watcher.page import Page
from watcher.recorder import Recorder
from watcher.scheduler import Cadence, Scheduler
from watcher.sharding import Shard

RUNS = 2_000
# Measured: about 4.0 kB and 28 allocations a run (Python 3.11), most of it the run's cached
# /metrics text (1.7 kB of it text; 10,000 runs are 17 MB) and its parsed fields.
BYTES_PER_RUN = 6_000
ALLOCATIONS_PER_RUN = 45


def body(number: int) -> bytes:
    """One run as the API sends it, with IDs and names as long as real ones."""
    run_id = f"r{number:06d}"
    sampler = {
        "id": f"s{number:06d}",
        "base_url": f"https://model-m{number:06d}.api.baseten.co/deployment/d{number:06d}/sync",
        "base_model": "Qwen/Qwen3-32B",
        "created_at": "2026-11-01T10:05:00.000000Z",
        "model_id": f"m{number:06d}",
        "deployment_id": f"d{number:06d}",
        "status": {"name": "ACTIVE"},
        "user": {"email": "ada@example.com"},
        "instance_type": {"name": "H100:2x80GB"},
        "node_count": 1,
    }
    run = run_json(
        run_id,
        session_id=f"e{number:06d}",
        deployment_id=f"p{number:06d}",
        name=f"run-{number:05d}",
        base_model="Qwen/Qwen3-32B",
        base_url=f"https://loops.api.baseten.co/v1/loops/runs/{run_id}",
        created_at="2026-11-01T10:00:00.000000Z",
        user={"email": "ada@example.com"},
        sampler=sampler,
    )
    run["status"] = {"name": "ACTIVE"}  # the run's own; run_json's `status` is the sampler's
    return json.dumps({"run": run}).encode()


@pytest.fixture
def traced() -> Iterator[None]:
    gc.collect()
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


async def never(_run_id: str) -> Cadence:
    raise AssertionError("the scheduler is not run here")


def test_a_watched_run_costs_what_the_readme_says(traced: None) -> None:
    bodies = [body(number) for number in range(RUNS)]
    clock = FakeClock(1_800_000_000.0)
    with structlog.testing.capture_logs() as logs:
        recorder = Recorder(Metrics(CollectorRegistry(), "0.0.0", Shard(0, 1)), None, clock=clock)
        scheduler = Scheduler(never, poll_interval=30.0, fast_poll_interval=5.0)
        page = Page(lambda: recorder.tracker.runs, list, clock, version="0.0.0")
        recorder.begin()
        gc.collect()
        before, blocks_before = _traced()
        for number in range(RUNS):
            run_id = f"r{number:06d}"
            scheduler.add(run_id, spread=30.0)
            recorder.watch(run_id)
        for _poll in range(2):
            clock.now += 30.0
            for number, data in enumerate(bodies):
                run = parse_run_response(json.loads(data))
                outcome = Fetched(run, 1, "200", requested=clock.now)
                recorder.apply(f"r{number:06d}", outcome)
        fragments = page.fragments()
        assert len(fragments) == RUNS
        assert sum(entry.get("event") == "sampler_status_observed" for entry in logs) == RUNS
        logs.clear()
        del fragments, run, outcome
        gc.collect()
        after, blocks_after = _traced()
    per_run = (after - before) / RUNS
    allocations = (blocks_after - blocks_before) / RUNS
    assert per_run < BYTES_PER_RUN, f"{per_run:,.0f} bytes a run"
    assert allocations < ALLOCATIONS_PER_RUN, f"{allocations:.1f} allocations a run"
    # The path really was taken: every run is exported with its status.
    text = recorder.metrics.render("text/plain")[0].decode()
    assert text.count(',status="ACTIVE"} 1.0') == 2 * RUNS  # sampler and run status


def _traced() -> tuple[int, int]:
    snapshot = tracemalloc.take_snapshot()
    return sum(s.size for s in snapshot.statistics("filename")), len(snapshot.traces)
