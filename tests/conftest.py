"""Fixtures shared across test files, and the line between `make check` and `make test`.

`make check` runs every test that starts no process (`-m "not process"`). A test that starts
one (the watcher, a validator such as promtool, git) says so with `@pytest.mark.process`, or
`@pytest.mark.e2e`, which implies it; a test that starts a process without the mark fails, so
the fast target never quietly grows slow.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from typing import Any, NoReturn

import pytest
from support import FAKE_KEY
from support.e2e import StartSimulator, StartWatcher, WatcherProcess, scenario

from watcher.simulator import SimulatorThread


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.process)


@pytest.fixture(autouse=True)
def _processes_only_where_marked(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("process"):
        return
    name = request.node.nodeid

    # subprocess.run, Popen and asyncio's subprocesses all start the child here.
    def refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise AssertionError(f"{name} starts a process: mark it @pytest.mark.process")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


@pytest.fixture
def start_simulator() -> Iterator[StartSimulator]:
    """Start Loops API simulators on loopback, in this process; all stop at teardown."""
    with ExitStack() as stack:

        def start(
            runs: Mapping[str, str | None], *, api_keys: Iterable[str] = (FAKE_KEY,)
        ) -> SimulatorThread:
            return stack.enter_context(SimulatorThread(scenario(runs), list(api_keys)))

        yield start


@pytest.fixture
def start_watcher() -> Iterator[StartWatcher]:
    """Start real `loops-watcher` processes; every one is killed at teardown."""
    with ExitStack() as stack:

        def start(
            *args: str,
            api_key: str | None = FAKE_KEY,
            env: Mapping[str, str] | None = None,
            ready: bool = True,
            nofile: int | None = None,
        ) -> WatcherProcess:
            watcher = stack.enter_context(
                WatcherProcess(*args, api_key=api_key, env=env, nofile=nofile)
            )
            return watcher.start(ready=ready)

        yield start
