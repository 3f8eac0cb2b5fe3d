"""The state file: what each run looked like, kept in SQLite so a restarted watcher continues.

With `--state-file PATH` every run's `Saved` record (see `watcher.tracker`) is written to one
row of an SQLite database in WAL mode; a new process loads the rows and the tracker picks each
run up where the last one stopped. The file holds run identities and statuses, never the API
key or anything else secret.

Writes never happen on the event loop: `save` encodes the run's row (a few microseconds, in C
mostly) and leaves it in a dict, the newest row of each run; a writer thread takes the dict
whole and commits it in one transaction, once the saves pause (a burst of changes is written
after it, not in pieces while the loop is busy with it) and at least every half second. The
writer does as little Python as it can: it joins the rows into one JSON array for one
statement (SQLite's `json_each`). Each time a thread wants the GIL back from a busy event
loop (sqlite3 lets go of it around every statement) the loop is interrupted; encoding rows in
the writer, or a statement a row, slowed a burst of 10,000 changes by most of a second.
A `kill -9` therefore loses at most the records of the last fraction of a second, and only
those not yet committed: a committed transaction is in the WAL file, which the next open
replays. A record that is lost is no harm either: the next process polls the run, finds it
moved on from the saved status and reports that change once.

A file that cannot be used as it is (not SQLite, corrupt, truncated, locked by another process,
another program's database, or written by a newer watcher) is moved aside with one error-level
log line and the watcher starts afresh. A file that cannot be written (read-only filesystem,
full disk) leaves the watcher running in memory, `loops_watcher_state_file_writable` at 0, and
the writes are retried (after 1 s, doubling up to `RETRY_INTERVAL`), newest record per run
only, so memory stays bounded by the number of runs.

Schema: `PRAGMA user_version` is the schema version and `MIGRATIONS[n]` takes a file from
version n to n + 1, so an older file is upgraded in place; `PRAGMA application_id` marks the
file as this program's. Rows of runs no longer watched are deleted after `RETENTION`.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from watcher.logs import get_logger
from watcher.model import Run
from watcher.tracker import RunRecord, Saved

APPLICATION_ID = 0x4C575354  # "LWST", in the database header: a loops-watcher state file
RETENTION = 7 * 86_400.0  # rows of runs no longer watched are kept this long
# The writer commits once no run was saved for BATCH_QUIET seconds, or BATCH_MAX_DELAY after
# the first save of a batch, whichever comes first: a burst of changes (a list response with
# every run moved) is committed after it, not in pieces while the event loop is busy with it.
BATCH_QUIET, BATCH_MAX_DELAY = 0.05, 0.5
RETRY_FIRST, RETRY_INTERVAL = 1.0, 30.0  # backoff while the file cannot be written
BUSY_TIMEOUT = 1.0  # how long to wait for another process's lock before calling the file locked

# MIGRATIONS[n]: the statements taking a file from schema version n to n + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        run TEXT NOT NULL,                  -- the run as last polled, JSON: identity, statuses
        since REAL,                         -- when that status was first observed, Unix seconds
        saw_status_begin INTEGER NOT NULL,  -- 1 when the watcher saw that status begin
        transitions TEXT NOT NULL,          -- JSON [[from_status, to_status, count], ...]
        seen_at REAL NOT NULL               -- last time a watcher watched the run
    ) WITHOUT ROWID
    """,
    ),
    # The last transitions with their times, for the status page: JSON [[at, from, to], ...].
    ("ALTER TABLE runs ADD COLUMN recent TEXT NOT NULL DEFAULT '[]'",),
)
SCHEMA_VERSION = len(MIGRATIONS)

# ?1: a JSON array of [run_id, run, since, saw_status_begin, transitions, recent] rows (`_row`);
# ?2: now. (`WHERE true` tells the parser that ON CONFLICT belongs to the INSERT.)
_UPSERT = """
    INSERT INTO runs (run_id, run, since, saw_status_begin, transitions, recent, seen_at)
    SELECT value ->> 0, value -> 1, value ->> 2, value ->> 3, value -> 4, value -> 5, ?2
    FROM json_each(?1) WHERE true
    ON CONFLICT (run_id) DO UPDATE SET
        run = excluded.run, since = excluded.since,
        saw_status_begin = excluded.saw_status_begin, transitions = excluded.transitions,
        recent = excluded.recent, seen_at = excluded.seen_at
"""
_TOUCH = "UPDATE runs SET seen_at = ?2 WHERE run_id IN (SELECT value FROM json_each(?1))"
_RUN = TypeAdapter(Run)
_SAVED = TypeAdapter(Saved)
# Errors that say the file's surroundings are at fault (a read-only filesystem, a full disk,
# permissions), not its contents: the file is left where it is.
_ENVIRONMENT_ERRORS = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
    }
)


class _Broken(Exception):
    """The file's contents cannot be used: move it aside and start afresh."""


class _Unwritable(Exception):
    """The file cannot be opened or written where it is: keep state in memory."""


def _environment_error(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _ENVIRONMENT_ERRORS


def _decode(row: tuple[object, ...]) -> Saved:
    run_id, run_text, since, saw_status_begin, transitions, recent = row
    if not (isinstance(run_text, str) and isinstance(transitions, str) and isinstance(recent, str)):
        raise _Broken(f"the row of run {str(run_id)[:80]!r} is malformed")
    try:
        run = _RUN.validate_python(json.loads(run_text), strict=False)
        saved = _SAVED.validate_python(
            {
                "run_id": run_id,
                "run": run,
                # The tracker's status is always the polled run's sampler status.
                "status": run.sampler.status if run.sampler else None,
                "since": since,
                "saw_status_begin": saw_status_begin,
                "transitions": json.loads(transitions),
                "recent": [
                    {"at": at, "from_status": old, "to_status": new}
                    for at, old, new in json.loads(recent)
                ],
            },
            strict=False,
        )
    except (ValueError, ValidationError) as exc:
        raise _Broken(f"the row of run {str(run_id)[:80]!r} is malformed: {exc}") from None
    if saved.run.id != saved.run_id:
        raise _Broken(f"the row of run {saved.run_id[:80]!r} holds another run")
    return saved


def _row(record: RunRecord) -> str | None:
    """A run's row for `_UPSERT`, as JSON; None for a run ID SQLite cannot store as text.

    Built by hand from C-speed pieces (it runs on the event loop for every changed run);
    strings are escaped to ASCII, lone surrogates included.
    """
    assert record.run is not None
    try:
        record.run_id.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return None
    transitions = ",".join(
        f"[{encode_basestring_ascii(old)},{encode_basestring_ascii(new)},{count:d}]"
        for (old, new), count in record.transitions.items()
    )
    recent = ",".join(
        f"[{_number(moment.at)},{encode_basestring_ascii(moment.from_status)},"
        f"{encode_basestring_ascii(moment.to_status)}]"
        for moment in record.recent
    )
    return (
        f"[{encode_basestring_ascii(record.run_id)},{_run_json(record.run)},"
        f"{_number(record.since)},{int(record.saw_status_begin)},[{transitions}],[{recent}]]"
    )


def _number(value: float | None) -> str:
    return repr(value) if value is not None and math.isfinite(value) else "null"


def _run_json(run: Run) -> str:
    try:
        return _RUN.dump_json(run).decode()
    except PydanticSerializationError:
        # A lone surrogate (kept by an older release's parser) is not UTF-8; json.dumps
        # escapes it like everything else that is not ASCII.
        return json.dumps(_RUN.dump_python(run))


class StateStore:
    """One state file: `open` loads it, `save` and `touch` queue writes for the writer thread.

    `open` and `close` block (call them off the event loop); `save` and `touch` never do.
    """

    def __init__(
        self,
        path: Path,
        registry: CollectorRegistry,
        *,
        retention: float = RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._retention = retention
        self._clock = clock
        self._log = get_logger()
        self._conn: sqlite3.Connection | None = None
        self._writable: bool | None = None  # unknown until the file was opened
        self._gauge = Gauge(
            "loops_watcher_state_file_writable",
            "1 while the state file takes writes; 0 while state is kept in memory only.",
            registry=registry,
        )
        # Filled by the event loop, taken whole by the writer: the newest row of each run, and
        # the runs still watched when `touch` was called.
        self._lock = threading.Lock()
        self._pending: dict[str, str] = {}
        self._touch: list[str] | None = None
        self._saves = 0  # only ever grows; the writer watches it to see a burst end
        # The writer's own: rows taken but not committed yet (the file could not be written).
        self._unwritten: dict[str, str] = {}
        self._unwritten_touch: list[str] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="state-writer", daemon=True)

    # --- called from the event loop -------------------------------------------------------

    def save(self, record: RunRecord) -> None:
        """Queue the run's state as it is now; the writer commits it within a fraction of a
        second. Only for a run seen at least once."""
        row = _row(record)
        if row is not None:
            with self._lock:
                self._pending[record.run_id] = row
            self._saves += 1
            self._wake_writer()

    def touch(self, run_ids: list[str]) -> None:
        """Mark these runs as still watched and delete rows unwatched for longer than retention."""
        with self._lock:
            self._touch = run_ids
        self._wake_writer()

    def _wake_writer(self) -> None:
        # Queued before looking: if the flag is still set, the writer has not cleared it yet,
        # and clears it before it takes what is queued, this included.
        if not self._wake.is_set():
            self._wake.set()

    @property
    def writable(self) -> bool:
        return self._writable is True

    # --- blocking: call through asyncio.to_thread -------------------------------------------

    def open(self) -> dict[str, Saved]:
        """Load the saved runs (none when the file is new or unusable) and start the writer."""
        saved: dict[str, Saved] = {}
        try:
            saved = self._load()
        except _Broken as exc:
            self._disconnect()
            if self._move_aside(str(exc)):
                self._try_prepare()
        except _Unwritable as exc:
            self._disconnect()
            self._set_writable(False, str(exc))
        else:
            self._set_writable(True)
            self._log.info(
                "state_file_loaded",
                path=str(self.path),
                runs=len(saved),
                schema_version=SCHEMA_VERSION,
            )
        self._writer.start()
        return saved

    def close(self) -> None:
        """Commit what is queued (one last attempt) and close the file."""
        self._stopping.set()
        self._wake.set()
        if self._writer.is_alive():
            self._writer.join()
        self._disconnect()

    # --- opening ------------------------------------------------------------------------

    def _load(self) -> dict[str, Saved]:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _Unwritable(f"cannot reach the file: {exc.strerror}") from None
        else:
            if not stat.S_ISREG(info.st_mode):
                # Never renamed: it may be a device or something else nobody wants moved.
                raise _Unwritable("not a regular file")
        try:
            self._prepare()
            assert self._conn is not None
            rows = self._conn.execute(
                "SELECT run_id, run, since, saw_status_begin, transitions, recent FROM runs"
            ).fetchall()
            return {saved.run_id: saved for saved in map(_decode, rows)}
        except sqlite3.Error as exc:
            if _environment_error(exc):
                raise _Unwritable(str(exc)) from None
            raise _Broken(_describe(exc)) from None
        except (_Broken, _Unwritable):
            raise
        except Exception as exc:
            # The file is input like any other: whatever else a damaged one makes go wrong
            # (text that is not UTF-8, even in SQLite's own messages) means it is unusable.
            raise _Broken(f"corrupt: {type(exc).__name__}: {exc}") from None

    def _prepare(self) -> None:
        """Connect, check the file is this program's, bring its schema up to date."""
        try:
            self._prepare_connection()
        except BaseException:
            self._disconnect()
            raise

    def _prepare_connection(self) -> None:
        conn = self._conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if application_id == 0 and version == 0:
            if conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise _Broken("another program's database (it has tables but no loops-watcher id)")
            # Only possible before the first table: lets deletions give space back to the disk.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        elif application_id != APPLICATION_ID:
            raise _Broken(f"another program's database (application_id {application_id:#x})")
        elif version < 0:
            raise _Broken(f"corrupt: schema version {version}")
        elif version > SCHEMA_VERSION:
            raise _Broken(
                f"written by a newer watcher (schema version {version}; this one knows up to "
                f"{SCHEMA_VERSION})"
            )
        problems = conn.execute("PRAGMA quick_check").fetchall()
        if problems != [("ok",)]:
            raise _Broken(f"corrupt: {str(problems[0][0])[:200]}")
        conn.execute("PRAGMA journal_mode = WAL")
        # A commit survives a killed process; only a power cut may take the last ones back.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 4194304")
        for number in range(version, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {number + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _try_prepare(self) -> None:
        try:
            self._prepare()
        except (sqlite3.Error, _Broken) as exc:
            self._set_writable(False, str(exc))
        else:
            self._set_writable(True)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _move_aside(self, reason: str) -> bool:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.broken-{stamp}")
        try:
            os.replace(self.path, aside)
            # The journal belongs to the moved file; the shared-memory index is only a cache.
            for suffix in ("-wal", "-journal"):
                companion = Path(f"{self.path}{suffix}")
                if companion.exists():
                    os.replace(companion, f"{aside}{suffix}")
            Path(f"{self.path}-shm").unlink(missing_ok=True)
        except OSError as exc:
            self._set_writable(False, f"{reason}; cannot move it aside: {exc.strerror}")
            return False
        self._log.error(
            "state_file_moved_aside",
            path=str(self.path),
            moved_to=str(aside),
            reason=reason,
            note="starting with no saved state",
        )
        return True

    # --- the writer thread --------------------------------------------------------------

    def _write_loop(self) -> None:
        backoff = RETRY_FIRST
        while not self._stopping.is_set():
            self._wake.wait()
            self._wait_for_quiet()
            self._wake.clear()
            if self._write():
                backoff = RETRY_FIRST
            else:
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RETRY_INTERVAL)
                self._wake.set()  # what failed is still to be written
        self._write()

    def _wait_for_quiet(self) -> None:
        deadline = time.monotonic() + BATCH_MAX_DELAY
        while not self._stopping.is_set():
            saves = self._saves
            if self._stopping.wait(min(BATCH_QUIET, max(0.0, deadline - time.monotonic()))):
                return
            if self._saves == saves or time.monotonic() >= deadline:
                return

    def _write(self) -> bool:
        with self._lock:
            taken, self._pending = self._pending, {}
            touch, self._touch = self._touch, None
        self._unwritten.update(taken)  # newer rows replace older ones
        if touch is not None:
            self._unwritten_touch = touch
        if not self._unwritten and self._unwritten_touch is None:
            return True
        try:
            if self._conn is None:
                self._prepare()
            self._commit()
        except (sqlite3.Error, _Broken, ValueError) as exc:
            self._set_writable(False, str(exc))  # kept, and tried again with what comes next
            return False
        self._unwritten = {}
        self._unwritten_touch = None
        self._set_writable(True)
        return True

    def _commit(self) -> None:
        conn = self._conn
        assert conn is not None
        now = self._clock()
        rows = "[" + ",".join(self._unwritten.values()) + "]"
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_UPSERT, (rows, now))
            if self._unwritten_touch is not None:
                conn.execute(_TOUCH, (json.dumps(self._unwritten_touch), now))
                conn.execute("DELETE FROM runs WHERE seen_at < ?", (now - self._retention,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if self._unwritten_touch is not None:
            conn.execute("PRAGMA incremental_vacuum")

    def _set_writable(self, writable: bool, error: str = "") -> None:
        previous, self._writable = self._writable, writable
        self._gauge.set(1 if writable else 0)
        if writable == previous:
            return
        if not writable:
            self._log.error(
                "state_file_unwritable",
                path=str(self.path),
                error=error,
                note=f"state is kept in memory; writes are retried, at least every "
                f"{RETRY_INTERVAL:g} s",
            )
        elif previous is False:
            self._log.info("state_file_writable", path=str(self.path))


def _describe(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"locked by another process ({exc})"
    return str(exc)
