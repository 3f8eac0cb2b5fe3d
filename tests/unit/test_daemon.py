"""The watcher's handling of outcomes: log events, levels, metrics, key rejection, readiness."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from support import FAKE_KEY, FakeClock
from support.factories import make_run

from watcher import watchlist
from watcher.config import load_settings
from watcher.daemon import Watcher
from watcher.listing import DISCOVERY_FAILING_AFTER
from watcher.model import SAMPLER_STATUSES, Failed, Fetched, Result, Run
from watcher.recorder import change_level


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def watcher(clock: FakeClock) -> Watcher:
    settings = load_settings(
        ["--run-id", "k4q95w5", "--run-id", "7wq2m3x"],
        {"BASETEN_API_KEY": FAKE_KEY},
        stdout_is_tty=False,
    )
    instance = Watcher(settings, registry=CollectorRegistry(), clock=clock)
    instance.sync_runs(instance.watchlist.desired(), spread=0)
    return instance


def ok(run: Run) -> Fetched[Run]:
    return Fetched(run, 1, "200")


def failed(result: Result, detail: str = "boom", retry_after: float | None = None) -> Failed:
    return Failed(result, detail, 4, "error", retry_after)


@pytest.mark.parametrize(
    ("status", "level"),
    [
        ("FAILED", "error"),
        ("UNHEALTHY", "error"),
        ("DEPLOY_FAILED", "error"),
        ("BUILD_FAILED", "error"),
        ("BUILD_STOPPED", "error"),
        ("INACTIVE", "warning"),
        ("DEACTIVATING", "warning"),
        ("ACTIVE", "info"),
        ("WAKING_UP", "info"),
        ("SCALED_TO_ZERO", "info"),
        ("SOMETHING_NEW", "info"),
    ],
)
def test_change_levels(status: str, level: str) -> None:
    assert change_level(status) == level


def test_every_documented_status_has_a_level() -> None:
    assert {change_level(status) for status in SAMPLER_STATUSES} == {"info", "warning", "error"}


def test_observation_then_transitions_are_logged_once_each(
    watcher: Watcher, clock: FakeClock
) -> None:
    with capture_logs() as logs:
        watcher.recorder.apply("k4q95w5", ok(make_run("SCALED_TO_ZERO")))
        clock.now += 30
        watcher.recorder.apply("k4q95w5", ok(make_run("WAKING_UP")))
        clock.now += 5
        watcher.recorder.apply("k4q95w5", ok(make_run("WAKING_UP")))
        clock.now += 40
        watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE")))
        clock.now += 100
        watcher.recorder.apply("k4q95w5", ok(make_run("FAILED")))
    events = [(log["event"], log["log_level"]) for log in logs]
    assert events == [
        ("sampler_status_observed", "info"),
        ("sampler_status_changed", "info"),
        ("sampler_status_changed", "info"),
        ("sampler_status_changed", "error"),
    ]
    wake, active, failing = logs[1], logs[2], logs[3]
    assert wake["from_status"] == "SCALED_TO_ZERO"
    assert wake["to_status"] == "WAKING_UP"
    assert wake["seconds_in_previous_status"] is None
    assert wake["run_id"] == "k4q95w5"
    assert wake["sampler_id"] == "smp1"
    assert active["seconds_in_previous_status"] == 45
    assert failing["seconds_in_previous_status"] == 100
    registry_text = watcher.metrics.render("")[0].decode()
    assert 'baseten_loops_sampler_status_duration_seconds_count{status="WAKING_UP"} 1.0' in (
        registry_text
    )
    assert 'baseten_loops_sampler_status_duration_seconds_count{status="ACTIVE"} 1.0' in (
        registry_text
    )
    assert 'duration_seconds_count{status="SCALED_TO_ZERO"}' not in registry_text


def test_failures_warn_once_per_streak_and_key_rejection_once(watcher: Watcher) -> None:
    with capture_logs() as logs:
        for _ in range(3):
            watcher.recorder.apply("k4q95w5", failed(Result.UNAUTHORIZED))
            watcher.recorder.apply("7wq2m3x", failed(Result.UNAUTHORIZED))
    levels = [(log["event"], log["log_level"]) for log in logs]
    assert levels.count(("api_key_rejected", "error")) == 1
    assert levels.count(("poll_failed", "warning")) == 2  # one per run, at the start of a streak
    assert levels.count(("poll_failed", "debug")) == 4
    assert FAKE_KEY not in repr(logs)
    with capture_logs() as logs:
        watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE")))
        watcher.recorder.apply("7wq2m3x", failed(Result.UNAUTHORIZED))
    assert [log["event"] for log in logs] == [
        "sampler_status_observed",
        "poll_recovered",
        "api_key_accepted",
        "poll_failed",
        "api_key_rejected",
    ]


def key_rejected(watcher: Watcher) -> float | None:
    return watcher.metrics.registry.get_sample_value("loops_watcher_api_key_rejected")


def test_key_rejected_gauge_holds_from_the_first_rejection_until_a_poll_succeeds(
    watcher: Watcher,
) -> None:
    assert key_rejected(watcher) == 0, "exported at 0 before anything was rejected"
    watcher.recorder.apply("k4q95w5", failed(Result.FORBIDDEN))
    assert key_rejected(watcher) == 1, "the first rejection sets it"
    # Timeouts and 5xx say nothing about the key, however many come and however slowly.
    for result in (Result.TIMEOUT, Result.SERVER_ERROR, Result.CONNECTION_ERROR):
        watcher.recorder.apply("7wq2m3x", failed(result))
        assert key_rejected(watcher) == 1
    watcher.recorder.apply("7wq2m3x", ok(make_run("ACTIVE", run_id="7wq2m3x")))
    assert key_rejected(watcher) == 0


def test_failure_backs_off_and_honours_retry_after(watcher: Watcher) -> None:
    first = watcher.recorder.apply("k4q95w5", failed(Result.RATE_LIMITED, retry_after=42))
    second = watcher.recorder.apply("k4q95w5", failed(Result.TIMEOUT))
    assert first.retry_after == 42
    assert (first.failures, second.failures) == (1, 2)
    assert not watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE"))).fast
    assert watcher.recorder.apply("k4q95w5", ok(make_run("WAKING_UP"))).fast


def test_undocumented_status_warns_once(watcher: Watcher) -> None:
    with capture_logs() as logs:
        watcher.recorder.apply("k4q95w5", ok(make_run("HIBERNATING")))
        watcher.recorder.apply(
            "7wq2m3x", ok(make_run("HIBERNATING", run_id="7wq2m3x", id="7wq2m3x"))
        )
    assert [log["event"] for log in logs].count("undocumented_sampler_status") == 1


def test_outcome_for_an_unwatched_run_is_dropped(watcher: Watcher) -> None:
    watcher.sync_runs({"7wq2m3x": None}, spread=0)
    watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE")))
    assert "k4q95w5" not in watcher.metrics.render("")[0].decode()


def test_readiness_waits_for_first_round_then_latches(watcher: Watcher) -> None:
    watcher.recorder.begin()
    assert not watcher.probes.readiness()[0]
    watcher.recorder.apply("k4q95w5", failed(Result.CONNECTION_ERROR))
    assert not watcher.probes.readiness()[0]
    watcher.recorder.apply("7wq2m3x", failed(Result.CONNECTION_ERROR))  # attempted, even if failed
    assert watcher.probes.readiness() == (True, "ok")
    watcher.sync_runs({"new1234": None, **watcher.watchlist.desired()}, spread=0)
    assert watcher.probes.readiness()[0]


def test_health_follows_the_poll_loop(watcher: Watcher) -> None:
    assert watcher.probes.health() == (True, "ok")
    watcher.scheduler.heartbeat -= 60
    healthy, message = watcher.probes.health()
    assert not healthy
    assert "poll loop" in message


def file_watcher(tmp_path: Path) -> tuple[Watcher, Path]:
    path = tmp_path / "run-ids"
    path.write_text("k4q95w5\n7wq2m3x\n")
    settings = load_settings(
        ["--run-ids-file", str(path)], {"BASETEN_API_KEY": FAKE_KEY}, stdout_is_tty=False
    )
    return Watcher(settings, registry=CollectorRegistry()), path


async def test_a_run_ids_file_turned_into_a_fifo_keeps_the_last_good_set(tmp_path: Path) -> None:
    watcher, path = file_watcher(tmp_path)
    await watcher.watchlist.reload_file("start")
    path.unlink()
    os.mkfifo(path)
    with capture_logs() as logs:
        await asyncio.wait_for(watcher.watchlist.reload_file("changed"), timeout=5)
    assert logs == [
        {
            "event": "run_ids_file_invalid",
            "log_level": "error",
            "path": str(path),
            "reason": "changed",
            "error": f"--run-ids-file: {str(path)!r} is a FIFO, not a regular file",
        }
    ]
    assert list(watcher.watchlist.desired()) == ["k4q95w5", "7wq2m3x"]


async def test_the_run_ids_file_is_read_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher, _ = file_watcher(tmp_path)
    readers: list[threading.Thread] = []

    def read(path: Path) -> tuple[str, ...]:
        readers.append(threading.current_thread())
        return ("k4q95w5",)

    monkeypatch.setattr(watchlist, "read_run_ids_file", read)
    await watcher.watchlist.reload_file("start")
    assert readers
    assert readers[0] is not threading.main_thread()
    assert list(watcher.watchlist.desired()) == ["k4q95w5"]


def kinds(watcher: Watcher) -> list[str]:
    return [problem.kind for problem in watcher.probes.problems()]


def test_a_rejected_key_is_a_problem_until_a_poll_succeeds(
    watcher: Watcher, clock: FakeClock
) -> None:
    watcher.recorder.apply("k4q95w5", failed(Result.FORBIDDEN))
    (problem,) = watcher.probes.problems()
    assert (problem.kind, problem.since) == ("key_rejected", clock.now)
    assert FAKE_KEY not in problem.message
    watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE")))
    assert watcher.probes.problems() == []


def test_the_api_is_unreachable_after_attempts_in_a_row_get_no_answer(
    watcher: Watcher, clock: FakeClock
) -> None:
    watcher.recorder.attempt_finished("error", 2.0)
    watcher.recorder.attempt_finished("error", 2.0)
    assert kinds(watcher) == []
    watcher.recorder.attempt_finished("error", 2.0)
    (problem,) = watcher.probes.problems()
    assert problem.kind == "api_unreachable"
    assert problem.since == clock.now - 2.0
    watcher.recorder.attempt_finished("503", 0.1)  # an answer, even a bad one: the API is reachable
    assert kinds(watcher) == []


def test_failing_lists_are_a_problem_only_with_discovery(clock: FakeClock) -> None:
    def lists_fail(*argv: str) -> list[list[str]]:
        """The problems before each failed list and after the last."""
        settings = load_settings(
            ["--run-id", "k4q95w5", *argv], {"BASETEN_API_KEY": FAKE_KEY}, stdout_is_tty=False
        )
        instance = Watcher(settings, registry=CollectorRegistry(), clock=clock)
        seen = []
        for _ in range(DISCOVERY_FAILING_AFTER):
            seen.append(kinds(instance))
            asyncio.run(instance.listing.record(Failed(Result.SERVER_ERROR, "boom", 4, "503")))
        return [*seen, kinds(instance)]

    assert lists_fail("--discover", "org") == [[], [], [], ["discovery_failing"]]
    assert lists_fail() == [[], [], [], []]


def test_data_goes_stale_when_nothing_was_read_for_a_while(
    watcher: Watcher, clock: FakeClock
) -> None:
    watcher.recorder.begin()
    clock.now += 3 * watcher.settings.poll_interval
    assert kinds(watcher) == []
    clock.now += watcher.settings.request_timeout + 1
    (problem,) = watcher.probes.problems()
    assert (problem.kind, problem.since) == ("data_stale", clock.now - 101)
    watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE")))
    assert kinds(watcher) == []
    watcher.scheduler.heartbeat -= 60
    assert kinds(watcher) == ["data_stale"]  # the poll loop itself stopped
