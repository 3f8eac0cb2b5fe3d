"""List mode, the second polling loop: one list request per interval reads every listed run.

From `LIST_MODE_MIN_RUNS` watched runs on (or whenever discovery is on) statuses come from the
list endpoint; a run the list covered is polled on its own only if the list goes quiet for
`LIST_COVER` intervals. The list also feeds discovery. Per-run cadence is the scheduler's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from watcher.api import LoopsClient
from watcher.config import Settings, check_run_id
from watcher.logs import get_logger
from watcher.model import Failed, InvalidRun, Outcome, Result, Run, RunList, clean_text
from watcher.recorder import KEY_REJECTED, Recorder
from watcher.scheduler import Scheduler, loop_time
from watcher.watchlist import WatchList

# From this many watched runs on, statuses come from one list request per interval.
LIST_MODE_MIN_RUNS = 10
# A settled run covered by the list is polled on its own only if the list goes quiet this long
# (in poll intervals): one list round may fail without anyone noticing a gap.
LIST_COVER = 2.5
# Discovery that has failed this many lists in a row is reported as failing (metric, error log).
DISCOVERY_FAILING_AFTER = 3
# Skipped list entries are warned about once each; this many are remembered for that.
SKIPPED_REMEMBERED = 1000
# Stands for the first list request among the runs the first round waits for.
FIRST_LIST = "(list request)"
# A list is recorded this many runs at a time, the event loop let in between: a run that
# changed costs up to a few hundred microseconds (log line, metric block, saved row), so a
# 10,000-run list that changed everywhere would otherwise hold /healthz, /readyz and scrapes
# for a second or more, longer than a Kubernetes probe waits.
RECORD_SLICE = 200


class ListLoop:
    """Asks for the list once per interval while list mode is on and records what it says."""

    def __init__(
        self,
        settings: Settings,
        client: LoopsClient,
        recorder: Recorder,
        watchlist: WatchList,
        scheduler: Scheduler,
        *,
        discovered: Callable[[], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.client = client
        self.recorder = recorder
        self.watchlist = watchlist
        self.scheduler = scheduler
        self._discovered = discovered  # called after each list that fed discovery
        self.log = get_logger()
        self.usable = True  # False once the key proved unable to list (without discovery)
        self.failures = 0  # lists in a row that failed
        self.failing_since: float | None = None
        self._skipped_entries: dict[str, None] = {}  # list entries already warned about

    def active(self, watched: int | None = None) -> bool:
        """Whether statuses should come from the list endpoint this round."""
        if self.settings.discover:
            return True
        count = len(self.recorder.tracker.runs) if watched is None else watched
        return self.usable and count >= LIST_MODE_MIN_RUNS

    def keep(self, run: Run) -> Run | None:
        """What to hold of a listed run until the whole list has arrived (the client's
        `keep_listed`): nothing of a run `record` would pass over (another shard's, or not
        watched without discovery), the run already held when nothing changed, else the run.

        A 50,000-run list thus holds new objects only for runs that changed, not a second copy
        of every run next to the tracker's. An entry whose ID is no run ID is kept, to be
        warned about."""
        try:
            check_run_id(run.id)
        except ValueError:
            return run
        if not self.watchlist.shard.owns(run.id):
            return None
        record = self.recorder.tracker.runs.get(run.id)
        if record is None:
            return run if self.settings.discover else None
        return record.run if record.run == run else run

    async def run(self) -> None:
        while True:
            started = loop_time()
            if self.active():
                await self.round()
            # Intervals count from each list's start, so however long a list takes there is
            # one per interval; an interval a slow list overran is skipped, not made up for.
            period = self.settings.poll_interval * random.uniform(0.95, 1.05)
            await asyncio.sleep(period - (loop_time() - started) % period)

    async def round(self) -> None:
        """One list request: discover runs and record the status of every listed watched run."""
        discover = self.settings.discover
        outcome = await self.client.list_runs(
            scope="org" if discover in (None, "org") else None,
            base_model=self.settings.discover_base_model if discover else None,
        )
        await self.record(outcome)

    async def record(self, outcome: Outcome[RunList]) -> None:
        """What one list outcome does: discovery, each listed run's status, the list's health.

        Recorded in slices of RECORD_SLICE runs that let the event loop in between. The list
        loop awaits this before it asks for the next list, so lists never interleave; the first
        list counts as attempted (readiness) only once every run in it is recorded."""
        recorder = self.recorder
        if not self._refused_listing_only(outcome):
            recorder.key_verdict(outcome)
        if isinstance(outcome, Failed):
            recorder.first_round.discard(FIRST_LIST)
            self._failed(outcome)
            return
        if self.failures:
            self.log.info("list_recovered", failed_lists=self.failures)
        self.failures = 0
        self.failing_since = None
        if recorder.metrics.discovery_failing is not None:
            recorder.metrics.discovery_failing.set(0)
        listed = self._listed(outcome.value)
        if self.settings.discover:
            self.watchlist.listed(listed)
            await self._discovered()
        now = recorder.clock()
        for position, (run_id, entry) in enumerate(listed.items(), 1):
            if position % RECORD_SLICE == 0:
                await asyncio.sleep(0)
            # Checked after each pause too: the run may have been unwatched meanwhile.
            if run_id not in recorder.tracker.runs:
                continue
            recorder.first_round.discard(run_id)
            if isinstance(entry, InvalidRun):
                # Only this run's entry is bad: it fails alone and keeps its own poll schedule.
                failed = Failed(Result.INVALID_RESPONSE, str(entry), 1, outcome.code)
                recorder.record_failure(run_id, failed)
                continue
            fast = recorder.record_success(entry, now, outcome.requested).fast
            self.scheduler.reschedule(
                run_id,
                self.settings.fast_poll_interval
                if fast
                else self.settings.poll_interval * LIST_COVER,
            )
        recorder.first_round.discard(FIRST_LIST)

    def _listed(self, runs: RunList) -> dict[str, Run | InvalidRun]:
        """This shard's listed runs by ID; entries without a valid run ID are skipped, warned
        once. Every shard lists every run and keeps its own share."""
        listed: dict[str, Run | InvalidRun] = {}
        entries: list[Run | InvalidRun] = [*runs.invalid, *runs.runs]
        for entry in entries:
            run_id = entry.id if isinstance(entry, Run) else entry.run_id
            try:
                check_run_id(run_id or "")
            except ValueError as exc:
                self._skip_entry(run_id, str(exc) if run_id else str(entry))
                continue
            if run_id and self.watchlist.shard.owns(run_id):
                listed[run_id] = entry
        return listed

    def _skip_entry(self, run_id: str | None, reason: str) -> None:
        key = reason if run_id is None else run_id
        if key in self._skipped_entries:
            return
        if len(self._skipped_entries) >= SKIPPED_REMEMBERED:
            del self._skipped_entries[next(iter(self._skipped_entries))]
        self._skipped_entries[key] = None
        shown = None if run_id is None else clean_text(run_id)
        self.log.warning("list_entry_skipped", run_id=shown, reason=reason)

    def _refused_listing_only(self, outcome: Outcome[RunList]) -> bool:
        """A 403 to the list of a key that reads its runs one by one: the key is not rejected.

        Without discovery the list only saves requests, and the runs' own GETs say whether the
        key is accepted; with discovery the list is the only way to the runs."""
        return (
            isinstance(outcome, Failed)
            and outcome.result is Result.FORBIDDEN
            and not self.settings.discover
        )

    def _failed(self, outcome: Failed) -> None:
        self.failures += 1
        discovery_failing = self.recorder.metrics.discovery_failing
        if self.failures == DISCOVERY_FAILING_AFTER and discovery_failing:
            discovery_failing.set(1)
            self.log.error(
                "discovery_failing",
                **outcome.failure_fields(),
                failed_lists=self.failures,
                note="runs that start or end are not noticed until a list answers again",
            )
        if self.failures == 1:
            self.failing_since = self.recorder.clock()
            self.log.warning(
                "list_failed",
                **outcome.failure_fields(),
                note="runs are polled one by one until the list answers again",
            )
        if outcome.result in KEY_REJECTED and not self.settings.discover:
            # The key may read runs one by one without being allowed to list them.
            self.usable = False
            self.log.warning("list_mode_unavailable", result=str(outcome.result))
