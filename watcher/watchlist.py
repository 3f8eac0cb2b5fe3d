"""Which runs are watched, and why: named by flag, listed in the run-IDs file, or discovered.

Each source keeps only this shard's share. The file is re-read when it changes or on SIGHUP;
a file that cannot be read keeps the last good set. A discovered run is dropped only after
it is missing from `DISCOVERY_MISSES` successful lists in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watcher.config import ConfigError, Settings, read_run_ids_file
from watcher.logs import get_logger
from watcher.sharding import Shard

FILE_CHECK_INTERVAL = 2.0
# A discovered run missing from this many successful lists in a row stops being watched.
DISCOVERY_MISSES = 2


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


class WatchList:
    """This shard's run IDs from the flags, the run-IDs file and discovery."""

    def __init__(self, settings: Settings, shard: Shard) -> None:
        self.path = settings.run_ids_file
        self.shard = shard
        self.log = get_logger()
        self._configured = tuple(filter(shard.owns, settings.run_id))
        self._file_ids: tuple[str, ...] = ()  # this shard's share of the file
        self._discovered: dict[str, int] = {}  # run_id -> successive lists it was missing from
        self._file_stamp: FileStamp | None = None
        self._reload_requested = asyncio.Event()

    def desired(self) -> dict[str, None]:
        """This shard's runs: configured, from the file, discovered (each kept only if owned)."""
        return dict.fromkeys((*self._configured, *self._file_ids, *self._discovered))

    def request_reload(self) -> None:
        """Re-read the run-IDs file soon (SIGHUP), even if it looks unchanged."""
        self._reload_requested.set()

    async def reload_file(self, reason: str) -> bool:
        """Re-read the run-IDs file; False (the last good set kept) if it cannot be used."""
        path = self.path
        if path is None:
            return False
        # Off the event loop: a file of up to 16 MB takes a while to read and check.
        self._file_stamp, ids, error = await asyncio.to_thread(_load_run_ids_file, path)
        if ids is None:
            # Keep watching what we had: a half-written file must not drop every run.
            self.log.error("run_ids_file_invalid", path=str(path), error=error, reason=reason)
            return False
        ids = tuple(filter(self.shard.owns, ids))
        if ids != self._file_ids:
            self.log.info("run_ids_file_loaded", path=str(path), runs=len(ids), reason=reason)
        self._file_ids = ids
        return True

    async def follow_file(self, reloaded: Callable[[], None]) -> None:
        """Re-read the file whenever it changes or a reload is requested; call `reloaded`."""
        path = self.path
        assert path is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_requested.wait(), FILE_CHECK_INTERVAL)
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                reason = "SIGHUP"
            elif _stamp(path) != self._file_stamp:
                reason = "changed"
            else:
                continue
            if await self.reload_file(reason):
                reloaded()

    def listed(self, run_ids: Iterable[str]) -> None:
        """Discovery: the run IDs a successful list returned (this shard's share)."""
        listed = dict.fromkeys(run_ids)
        for run_id in listed:
            self._discovered[run_id] = 0
        for run_id in [r for r in self._discovered if r not in listed]:
            self._discovered[run_id] += 1
            if self._discovered[run_id] >= DISCOVERY_MISSES:
                del self._discovered[run_id]
