"""Fixtures shared across test files."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack

import pytest
from e2e_support import FAKE_KEY, StartSimulator, StartWatcher, WatcherProcess, scenario

from watcher.simulator import SimulatorThread


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
        ) -> WatcherProcess:
            watcher = stack.enter_context(WatcherProcess(*args, api_key=api_key, env=env))
            return watcher.start(ready=ready)

        yield start
