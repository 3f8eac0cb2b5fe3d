"""What one outcome does: the tracker's record, the log lines, the metrics and the state file.

Every poll's outcome, every list entry and every HTTP attempt ends here. The recorder keeps
what the watcher has learnt about the API along the way (is the key rejected, does the API
answer at all, which runs still wait for their first attempt) for the probes and the page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from watcher.logs import LEVELS, get_logger
from watcher.metrics import Metrics
from watcher.model import (
    Failed,
    Fetched,
    Outcome,
    Result,
    Run,
    StatusClass,
    bounded_status,
    status_class,
)
from watcher.scheduler import Cadence
from watcher.tracker import Changed, Event, Observed, Saved, Tracker, Undocumented

if TYPE_CHECKING:  # loaded only with --state-file (sqlite3, and pydantic for its rows)
    from watcher.state import StateStore

KEY_REJECTED = frozenset({Result.UNAUTHORIZED, Result.FORBIDDEN})

_CHANGE_LEVEL = {
    StatusClass.FAILED: "error",
    StatusClass.FAILING: "error",
    StatusClass.SHUT_DOWN: "warning",
}


def change_level(to_status: str) -> str:
    """Log level of a `sampler_status_changed` line, by the status it went into."""
    if to_status == "DEACTIVATING":
        return "warning"
    return _CHANGE_LEVEL.get(status_class(to_status), "info")


class Recorder:
    """Turns outcomes into the tracker's records, log lines, metrics and saved state."""

    def __init__(
        self,
        metrics: Metrics,
        store: StateStore | None,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.tracker = Tracker()
        self.metrics = metrics
        self.store = store
        self.clock = clock
        self.log = get_logger()
        # When the watcher started watching (None before): from then on, new runs are logged.
        self.started_at: float | None = None
        # Runs (and the first list) not attempted yet since start: readiness waits for them.
        self.first_round: set[str] = set()
        self.key_rejected = False
        self.key_rejected_since: float | None = None
        self.unanswered = 0  # attempts in a row that got no answer
        self.unanswered_since: float | None = None
        # Runs the state file knows that are not watched right now, ready to be picked up again.
        self._saved: dict[str, Saved] = {}
        self._unexported: set[str] = set()  # runs whose last observation could not be rendered

    def restore(self, saved: dict[str, Saved]) -> None:
        """Runs the state file holds, picked up when they are watched."""
        self._saved = saved

    def begin(self) -> None:
        """The first round is scheduled: from now on, runs that come and go are logged."""
        self.started_at = self.clock()

    def watch(self, run_id: str) -> None:
        saved = self._saved.pop(run_id, None)
        if saved is None:
            self.tracker.watch(run_id)
        else:
            self.tracker.restore(saved)
        self.metrics.watch(run_id)
        if self.started_at is not None:
            self.log.info("run_watched", run_id=run_id)
        else:
            self.first_round.add(run_id)

    def unwatch(self, run_id: str) -> None:
        record = self.tracker.unwatch(run_id)
        if self.store is not None and record is not None and record.run is not None:
            self._saved[run_id] = record.saved()
        self.metrics.forget(run_id)
        self.first_round.discard(run_id)
        self._unexported.discard(run_id)
        self.log.info("run_unwatched", run_id=run_id)

    def apply(self, run_id: str, outcome: Outcome[Run]) -> Cadence:
        """Record one poll's outcome: tracker, logs, metrics; say when to poll next."""
        now = self.clock()
        self.first_round.discard(run_id)
        if run_id not in self.tracker.runs:
            return Cadence(fast=False)  # unwatched while the request was in flight
        if isinstance(outcome, Fetched):
            cadence = self.record_success(outcome.value, now, outcome.requested)
        else:
            cadence = self.record_failure(run_id, outcome)
        self.key_verdict(outcome, run_id)
        return cadence

    def record_success(self, run: Run, now: float, requested: float) -> Cadence:
        record = self.tracker.runs[run.id]
        had_failures = record.consecutive_failures
        events, changed = self.tracker.observe(run, now, requested=requested)
        for event in events:
            self._emit(event, run)
        if changed and self.store is not None:
            self.store.save(record)
        if changed or run.id in self._unexported:
            try:
                self.metrics.update_state(record)
            except Exception as exc:
                # Observed but not exportable: a bad body, never a poll_success of 1.
                self._unexported.add(run.id)
                detail = f"cannot export the run: {type(exc).__name__}: {exc}"
                return self.record_failure(
                    run.id, Failed(Result.INVALID_RESPONSE, detail[:200], 1, "200")
                )
            self._unexported.discard(run.id)
        self.tracker.record_poll(run.id, Result.OK, now)
        self.metrics.update_polls(record)
        if had_failures:
            self.log.info("poll_recovered", run_id=run.id, failed_polls=had_failures)
        status = record.status
        return Cadence(fast=status is not None and status_class(status) is StatusClass.TRANSITIONAL)

    def record_failure(self, run_id: str, outcome: Failed) -> Cadence:
        previous_result = self.tracker.runs[run_id].last_result
        record = self.tracker.record_poll(run_id, outcome.result, self.clock())
        self.metrics.update_polls(record)
        # Warn when a streak of failures starts or changes kind; repeats go to debug.
        level = "warning" if previous_result != outcome.result else "debug"
        self.log.log(
            LEVELS[level],
            "poll_failed",
            run_id=run_id,
            **outcome.failure_fields(),
            consecutive_failures=record.consecutive_failures,
        )
        return Cadence(
            fast=False, failures=record.consecutive_failures, retry_after=outcome.retry_after
        )

    def key_verdict(self, outcome: Outcome[Any], run_id: str | None = None) -> None:
        """Keep the API's latest word on the key: the last rejection or success decides.

        The gauge holds until an answer says otherwise, however rarely failing runs are polled,
        so the alert on it stays firing until a poll succeeds.
        """
        if isinstance(outcome, Fetched):
            rejection = None
        elif outcome.result in KEY_REJECTED:
            rejection = outcome
        else:
            return  # a timeout or a 5xx says nothing about the key
        rejected = rejection is not None
        if rejected == self.key_rejected:
            return
        self.key_rejected = rejected
        self.key_rejected_since = self.clock() if rejected else None
        self.metrics.api_key_rejected.set(int(rejected))
        if rejection is not None:
            self.log.error(
                "api_key_rejected",
                **({"run_id": run_id} if run_id else {"request": "list"}),
                result=str(rejection.result),
                detail=rejection.detail,
                hint="check the key in BASETEN_API_KEY or --api-key-file, and --auth-scheme",
            )
        else:
            self.log.info("api_key_accepted")

    def _emit(self, event: Event, run: Run) -> None:
        identity: dict[str, Any] = {"run_name": run.name, "base_model": run.base_model}
        if isinstance(event, Observed):
            self.log.info(
                "sampler_status_observed",
                run_id=event.run_id,
                sampler_id=event.sampler_id,
                status=event.status,
                **identity,
            )
        elif isinstance(event, Changed):
            seconds = event.seconds_in_previous_status
            if seconds is not None:
                self.metrics.status_duration.labels(bounded_status(event.from_status)).observe(
                    seconds
                )
            self.log.log(
                LEVELS[change_level(event.to_status)],
                "sampler_status_changed",
                run_id=event.run_id,
                sampler_id=event.sampler_id,
                from_status=event.from_status,
                to_status=event.to_status,
                seconds_in_previous_status=(None if seconds is None else round(seconds, 3)),
                across_restart=event.across_restart,
                **identity,
            )
        elif isinstance(event, Undocumented):
            self.log.warning(
                "undocumented_sampler_status",
                run_id=event.run_id,
                status=event.status,
                note="not one of the 14 documented statuses; exported as its own series",
            )

    # --- the client's observer: every HTTP attempt --------------------------------------

    def attempt_finished(self, code: str, seconds: float) -> None:
        self.metrics.api_requests.labels(code).inc()
        self.metrics.api_duration.observe(seconds)
        if code == "error":
            self.unanswered += 1
            if self.unanswered_since is None:
                self.unanswered_since = self.clock() - seconds
        else:
            self.unanswered = 0
            self.unanswered_since = None

    def retrying(self, result: Result, detail: str, attempt: int, delay: float) -> None:
        self.metrics.retries.labels(str(result)).inc()
        self.log.debug(
            "poll_retrying", result=str(result), detail=detail, attempt=attempt, delay=delay
        )
