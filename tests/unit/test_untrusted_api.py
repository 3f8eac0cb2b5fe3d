"""What the API sends cannot crash, blind or bloat the watcher: the daemon's side.

Lists with bad entries, answers that cross, statuses invented on every poll, run IDs that are
no run IDs and discovery that keeps failing, fed to a real `Watcher` as client outcomes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from support import FAKE_KEY, Exposition, FakeClock
from support.factories import make_run

from watcher.config import load_settings
from watcher.daemon import Watcher
from watcher.listing import DISCOVERY_FAILING_AFTER
from watcher.model import Failed, Fetched, InvalidRun, Outcome, Result, Run, RunList, parse_run
from watcher.sharding import shard_of


def make_watcher(*args: str) -> Watcher:
    settings = load_settings(list(args), {"BASETEN_API_KEY": FAKE_KEY}, stdout_is_tty=False)
    watcher = Watcher(settings, registry=CollectorRegistry(), clock=FakeClock())
    watcher.sync_runs(watcher.watchlist.desired(), spread=0)
    return watcher


@pytest.fixture
def watcher() -> Watcher:
    return make_watcher("--run-id", "k4q95w5", "--run-id", "7wq2m3x")


def ok(run: Run, requested: float = 0.0) -> Fetched[Run]:
    return Fetched(run, 1, "200", requested=requested)


def listed(*entries: Run | InvalidRun, requested: float = 0.0) -> Fetched[RunList]:
    runs = [entry for entry in entries if isinstance(entry, Run)]
    invalid = [entry for entry in entries if isinstance(entry, InvalidRun)]
    return Fetched(RunList(runs, invalid), 1, "200", requested=requested)


def feed_lists(watcher: Watcher, outcomes: list[Outcome[RunList]]) -> Iterator[None]:
    """Make the watcher's next list requests answer these outcomes, one each."""

    async def list_runs(*, scope: str | None, base_model: str | None) -> Outcome[RunList]:
        return outcomes.pop(0)

    watcher.client.list_runs = list_runs  # type: ignore[method-assign]
    yield


def scrape(watcher: Watcher) -> Exposition:
    return Exposition.parse(watcher.metrics.render("")[0])


async def run_list(watcher: Watcher, outcome: Outcome[RunList]) -> None:
    for _ in feed_lists(watcher, [outcome]):
        await watcher.listing.round()


async def test_one_bad_list_entry_fails_only_its_run(watcher: Watcher) -> None:
    await run_list(watcher, listed(make_run("ACTIVE"), make_run("ACTIVE", run_id="7wq2m3x")))
    bad = InvalidRun("list entry: run.session_id is missing", "7wq2m3x")
    await run_list(watcher, listed(make_run("FAILED"), bad))
    assert scrape(watcher).status_of("k4q95w5") == "FAILED"
    assert scrape(watcher).value("loops_watcher_poll_success", run_id="k4q95w5") == 1
    assert scrape(watcher).status_of("7wq2m3x") == "ACTIVE"  # its last status is kept
    assert scrape(watcher).value("loops_watcher_poll_success", run_id="7wq2m3x") == 0
    assert scrape(watcher).value("loops_watcher_polls_total", run_id="7wq2m3x", result="ok") == 1
    assert (
        scrape(watcher).value(
            "loops_watcher_polls_total", run_id="7wq2m3x", result="invalid_response"
        )
        == 1
    )


async def test_a_list_sent_before_an_applied_poll_does_not_move_the_run_back(
    watcher: Watcher,
) -> None:
    watcher.recorder.apply("k4q95w5", ok(make_run("SCALED_TO_ZERO"), requested=10.0))
    watcher.recorder.apply("k4q95w5", ok(make_run("WAKING_UP"), requested=30.0))
    with capture_logs() as logs:
        await run_list(watcher, listed(make_run("SCALED_TO_ZERO"), requested=20.0))
        watcher.recorder.apply("k4q95w5", ok(make_run("SCALED_TO_ZERO"), requested=25.0))
    assert scrape(watcher).status_of("k4q95w5") == "WAKING_UP"
    assert not [log for log in logs if log["event"] == "sampler_status_changed"]
    assert (
        scrape(watcher).value(
            "baseten_loops_sampler_status_transitions_total", to_status="SCALED_TO_ZERO"
        )
        is None
    )
    watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE"), requested=31.0))
    assert scrape(watcher).status_of("k4q95w5") == "ACTIVE"


def test_a_new_undocumented_status_every_poll_keeps_series_bounded(watcher: Watcher) -> None:
    clock = watcher.recorder.clock
    assert isinstance(clock, FakeClock)
    with capture_logs():
        for poll in range(300):
            clock.now += 5
            watcher.recorder.apply("k4q95w5", ok(make_run(f"NEW_STATUS_{poll}")))
            clock.now += 5
            watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE")))
    text = watcher.metrics.render("")[0].decode()
    series = [line for line in text.splitlines() if 'run_id="k4q95w5"' in line]
    assert len(series) <= 40, series
    durations = {
        dict(key)["status"]
        for key in scrape(watcher).by_labels("baseten_loops_sampler_status_duration_seconds_count")
    }
    assert durations == {"ACTIVE", "other"}
    assert len(watcher.tracker.undocumented_seen) <= 1000


def test_a_run_that_cannot_be_rendered_is_not_a_successful_poll(
    watcher: Watcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    watcher.recorder.apply("k4q95w5", ok(make_run("ACTIVE")))

    def broken(record: object) -> tuple[str, ...]:
        raise UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed")

    monkeypatch.setattr("watcher.metrics.render_state", broken)
    watcher.recorder.apply("k4q95w5", ok(make_run("FAILED")))
    assert scrape(watcher).value("loops_watcher_poll_success", run_id="k4q95w5") == 0
    assert (
        scrape(watcher).value(
            "loops_watcher_polls_total", run_id="k4q95w5", result="invalid_response"
        )
        == 1
    )
    monkeypatch.undo()
    watcher.recorder.apply("k4q95w5", ok(make_run("FAILED")))  # same run again: now it is exported
    assert scrape(watcher).status_of("k4q95w5") == "FAILED"
    assert scrape(watcher).value("loops_watcher_poll_success", run_id="k4q95w5") == 1


def test_hostile_text_reaches_labels_and_logs_safe_and_short(watcher: Watcher) -> None:
    body = {
        "id": "k4q95w5", "session_id": "s", "base_model": "b", "base_url": "u",
        "created_at": "2026-01-01t00:00:00z", "name": "\udc80" + "n" * 1_000_000,
        "sampler": {"id": "x", "base_url": "u", "base_model": "b", "created_at": "2026-01-01Z",
                    "model_id": None, "deployment_id": None, "status": {"name": ""}},
    }  # fmt: skip
    body["sampler"]["created_at"] = "2026-01-01T00:00:00Z"  # type: ignore[index]
    with capture_logs() as logs:
        watcher.recorder.apply("k4q95w5", ok(parse_run(body)))
    text = watcher.metrics.render("")[0].decode()
    assert len(text) < 20_000
    info = scrape(watcher).by_labels("baseten_loops_run_info")
    (labels,) = [dict(key) for key in info if dict(key)["run_id"] == "k4q95w5"]
    assert labels["run_name"].startswith("\ufffdnnn")
    assert len(labels["run_name"]) <= 256
    assert (labels["model_id"], labels["deployment_id"]) == ("", "")
    assert len(repr(logs)) < 5_000
    assert scrape(watcher).value("loops_watcher_poll_success", run_id="k4q95w5") == 1


async def test_discovered_run_ids_are_checked_and_each_bad_one_warned_once() -> None:
    watcher = make_watcher("--discover", "org")
    bad_ids = ["", "../../etc", "abc\ndef", "abc123\n", "x" * 5000]
    entries: list[Run | InvalidRun] = [make_run("ACTIVE", run_id=run_id) for run_id in bad_ids]
    entries.append(InvalidRun("list entry: run is not an object"))
    entries.append(make_run("ACTIVE", run_id="good123"))
    with capture_logs() as logs:
        await run_list(watcher, listed(*entries))
        await run_list(watcher, listed(*entries))
    assert watcher.scheduler.run_ids == ["good123"]
    skipped = [log for log in logs if log["event"] == "list_entry_skipped"]
    assert len(skipped) == 6
    assert all(log["log_level"] == "warning" for log in skipped)
    assert all(len(repr(log)) < 1_000 for log in skipped)


async def test_discovery_that_keeps_failing_says_so() -> None:
    watcher = make_watcher("--discover", "org")
    assert scrape(watcher).value("loops_watcher_discovery_failing") == 0
    failure = Failed(Result.INVALID_RESPONSE, "body exceeds the 67108864-byte cap", 1, "200")
    with capture_logs() as logs:
        for _ in range(DISCOVERY_FAILING_AFTER + 2):
            await run_list(watcher, failure)
    assert scrape(watcher).value("loops_watcher_discovery_failing") == 1
    errors = [log for log in logs if log["event"] == "discovery_failing"]
    assert len(errors) == 1
    assert errors[0]["log_level"] == "error"
    assert "cap" in errors[0]["detail"]
    await run_list(watcher, listed(make_run("ACTIVE", run_id="good123")))
    assert scrape(watcher).value("loops_watcher_discovery_failing") == 0


def test_discovery_gauge_is_absent_without_discovery(watcher: Watcher) -> None:
    assert "loops_watcher_discovery_failing" not in watcher.metrics.render("")[0].decode()


def test_a_list_holds_only_what_it_will_record() -> None:
    """What a list keeps while the rest of it arrives: no second copy of an unchanged run,
    nothing of a run it would pass over, and every entry it must warn about."""
    watched = [f"run{number:03d}" for number in range(8)]
    argv = [arg for run_id in watched for arg in ("--run-id", run_id)]
    watcher = make_watcher(*argv, "--total-shards", "2", "--shard", "0")
    mine = [run_id for run_id in watched if shard_of(run_id, 2) == 0]
    theirs = next(run_id for run_id in watched if shard_of(run_id, 2) == 1)
    unwatched = next(f"new{n:03d}" for n in range(100) if shard_of(f"new{n:03d}", 2) == 0)
    held = make_run("ACTIVE", run_id=mine[0])
    watcher.recorder.apply(mine[0], ok(held))
    keep = watcher.listing.keep

    assert keep(make_run("ACTIVE", run_id=mine[0])) is held
    changed = make_run("FAILED", run_id=mine[0])
    assert keep(changed) is changed
    never_seen = make_run("ACTIVE", run_id=mine[1])
    assert keep(never_seen) is never_seen
    assert keep(make_run("ACTIVE", run_id=theirs)) is None
    assert keep(make_run("ACTIVE", run_id=unwatched)) is None  # no discovery: ignored
    bad_id = make_run("ACTIVE", run_id="../../etc")
    assert keep(bad_id) is bad_id  # kept to be warned about

    discovering = make_watcher("--discover", "org", "--total-shards", "2", "--shard", "0")
    new = make_run("ACTIVE", run_id=unwatched)
    assert discovering.listing.keep(new) is new
    assert discovering.listing.keep(make_run("ACTIVE", run_id=theirs)) is None
