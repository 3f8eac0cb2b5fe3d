"""What `/metrics`, `/healthz`, `/readyz` and the status page's banners are told.

Everything here reads state and changes none: a probe or a scrape can never alter what the
next one says.
"""

from __future__ import annotations

from collections.abc import Callable

from watcher.api import RETRY_AFTER_CAP
from watcher.config import Settings
from watcher.listing import DISCOVERY_FAILING_AFTER, ListLoop
from watcher.page import Problem
from watcher.recorder import Recorder
from watcher.scheduler import Scheduler

HEARTBEAT_LIMIT = 15.0
# The API counts as unreachable after this many attempts in a row got no answer at all.
UNREACHABLE_ATTEMPTS = 3
# The page calls the data stale when no run was read for this many poll intervals.
STALE_INTERVALS = 3


class Probes:
    """The watcher's health, readiness and trouble, as the endpoints report them."""

    def __init__(
        self,
        settings: Settings,
        recorder: Recorder,
        listing: ListLoop,
        scheduler: Scheduler,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.recorder = recorder
        self.listing = listing
        self.scheduler = scheduler
        self.clock = clock
        # Longest a healthy poll can take: every attempt at its deadline plus capped waits.
        self._poll_limit = (settings.request_timeout + RETRY_AFTER_CAP) * (
            settings.max_retries + 1
        ) + 30.0

    def render_metrics(self, accept: str) -> tuple[list[bytes], str]:
        return self.recorder.metrics.render_parts(accept)

    def health(self) -> tuple[bool, str]:
        silent = self.scheduler.silent_for()
        if silent > HEARTBEAT_LIMIT:
            return False, f"poll loop has not run for {silent:.0f} s"
        stuck = self.scheduler.oldest_poll_age()
        if stuck > self._poll_limit:
            return False, f"a poll has been in flight for {stuck:.0f} s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """Ready once every run (and the first list) was attempted; never unready again: the
        first round only shrinks after start, and readiness never tracks the API's health."""
        if self.recorder.started_at is None:
            return False, "starting"
        left = self.recorder.first_round
        if left:
            return False, f"first poll round: {len(left)} left to attempt"
        return True, "ok"

    def problems(self) -> list[Problem]:
        """Watcher-level trouble for the status page's banners, worst first."""
        recorder, found = self.recorder, []
        if recorder.key_rejected:
            found.append(
                Problem(
                    "key_rejected",
                    "The Loops API answers 401/403: check the key in BASETEN_API_KEY or "
                    "--api-key-file, and --auth-scheme.",
                    recorder.key_rejected_since,
                )
            )
        if recorder.unanswered >= UNREACHABLE_ATTEMPTS:
            found.append(
                Problem(
                    "api_unreachable",
                    f"The last {recorder.unanswered} requests to {self.settings.api_url} got no "
                    "answer (timeouts or connection errors); statuses shown are the last known.",
                    recorder.unanswered_since,
                )
            )
        failures = self.listing.failures
        if self.settings.discover and failures >= DISCOVERY_FAILING_AFTER:
            found.append(
                Problem(
                    "discovery_failing",
                    f"The last {failures} list requests failed: runs that start or "
                    "end are not noticed until a list answers again.",
                    self.listing.failing_since,
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
        runs, started_at = self.recorder.tracker.runs, self.recorder.started_at
        if started_at is None or not runs:
            return None
        latest = max(
            (r.last_success for r in runs.values() if r.last_success is not None),
            default=started_at,
        )
        limit = STALE_INTERVALS * self.settings.poll_interval + self.settings.request_timeout
        return latest if self.clock() - latest > limit else None
