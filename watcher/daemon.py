"""The watcher put together: builds each part, connects them, and holds them for the caller.

Data flows one way: the scheduler (`scheduler`, per run) and the list loop (`listing`) ask for
polls, the client (`api`) returns outcomes, the recorder (`recorder`) turns each into the
tracker's record, logs, metrics and saved state. `watchlist` says which runs are watched,
`probes` and `page` answer the endpoints the `server` serves, `lifecycle` starts and stops it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator

import structlog
from prometheus_client import CollectorRegistry

from watcher import __version__
from watcher.api import LoopsClient
from watcher.config import Settings
from watcher.lifecycle import Lifecycle
from watcher.listing import RECORD_SLICE, ListLoop
from watcher.metrics import Metrics
from watcher.model import Run
from watcher.page import Page
from watcher.probes import Probes
from watcher.recorder import Recorder
from watcher.scheduler import Cadence, Scheduler
from watcher.server import Server
from watcher.sharding import Shard
from watcher.watchlist import WatchList


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
        shard = Shard(settings.shard, settings.total_shards)
        self.metrics = Metrics(
            registry, __version__, shard, discovery=settings.discover is not None
        )
        store = None
        if settings.state_file is not None:
            # Imported here: sqlite3, and pydantic for the rows, only when a state file is used.
            from watcher.state import StateStore  # noqa: PLC0415

            store = StateStore(settings.state_file, registry)
        self.recorder = Recorder(self.metrics, store, clock=clock)
        self.tracker = self.recorder.tracker
        self.watchlist = WatchList(settings, shard)
        self._syncs = 0  # syncs of the watched runs begun: a gradual one yields to a newer

        def keep_listed(run: Run) -> Run | None:
            return self.listing.keep(run)  # the list loop is built after its client

        self.client = LoopsClient(
            api_url=settings.api_url,
            api_key=settings.api_key.get_secret_value() if settings.api_key else "",
            auth_scheme=settings.auth_scheme,
            request_timeout=settings.request_timeout,
            max_retries=settings.max_retries,
            max_concurrency=settings.max_concurrency,
            max_requests_per_second=settings.max_requests_per_second,
            list_body_cap=settings.max_list_body_bytes,
            keep_listed=keep_listed,
            observer=self.recorder,
        )
        self.scheduler = Scheduler(
            self.poll_run,
            poll_interval=settings.poll_interval,
            fast_poll_interval=settings.fast_poll_interval,
            max_concurrency=settings.max_concurrency,
        )
        self.listing = ListLoop(
            settings,
            self.client,
            self.recorder,
            self.watchlist,
            self.scheduler,
            discovered=lambda: self.sync_gradually(
                self.watchlist.desired(), spread=settings.fast_poll_interval
            ),
        )
        self.probes = Probes(settings, self.recorder, self.listing, self.scheduler, clock=clock)
        self.page = Page(
            lambda: self.tracker.runs,
            self.probes.problems,
            clock,
            version=__version__,
            base=settings.web_path,
        )
        server = Server(self.probes, prefix=settings.web_path)
        for path, handler in self.page.routes().items():
            server.route(path, handler)
        self.lifecycle = Lifecycle(
            settings,
            client=self.client,
            recorder=self.recorder,
            watchlist=self.watchlist,
            listing=self.listing,
            scheduler=self.scheduler,
            server=server,
            sync=self.sync_runs,
            poll=self.poll_run,
        )

    def sync_runs(self, desired: dict[str, None], *, spread: float, after: float = 0.0) -> None:
        """Watch exactly `desired`: stop polling the rest, schedule the new ones."""
        for _ in self._sync_steps(desired, spread=spread, after=after):
            pass

    async def sync_gradually(self, desired: dict[str, None], *, spread: float) -> None:
        """`sync_runs` in slices that let the event loop in: a first list may discover 50,000
        runs. Left off if another sync ran meanwhile: that one watched a newer `desired`."""
        for position, syncs in enumerate(self._sync_steps(desired, spread=spread), 1):
            if position % RECORD_SLICE == 0:
                await asyncio.sleep(0)
                if self._syncs != syncs:
                    return

    def _sync_steps(
        self, desired: dict[str, None], *, spread: float, after: float = 0.0
    ) -> Iterator[int]:
        """Each run unwatched or newly watched in turn; yields which sync this is."""
        self._syncs += 1
        syncs = self._syncs
        for run_id in [r for r in self.scheduler.run_ids if r not in desired]:
            self.scheduler.remove(run_id)
            self.recorder.unwatch(run_id)
            yield syncs
        for run_id in desired:
            if self.scheduler.add(run_id, spread=spread, after=after):
                self.recorder.watch(run_id)
                yield syncs

    async def poll_run(self, run_id: str) -> Cadence:
        """One run's poll: the request, then what its outcome does."""
        with structlog.contextvars.bound_contextvars(run_id=run_id):
            outcome = await self.client.get_run(run_id)
            return self.recorder.apply(run_id, outcome)


def install_signal_handlers(
    stop: asyncio.Event, on_hangup: Callable[[], None] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
