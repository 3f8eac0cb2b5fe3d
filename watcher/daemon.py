"""The running watcher: wires client, tracker, metrics, scheduler and server together.

Data flows one way: the scheduler asks for a poll, the client returns an outcome, the tracker
turns it into events, and this module logs the events and updates the metrics. It also owns
the set of watched runs (flags, the run-IDs file, discovery) and the process lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from watcher import __version__
from watcher.api import RETRY_AFTER_CAP, LoopsClient
from watcher.config import ConfigError, Settings, check_run_id, read_run_ids_file, redacted
from watcher.logs import LEVELS, get_logger
from watcher.metrics import Metrics
from watcher.model import (
    InvalidRun,
    Outcome,
    Result,
    Run,
    RunList,
    StatusClass,
    bounded_status,
    clean_text,
    status_class,
)
from watcher.page import Page, Problem
from watcher.scheduler import Cadence, Scheduler
from watcher.server import Server
from watcher.sharding import Shard
from watcher.state import StateStore
from watcher.tracker import Changed, Event, Observed, Saved, Tracker, Undocumented

FILE_CHECK_INTERVAL = 2.0
HEARTBEAT_LIMIT = 15.0
KEY_REJECTED = frozenset({Result.UNAUTHORIZED, Result.FORBIDDEN})
# From this many watched runs on, statuses come from one list request per interval.
LIST_MODE_MIN_RUNS = 10
# A settled run covered by the list is polled on its own only if the list goes quiet this long
# (in poll intervals): one list round may fail without anyone noticing a gap.
LIST_COVER = 2.5
# A discovered run missing from this many successful lists in a row stops being watched.
DISCOVERY_MISSES = 2
# Discovery that has failed this many lists in a row is reported as failing (metric, error log).
DISCOVERY_FAILING_AFTER = 3
# Skipped list entries are warned about once each; this many are remembered for that.
SKIPPED_REMEMBERED = 1000
# The API counts as unreachable after this many attempts in a row got no answer at all.
UNREACHABLE_ATTEMPTS = 3
# The page calls the data stale when no run was read for this many poll intervals.
STALE_INTERVALS = 3
FIRST_LIST = "(list request)"
# When the state file is told which runs are still watched (and older rows are pruned): soon
# after start, once discovery had its first lists, then hourly.
STATE_UPKEEP_FIRST = 300.0
STATE_UPKEEP_INTERVAL = 3600.0

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


@dataclass(frozen=True, slots=True)
class FileStamp:
    mtime_ns: int
    size: int
    inode: int


def _stamp(path: Path) -> FileStamp | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return FileStamp(info.st_mtime_ns, info.st_size, info.st_ino)


def _load_run_ids_file(path: Path) -> tuple[FileStamp | None, tuple[str, ...] | None, str]:
    """(stamp, IDs or None, why not): the stamp is taken first so no edit goes unnoticed."""
    stamp = _stamp(path)
    try:
        return stamp, read_run_ids_file(path), ""
    except ConfigError as exc:
        return stamp, None, str(exc)


class Watcher:
    """One watcher instance; everything it owns hangs off here, nothing is global."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.log = get_logger()
        self.tracker = Tracker()
        self.shard = Shard(settings.shard, settings.total_shards)
        self.metrics = Metrics(
            registry, __version__, self.shard, discovery=settings.discover is not None
        )
        self.store = (
            StateStore(settings.state_file, registry) if settings.state_file is not None else None
        )
        # Runs the state file knows that are not watched right now, ready to be picked up again.
        self._saved: dict[str, Saved] = {}
        self.client = LoopsClient(
            api_url=settings.api_url,
            api_key=settings.api_key.get_secret_value() if settings.api_key else "",
            auth_scheme=settings.auth_scheme,
            request_timeout=settings.request_timeout,
            max_retries=settings.max_retries,
            max_concurrency=settings.max_concurrency,
            max_requests_per_second=settings.max_requests_per_second,
            list_body_cap=settings.max_list_body_bytes,
            observer=self,
        )
        self.scheduler = Scheduler(
            self.poll_run,
            poll_interval=settings.poll_interval,
            fast_poll_interval=settings.fast_poll_interval,
        )
        self.page = Page(
            lambda: self.tracker.runs,
            self.problems,
            clock,
            version=__version__,
            base=settings.web_path,
        )
        self._key_rejected = False
        self._key_rejected_since: float | None = None
        self._unanswered = 0  # attempts in a row that got no answer
        self._unanswered_since: float | None = None
        self._list_failing_since: float | None = None
        self._started_at: float | None = None
        self._awaiting_first_poll: set[str] = set()
        self._started = False
        self._ready = False
        self._list_usable = True
        self._list_failures = 0
        self._discovered: dict[str, int] = {}  # run_id -> successive lists it was missing from
        self._configured = tuple(filter(self.shard.owns, settings.run_id))
        self._file_ids: tuple[str, ...] = ()  # this shard's share of the file
        self._skipped_entries: dict[str, None] = {}  # list entries already warned about
        self._unexported: set[str] = set()  # runs whose last observation could not be rendered
        self._file_stamp: FileStamp | None = None
        self._reload_requested = asyncio.Event()
        # Longest a healthy poll can take: every attempt at its deadline plus capped waits.
        self._poll_limit = (settings.request_timeout + RETRY_AFTER_CAP) * (
            settings.max_retries + 1
        ) + 30.0

    # --- the set of watched runs -------------------------------------------------------

    def desired_runs(self) -> dict[str, None]:
        """This shard's runs: configured, from the file, discovered (each kept only if owned)."""
        return dict.fromkeys((*self._configured, *self._file_ids, *self._discovered))

    def sync_runs(self, desired: dict[str, None], *, spread: float, after: float = 0.0) -> None:
        for run_id in [r for r in self.scheduler.run_ids if r not in desired]:
            self.scheduler.remove(run_id)
            record = self.tracker.unwatch(run_id)
            if self.store is not None and record is not None and record.run is not None:
                self._saved[run_id] = record.saved()
            self.metrics.forget(run_id)
            self._awaiting_first_poll.discard(run_id)
            self._unexported.discard(run_id)
            self.log.info("run_unwatched", run_id=run_id)
        for run_id in self.scheduler.add_many(desired, spread=spread, after=after):
            saved = self._saved.pop(run_id, None)
            if saved is None:
                self.tracker.watch(run_id)
            else:
                self.tracker.restore(saved)
            self.metrics.watch(run_id)
            if self._started:
                self.log.info("run_watched", run_id=run_id)
            else:
                self._awaiting_first_poll.add(run_id)

    def request_run_ids_reload(self) -> None:
        """Re-read the run-IDs file soon (SIGHUP), even if it looks unchanged."""
        self._reload_requested.set()

    async def reload_run_ids_file(self, reason: str) -> None:
        path = self.settings.run_ids_file
        if path is None:
            return
        # Off the event loop: a file of up to 16 MB takes a while to read and check.
        self._file_stamp, ids, error = await asyncio.to_thread(_load_run_ids_file, path)
        if ids is None:
            # Keep watching what we had: a half-written file must not drop every run.
            self.log.error("run_ids_file_invalid", path=str(path), error=error, reason=reason)
            return
        ids = tuple(filter(self.shard.owns, ids))
        if ids != self._file_ids:
            self.log.info("run_ids_file_loaded", path=str(path), runs=len(ids), reason=reason)
        self._file_ids = ids
        if self._started:
            # Before that, the caller starts every run at once: spread out, the list first.
            self.sync_runs(self.desired_runs(), spread=min(1.0, self.settings.fast_poll_interval))

    async def _watch_run_ids_file(self) -> None:
        path = self.settings.run_ids_file
        assert path is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_requested.wait(), FILE_CHECK_INTERVAL)
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                await self.reload_run_ids_file("SIGHUP")
            elif _stamp(path) != self._file_stamp:
                await self.reload_run_ids_file("changed")

    # --- list mode and discovery --------------------------------------------------------

    def list_mode(self, watched: int | None = None) -> bool:
        """Whether statuses should come from the list endpoint this round."""
        if self.settings.discover:
            return True
        count = len(self.tracker.runs) if watched is None else watched
        return self._list_usable and count >= LIST_MODE_MIN_RUNS

    async def list_round(self) -> None:
        """One list request: discover runs and record the status of every listed watched run."""
        discover = self.settings.discover
        outcome = await self.client.list_runs(
            scope="org" if discover in (None, "org") else None,
            base_model=self.settings.discover_base_model if discover else None,
        )
        self._awaiting_first_poll.discard(FIRST_LIST)
        self._key_verdict(outcome)
        if outcome.result is not Result.OK:
            self._list_failed(outcome)
            return
        assert outcome.value is not None
        if self._list_failures:
            self.log.info("list_recovered", failed_lists=self._list_failures)
        self._list_failures = 0
        self._list_failing_since = None
        if self.metrics.discovery_failing is not None:
            self.metrics.discovery_failing.set(0)
        listed = self._listed(outcome.value)
        if discover:
            self._update_discovered(listed)
        now = self.clock()
        for run_id, entry in listed.items():
            if run_id not in self.tracker.runs:
                continue
            self._awaiting_first_poll.discard(run_id)
            if isinstance(entry, InvalidRun):
                # Only this run's entry is bad: it fails alone and keeps its own poll schedule.
                failed: Outcome[Run] = Outcome(
                    Result.INVALID_RESPONSE, None, str(entry), 1, outcome.code
                )
                self._record_failure(run_id, failed)
                continue
            fast = self._record_success(entry, now, outcome.requested).fast
            self.scheduler.reschedule(
                run_id,
                self.settings.fast_poll_interval
                if fast
                else self.settings.poll_interval * LIST_COVER,
            )

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
            if run_id and self.shard.owns(run_id):
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

    def _update_discovered(self, listed: dict[str, Run | InvalidRun]) -> None:
        for run_id in listed:
            self._discovered[run_id] = 0
        for run_id in [r for r in self._discovered if r not in listed]:
            self._discovered[run_id] += 1
            if self._discovered[run_id] >= DISCOVERY_MISSES:
                del self._discovered[run_id]
        self.sync_runs(self.desired_runs(), spread=self.settings.fast_poll_interval)

    def _list_failed(self, outcome: Outcome[RunList]) -> None:
        self._list_failures += 1
        if self._list_failures == DISCOVERY_FAILING_AFTER and self.metrics.discovery_failing:
            self.metrics.discovery_failing.set(1)
            self.log.error(
                "discovery_failing",
                result=str(outcome.result),
                detail=outcome.detail,
                http_status=outcome.code,
                failed_lists=self._list_failures,
                note="runs that start or end are not noticed until a list answers again",
            )
        if self._list_failures == 1:
            self._list_failing_since = self.clock()
            self.log.warning(
                "list_failed",
                result=str(outcome.result),
                detail=outcome.detail,
                http_status=outcome.code,
                attempts=outcome.attempts,
                note="runs are polled one by one until the list answers again",
            )
        if outcome.result in KEY_REJECTED and not self.settings.discover:
            # The key may read runs one by one without being allowed to list them.
            self._list_usable = False
            self.log.warning("list_mode_unavailable", result=str(outcome.result))

    async def _list_loop(self) -> None:
        while True:
            if self.list_mode():
                await self.list_round()
            await asyncio.sleep(self.settings.poll_interval * random.uniform(0.95, 1.05))

    # --- polling ---------------------------------------------------------------------

    async def poll_run(self, run_id: str) -> Cadence:
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            outcome = await self.client.get_run(run_id)
            return self.apply(run_id, outcome)

    def apply(self, run_id: str, outcome: Outcome[Run]) -> Cadence:
        """Record one poll's outcome: tracker, logs, metrics; say when to poll next."""
        now = self.clock()
        self._awaiting_first_poll.discard(run_id)
        if run_id not in self.tracker.runs:
            return Cadence(fast=False)  # unwatched while the request was in flight
        if outcome.result is Result.OK:
            assert outcome.value is not None
            cadence = self._record_success(outcome.value, now, outcome.requested)
        else:
            cadence = self._record_failure(run_id, outcome)
        self._key_verdict(outcome, run_id)
        return cadence

    def _record_success(self, run: Run, now: float, requested: float) -> Cadence:
        record = self.tracker.runs[run.id]
        had_failures = record.consecutive_failures
        events, changed = self.tracker.observe(run, now, requested=requested)
        for event in events:
            self._emit(event, run)
        if changed and self.store is not None:
            self.store.save(record.saved())
        if changed or run.id in self._unexported:
            try:
                self.metrics.update_state(record)
            except Exception as exc:
                # Observed but not exportable: a bad body, never a poll_success of 1.
                self._unexported.add(run.id)
                detail = f"cannot export the run: {type(exc).__name__}: {exc}"
                return self._record_failure(
                    run.id, Outcome(Result.INVALID_RESPONSE, None, detail[:200], 1, "200")
                )
            self._unexported.discard(run.id)
        self.tracker.record_poll(run.id, Result.OK, now)
        self.metrics.update_polls(record)
        if had_failures:
            self.log.info("poll_recovered", run_id=run.id, failed_polls=had_failures)
        status = record.status
        return Cadence(fast=status is not None and status_class(status) is StatusClass.TRANSITIONAL)

    def _record_failure(self, run_id: str, outcome: Outcome[Any]) -> Cadence:
        previous_result = self.tracker.runs[run_id].last_result
        record = self.tracker.record_poll(run_id, outcome.result, self.clock())
        self.metrics.update_polls(record)
        # Warn when a streak of failures starts or changes kind; repeats go to debug.
        level = "warning" if previous_result != outcome.result else "debug"
        self.log.log(
            LEVELS[level],
            "poll_failed",
            run_id=run_id,
            result=str(outcome.result),
            detail=outcome.detail,
            http_status=outcome.code,
            attempts=outcome.attempts,
            consecutive_failures=record.consecutive_failures,
        )
        return Cadence(
            fast=False, failures=record.consecutive_failures, retry_after=outcome.retry_after
        )

    def _key_verdict(self, outcome: Outcome[Any], run_id: str | None = None) -> None:
        """Keep the API's latest word on the key: the last rejection or success decides.

        The gauge holds until an answer says otherwise, however rarely failing runs are polled,
        so the alert on it stays firing until a poll succeeds.
        """
        if outcome.result is Result.OK:
            rejected = False
        elif outcome.result in KEY_REJECTED:
            rejected = True
        else:
            return  # a timeout or a 5xx says nothing about the key
        if rejected == self._key_rejected:
            return
        self._key_rejected = rejected
        self._key_rejected_since = self.clock() if rejected else None
        self.metrics.api_key_rejected.set(int(rejected))
        if rejected:
            self.log.error(
                "api_key_rejected",
                **({"run_id": run_id} if run_id else {"request": "list"}),
                result=str(outcome.result),
                detail=outcome.detail,
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

    # --- ClientObserver ----------------------------------------------------------------

    def attempt_finished(self, code: str, seconds: float) -> None:
        self.metrics.api_requests.labels(code).inc()
        self.metrics.api_duration.observe(seconds)
        if code == "error":
            self._unanswered += 1
            if self._unanswered_since is None:
                self._unanswered_since = self.clock() - seconds
        else:
            self._unanswered = 0
            self._unanswered_since = None

    def retrying(self, result: Result, detail: str, attempt: int, delay: float) -> None:
        self.metrics.retries.labels(str(result)).inc()
        self.log.debug(
            "poll_retrying", result=str(result), detail=detail, attempt=attempt, delay=delay
        )

    # --- endpoints ---------------------------------------------------------------------

    def render_metrics(self, accept: str) -> tuple[list[bytes], str]:
        return self.metrics.render_parts(accept)

    def problems(self) -> list[Problem]:
        """Watcher-level trouble for the status page's banners, worst first."""
        found = []
        if self._key_rejected:
            found.append(
                Problem(
                    "key_rejected",
                    "The Loops API answers 401/403: check the key in BASETEN_API_KEY or "
                    "--api-key-file, and --auth-scheme.",
                    self._key_rejected_since,
                )
            )
        if self._unanswered >= UNREACHABLE_ATTEMPTS:
            found.append(
                Problem(
                    "api_unreachable",
                    f"The last {self._unanswered} requests to {self.settings.api_url} got no "
                    "answer (timeouts or connection errors); statuses shown are the last known.",
                    self._unanswered_since,
                )
            )
        if self.settings.discover and self._list_failures >= DISCOVERY_FAILING_AFTER:
            found.append(
                Problem(
                    "discovery_failing",
                    f"The last {self._list_failures} list requests failed: runs that start or "
                    "end are not noticed until a list answers again.",
                    self._list_failing_since,
                )
            )
        stale = self._stale_since()
        alive, message = self.health()
        if stale is not None:
            found.append(
                Problem(
                    "data_stale",
                    f"No run has been read for over {STALE_INTERVALS} poll intervals.",
                    stale,
                )
            )
        elif not alive:
            found.append(Problem("data_stale", f"The poll loop is stuck: {message}."))
        return found

    def _stale_since(self) -> float | None:
        """Since when no run was read, if that is longer than STALE_INTERVALS intervals."""
        if self._started_at is None or not self.tracker.runs:
            return None
        latest = max(
            (r.last_success for r in self.tracker.runs.values() if r.last_success is not None),
            default=self._started_at,
        )
        limit = STALE_INTERVALS * self.settings.poll_interval + self.settings.request_timeout
        return latest if self.clock() - latest > limit else None

    def health(self) -> tuple[bool, str]:
        silent = time.monotonic() - self.scheduler.heartbeat
        if silent > HEARTBEAT_LIMIT:
            return False, f"poll loop has not run for {silent:.0f} s"
        stuck = self.scheduler.oldest_poll_age()
        if stuck > self._poll_limit:
            return False, f"a poll has been in flight for {stuck:.0f} s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if not self._started:
            return False, "starting"
        if self._awaiting_first_poll and not self._ready:
            return False, f"first poll round: {len(self._awaiting_first_poll)} left to attempt"
        self._ready = True  # once ready, always: readiness never tracks the API's health
        return True, "ok"

    # --- lifecycle ---------------------------------------------------------------------

    async def run(
        self, stop: asyncio.Event, *, on_listening: Callable[[int], None] | None = None
    ) -> None:
        """Serve and poll until `stop` is set."""
        server = Server(self, prefix=self.settings.web_path)
        for path, handler in self.page.routes().items():
            server.route(path, handler)
        listen = self.settings.listen
        try:
            await server.start(listen.host, listen.port)
        except OSError as exc:
            raise ConfigError(
                f"--listen-address {self.settings.listen_address!r}: cannot listen: "
                f"{exc.strerror or exc}"
            ) from None
        if on_listening:
            on_listening(server.port)
        if self.store is not None:
            self._saved = await asyncio.to_thread(self.store.open)
        await self.reload_run_ids_file("start")
        desired = self.desired_runs()
        # In list mode the first list gets a chance to answer before runs are polled one by one:
        # the runs it returns are then not polled on their own at all.
        listing = self.list_mode(len(desired))
        self.sync_runs(
            desired,
            spread=self.first_round_spread(),
            after=self.settings.request_timeout if listing else 0.0,
        )
        if listing:
            self._awaiting_first_poll.add(FIRST_LIST)
        self.log.info(
            "watcher_started",
            version=__version__,
            pid=os.getpid(),
            listen=f"{listen.host}:{server.port}",
            runs=len(self.scheduler.run_ids),
            config=redacted(self.settings),
        )
        self._started = True
        self._started_at = self.clock()
        tasks = [
            asyncio.create_task(self.scheduler.run(), name="scheduler"),
            asyncio.create_task(self._list_loop(), name="list"),
        ]
        if self.settings.run_ids_file is not None:
            tasks.append(asyncio.create_task(self._watch_run_ids_file(), name="run-ids-file"))
        if self.store is not None:
            tasks.append(asyncio.create_task(self._keep_state(self.store), name="state-upkeep"))
        try:
            await _wait_for_stop_or_crash(stop, tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.aclose()
            await server.close()
            if self.store is not None:
                await asyncio.to_thread(self.store.close)

    async def _keep_state(self, store: StateStore) -> None:
        await asyncio.sleep(STATE_UPKEEP_FIRST)
        while True:
            store.touch(list(self.tracker.runs))
            await asyncio.sleep(STATE_UPKEEP_INTERVAL)

    def first_round_spread(self) -> float:
        """How far to spread the first round: no faster than the request cap allows."""
        count = len(self.desired_runs())
        return min(self.settings.poll_interval, count / self.settings.max_requests_per_second)


async def _wait_for_stop_or_crash(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    for task in done:
        if task is not stopper:
            task.result()  # a background task that ended on its own is a bug: surface it


def install_signal_handlers(
    stop: asyncio.Event, on_hangup: Callable[[], None] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
