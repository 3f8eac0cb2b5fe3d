"""Helpers for the end-to-end tests: a real `loops-watcher` process, its logs and its metrics.

The watcher runs as `python -m watcher` in a subprocess with a fake API key in its
environment; its stdout and stderr are drained by background threads so a pipe never fills.
It listens on `127.0.0.1:0` and the tests read the port it got from its `watcher_started`
line, so parallel test runs never race for a port. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import httpx

from support import FAKE_KEY, Exposition, wait_until
from watcher.simulator import SimulatorThread
from watcher.simulator.scenarios import RunSpec, Scenario, Step

T = TypeVar("T")

CALLER = "e2e@example.com"
# Options every e2e watcher gets unless a test passes its own.
FAST = (
    "--poll-interval",
    "1",
    "--fast-poll-interval",
    "0.5",
    "--request-timeout",
    "1",
    "--max-requests-per-second",
    "1000",
)
REPO = Path(__file__).resolve().parents[2]
# How long a start may take before a test fails. No test is about how fast the watcher starts,
# and a start is mostly imports: on a busy 2-core machine they alone can take over 15 s.
STARTUP = 60.0


def scenario(runs: Mapping[str, str | None]) -> Scenario:
    """Runs that sit in one sampler status (None: no sampler) until a test changes them."""
    return Scenario(
        caller=CALLER,
        runs=tuple(
            RunSpec(
                id=run_id,
                name=f"name-{run_id}",
                base_model="Qwen/Qwen3-8B",
                owner=CALLER,
                timeline=None if status is None else (Step(status, 86_400.0),),
                loop=False,
            )
            for run_id, status in runs.items()
        ),
    )


def _drain(stream: Any, into: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        into.append(raw.decode("utf-8", "replace").rstrip("\n"))
    stream.close()


def watcher_env(api_key: str | None = FAKE_KEY, **extra: str) -> dict[str, str]:
    """The test's environment without any watcher settings, plus the given ones."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("LOOPS_WATCHER_") and name != "BASETEN_API_KEY"
    }
    if api_key is not None:
        env["BASETEN_API_KEY"] = api_key
    env.update(extra)
    return env


def run_watcher(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m watcher ARGS` to completion (for --once, --check-config, bad usage)."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        env=dict(env) if env is not None else watcher_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class WatcherProcess:
    """A running `loops-watcher`; use as a context manager so it is always killed."""

    def __init__(
        self,
        *args: str,
        api_key: str | None = FAKE_KEY,
        env: Mapping[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        self.args = ("--listen-address", "127.0.0.1:0", "--log-format", "json", *args)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        # prlimit execs the watcher in its own place: the pid stays the watcher's.
        limit = ["prlimit", f"--nofile={nofile}", "--"] if nofile is not None else []
        self.proc = subprocess.Popen(
            [*limit, sys.executable, "-m", "watcher", *self.args],
            env=watcher_env(api_key, **(env or {})),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._readers = [
            threading.Thread(target=_drain, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=_drain, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.port = 0
        # Generous: a watcher busy with a large first list on a loaded machine answers seconds
        # late, not never; the tests that care how fast it answers measure that themselves.
        self.http = httpx.Client(timeout=30.0)

    def __enter__(self) -> WatcherProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill()

    def kill(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.join_output()

    def join_output(self) -> None:
        """After the process exited: wait until every line it wrote has been read."""
        for reader in self._readers:
            reader.join(timeout=5)

    # --- logs --------------------------------------------------------------------------

    def logs(
        self, event: str | None = None, *, since: int = 0, **fields: Any
    ) -> list[dict[str, Any]]:
        """Parsed stdout lines from index `since` on, optionally of one event with fields."""
        found = []
        for line in self.stdout[since:]:
            record: dict[str, Any] = json.loads(line)
            if event is not None and record.get("event") != event:
                continue
            if all(record.get(key) == value for key, value in fields.items()):
                found.append(record)
        return found

    def mark(self) -> int:
        """An index into stdout, to look only at lines logged after it."""
        return len(self.stdout)

    def wait_for_log(
        self, event: str, *, timeout: float = 10.0, since: int = 0, **fields: Any
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            self._check_alive()
            records = self.logs(event, since=since, **fields)
            return records[0] if records else None

        return wait_until(found, timeout=timeout, what=f"log {event} {fields}")

    def start(self, *, ready: bool = True, timeout: float = STARTUP) -> WatcherProcess:
        """Wait until it listens (and, with `ready`, until /readyz says 200)."""
        started = self.wait_for_log("watcher_started", timeout=timeout)
        self.port = int(str(started["listen"]).rsplit(":", 1)[1])
        if ready:
            wait_until(
                lambda: self.get("/readyz").status_code == 200,
                timeout=timeout,
                what="/readyz to answer 200",
            )
        return self

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the watcher exited with {self.proc.returncode}; stderr: {self.stderr[-5:]}"
            )

    # --- HTTP ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.port, "start() the watcher first"
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **headers: str) -> httpx.Response:
        return self.http.get(self.url + path, headers=headers)

    def scrape(self) -> Exposition:
        self._check_alive()
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        return Exposition.parse(response.text)

    def wait_for_metrics(
        self, condition: Callable[[Exposition], object], *, timeout: float = 10.0, what: str
    ) -> Exposition:
        def check() -> Exposition | None:
            metrics = self.scrape()
            return metrics if condition(metrics) else None

        return wait_until(check, timeout=timeout, what=what)

    # --- process -------------------------------------------------------------------------

    def send(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (resident now) and VmHWM (peak resident) from /proc/<pid>/status, in KiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
        return fields

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used, from /proc/<pid>/stat."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def all_output(self) -> str:
        return "\n".join((*self.stdout, *self.stderr))


def request_count(counts: Mapping[str, int], run_ids: Iterable[str]) -> int:
    """API requests the simulator served for these runs' single-run endpoint."""
    return sum(counts.get(f"/v1/loops/runs/{run_id}", 0) for run_id in run_ids)


class StartSimulator(Protocol):
    """The `start_simulator` fixture: a simulator thread serving `runs`, stopped afterwards."""

    def __call__(
        self, runs: Mapping[str, str | None], *, api_keys: Iterable[str] = (FAKE_KEY,)
    ) -> SimulatorThread: ...


class StartWatcher(Protocol):
    """The `start_watcher` fixture: a started watcher process, killed afterwards."""

    def __call__(
        self,
        *args: str,
        api_key: str | None = FAKE_KEY,
        env: Mapping[str, str] | None = None,
        ready: bool = True,
        nofile: int | None = None,
    ) -> WatcherProcess: ...
