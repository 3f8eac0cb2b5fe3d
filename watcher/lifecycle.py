"""How the watcher starts and stops, as a daemon (`serve`) or for one look (`once`).

Start: listen, open the state file, read the run-IDs file, spread the first round (the list
first in list mode), log `watcher_started`, run the background jobs. Stop: cancel them, close
the client, the server and the state file. A background job that ends on its own is a bug and
ends the process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from watcher import __version__
from watcher.api import LoopsClient
from watcher.config import ConfigError, Settings, redacted
from watcher.listing import FIRST_LIST, ListLoop
from watcher.logs import get_logger
from watcher.recorder import Recorder
from watcher.scheduler import Cadence, Scheduler
from watcher.server import Server
from watcher.watchlist import WatchList

if TYPE_CHECKING:  # loaded only with --state-file (sqlite3, and pydantic for its rows)
    from watcher.state import StateStore

# When the state file is told which runs are still watched (and older rows are pruned): soon
# after start, once discovery had its first lists, then hourly.
STATE_UPKEEP_FIRST = 300.0
STATE_UPKEEP_INTERVAL = 3600.0


class SyncRuns(Protocol):
    def __call__(self, desired: dict[str, None], *, spread: float, after: float = 0.0) -> None: ...


class Lifecycle:
    """Starts the watcher's parts in order, keeps its background jobs, stops it cleanly."""

    def __init__(
        self,
        settings: Settings,
        *,
        client: LoopsClient,
        recorder: Recorder,
        watchlist: WatchList,
        listing: ListLoop,
        scheduler: Scheduler,
        server: Server,
        sync: SyncRuns,
        poll: Callable[[str], Awaitable[Cadence]],
    ) -> None:
        self.settings = settings
        self.client = client
        self.recorder = recorder
        self.watchlist = watchlist
        self.listing = listing
        self.scheduler = scheduler
        self.server = server
        self.sync = sync
        self.poll = poll
        self.log = get_logger()

    async def serve(
        self, stop: asyncio.Event, *, on_listening: Callable[[int], None] | None = None
    ) -> None:
        """Serve and poll until `stop` is set."""
        settings, server, store = self.settings, self.server, self.recorder.store
        listen = settings.listen
        try:
            await server.start(listen.host, listen.port)
        except OSError as exc:
            raise ConfigError(
                f"--listen-address {settings.listen_address!r}: cannot listen: "
                f"{exc.strerror or exc}"
            ) from None
        if on_listening:
            on_listening(server.port)
        if store is not None:
            self.recorder.restore(await asyncio.to_thread(store.open))
        await self.watchlist.reload_file("start")
        desired = self.watchlist.desired()
        # In list mode the first list gets a chance to answer before runs are polled one by one:
        # the runs it returns are then not polled on their own at all.
        listing = self.listing.active(len(desired))
        self.sync(
            desired,
            spread=self.first_round_spread(),
            after=settings.request_timeout if listing else 0.0,
        )
        if listing:
            self.recorder.first_round.add(FIRST_LIST)
        self.log.info(
            "watcher_started",
            version=__version__,
            pid=os.getpid(),
            listen=f"{listen.host}:{server.port}",
            runs=len(self.scheduler.run_ids),
            config=redacted(settings),
        )
        self.recorder.begin()
        tasks = [
            asyncio.create_task(self.scheduler.run(), name="scheduler"),
            asyncio.create_task(self.listing.run(), name="list"),
        ]
        if settings.run_ids_file is not None:
            tasks.append(
                asyncio.create_task(
                    self.watchlist.follow_file(self._file_reloaded), name="run-ids-file"
                )
            )
        if store is not None:
            tasks.append(asyncio.create_task(self._keep_state(store), name="state-upkeep"))
        try:
            await _wait_for_stop_or_crash(stop, tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.aclose()
            await server.close()
            if store is not None:
                await asyncio.to_thread(store.close)

    async def once(self) -> None:
        """Read every run once (from the list where list mode would), then close the client."""
        await self.watchlist.reload_file("start")
        self.sync(self.watchlist.desired(), spread=0.0)
        try:
            if self.listing.active():
                await self.listing.round()
            runs = self.recorder.tracker.runs
            unread = [run_id for run_id, record in runs.items() if not record.run]
            await asyncio.gather(*(self.poll(run_id) for run_id in unread))
        finally:
            await self.client.aclose()

    def first_round_spread(self) -> float:
        """How far to spread the first round: no faster than the request cap allows."""
        count = len(self.watchlist.desired())
        return min(self.settings.poll_interval, count / self.settings.max_requests_per_second)

    def _file_reloaded(self) -> None:
        # Spread out: the file may have brought many runs at once.
        self.sync(self.watchlist.desired(), spread=min(1.0, self.settings.fast_poll_interval))

    async def _keep_state(self, store: StateStore) -> None:
        await asyncio.sleep(STATE_UPKEEP_FIRST)
        while True:
            store.touch(list(self.recorder.tracker.runs))
            await asyncio.sleep(STATE_UPKEEP_INTERVAL)


async def _wait_for_stop_or_crash(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    for task in done:
        if task is not stopper:
            task.result()  # a background task that ended on its own is a bug: surface it
