"""Status bookkeeping: what each watched run looks like and what changed, decided purely.

The tracker does no I/O and reads no clock: callers pass each observation with the time it was
made and get back the events it caused. A transition is a change of sampler status between two
successful polls of the same run; the first sight of a run is an observation, not a transition.
How long a status lasted is only known when the watcher saw that status begin.

Answers can arrive out of order (a slow list response after a quicker per-run poll), so an
observation is applied only if it was requested after the last one applied for that run.
Whatever the API reports, a run's series stay bounded: the transitions counter names at most
`UNDOCUMENTED_PER_RUN` undocumented statuses of a run and counts the rest as `other`.

A run can also be restored from what a previous watcher process saved (`Saved`): its status,
since when, and its transition counts carry over; the first poll in this process either
confirms the status, which then goes on as if the watcher had never stopped, or reports the
change that happened meanwhile as one transition from the saved status, marked as seen across
a restart and untimed (the moment it happened is unknown).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from watcher.model import OTHER, Result, Run, is_documented

UNDOCUMENTED_PER_RUN = 3
# Undocumented values remembered for warning once each; past this the oldest are forgotten.
UNDOCUMENTED_REMEMBERED = 1000


@dataclass(frozen=True, slots=True)
class Observed:
    """First successful poll of a run (or of its sampler, after it had none)."""

    run_id: str
    sampler_id: str | None
    status: str | None


@dataclass(frozen=True, slots=True)
class Changed:
    run_id: str
    sampler_id: str | None
    from_status: str
    to_status: str
    seconds_in_previous_status: float | None
    across_restart: bool = False


@dataclass(frozen=True, slots=True)
class Undocumented:
    """A status value outside the documented 14, reported once per watcher and value."""

    run_id: str
    status: str


Event = Observed | Changed | Undocumented
# Transitions each record keeps for the status page; the counters keep the totals.
RECENT_TRANSITIONS = 10


@dataclass(frozen=True, slots=True)
class Transition:
    at: float
    from_status: str
    to_status: str


# Shared by every record until its first transition, which most runs never have: an empty
# Counter and set of its own would cost each record about 300 bytes (3 MB at 10,000 runs).
# Transitions and undocumented statuses are rare, so a change replaces the whole value.
_NO_TRANSITIONS: Mapping[tuple[str, str], int] = MappingProxyType({})
_NO_STATUSES: frozenset[str] = frozenset()


@dataclass(slots=True)
class RunRecord:
    """Everything known about one watched run."""

    run_id: str
    run: Run | None = None
    status: str | None = None
    since: float | None = None
    saw_status_begin: bool = False
    applied_request: float = float("-inf")  # when the last applied observation was requested
    transitions: Mapping[tuple[str, str], int] = field(default_factory=lambda: _NO_TRANSITIONS)
    undocumented: frozenset[str] = _NO_STATUSES  # named in `transitions`
    # Oldest first. A tuple, not a deque: an empty one costs nothing, and at 10,000 runs an
    # empty bounded deque each would cost 7.7 MB; transitions are rare enough to copy.
    recent: tuple[Transition, ...] = ()
    polls: Counter[str] = field(default_factory=Counter)
    last_result: Result | None = None
    last_poll: float | None = None
    last_success: float | None = None
    consecutive_failures: int = 0
    # The status came from a previous process and no poll in this one has confirmed it yet.
    carried_over: bool = False
    # Bumped whenever the record changes, so views derived from it know when to redo them.
    version: int = 0

    def saved(self) -> Saved:
        """What a later process needs to continue this run; only for a run seen at least once."""
        assert self.run is not None
        return Saved(
            run_id=self.run_id,
            run=self.run,
            status=self.status,
            since=self.since,
            saw_status_begin=self.saw_status_begin,
            transitions=tuple((old, new, count) for (old, new), count in self.transitions.items()),
            recent=self.recent,
        )


@dataclass(frozen=True, slots=True)
class Saved:
    """The part of a run's record that outlives the process: enough to continue exactly."""

    run_id: str
    run: Run
    status: str | None
    since: float | None
    saw_status_begin: bool
    transitions: tuple[tuple[str, str, int], ...]
    recent: tuple[Transition, ...] = ()


class Tracker:
    def __init__(self) -> None:
        self.runs: dict[str, RunRecord] = {}
        # Undocumented statuses already warned about (at most UNDOCUMENTED_REMEMBERED).
        self.undocumented_seen: dict[str, None] = {}

    def watch(self, run_id: str) -> RunRecord:
        record = self.runs.get(run_id)
        if record is None:
            record = self.runs[run_id] = RunRecord(run_id)
        return record

    def restore(self, saved: Saved) -> RunRecord:
        """Watch a run as a previous process left it; its first poll here confirms or moves it."""
        transitions = {(old, new): count for old, new, count in saved.transitions}
        record = self.runs[saved.run_id] = RunRecord(
            saved.run_id,
            run=saved.run,
            status=saved.status,
            since=saved.since,
            saw_status_begin=saved.saw_status_begin,
            transitions=transitions or _NO_TRANSITIONS,
            undocumented=frozenset(
                status
                for pair in transitions
                for status in pair
                if not is_documented(status) and status != OTHER
            ),
            recent=saved.recent[-RECENT_TRANSITIONS:],
            carried_over=True,
        )
        return record

    def unwatch(self, run_id: str) -> RunRecord | None:
        return self.runs.pop(run_id, None)

    def observe(
        self, run: Run, now: float, *, requested: float = float("-inf")
    ) -> tuple[list[Event], bool]:
        """Apply a good observation made at `now` of a request sent at `requested` (any clock
        that orders requests); return its events and whether the exported state changed."""
        record = self.watch(run.id)
        if requested < record.applied_request:
            return [], False  # older than what is already known: would move the run back
        record.applied_request = requested
        record.version += 1

        events: list[Event] = []
        status = run.sampler.status if run.sampler else None
        sampler_id = run.sampler.id if run.sampler else None
        # A restored run's exported state is first rendered once a poll here has seen it.
        changed = run != record.run or record.carried_over
        across_restart = record.carried_over
        record.carried_over = False
        if record.run is None or (record.status is None and status is not None):
            events.append(Observed(run.id, sampler_id, status))
            record.since = now if status is not None else None
            record.saw_status_begin = False
        elif status != record.status:
            if status is None:  # the run lost its sampler: its sampler series go away
                record.since = None
            else:
                assert record.status is not None
                assert record.since is not None
                # Across a restart the change happened at some unknown moment while nobody
                # looked: neither the old status's duration nor the new one's start is known.
                seconds = (
                    now - record.since if record.saw_status_begin and not across_restart else None
                )
                events.append(
                    Changed(run.id, sampler_id, record.status, status, seconds, across_restart)
                )
                pair = (_transition_label(record, record.status), _transition_label(record, status))
                record.transitions = {
                    **record.transitions,
                    pair: record.transitions.get(pair, 0) + 1,
                }
                transition = Transition(now, record.status, status)
                record.recent = (*record.recent, transition)[-RECENT_TRANSITIONS:]
                record.since = now
                record.saw_status_begin = not across_restart
        if status is not None and not is_documented(status):
            if status not in self.undocumented_seen:
                events.append(Undocumented(run.id, status))
                if len(self.undocumented_seen) >= UNDOCUMENTED_REMEMBERED:
                    del self.undocumented_seen[next(iter(self.undocumented_seen))]
            self.undocumented_seen[status] = None
        record.run = run
        record.status = status
        return events, changed

    def record_poll(self, run_id: str, result: Result, now: float) -> RunRecord:
        """Count one poll; a failed one keeps the last known status."""
        record = self.watch(run_id)
        record.version += 1
        record.polls[result] += 1
        record.last_result = result
        record.last_poll = now
        if result is Result.OK:
            record.last_success = now
            record.consecutive_failures = 0
        else:
            record.consecutive_failures += 1
        return record


def _transition_label(record: RunRecord, status: str) -> str:
    if is_documented(status) or status in record.undocumented:
        return status
    if len(record.undocumented) < UNDOCUMENTED_PER_RUN:
        record.undocumented |= {status}
        return status
    return OTHER
