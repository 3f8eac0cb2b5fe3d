"""List mode and discovery, with the real watcher and the real simulator in one event loop.

Statuses that arrive through `GET /v1/loops/runs` must have exactly the effect of per-run
polls; runs appear and disappear with the list; the list is one request per interval.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from support import FAKE_KEY, Exposition, until

from watcher.cli import run_once
from watcher.config import Settings, load_settings
from watcher.daemon import Watcher
from watcher.listing import LIST_MODE_MIN_RUNS
from watcher.sharding import shard_of
from watcher.simulator import Fault, Simulator
from watcher.simulator.scenarios import Scenario

# The watcher and the simulator share one event loop whose clock is virtual: it jumps to the
# next timer whenever nothing is left to do, so waiting out poll intervals costs no real time
# and a loaded machine cannot stretch them.
pytestmark = pytest.mark.looptime

CALLER = "ada@example.com"


@dataclass
class Harness:
    simulator: Simulator
    watcher: Watcher

    def samples(self, family: str) -> dict[tuple[tuple[str, str], ...], float]:
        return Exposition.parse(self.watcher.metrics.render("")[0]).by_labels(family)

    def status_of(self, run_id: str) -> str | None:
        return Exposition.parse(self.watcher.metrics.render("")[0]).status_of(run_id)

    def run_gets(self) -> int:
        counts = self.simulator.request_counts()
        return sum(n for path, n in counts.items() if path.startswith("/v1/loops/runs/"))

    def lists(self) -> int:
        return self.simulator.request_counts().get("/v1/loops/runs", 0)


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(Scenario(caller=CALLER, runs=()), api_keys=[FAKE_KEY])
    await sim.start("127.0.0.1", 0)
    yield sim
    await sim.close()


def settings_for(sim: Simulator, *argv: str) -> Settings:
    return load_settings(
        [
            "--api-url",
            sim.url,
            "--listen-address",
            "127.0.0.1:0",
            "--poll-interval",
            "0.4",
            "--fast-poll-interval",
            "0.1",
            "--request-timeout",
            "1",
            "--max-retries",
            "0",
            "--max-requests-per-second",
            "1000",
            *argv,
        ],
        {"BASETEN_API_KEY": FAKE_KEY},
        stdout_is_tty=False,
    )


@pytest.fixture
async def start(simulator: Simulator) -> AsyncIterator[Callable[..., Harness]]:
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def launch(*argv: str) -> Harness:
        watcher = Watcher(settings_for(simulator, *argv), registry=CollectorRegistry())
        tasks.append(asyncio.create_task(watcher.lifecycle.serve(stop)))
        return Harness(simulator, watcher)

    yield launch
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)


async def test_discovery_follows_the_list(
    simulator: Simulator, start: Callable[..., Harness]
) -> None:
    simulator.set_run("mine001", status="ACTIVE", owner=CALLER)
    simulator.set_run("theirs1", status="SCALED_TO_ZERO", owner="bob@example.com")
    own = start("--discover", "own")
    await until(lambda: own.status_of("mine001") == "ACTIVE")
    assert own.status_of("theirs1") is None
    assert own.watcher.probes.readiness()[0]

    org = start("--discover", "org", "--listen-address", "127.0.0.1:0")
    await until(lambda: org.status_of("theirs1") == "SCALED_TO_ZERO")

    # A new run is picked up by the next list.
    simulator.set_run("newrun1", status="BUILDING", owner=CALLER)
    await until(lambda: own.status_of("newrun1") == "BUILDING")

    # A run that leaves the list loses every series after a confirming list.
    with capture_logs() as logs:
        simulator.remove_run("mine001")
        await until(lambda: "mine001" not in own.watcher.metrics.render("")[0].decode())
    assert {"event": "run_unwatched", "run_id": "mine001", "log_level": "info"} in logs


async def test_list_statuses_make_the_same_transitions(
    simulator: Simulator, start: Callable[..., Harness]
) -> None:
    for number in range(LIST_MODE_MIN_RUNS):
        simulator.set_run(f"run{number:04d}", status="SCALED_TO_ZERO")
    run_ids = [
        arg for number in range(LIST_MODE_MIN_RUNS) for arg in ("--run-id", f"run{number:04d}")
    ]
    harness = start(*run_ids)
    await until(lambda: harness.status_of("run0000") == "SCALED_TO_ZERO")
    with capture_logs() as logs:
        simulator.set_status("run0000", "FAILED")
        await until(lambda: harness.status_of("run0000") == "FAILED")
    changes = [log for log in logs if log["event"] == "sampler_status_changed"]
    assert len(changes) == 1
    assert changes[0]["from_status"] == "SCALED_TO_ZERO"
    assert changes[0]["to_status"] == "FAILED"
    assert changes[0]["log_level"] == "error"
    transitions = harness.samples("baseten_loops_sampler_status_transitions_total")
    assert transitions == {
        (("from_status", "SCALED_TO_ZERO"), ("run_id", "run0000"), ("to_status", "FAILED")): 1.0
    }


async def test_list_mode_costs_one_request_per_interval(
    simulator: Simulator, start: Callable[..., Harness]
) -> None:
    count = 40
    for number in range(count):
        simulator.set_run(f"set{number:04d}", status="ACTIVE")
    simulator.set_run("moving1", status="WAKING_UP")
    run_ids = ["--run-id", "moving1"]
    for number in range(count):
        run_ids += ["--run-id", f"set{number:04d}"]
    harness = start(*run_ids, "--poll-interval", "1")
    await until(lambda: harness.watcher.probes.readiness()[0])
    await asyncio.sleep(1.0)  # let the first round of individual polls settle
    moving_before = simulator.request_counts().get("/v1/loops/runs/moving1", 0)
    gets_before, lists_before = harness.run_gets(), harness.lists()
    await asyncio.sleep(3.0)  # three poll intervals
    gets = harness.run_gets() - gets_before
    lists = harness.lists() - lists_before
    assert 2 <= lists <= 4
    # Only the transitional run is still polled on its own, at the fast interval.
    moving = simulator.request_counts().get("/v1/loops/runs/moving1", 0) - moving_before
    assert moving >= 10
    assert gets - moving <= 1


async def test_an_unchanged_list_holds_no_second_copy_of_its_runs(
    simulator: Simulator, start: Callable[..., Harness]
) -> None:
    run_ids = [f"run{number:04d}" for number in range(LIST_MODE_MIN_RUNS)]
    for run_id in run_ids:
        simulator.set_run(run_id, status="ACTIVE")
    harness = start(*(arg for run_id in run_ids for arg in ("--run-id", run_id)))
    tracker = harness.watcher.tracker
    await until(lambda: all(harness.status_of(run_id) == "ACTIVE" for run_id in run_ids))
    held = {run_id: tracker.runs[run_id].run for run_id in run_ids}
    lists = harness.lists()
    simulator.set_status(run_ids[0], "FAILED")
    await until(lambda: harness.lists() >= lists + 2)  # the first of these has been recorded
    assert harness.status_of(run_ids[0]) == "FAILED"
    assert [run_id for run_id in run_ids if tracker.runs[run_id].run is not held[run_id]] == [
        run_ids[0]
    ]


async def test_a_slow_list_still_comes_once_per_interval(
    simulator: Simulator, start: Callable[..., Harness]
) -> None:
    simulator.set_run("slow001", status="ACTIVE")
    simulator.add_fault(Fault(kind="delay", delay=0.5, endpoint="list"))
    harness = start("--discover", "org", "--poll-interval", "1")
    await until(lambda: harness.watcher.probes.readiness()[0])
    lists_before = harness.lists()
    await asyncio.sleep(10.0)
    # Counted from each list's start, 9 to 11 intervals of 0.95-1.05 s fit in 10 s; counted
    # from each answer, as many of 1.45-1.55 s make at most 7.
    assert 9 <= harness.lists() - lists_before <= 11


async def test_runs_the_list_lacks_and_keys_it_rejects_fall_back_to_gets(
    simulator: Simulator, start: Callable[..., Harness]
) -> None:
    for number in range(LIST_MODE_MIN_RUNS):
        simulator.set_run(f"run{number:04d}", status="ACTIVE")
    simulator.add_fault(Fault(kind="status", status=403, endpoint="list"))
    run_ids = [
        arg for number in range(LIST_MODE_MIN_RUNS) for arg in ("--run-id", f"run{number:04d}")
    ]
    with capture_logs() as logs:
        harness = start(*run_ids)
        await until(
            lambda: all(harness.status_of(f"run{n:04d}") for n in range(LIST_MODE_MIN_RUNS))
        )
        lists = harness.lists()
        await asyncio.sleep(1.0)
    assert harness.lists() == lists == 1  # after one refusal the list is not asked again
    events = [log["event"] for log in logs]
    assert events.count("list_mode_unavailable") == 1
    assert harness.run_gets() >= 2 * LIST_MODE_MIN_RUNS
    # The key reads every run: refused a list it never needed, it is not a rejected key.
    assert "api_key_rejected" not in events
    registry = harness.watcher.metrics.registry
    assert registry.get_sample_value("loops_watcher_api_key_rejected") == 0


async def test_once_reads_many_runs_with_one_list(simulator: Simulator) -> None:
    run_ids = [f"run{number:04d}" for number in range(LIST_MODE_MIN_RUNS)]
    for run_id in run_ids:
        simulator.set_run(run_id, status="ACTIVE")
    simulator.set_status(run_ids[3], "UNHEALTHY")
    out = io.StringIO()
    argv = [arg for run_id in [*run_ids, "gone123"] for arg in ("--run-id", run_id)]
    code = await run_once(settings_for(simulator, "--once", *argv), out)
    assert code == 1  # a failing run outranks the unreadable one
    table = out.getvalue()
    assert "UNHEALTHY" in table
    assert "unreadable: not_found" in table
    assert simulator.request_counts() == {"/v1/loops/runs": 1, "/v1/loops/runs/gone123": 1}


async def test_shards_split_configured_file_and_discovered_runs(
    simulator: Simulator, start: Callable[..., Harness], tmp_path: Path
) -> None:
    configured = [f"conf{number:03d}" for number in range(12)]
    in_file = [f"file{number:03d}" for number in range(12)]
    discovered = [f"disc{number:03d}" for number in range(12)]
    for run_id in (*configured, *in_file, *discovered):
        simulator.set_run(run_id, status="ACTIVE", owner=CALLER)
    run_ids_file = tmp_path / "runs.txt"
    run_ids_file.write_text("\n".join(in_file) + "\n")
    argv = [arg for run_id in configured for arg in ("--run-id", run_id)]
    argv += ["--run-ids-file", str(run_ids_file), "--discover", "own", "--total-shards", "2"]
    shards = [start(*argv, "--shard", str(index)) for index in range(2)]
    everything = {*configured, *in_file, *discovered}

    def split() -> bool:
        return all(
            set(shard.watcher.tracker.runs) == {r for r in everything if shard_of(r, 2) == index}
            for index, shard in enumerate(shards)
        )

    await until(split)
    assert all(len(shard.watcher.tracker.runs) < len(everything) for shard in shards)
    await until(
        lambda: all(shard.status_of(r) for shard in shards for r in shard.watcher.tracker.runs)
    )
    for index, shard in enumerate(shards):
        exported = {
            dict(labels)["run_id"] for labels in shard.samples("loops_watcher_poll_success")
        }
        assert exported == set(shard.watcher.tracker.runs)
        assert shard.samples("loops_watcher_shard_info") == {
            (("shard", str(index)), ("total_shards", "2")): 1.0
        }

    # Runs arriving later, by the file or by the list, land in exactly one shard too.
    simulator.set_run("late-listed", status="ACTIVE", owner=CALLER)
    simulator.set_run("late-filed", status="ACTIVE", owner="bob@example.com")
    run_ids_file.write_text("\n".join([*in_file, "late-filed"]) + "\n")
    everything |= {"late-listed", "late-filed"}
    await until(split, within=10.0)
