"""End to end: several real `loops-watcher` shard processes sharing 3,000 runs of the simulator.

Each shard must export exactly its own runs, the shards together every run, growing from three
shards to four must move about a quarter of the runs, and in list mode the API must see one
list request per shard per interval and no request per run.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from support import wait_until
from support.e2e import FAST, StartSimulator, StartWatcher, WatcherProcess, run_watcher, watcher_env

from watcher.sharding import hostname_ordinal

pytestmark = pytest.mark.e2e

RUNS = [f"r{number:04d}x" for number in range(3000)]
INTERVAL = 2.0  # seconds between lists; a settled run listed is not polled on its own for 2.5x


def shard_args(total: int, index: int, *extra: str) -> tuple[str, ...]:
    # A list of 3,000 runs, served by a simulator that shares this test's process, can take
    # more than FAST's 1 s on a busy machine: timed out, it would leave every run to be polled
    # on its own, swamping the simulator, and no list would be counted.
    return (*FAST, "--poll-interval", str(INTERVAL), "--request-timeout", "10", "--total-shards",
            str(total), "--shard", str(index), *extra)  # fmt: skip


def exported_runs(shard: WatcherProcess) -> set[str]:
    """The runs a shard exports a sampler status for."""
    metrics = shard.scrape()
    return {s.labels["run_id"] for s in metrics.find("baseten_loops_sampler_status") if s.value}


def wait_for_split(shards: Sequence[WatcherProcess]) -> list[set[str]]:
    """Each shard's exported runs, once together they cover every run."""

    def covered() -> list[set[str]] | None:
        sets = [exported_runs(shard) for shard in shards]
        return sets if set().union(*sets) == set(RUNS) else None

    return wait_until(covered, timeout=60.0, what=f"{len(shards)} shards to cover every run")


def assert_partition(sets: list[set[str]]) -> None:
    assert sum(len(runs) for runs in sets) == len(RUNS), "some run is exported by two shards"
    assert set().union(*sets) == set(RUNS)
    share = len(RUNS) / len(sets)
    assert all(0.8 * share < len(runs) < 1.2 * share for runs in sets), [len(s) for s in sets]


def api_requests(url: str) -> dict[str, int]:
    """What the simulator's control interface counted: API requests by path."""
    counts: dict[str, int] = httpx.get(f"{url}/_sim/requests").json()["requests"]
    return counts


def test_three_shards_split_discovered_runs_and_list_once_per_interval_each(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    served = start_simulator(dict.fromkeys(RUNS, "ACTIVE"))
    shards = [
        start_watcher("--api-url", served.url, *shard_args(3, index, "--discover", "org"))
        for index in range(3)
    ]
    assert_partition(wait_for_split(shards))
    for index, shard in enumerate(shards):
        metrics = shard.scrape()
        assert metrics.value("loops_watcher_shard_info", shard=str(index), total_shards="3") == 1
        assert metrics.value("loops_watcher_watched_runs") == len(exported_runs(shard))

    before, started = api_requests(served.url), time.monotonic()
    time.sleep(5 * INTERVAL)
    after, elapsed = api_requests(served.url), time.monotonic() - started
    lists = after["/v1/loops/runs"] - before["/v1/loops/runs"]
    per_interval = lists / (elapsed / INTERVAL)
    # Each shard starts a list every 0.95-1.05 intervals, however long the list takes.
    assert 0.8 * len(shards) <= per_interval <= 1.1 * len(shards), (lists, elapsed)
    single = sum(count for path, count in after.items() if path.startswith("/v1/loops/runs/"))
    assert single == sum(
        count for path, count in before.items() if path.startswith("/v1/loops/runs/")
    ), "a settled run covered by the list was polled on its own"


def test_a_fourth_shard_takes_about_a_quarter_of_the_configured_runs(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    served = start_simulator(dict.fromkeys(RUNS, "ACTIVE"))
    run_ids_file = tmp_path / "runs.txt"
    run_ids_file.write_text("\n".join(RUNS) + "\n")
    source = ("--api-url", served.url, "--run-ids-file", str(run_ids_file))

    three = [start_watcher(*source, *shard_args(3, index)) for index in range(3)]
    before = wait_for_split(three)
    assert_partition(before)
    for shard in three:
        shard.kill()

    four = [start_watcher(*source, *shard_args(4, index)) for index in range(4)]
    after = wait_for_split(four)
    assert_partition(after)
    owner_before = {run_id: index for index, runs in enumerate(before) for run_id in runs}
    owner_after = {run_id: index for index, runs in enumerate(after) for run_id in runs}
    moved = {run_id for run_id in RUNS if owner_before[run_id] != owner_after[run_id]}
    # Binomial(3000, 1/4): 750 +- 24; the jump hash moves runs only to the new shard.
    assert 0.22 < len(moved) / len(RUNS) < 0.28, len(moved)
    assert moved == after[3]


def test_a_shard_outside_the_total_is_refused_with_exit_2() -> None:
    finished = run_watcher("--run-id", "abc1234", "--total-shards", "3", "--shard", "3")
    assert finished.returncode == 2
    assert finished.stderr.strip() == (
        "loops-watcher: error: --shard (from command line): invalid value 3: "
        "--total-shards (from command line) is 3, so shards are numbered 0 to 2"
    )
    env = watcher_env(LOOPS_WATCHER_SHARD="auto", LOOPS_WATCHER_TOTAL_SHARDS="100")
    finished = run_watcher("--run-id", "abc1234", "--check-config", env=env)
    hostname = socket.gethostname()
    ordinal = hostname_ordinal(hostname)
    if ordinal is not None and ordinal < 100:
        assert finished.returncode == 0, finished.stderr
        assert f"shard = {ordinal}\n" in finished.stdout
    else:
        assert finished.returncode == 2
        assert finished.stderr.startswith(
            "loops-watcher: error: --shard (from environment LOOPS_WATCHER_SHARD): "
            + (
                "invalid value 'auto': the hostname"
                if ordinal is None
                else "invalid value auto (hostname"
            )
        )
        assert repr(hostname) in finished.stderr
