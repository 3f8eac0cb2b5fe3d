"""End to end: the real watcher restarted on its state file, cleanly, by `kill -9`, on bad files.

Each test runs `python -m watcher --state-file PATH` against the simulator, stops or kills it,
changes the simulated runs while it is down, starts it again on the same file and compares
what the second process exports and logs with what the first one saw and the file holds.
"""

from __future__ import annotations

import itertools
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support import Exposition, wait_until
from support.e2e import FAST, StartSimulator, StartWatcher, WatcherProcess

from watcher.model import SAMPLER_STATUSES
from watcher.state import StateStore
from watcher.tracker import Saved

pytestmark = pytest.mark.e2e

WRITABLE = "loops_watcher_state_file_writable"
TRANSITIONS = "baseten_loops_sampler_status_transitions_total"
SINCE = "baseten_loops_sampler_status_since_timestamp_seconds"


def args(
    api_url: str, state_file: Path, run_ids: Iterator[str] | list[str], *extra: str
) -> list[str]:
    runs = [arg for run_id in run_ids for arg in ("--run-id", run_id)]
    return ["--api-url", api_url, "--state-file", str(state_file), *FAST, *runs, *extra]


def transitions(metrics: Exposition, run_id: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["from_status"], s.labels["to_status"]): s.value
        for s in metrics.find(TRANSITIONS, run_id=run_id)
    }


def read_state(path: Path) -> dict[str, Saved]:
    """What the file holds, through the watcher's own loader."""
    store = StateStore(path, CollectorRegistry())
    try:
        return store.open()
    finally:
        store.close()


def test_restart_keeps_clocks_counts_and_reports_what_changed_meanwhile(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    state_file = tmp_path / "state.db"
    runs = {"steady": "ACTIVE", "waking": "SCALED_TO_ZERO", "moves": "ACTIVE", "trainer": None}
    served = start_simulator(runs)
    first = start_watcher(*args(served.url, state_file, list(runs)))
    first.wait_for_metrics(
        lambda m: all(m.status_of(r) == s for r, s in runs.items() if s), what="first statuses"
    )
    served.sim.set_status("waking", "WAKING_UP")
    before = first.wait_for_metrics(
        lambda m: m.status_of("waking") == "WAKING_UP", what="the wake-up to begin"
    )
    first.send(signal.SIGTERM)
    assert first.wait_exit(timeout=5) == 0

    served.sim.set_status("moves", "FAILED")  # while nobody watches
    second = start_watcher(*args(served.url, state_file, list(runs)))
    loaded = second.wait_for_log("state_file_loaded")
    assert loaded["runs"] == len(runs)
    after = second.wait_for_metrics(
        lambda m: m.status_of("moves") == "FAILED" and m.status_of("waking") == "WAKING_UP",
        what="the second process's first polls",
    )
    for run_id in ("steady", "waking"):
        assert after.value(SINCE, run_id=run_id) == before.value(SINCE, run_id=run_id), run_id
    assert after.value(SINCE, run_id="trainer") is None
    assert after.find("baseten_loops_run_info", run_id="trainer")
    # The restored runs are continued, not seen for the first time.
    assert second.logs("sampler_status_observed") == []
    (change,) = second.logs("sampler_status_changed")
    assert (change["run_id"], change["from_status"], change["to_status"]) == (
        "moves",
        "ACTIVE",
        "FAILED",
    )
    assert change["across_restart"] is True
    assert change["seconds_in_previous_status"] is None
    assert change["level"] == "error"
    assert transitions(after, "moves") == {("ACTIVE", "FAILED"): 1}
    assert transitions(after, "waking") == {("SCALED_TO_ZERO", "WAKING_UP"): 1}
    assert after.value(WRITABLE) == 1

    # A status that began before the restart is timed from its real beginning when it ends.
    mark = second.mark()
    served.sim.set_status("waking", "ACTIVE")
    ended = time.time()
    woke = second.wait_for_metrics(
        lambda m: m.status_of("waking") == "ACTIVE", what="the wake-up to finish"
    )
    (done,) = second.logs("sampler_status_changed", since=mark)
    assert done["across_restart"] is False
    began = before.value(SINCE, run_id="waking")
    assert began is not None
    assert ended - began <= done["seconds_in_previous_status"] <= time.time() - began
    assert woke.value(
        "baseten_loops_sampler_status_duration_seconds_count", status="WAKING_UP"
    ) == (1)
    assert transitions(woke, "waking") == {
        ("SCALED_TO_ZERO", "WAKING_UP"): 1,
        ("WAKING_UP", "ACTIVE"): 1,
    }
    assert transitions(woke, "moves") == {("ACTIVE", "FAILED"): 1}


# Every run walks the documented statuses in its own order, never repeating one, so each
# (from, to) pair can happen at most once and a pair counted twice shows as a 2.
BURST_RUNS = 8
STEP_SECONDS = 0.15


def path_of(index: int) -> list[str]:
    return [*SAMPLER_STATUSES[index:], *SAMPLER_STATUSES[:index]]


class Burst:
    """A thread moving every run one step along its path every STEP_SECONDS, until stopped."""

    def __init__(self, sim_set_status: object, paths: dict[str, list[str]]) -> None:
        self._set = sim_set_status
        self.paths = paths
        self.position = dict.fromkeys(paths, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Burst:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(STEP_SECONDS):
            for run_id, path in self.paths.items():
                if self.position[run_id] + 1 < len(path):
                    self.position[run_id] += 1
                    self._set(run_id, path[self.position[run_id]])  # type: ignore[operator]


def statuses_seen(watcher: WatcherProcess, run_id: str, until: float | None = None) -> list[str]:
    """The statuses a watcher logged for a run, in order (first sight, then each change)."""
    seen: list[str] = []
    for line in watcher.logs(run_id=run_id):
        if until is not None and datetime.fromisoformat(line["timestamp"]).timestamp() > until:
            break
        if line["event"] == "sampler_status_observed":
            seen.append(line["status"])
        elif line["event"] == "sampler_status_changed":
            assert line["from_status"] == seen[-1], line
            seen.append(line["to_status"])
    return seen


def pairs(path: list[str]) -> dict[tuple[str, str], int]:
    return dict(Counter(itertools.pairwise(path)))


def test_kill_9_in_a_burst_of_transitions_loses_nothing_written_and_counts_nothing_twice(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    state_file = tmp_path / "state.db"
    paths = {f"burst-{n}": path_of(n) for n in range(BURST_RUNS)}
    served = start_simulator({run_id: path[0] for run_id, path in paths.items()})
    fast = ("--poll-interval", "0.1", "--fast-poll-interval", "0.1")
    first = start_watcher(*args(served.url, state_file, list(paths), *fast))
    first.wait_for_metrics(
        lambda m: all(m.status_of(r) == p[0] for r, p in paths.items()), what="first statuses"
    )
    with Burst(served.sim.set_status, paths) as burst:
        wait_until(
            lambda: len(first.logs("sampler_status_changed")) >= 8 * BURST_RUNS,
            timeout=20,
            what="eight transitions of every run",
        )
        first.proc.send_signal(signal.SIGKILL)  # in the middle of the burst
        killed = time.time()
        first.wait_exit(timeout=5)
        first.join_output()
        time.sleep(3 * STEP_SECONDS)  # the burst goes on while nobody watches
    final = {run_id: path[burst.position[run_id]] for run_id, path in paths.items()}

    written = read_state(state_file)
    second = start_watcher(*args(served.url, state_file, list(paths), *fast))
    after = second.wait_for_metrics(
        lambda m: all(m.status_of(r) == s for r, s in final.items()), what="the final statuses"
    )
    for run_id, path in paths.items():
        seen = statuses_seen(first, run_id)
        assert seen == [s for s in path if s in seen], f"{run_id} out of order: {seen}"
        # What the file holds is a point on what the first process saw, transitions consistent.
        saved = written[run_id]
        assert saved.status is not None
        at = seen.index(saved.status)
        assert {(a, b): n for a, b, n in saved.transitions} == pairs(seen[: at + 1])
        # Anything seen a second before the kill had long been committed.
        assert at + 1 >= len(statuses_seen(first, run_id, until=killed - 1.0)), run_id
        # The second process continues from the file: one change for what happened meanwhile.
        changes = second.logs("sampler_status_changed", run_id=run_id)
        if saved.status == final[run_id]:
            assert changes == []
            assert after.value(SINCE, run_id=run_id) == saved.since
        else:
            (change,) = changes
            assert (change["from_status"], change["to_status"]) == (saved.status, final[run_id])
            assert change["across_restart"] is True
            assert change["seconds_in_previous_status"] is None
        expected = pairs([*seen[: at + 1], final[run_id]] if changes else seen[: at + 1])
        assert transitions(after, run_id) == expected, run_id  # every count is 1: none twice
    assert second.logs("sampler_status_observed") == []


def test_an_unusable_state_file_is_moved_aside_and_the_watcher_starts_afresh(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    state_file = tmp_path / "state.db"
    state_file.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # a header, then ruin
    served = start_simulator({"run-a": "ACTIVE"})
    watcher = start_watcher(*args(served.url, state_file, ["run-a"]))
    metrics = watcher.wait_for_metrics(lambda m: m.status_of("run-a") == "ACTIVE", what="a poll")
    (line,) = [log for log in watcher.logs() if log["level"] == "error"]
    assert line["event"] == "state_file_moved_aside"
    assert Path(line["moved_to"]).read_bytes().startswith(b"SQLite format 3\x00\xff")
    assert metrics.value(WRITABLE) == 1
    assert [log["run_id"] for log in watcher.logs("sampler_status_observed")] == ["run-a"]
    watcher.send(signal.SIGTERM)
    assert watcher.wait_exit(timeout=5) == 0
    assert set(read_state(state_file)) == {"run-a"}


def test_a_full_disk_keeps_the_watcher_running_in_memory_until_it_can_write_again(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    state_file = tmp_path / "state.db"
    runs = {f"run-{n}": "ACTIVE" for n in range(5)}
    served = start_simulator(runs)
    watcher = start_watcher(*args(served.url, state_file, list(runs)))
    watcher.wait_for_metrics(
        lambda m: all(m.status_of(r) == "ACTIVE" for r in runs), what="first statuses"
    )
    pid = watcher.proc.pid
    # No file of the watcher's may grow by a byte: what a full disk looks like to SQLite.
    unlimited = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, unlimited[1]))  # a soft limit: undoable
    try:
        for run_id in runs:
            served.sim.set_status(run_id, "UNHEALTHY")
        full = watcher.wait_for_metrics(
            lambda m: m.value(WRITABLE) == 0 and all(m.status_of(r) == "UNHEALTHY" for r in runs),
            what="the writes to fail while polling goes on",
        )
        (line,) = watcher.logs("state_file_unwritable")
        assert line["level"] == "error"
        assert line["path"] == str(state_file)
        assert all(full.value("loops_watcher_poll_success", run_id=r) == 1 for r in runs)
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, unlimited)
    watcher.wait_for_metrics(lambda m: m.value(WRITABLE) == 1, what="the writes to resume")
    watcher.wait_for_log("state_file_writable")
    watcher.kill()  # kill -9: what was queued while the disk was full has been written since
    assert {saved.status for saved in read_state(state_file).values()} == {"UNHEALTHY"}
