"""Status bookkeeping: what each watched run looks like and what changed, decided purely.

The tracker does no I/O and reads no clock: callers pass each observation with the time it was
made and get back the events it caused. A transition is a change of sampler status between two
successful polls of the same run; the first sight of a run is an observation, not a transition.
How long a status lasted is only known when the watcher saw that status begin.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from watcher.api import Result
from watcher.model import Run, is_documented


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


@dataclass(frozen=True, slots=True)
class Undocumented:
    """A status value outside the documented 14, reported once per watcher and value."""

    run_id: str
    status: str


Event = Observed | Changed | Undocumented


@dataclass(slots=True)
class RunRecord:
    """Everything known about one watched run."""

    run_id: str
    run: Run | None = None
    status: str | None = None
    since: float | None = None
    saw_status_begin: bool = False
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    polls: Counter[str] = field(default_factory=Counter)
    last_result: Result | None = None
    last_success: float | None = None
    consecutive_failures: int = 0


class Tracker:
    def __init__(self) -> None:
        self.runs: dict[str, RunRecord] = {}
        self._undocumented_seen: set[str] = set()

    def watch(self, run_id: str) -> RunRecord:
        record = self.runs.get(run_id)
        if record is None:
            record = self.runs[run_id] = RunRecord(run_id)
        return record

    def unwatch(self, run_id: str) -> RunRecord | None:
        return self.runs.pop(run_id, None)

    def record_success(self, run: Run, now: float) -> tuple[list[Event], bool]:
        """Apply a good observation; return its events and whether the exported state changed."""
        record = self.watch(run.id)
        record.polls[Result.OK] += 1
        record.last_result = Result.OK
        record.last_success = now
        record.consecutive_failures = 0

        events: list[Event] = []
        status = run.sampler.status if run.sampler else None
        sampler_id = run.sampler.id if run.sampler else None
        changed = run != record.run
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
                seconds = now - record.since if record.saw_status_begin else None
                events.append(Changed(run.id, sampler_id, record.status, status, seconds))
                record.transitions[(record.status, status)] += 1
                record.since = now
                record.saw_status_begin = True
        if (
            status is not None
            and not is_documented(status)
            and status not in self._undocumented_seen
        ):
            self._undocumented_seen.add(status)
            events.append(Undocumented(run.id, status))
        record.run = run
        record.status = status
        return events, changed

    def record_failure(self, run_id: str, result: Result) -> RunRecord:
        """A failed poll keeps the last known status; only the poll bookkeeping moves."""
        record = self.watch(run_id)
        record.polls[result] += 1
        record.last_result = result
        record.consecutive_failures += 1
        return record
