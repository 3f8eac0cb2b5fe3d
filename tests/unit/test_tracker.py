"""The tracker decides observations, transitions and durations from (run, time) pairs."""

from __future__ import annotations

from support.factories import make_run

from watcher.model import Result
from watcher.tracker import (
    RECENT_TRANSITIONS,
    Changed,
    Observed,
    Tracker,
    Transition,
    Undocumented,
)


def test_first_sight_is_an_observation_not_a_transition() -> None:
    tracker = Tracker()
    events, changed = tracker.observe(make_run("SCALED_TO_ZERO"), 100.0)
    assert events == [Observed("k4q95w5", "smp1", "SCALED_TO_ZERO")]
    assert changed
    record = tracker.runs["k4q95w5"]
    assert record.since == 100.0
    assert not record.transitions


def test_unchanged_status_is_silent_and_keeps_since() -> None:
    tracker = Tracker()
    tracker.observe(make_run("ACTIVE"), 100.0)
    events, changed = tracker.observe(make_run("ACTIVE"), 130.0)
    assert events == []
    assert not changed
    assert tracker.runs["k4q95w5"].since == 100.0


def test_wake_up_durations_only_for_statuses_seen_to_begin() -> None:
    tracker = Tracker()
    tracker.observe(make_run("SCALED_TO_ZERO"), 100.0)
    events, _ = tracker.observe(make_run("WAKING_UP"), 130.0)
    # SCALED_TO_ZERO began before the watcher looked: its duration is unknown.
    assert events == [Changed("k4q95w5", "smp1", "SCALED_TO_ZERO", "WAKING_UP", None)]
    events, _ = tracker.observe(make_run("ACTIVE"), 175.0)
    assert events == [Changed("k4q95w5", "smp1", "WAKING_UP", "ACTIVE", 45.0)]
    record = tracker.runs["k4q95w5"]
    assert record.since == 175.0
    assert record.transitions == {("SCALED_TO_ZERO", "WAKING_UP"): 1, ("WAKING_UP", "ACTIVE"): 1}


def test_repeated_pairs_count_up() -> None:
    tracker = Tracker()
    tracker.observe(make_run("ACTIVE"), 0.0)
    for moment in range(1, 7):
        tracker.observe(make_run("UNHEALTHY" if moment % 2 else "ACTIVE"), float(moment))
    assert tracker.runs["k4q95w5"].transitions == {
        ("ACTIVE", "UNHEALTHY"): 3,
        ("UNHEALTHY", "ACTIVE"): 3,
    }


def test_failed_poll_keeps_last_status_and_counts() -> None:
    tracker = Tracker()
    tracker.observe(make_run("ACTIVE"), 10.0)
    tracker.record_poll("k4q95w5", Result.OK, 10.0)
    record = tracker.record_poll("k4q95w5", Result.TIMEOUT, 12.0)
    record = tracker.record_poll("k4q95w5", Result.TIMEOUT, 14.0)
    assert record.last_poll == 14.0
    assert record.status == "ACTIVE"
    assert record.since == 10.0
    assert record.last_success == 10.0
    assert record.consecutive_failures == 2
    assert record.polls == {"ok": 1, "timeout": 2}
    tracker.record_poll("k4q95w5", Result.OK, 20.0)
    assert tracker.runs["k4q95w5"].consecutive_failures == 0


def test_failure_before_any_success_has_no_status() -> None:
    tracker = Tracker()
    record = tracker.record_poll("k4q95w5", Result.NOT_FOUND, 1.0)
    assert record.run is None
    assert record.status is None


def test_trainer_only_run_then_sampler_appears() -> None:
    tracker = Tracker()
    events, _ = tracker.observe(make_run(None), 0.0)
    assert events == [Observed("k4q95w5", None, None)]
    assert tracker.runs["k4q95w5"].since is None
    events, _ = tracker.observe(make_run("BUILDING"), 5.0)
    assert events == [Observed("k4q95w5", "smp1", "BUILDING")]
    events, _ = tracker.observe(make_run("DEPLOYING"), 9.0)
    # BUILDING began before it was first seen (the sampler appeared between polls).
    assert events == [Changed("k4q95w5", "smp1", "BUILDING", "DEPLOYING", None)]


def test_sampler_disappearing_drops_status_without_transition() -> None:
    tracker = Tracker()
    tracker.observe(make_run("ACTIVE"), 0.0)
    events, changed = tracker.observe(make_run(None), 5.0)
    assert events == []
    assert changed
    record = tracker.runs["k4q95w5"]
    assert record.status is None
    assert record.since is None


def test_undocumented_status_is_kept_and_reported_once() -> None:
    tracker = Tracker()
    events, _ = tracker.observe(make_run("HIBERNATING"), 0.0)
    assert Undocumented("k4q95w5", "HIBERNATING") in events
    assert tracker.runs["k4q95w5"].status == "HIBERNATING"
    events, _ = tracker.observe(make_run("HIBERNATING", run_id="other"), 1.0)
    assert not any(isinstance(event, Undocumented) for event in events)


def test_identity_change_without_status_change_is_exported() -> None:
    tracker = Tracker()
    tracker.observe(make_run("ACTIVE"), 0.0)
    events, changed = tracker.observe(make_run("ACTIVE", name="renamed"), 5.0)
    assert events == []
    assert changed


def test_unwatch_forgets_everything() -> None:
    tracker = Tracker()
    tracker.observe(make_run("ACTIVE"), 0.0)
    assert tracker.unwatch("k4q95w5") is not None
    assert "k4q95w5" not in tracker.runs
    events, _ = tracker.observe(make_run("FAILED"), 5.0)
    assert events == [Observed("k4q95w5", "smp1", "FAILED")]


def restored(status: str, *, since: float, saw_begin: bool) -> Tracker:
    """A tracker that picked up a run a previous process had seen in `status` since `since`."""
    earlier = Tracker()
    earlier.observe(make_run("BUILDING"), since - 10.0)
    earlier.observe(make_run(status), since)
    record = earlier.runs["k4q95w5"]
    record.saw_status_begin = saw_begin
    tracker = Tracker()
    tracker.restore(record.saved())
    return tracker


def test_restored_status_confirmed_goes_on_as_if_never_stopped() -> None:
    tracker = restored("WAKING_UP", since=100.0, saw_begin=True)
    events, changed = tracker.observe(make_run("WAKING_UP"), 500.0)
    assert events == []  # neither a first observation nor a change
    assert changed  # its exported state is rendered from this first poll on
    record = tracker.runs["k4q95w5"]
    assert record.since == 100.0
    assert not record.carried_over
    # The status began before the restart and is timed from its real beginning.
    events, _ = tracker.observe(make_run("ACTIVE"), 560.0)
    assert events == [Changed("k4q95w5", "smp1", "WAKING_UP", "ACTIVE", 460.0)]
    assert record.transitions == {("BUILDING", "WAKING_UP"): 1, ("WAKING_UP", "ACTIVE"): 1}


def test_change_while_down_is_one_untimed_transition_from_the_saved_status() -> None:
    tracker = restored("ACTIVE", since=100.0, saw_begin=True)
    events, changed = tracker.observe(make_run("FAILED"), 900.0)
    assert events == [Changed("k4q95w5", "smp1", "ACTIVE", "FAILED", None, across_restart=True)]
    assert changed
    record = tracker.runs["k4q95w5"]
    assert record.transitions == {("BUILDING", "ACTIVE"): 1, ("ACTIVE", "FAILED"): 1}
    assert record.since == 900.0
    # FAILED began at some unknown moment while nobody looked: its duration is unknown too.
    assert not record.saw_status_begin
    events, _ = tracker.observe(make_run("ACTIVE"), 950.0)
    assert events == [Changed("k4q95w5", "smp1", "FAILED", "ACTIVE", None)]
    events, _ = tracker.observe(make_run("UNHEALTHY"), 990.0)
    assert events == [Changed("k4q95w5", "smp1", "ACTIVE", "UNHEALTHY", 40.0)]


def test_restored_run_keeps_its_state_through_failed_polls() -> None:
    tracker = restored("SCALED_TO_ZERO", since=100.0, saw_begin=False)
    record = tracker.record_poll("k4q95w5", Result.TIMEOUT, 200.0)
    assert (record.status, record.since, record.carried_over) == ("SCALED_TO_ZERO", 100.0, True)
    events, _ = tracker.observe(make_run("WAKING_UP"), 300.0)
    assert events == [
        Changed("k4q95w5", "smp1", "SCALED_TO_ZERO", "WAKING_UP", None, across_restart=True)
    ]


def test_saved_record_round_trips_through_restore() -> None:
    tracker = restored("UNHEALTHY", since=100.0, saw_begin=True)
    record = tracker.runs["k4q95w5"]
    again = Tracker()
    again.restore(record.saved())
    assert again.runs["k4q95w5"].saved() == record.saved()
    assert record.saved().transitions == (("BUILDING", "UNHEALTHY", 1),)


def test_restored_undocumented_statuses_keep_their_place_in_the_label_budget() -> None:
    earlier = Tracker()
    for moment, status in enumerate(("ACTIVE", "HIBERNATING", "ACTIVE")):
        earlier.observe(make_run(status), float(moment))
    tracker = Tracker()
    record = tracker.restore(earlier.runs["k4q95w5"].saved())
    assert record.undocumented == {"HIBERNATING"}
    assert record.undocumented == earlier.runs["k4q95w5"].undocumented


def test_recent_transitions_keep_the_last_few_with_their_times() -> None:
    tracker = Tracker()
    tracker.observe(make_run("ACTIVE"), 0.0)
    statuses = ["UNHEALTHY", "ACTIVE"] * RECENT_TRANSITIONS
    for moment, status in enumerate(statuses, start=1):
        tracker.observe(make_run(status), float(moment))
    record = tracker.runs["k4q95w5"]
    assert len(record.recent) == RECENT_TRANSITIONS
    assert record.recent[-1] == Transition(float(len(statuses)), "UNHEALTHY", "ACTIVE")
    assert record.recent[0].at == float(len(statuses) - RECENT_TRANSITIONS + 1)
    # The counters still hold every transition the bounded history forgot.
    assert sum(record.transitions.values()) == len(statuses)


def test_every_applied_observation_and_poll_moves_the_version() -> None:
    tracker = Tracker()
    tracker.observe(make_run("ACTIVE"), 0.0, requested=1.0)
    tracker.record_poll("k4q95w5", Result.OK, 0.0)
    tracker.observe(make_run("FAILED"), 2.0, requested=0.5)  # older than what is known: ignored
    record = tracker.record_poll("k4q95w5", Result.TIMEOUT, 2.0)
    assert record.version == 3
