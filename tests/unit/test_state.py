"""The state file: round trips, retention, and every kind of file it must survive."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from support.factories import make_run

from watcher import state
from watcher.state import APPLICATION_ID, RETENTION, SCHEMA_VERSION, StateStore
from watcher.tracker import RunRecord, Saved, Tracker, Transition

DAY = 86_400.0


def saved_run(run_id: str, status: str = "ACTIVE", **changes: Any) -> Saved:
    return Saved(
        run_id=run_id,
        run=make_run(status, run_id=run_id, **changes),
        status=status,
        since=1_700_000_100.5,
        saw_status_begin=True,
        transitions=(("ACTIVE", "FAILED", 2), ("FAILED", "ACTIVE", 1)),
        recent=(
            Transition(1_700_000_050.25, "ACTIVE", "FAILED"),
            Transition(1_700_000_100.5, "FAILED", "ACTIVE"),
        ),
    )


class Opened:
    """A store opened on `path` with a fresh registry; closed at the end of the test."""

    def __init__(self, path: Path, clock: list[float] | None = None) -> None:
        self.registry = CollectorRegistry()
        moment = clock or [1_700_000_000.0]
        self.store = StateStore(path, self.registry, clock=lambda: moment[0])
        with capture_logs() as logs:
            self.loaded = self.store.open()
        self.logs = logs

    def writable(self) -> float | None:
        return self.registry.get_sample_value("loops_watcher_state_file_writable")

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def opened() -> Iterator[list[Opened]]:
    stores: list[Opened] = []
    yield stores
    for each in stores:
        each.close()


def open_store(opened: list[Opened], path: Path, clock: list[float] | None = None) -> Opened:
    each = Opened(path, clock)
    opened.append(each)
    return each


def record_of(saved: Saved) -> RunRecord:
    return Tracker().restore(saved)


def write_and_close(path: Path, runs: list[Saved]) -> None:
    store = StateStore(path, CollectorRegistry())
    assert store.open() == {}
    for saved in runs:
        store.save(record_of(saved))
    store.close()


def moved_aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.broken-*"))


def test_saved_runs_come_back_exactly(tmp_path: Path, opened: list[Opened]) -> None:
    path = tmp_path / "state.db"
    runs = [
        saved_run("run-a"),
        replace(saved_run("run-b", "HIBERNATING", name="é\udc80\n\"x'"), since=None),
        Saved("run-c", make_run(None, run_id="run-c"), None, None, False, ()),
    ]
    write_and_close(path, runs)
    again = open_store(opened, path)
    assert again.loaded == {saved.run_id: saved for saved in runs}
    assert again.writable() == 1
    assert [log["event"] for log in again.logs] == ["state_file_loaded"]


def test_a_newer_record_of_a_run_replaces_the_older(tmp_path: Path, opened: list[Opened]) -> None:
    path = tmp_path / "state.db"
    write_and_close(path, [saved_run("run-a", "ACTIVE"), saved_run("run-a", "FAILED")])
    assert open_store(opened, path).loaded["run-a"].status == "FAILED"


def test_file_is_marked_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    write_and_close(path, [saved_run("run-a")])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        rows = conn.execute("SELECT run_id, since FROM runs").fetchall()
        assert rows == [("run-a", 1_700_000_100.5)]
    conn.close()


def test_an_older_file_is_upgraded_in_place(
    tmp_path: Path, opened: list[Opened], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    write_and_close(path, [saved_run("run-a")])
    # A later release adding a column: its file is this one, one migration on.
    upgrade = ("ALTER TABLE runs ADD COLUMN note TEXT",)
    monkeypatch.setattr(state, "MIGRATIONS", (*state.MIGRATIONS, upgrade))
    monkeypatch.setattr(state, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    each = open_store(opened, path)
    assert each.loaded == {"run-a": saved_run("run-a")}
    assert moved_aside(path) == []
    each.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
        assert conn.execute("SELECT run_id, note FROM runs").fetchall() == [("run-a", None)]
    conn.close()


def test_a_first_version_file_gains_the_recent_transitions(
    tmp_path: Path, opened: list[Opened], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    with monkeypatch.context() as first_release:
        first_release.setattr(state, "MIGRATIONS", state.MIGRATIONS[:1])
        first_release.setattr(state, "SCHEMA_VERSION", 1)
        store = StateStore(path, CollectorRegistry())
        store.open()
        store.close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
            ("run-a", state._run_json(make_run("ACTIVE", run_id="run-a")), 5.0, 1, "[]", 9.0),
        )
    conn.close()
    each = open_store(opened, path)
    (saved,) = each.loaded.values()
    assert (saved.run_id, saved.since, saved.recent) == ("run-a", 5.0, ())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    conn.close()


def test_an_empty_file_is_a_new_state_file(tmp_path: Path, opened: list[Opened]) -> None:
    path = tmp_path / "state.db"
    path.touch()
    each = open_store(opened, path)
    assert each.loaded == {}
    assert each.writable() == 1
    assert moved_aside(path) == []


def test_runs_unwatched_past_retention_are_pruned(tmp_path: Path, opened: list[Opened]) -> None:
    path = tmp_path / "state.db"
    clock = [1_700_000_000.0]
    first = open_store(opened, path, clock)
    first.store.save(record_of(saved_run("kept")))
    first.store.save(record_of(saved_run("dropped")))
    first.close()
    clock[0] += RETENTION - DAY
    second = open_store(opened, path, clock)
    second.store.touch(["kept"])
    second.close()
    clock[0] += 2 * DAY  # "dropped" was last watched RETENTION + DAY ago, "kept" 2 days ago
    third = open_store(opened, path, clock)
    third.store.touch([])
    third.close()
    assert set(open_store(opened, path, clock).loaded) == {"kept"}


def test_the_file_stays_the_size_of_the_runs_it_holds(tmp_path: Path, opened: list[Opened]) -> None:
    path = tmp_path / "state.db"
    clock = [1_700_000_000.0]

    def fill(prefix: str) -> int:
        each = open_store(opened, path, clock)
        for number in range(2000):
            each.store.save(record_of(saved_run(f"{prefix}-{number}")))
        each.close()
        return path.stat().st_size

    first = fill("one")
    for prefix in ("two", "three", "four"):
        clock[0] += RETENTION + DAY
        each = open_store(opened, path, clock)
        each.store.touch([])  # every run so far has gone unwatched past retention
        each.close()
        assert fill(prefix) <= first * 1.2, prefix
    assert len(open_store(opened, path, clock).loaded) == 2000


def broken_files(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Files the watcher must move aside, each in a directory of its own."""

    def place(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        return folder / "state.db"

    path = place("garbage")
    path.write_bytes(b"this is not a database\n" * 100)
    yield "not a database", path

    path = place("foreign")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
    conn.close()
    yield "another program's database", path

    path = place("foreign-id")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 1234")
    conn.close()
    yield "another program's database", path

    path = place("newer")
    write_and_close(path, [saved_run("run-a")])
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    yield "newer watcher", path

    path = place("negative-version")
    write_and_close(path, [saved_run("run-a")])
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = -3")
    conn.close()
    yield "schema version -3", path

    for name, column, value in (
        ("bad-json", "run", "{not json"),
        ("bad-types", "run", '{"id": "run-a", "created_at": "yesterday"}'),
        ("bad-transitions", "transitions", '[["A", "B"]]'),
        ("other-run", "run", None),
    ):
        path = place(name)
        write_and_close(path, [saved_run("run-a"), saved_run("run-b")])
        with sqlite3.connect(path) as conn:
            if value is None:
                conn.execute("UPDATE runs SET run_id = 'run-z' WHERE run_id = 'run-a'")
            else:
                conn.execute(f"UPDATE runs SET {column} = ? WHERE run_id = 'run-a'", (value,))
        conn.close()
        yield "malformed" if value is not None else "holds another run", path

    path = place("truncated")
    write_and_close(path, [saved_run(f"run-{n}") for n in range(300)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    yield "", path


@pytest.mark.parametrize("case", range(10))
def test_an_unusable_file_is_moved_aside_once_and_the_watcher_starts_afresh(
    tmp_path: Path, opened: list[Opened], case: int
) -> None:
    reason, path = list(broken_files(tmp_path))[case]
    original = path.read_bytes()
    each = open_store(opened, path)
    assert each.loaded == {}
    (aside,) = moved_aside(path)
    assert aside.read_bytes() == original
    (line,) = [log for log in each.logs if log["log_level"] == "error"]
    assert line["event"] == "state_file_moved_aside"
    assert line["moved_to"] == str(aside)
    assert reason in line["reason"]
    # A fresh file took its place and works.
    assert each.writable() == 1
    each.store.save(record_of(saved_run("run-new")))
    each.close()
    assert set(open_store(opened, path).loaded) == {"run-new"}


def test_a_file_locked_by_another_process_is_moved_aside(
    tmp_path: Path, opened: list[Opened]
) -> None:
    path = tmp_path / "state.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        each = open_store(opened, path)
    finally:
        holder.close()
    assert each.loaded == {}
    (line,) = [log for log in each.logs if log["log_level"] == "error"]
    assert "locked" in line["reason"]
    assert len(moved_aside(path)) == 1
    assert each.writable() == 1


def test_fuzzed_files_never_crash_the_loader(tmp_path: Path, opened: list[Opened]) -> None:
    source = tmp_path / "source.db"
    runs = {f"run-{n}": saved_run(f"run-{n}") for n in range(50)}
    write_and_close(source, list(runs.values()))
    data = source.read_bytes()
    rng = random.Random(13)
    outcomes = {"loaded": 0, "moved": 0}
    for case in range(300):
        mangled = bytearray(data)
        kind = case % 3
        if kind == 0:  # flip bytes anywhere, header included
            for _ in range(rng.randint(1, 20)):
                mangled[rng.randrange(len(mangled))] = rng.randrange(256)
        elif kind == 1:  # cut it short
            del mangled[rng.randrange(len(mangled)) :]
        else:  # overwrite a stretch with garbage
            start = rng.randrange(len(mangled))
            mangled[start : start + rng.randint(1, 4096)] = rng.randbytes(rng.randint(1, 4096))
        folder = tmp_path / f"case-{case}"
        folder.mkdir()
        path = folder / "state.db"
        path.write_bytes(bytes(mangled))
        each = open_store(opened, path)
        assert isinstance(each.loaded, dict)
        if moved_aside(path):
            outcomes["moved"] += 1
            assert each.loaded == {}
        else:
            outcomes["loaded"] += 1
            # Whatever loads is well formed: a run the tracker and metrics can take as it is.
            for run_id, saved in each.loaded.items():
                assert isinstance(saved, Saved)
                assert saved.run.id == run_id
        assert each.writable() == 1, case
        each.close()
    assert outcomes["moved"] > 100, outcomes  # the fuzzing did reach the checks


def test_a_path_that_cannot_be_created_keeps_state_in_memory(
    tmp_path: Path, opened: list[Opened]
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where a directory should be")
    path = blocker / "state.db"
    each = open_store(opened, path)
    assert each.loaded == {}
    assert each.writable() == 0
    (line,) = each.logs
    assert (line["event"], line["log_level"]) == ("state_file_unwritable", "error")
    assert line["path"] == str(path)
    each.store.save(record_of(saved_run("run-a")))  # queued, never raises
    assert moved_aside(path) == []
    assert blocker.read_text() == "a file where a directory should be"


def test_something_other_than_a_file_is_left_alone(tmp_path: Path, opened: list[Opened]) -> None:
    path = tmp_path / "state.db"
    path.mkdir()
    each = open_store(opened, path)
    assert each.loaded == {}
    assert each.writable() == 0
    assert path.is_dir()
    assert moved_aside(path) == []
