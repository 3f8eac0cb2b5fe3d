"""Issue 5's benchmark: the real watcher process against the simulator on loopback.

Run with `make bench` (about ten minutes). Every process it starts listens on 127.0.0.1 only,
uses a fake key and is stopped on the way out, whatever happens. It measures, on this machine
and in one run:

1. CPU per poll and polls per second of a watcher asked for more than it can do (2,000 runs
   every second, per-run GETs), next to a bare `httpx.AsyncClient` loop doing only GET + JSON
   decode against the same simulator with the same concurrency, in its own process;
2. the idle process (one run); then 10,000 runs every 30 s polled one by one (the key may not
   list): whether it keeps up, CPU, the time and size of a `/metrics` scrape, and memory: the
   peak of three watchers (the median is held to the target), and what a run adds. These
   watchers run as the container image installs them (runtime dependencies only, bytecode
   compiled: a process that compiles its modules keeps megabytes of that work), in an
   environment made with the Makefile's uv; the idle one also as this environment runs it;
3. the same runs in list mode: requests per interval, CPU, memory (the median peak of three
   watchers, as in 2), and fast polls next to the most there could be (a run that turns
   transitional between two lists is seen, and then polled fast, from the next list on, so
   short wake-ups get few fast polls or none);
4. how long a status change in the backend takes to show in `/metrics`;
5. the runs of 2 and 3 split among four shard processes: each one's share, CPU and memory,
   and the requests all of them make together.
6. the state file (`--state-file`) at 10,000 runs, in this process through the watcher's own
   store: what saving every run costs the event loop, the longest stall of a running event
   loop from those saves until the writer thread committed them, the commit's time and CPU,
   the load time and the file size; and the slowest `/metrics` scrape of the real watcher
   while 10,000 runs change status in one list response, with and without the state file (a
   noisy comparison: the list round itself and other load dominate it).
7. a 50,000-run organisation (a list of about 37 MB of JSON) watched with `--discover org`
   by watchers installed as in 2: list requests per interval, whether a sample of runs shows
   their status, read lately, CPU between lists and the median peak memory of three watchers.
8. the event loop while list mode records a large list, in this process through the watcher's
   own list loop, recorder, metrics and logs (at info level, into /dev/null): the longest
   stall of a running event loop (what /healthz, /readyz and scrapes wait at worst) while a
   50,000-run first list is recorded (every run new, discovered) and while a list in which
   all of 10,000 runs changed status is recorded.

Part 2 also times the status page on its 10,000 runs: `/api/v1/runs` (what the page's script
fetches every few seconds), the server-rendered `/`, and `/metrics` scrapes while a browser
stand-in fetches `/api/v1/runs` every 2 s, next to the scrapes without it.

CPU is utime + stime from /proc/<pid>/stat, memory VmRSS (now) and VmHWM (peak) from
/proc/<pid>/status; polls come
from `loops_watcher_polls_total` and request counts from the simulator's `/_sim/requests`.
Timings vary by 15-25 % from run to run here, so repeated measurements are quoted as medians
and the watcher is compared with a floor measured in the same run.

`python benchmarks/benchmark.py --parts 1,4` runs only some parts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gzip
import json
import math
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
from prometheus_client import CollectorRegistry

from watcher.config import load_settings
from watcher.daemon import Watcher as InProcessWatcher
from watcher.logs import configure_logging
from watcher.model import Fetched, Run, RunList, Sampler, StatusClass, status_class
from watcher.simulator.scenarios import RunSpec, synthetic_scenario
from watcher.state import StateStore
from watcher.tracker import Tracker

KEY = "bench-fake-key-not-a-secret"
HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")
WATCHER = Path(sys.executable).with_name("loops-watcher")
ROOT = Path(__file__).resolve().parents[1]
LIST_FORBIDDEN = {"kind": "status", "status": 403, "endpoint": "list"}
PROMETHEUS_ACCEPT = "text/plain;version=0.0.4"
RUN_PATH = "/v1/loops/runs/"

# Part 1: more than the watcher can do.
SATURATE_RUNS = 2_000
SATURATE_CONCURRENCY = 32
WARMUP = 5.0  # seconds before measuring a process that has just started
# Parts 2 and 3: the size the issue asks about.
SCALE_RUNS = 10_000
SCALE_INTERVAL = 30.0
SCALE_FAST_INTERVAL = 5.0
SCALE_RATE = 1_000
PEAK_WATCHERS = 3  # watchers of the 10,000 runs whose peak memory is measured
IDLE_SETTLE = 5.0  # seconds a watcher of one run is left to settle before it is measured
# Part 4: short intervals, a few runs steered through the control interface.
LATENCY_RUNS = 50
LATENCY_INTERVAL = 5.0
LATENCY_FAST_INTERVAL = 1.0
LATENCY_TRIALS = 5
# Part 5: the same runs, split.
SHARDS = 4
# Part 7: a large organisation discovered in list mode; its list is about 37 MB of JSON.
ORG_RUNS = 50_000
ORG_SAMPLE = 500
# Poll intervals: a listed run is read when its list has arrived, so just before the next one
# arrives its last success is an interval plus the time a 38 MB list takes old; a missed list
# would make it two intervals.
FRESH_WITHIN = 1.5
# Part 6: every run changing status at once, with and without a state file.
STATE_INTERVAL = 10.0
STATE_BASELINE_SCRAPES = 5
STATE_FLIPS = 5
# Part 8: the longest the event loop may stall while a list is recorded (probes time out in 1 s).
STALL_TARGET = 0.1


# --- processes -------------------------------------------------------------------------------


class Child:
    """A process this benchmark started; `stop()` always ends it."""

    def __init__(self, name: str, argv: Sequence[str], *, stdout: int | IO[bytes]) -> None:
        self.name = name
        # No proxy variables: every request must stay on loopback.
        env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
        env["BASETEN_API_KEY"] = KEY
        env["LOOPS_SIMULATOR_API_KEY"] = KEY
        self.proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.STDOUT)

    def cpu(self) -> float:
        """CPU seconds used so far, user + system, all threads."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def memory(self, field: str = "VmRSS") -> int:
        """Resident memory in bytes: now (VmRSS) or at its peak so far (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.name}: no {field}")

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def http_client() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(30.0), trust_env=False)


@dataclass
class Simulator:
    child: Child
    url: str
    epoch: float  # time.monotonic() when it started; its timelines count from here
    runs: tuple[RunSpec, ...]
    http: httpx.Client

    def requests(self) -> dict[str, int]:
        response = self.http.get(f"{self.url}/_sim/requests")
        response.raise_for_status()
        counts: dict[str, int] = response.json()["requests"]
        return counts

    def run_gets(self) -> int:
        return sum(n for path, n in self.requests().items() if path.startswith(RUN_PATH))

    def control(self, method: str, path: str, body: object = None) -> None:
        response = self.http.request(method, f"{self.url}/_sim/{path}", json=body)
        response.raise_for_status()


@contextlib.contextmanager
def simulator(runs: int) -> Iterator[Simulator]:
    argv = [sys.executable, "-m", "watcher.simulator", "--listen", f"{HOST}:0", "--runs", str(runs)]
    child = Child("simulator", argv, stdout=subprocess.PIPE)
    try:
        assert child.proc.stdout is not None
        ready, _, _ = select.select([child.proc.stdout], [], [], 60.0)
        line = child.proc.stdout.readline().decode() if ready else ""
        epoch = time.monotonic()
        if " on " not in line:
            raise RuntimeError(f"simulator did not start: {line!r}")
        url = line.split(" on ", 1)[1].split()[0]
        scenario = synthetic_scenario(runs)  # the same seed: the simulator's runs, timelines too
        with http_client() as http:
            sim = Simulator(child, url, epoch, scenario.runs, http)
            state = http.get(f"{url}/_sim/state").json()
            if {run["id"] for run in state["runs"]} != {run.id for run in scenario.runs}:
                raise RuntimeError("the simulator serves other runs than synthetic_scenario()")
            yield sim
    finally:
        child.stop()


@dataclass
class Watcher:
    child: Child
    url: str
    http: httpx.Client

    def scrape(self, *, compressed: bool = False) -> tuple[str, float, int]:
        """(exposition text, seconds to the last byte, bytes on the wire)."""
        headers = {
            "Accept": PROMETHEUS_ACCEPT,
            "Accept-Encoding": "gzip" if compressed else "identity",
        }
        started = time.perf_counter()
        with self.http.stream("GET", f"{self.url}/metrics", headers=headers) as response:
            response.raise_for_status()
            raw = b"".join(response.iter_raw())
        seconds = time.perf_counter() - started
        body = gzip.decompress(raw) if compressed else raw
        return body.decode(), seconds, len(raw)

    def ready(self) -> bool:
        self.child.check()
        return self.http.get(f"{self.url}/readyz").status_code == 200


def log_entries(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                yield entry


def expected_warning(entry: dict[str, Any]) -> bool:
    """Status changes, and the list refused where the benchmark refuses it."""
    event = entry.get("event")
    refused = event == "list_failed" and entry.get("result") == "forbidden"
    return refused or event in ("sampler_status_changed", "list_mode_unavailable")


@contextlib.contextmanager
def watcher(
    sim: Simulator,
    tmp: Path,
    run_ids: Sequence[str],
    results: Results,
    *options: str,
    command: Path = WATCHER,
) -> Iterator[Watcher]:
    """The real watcher process on the given runs; its warnings end up in the notes."""
    ids_file = tmp / "run-ids.txt"
    ids_file.write_text("".join(f"{run_id}\n" for run_id in run_ids))
    log_path = tmp / f"watcher-{time.monotonic_ns()}.log"
    argv = [
        str(command),
        "--api-url", sim.url,
        "--run-ids-file", str(ids_file),
        "--listen-address", f"{HOST}:0",
        "--log-format", "json",
        *options,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        child = Child("watcher", argv, stdout=log)
    try:
        url = ""

        def started() -> bool:
            nonlocal url
            child.check()
            for entry in log_entries(log_path):
                if entry.get("event") == "watcher_started":
                    url = f"http://{entry['listen']}"
                    return True
            return False

        wait_until(started, 30, "watcher_started")
        with http_client() as http:
            yield Watcher(child, url, http)
    except BaseException:
        sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
        raise
    finally:
        child.stop()
    noisy = Counter(
        str(entry.get("event"))
        for entry in log_entries(log_path)
        if entry.get("level") in ("warning", "error") and not expected_warning(entry)
    )
    if noisy:
        events = ", ".join(f"{event} x{n}" for event, n in noisy.most_common())
        results.notes.append(
            f"the watcher on {len(run_ids):,} runs ({' '.join(options)}) logged {events}"
        )


# --- reading /metrics ------------------------------------------------------------------------


def sample_values(text: str, name: str) -> list[float]:
    prefixes = (name + "{", name + " ")
    return [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes)
    ]


def polls_total(text: str) -> float:
    return sum(sample_values(text, "loops_watcher_polls_total"))


def shows_status(text: str, run_id: str, status: str) -> bool:
    return f'baseten_loops_sampler_status{{run_id="{run_id}",status="{status}"}} 1.0' in text


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    seconds: float
    cpu: float
    count: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_per_count(self) -> float:
        return self.cpu / self.count if self.count else float("inf")


def measure(child: Child, count: Callable[[], float], seconds: float) -> Window:
    """CPU and count over one window; the counting itself (a scrape) is left outside it."""
    count0 = count()
    cpu0, t0 = child.cpu(), time.monotonic()
    time.sleep(seconds)
    t1, cpu1 = time.monotonic(), child.cpu()
    count1 = count()
    child.check()
    return Window(t1 - t0, cpu1 - cpu0, count1 - count0)


def share(child: Child) -> Callable[[], float]:
    """Start timing a process's CPU; the returned function gives its share of one core."""
    cpu0, t0 = child.cpu(), time.monotonic()
    return lambda: (child.cpu() - cpu0) / (time.monotonic() - t0)


def transitional_seconds(runs: Sequence[RunSpec], start: float, end: float) -> float:
    """Seconds the runs' timelines spend in a transitional status between two moments (seconds
    since the simulator's start), summed over the runs, in half-second steps."""
    step = 0.5
    total = 0.0
    for run in runs:
        moment = start
        while moment < end:
            current = run.at(moment)
            if current is not None and status_class(current.status) is StatusClass.TRANSITIONAL:
                total += step
            moment += step
    return total


def expected_polls(runs: Sequence[RunSpec], start: float, end: float) -> float:
    """Polls the timelines call for between two moments: the scale interval for settled
    statuses, the fast one for transitional ones."""
    moving = transitional_seconds(runs, start, end)
    settled = len(runs) * (end - start) - moving
    return settled / SCALE_INTERVAL + moving / SCALE_FAST_INTERVAL


def ever_transitional(run: RunSpec) -> bool:
    return any(status_class(step.status) is StatusClass.TRANSITIONAL for step in run.timeline or ())


# --- the bare httpx loops ---------------------------------------------------------------------


def bare_client(url: str, connections: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {KEY}", "Accept": "application/json"},
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(10.0),
        trust_env=False,
    )


async def bare_loop(
    url: str,
    run_ids: Sequence[str],
    concurrency: int,
    seconds: float,
    *,
    per_connection: bool,
    rate: float,
) -> None:
    """GET + JSON decode and nothing else, for at most `seconds`: `concurrency` at a time
    back to back, or (`rate` > 0) one started every 1/rate s. Through one client and its pool,
    or with a single-connection client per request in flight."""
    if per_connection:
        clients = [bare_client(url, 1) for _ in range(concurrency)]
    else:
        clients = [bare_client(url, concurrency)] * concurrency
    idle = list(clients)  # one entry per request that may be in flight
    requests: set[asyncio.Task[None]] = set()

    async def worker(index: int) -> None:
        client = clients[index]
        while True:
            response = await client.get(RUN_PATH + run_ids[index % len(run_ids)])
            response.json()
            index += concurrency

    async def one(run_id: str) -> None:
        client = idle.pop()
        try:
            (await client.get(RUN_PATH + run_id)).json()
        finally:
            idle.append(client)

    async def pacer() -> None:
        due, index = time.monotonic(), 0
        while True:
            due += 1 / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if idle:  # else more than `concurrency` would be in flight: skip this one
                task = asyncio.create_task(one(run_ids[index % len(run_ids)]))
                requests.add(task)
                task.add_done_callback(requests.discard)
                index += 1

    if rate:
        tasks = [asyncio.create_task(pacer())]
    else:
        tasks = [asyncio.create_task(worker(index)) for index in range(concurrency)]
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.gather(*tasks)
    finally:
        for task in [*tasks, *requests]:
            task.cancel()
        await asyncio.gather(*tasks, *requests, return_exceptions=True)
        for client in set(clients):
            await client.aclose()


# --- the parts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    part: str
    measure: str
    value: str
    target: str = ""
    verdict: str = ""


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scale_rss: int | None = None  # the per-run-mode watcher with SCALE_RUNS runs
    idle_rss: int | None = None  # a watcher of one run, as part 2's run: the base per run
    image: Path | None = None  # `loops-watcher` installed as the container image installs it


def bare_windows(
    sim: Simulator,
    tmp: Path,
    run_ids: Sequence[str],
    count: int,
    seconds: float,
    *,
    per_connection: bool,
    concurrency: int = SATURATE_CONCURRENCY,
    rate: float = 0.0,
) -> tuple[list[Window], float]:
    """Windows of a bare httpx loop in its own process, and the simulator's share of a core."""
    ids_file = tmp / "bare-ids.json"
    ids_file.write_text(json.dumps(list(run_ids)))
    argv = [
        sys.executable, __file__, "--bare-loop", sim.url,
        "--ids", str(ids_file),
        "--concurrency", str(concurrency),
        "--seconds", str(WARMUP + count * seconds + 30),
        "--rate", str(rate),
    ]  # fmt: skip
    if per_connection:
        argv.append("--per-connection")
    child = Child("bare httpx loop", argv, stdout=subprocess.DEVNULL)
    try:
        time.sleep(WARMUP)
        sim_share = share(sim.child)
        windows = [measure(child, sim.run_gets, seconds) for _ in range(count)]
        return windows, sim_share()
    finally:
        child.stop()


def part_saturated(tmp: Path, results: Results) -> None:
    count, seconds = 3, 5.0
    with simulator(SATURATE_RUNS) as sim:
        sim.control("POST", "faults", LIST_FORBIDDEN)
        run_ids = [run.id for run in sim.runs]
        options = [
            "--poll-interval", "1",
            "--fast-poll-interval", "1",
            "--max-requests-per-second", "100000",
            "--max-concurrency", str(SATURATE_CONCURRENCY),
        ]  # fmt: skip
        with watcher(sim, tmp, run_ids, results, *options) as w:
            wait_until(w.ready, 90, "watcher readiness")
            time.sleep(WARMUP)
            sim_share = share(sim.child)
            watched = [
                measure(w.child, lambda: polls_total(w.scrape()[0]), seconds) for _ in range(count)
            ]
            watched_sim = sim_share()
        one_pool, one_pool_sim = bare_windows(
            sim, tmp, run_ids, count, seconds, per_connection=False
        )
        per_conn, per_conn_sim = bare_windows(
            sim, tmp, run_ids, count, seconds, per_connection=True
        )

    def cpu_us(windows: list[Window]) -> float:
        return statistics.median(x.cpu_per_count for x in windows) * 1e6

    def rate(windows: list[Window]) -> str:
        per_second = statistics.median(x.rate for x in windows)
        core = statistics.median(x.cpu / x.seconds for x in windows)
        return f"{per_second:,.0f}/s at {core:.0%} of a core"

    mine, pooled, single = cpu_us(watched), cpu_us(one_pool), cpu_us(per_conn)
    floor = min(pooled, single)
    part = f"1 saturated: {SATURATE_RUNS:,} runs/1 s, {SATURATE_CONCURRENCY} in flight"
    results.rows += [
        Row(part, "watcher CPU per poll", f"{mine:,.0f} us ({rate(watched)})"),
        Row(part, "bare loop, one client, CPU per GET", f"{pooled:,.0f} us ({rate(one_pool)})"),
        Row(part, "bare loop, client per connection", f"{single:,.0f} us ({rate(per_conn)})"),
        Row(part, "watcher / bare loop, one client", f"{mine / pooled:.2f}x"),
        Row(
            part,
            "watcher / the faster bare loop",
            f"{mine / floor:.2f}x",
            "<= 1.5x",
            verdict(mine <= 1.5 * floor),
        ),
        Row(
            part,
            "simulator CPU (watcher, bare, bare)",
            f"{watched_sim:.0%}, {one_pool_sim:.0%}, {per_conn_sim:.0%} of a core",
        ),
    ]


Mode = Callable[[Simulator, Path, Sequence[str], Sequence[str], Results], None]


def both_modes(tmp: Path, results: Results, one_by_one: Mode, listing: Mode, *extra: str) -> None:
    """The SCALE_RUNS runs polled one by one (the simulator refuses lists, as for a key that may
    not list), then in list mode, each measured by its function with the same options."""
    with simulator(SCALE_RUNS) as sim:
        run_ids = [run.id for run in sim.runs]
        options = [
            "--poll-interval", str(SCALE_INTERVAL),
            "--fast-poll-interval", str(SCALE_FAST_INTERVAL),
            "--max-requests-per-second", str(SCALE_RATE),
            *extra,
        ]  # fmt: skip
        sim.control("POST", "faults", LIST_FORBIDDEN)
        one_by_one(sim, tmp, run_ids, options, results)
        sim.control("DELETE", "faults")
        listing(sim, tmp, run_ids, options, results)


def part_scale(tmp: Path, results: Results) -> None:
    results.image = runtime_environment(tmp)
    idle(tmp, results)
    both_modes(tmp, results, per_run_mode, list_mode)


def runtime_environment(tmp: Path) -> Path | None:
    """`loops-watcher` installed as the container image installs it: the runtime dependencies
    only, from uv.lock, bytecode compiled (the development tools add packages that httpcore
    loads when present, trio among them); None without the Makefile's uv."""
    uv = ROOT / ".tools" / "bin" / "uv"
    if not uv.exists():
        return None
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(tmp / "runtime-env"),
        "UV_PYTHON": os.environ.get("UV_PYTHON", "python3"),
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_COMPILE_BYTECODE": "1",
    }
    argv = [str(uv), "sync", "--locked", "--no-dev", "--no-editable", "--quiet"]
    subprocess.run(argv, cwd=ROOT, env=env, check=True, timeout=600)
    return tmp / "runtime-env" / "bin" / "loops-watcher"


def resident_when_idle(sim: Simulator, tmp: Path, results: Results, command: Path) -> int:
    """Resident memory of a watcher of one run once it polled it and answered a scrape."""
    with watcher(sim, tmp, [run.id for run in sim.runs], results, command=command) as w:
        wait_until(w.ready, 30, "watcher readiness")
        w.scrape()
        time.sleep(IDLE_SETTLE)
        return w.child.memory()


def idle(tmp: Path, results: Results) -> None:
    part = "2 idle: one run"
    with simulator(1) as sim:
        here = resident_when_idle(sim, tmp, results, WATCHER)
        image = resident_when_idle(sim, tmp, results, results.image) if results.image else None
    results.idle_rss = image or here
    results.rows += [
        Row(
            part,
            "resident memory, as the image installs it",
            f"{image / 1e6:.1f} MB" if image else "not measured: no .tools/bin/uv",
            "< 40 MB",
            verdict(image is not None and image < 40e6),
        ),
        Row(part, "resident memory, as this environment runs it", f"{here / 1e6:.1f} MB"),
    ]


def per_run_mode(
    sim: Simulator, tmp: Path, run_ids: Sequence[str], options: Sequence[str], results: Results
) -> None:
    part = f"2 per-run GETs: {SCALE_RUNS:,} runs/{SCALE_INTERVAL:g} s"
    command = results.image or WATCHER
    with watcher(sim, tmp, run_ids, results, *options, command=command) as w:
        wait_until(w.ready, 90, "watcher readiness")
        # The first round is squeezed into runs / rate seconds; jitter spreads the next ones.
        time.sleep(SCALE_INTERVAL / 3)
        text, scraped_at, rss = "", 0.0, 0

        def count() -> float:
            nonlocal text, scraped_at, rss
            rss = w.child.memory()  # between scrapes, not right after one
            scraped_at = time.time()
            text = w.scrape()[0]
            return polls_total(text)

        start = time.monotonic() - sim.epoch
        window = measure(w.child, count, 2 * SCALE_INTERVAL)
        end = time.monotonic() - sim.epoch
        last = sample_values(text, "loops_watcher_last_success_timestamp_seconds")
        oldest = scraped_at - min(last)
        results.scale_rss = rss
        expected = expected_polls(sim.runs, start, end) / (end - start)
        plain, zipped, cpu_per_scrape, page = endpoint_load(w, part)
        peaks = [w.child.memory("VmHWM")]
    for _ in range(PEAK_WATCHERS - 1):
        with watcher(sim, tmp, run_ids, results, *options, command=command) as w:
            wait_until(w.ready, 90, "watcher readiness")
            time.sleep(SCALE_INTERVAL)  # the first round, and a round at the usual pace
            endpoint_load(w, part)
            peaks.append(w.child.memory("VmHWM"))
    # The floor at this pace: a bare loop starting GETs at the rate the watcher polled.
    (paced,), _ = bare_windows(
        sim, tmp, run_ids, 1, 20.0, per_connection=True, concurrency=16, rate=window.rate
    )
    peak = statistics.median(peaks)
    fresh = len(last) == len(run_ids) and oldest <= 1.15 * SCALE_INTERVAL
    keeps_up = window.rate >= 0.95 * expected and fresh
    core = window.cpu / window.seconds
    plain_s = statistics.median(s for _, s, _ in plain)
    zipped_s = statistics.median(s for _, s, _ in zipped)
    size, lines = len(plain[-1][0].encode()), plain[-1][0].count("\n")
    results.rows += [
        Row(
            part,
            "polls per second (timelines call for)",
            f"{window.rate:,.0f} ({expected:,.0f})",
            ">= 95 %",
            verdict(window.rate >= 0.95 * expected),
        ),
        Row(
            part,
            "oldest last success, end of window",
            f"{oldest:.1f} s",
            f"<= {1.15 * SCALE_INTERVAL:g} s",
            verdict(fresh),
        ),
        Row(part, "keeps up", "yes" if keeps_up else "no", "yes", verdict(keeps_up)),
        Row(
            part,
            "CPU",
            f"{core:.0%} of a core ({window.cpu / window.count * 1e6:,.0f} us/poll)",
            "< 50 %",
            verdict(core < 0.5),
        ),
        Row(
            part,
            "bare loop paced at that rate",
            f"{paced.cpu / paced.seconds:.0%} of a core ({paced.cpu_per_count * 1e6:,.0f} us/GET)",
        ),
        Row(part, "resident memory between scrapes", f"{rss / 1e6:.0f} MB"),
        Row(
            part,
            f"peak resident memory, median of {len(peaks)} watchers",
            f"{peak / 1e6:.0f} MB ({', '.join(f'{p / 1e6:.0f}' for p in sorted(peaks))})",
            "< 100 MB (goal 80)",
            verdict(peak < 100e6),
        ),
        Row(
            part,
            "/metrics scrape, median of 5",
            f"{plain_s:.3f} s, {size / 1e6:.1f} MB, {lines:,} lines",
            "< 0.25 s",
            verdict(plain_s < 0.25),
        ),
        Row(
            part,
            "/metrics scrape, gzip, median of 5",
            f"{zipped_s:.3f} s, {zipped[-1][2] / 1e6:.1f} MB sent",
            "< 0.4 s",
            verdict(zipped_s < 0.4),
        ),
        Row(part, "watcher CPU per scrape", f"{cpu_per_scrape:.3f} s"),
        *page,
    ]


Scraped = tuple[str, float, int]


def endpoint_load(w: Watcher, part: str) -> tuple[list[Scraped], list[Scraped], float, list[Row]]:
    """What part 2 asks of the endpoints: five plain scrapes, five gzipped, the status page;
    (plain, gzipped, the watcher's CPU per scrape, the page's rows)."""
    scrapes = 5
    cpu_spent = 0.0

    def lone_scrape(compressed: bool) -> Scraped:
        # Scrapes that start soon after one another share a rendering: a second apart,
        # each pays for its own, as Prometheus's do.
        nonlocal cpu_spent
        time.sleep(1.0)
        cpu0 = w.child.cpu()
        scraped = w.scrape(compressed=compressed)
        cpu_spent += w.child.cpu() - cpu0
        return scraped

    plain = [lone_scrape(False) for _ in range(scrapes)]
    zipped = [lone_scrape(True) for _ in range(scrapes)]
    page = page_rows(w, part, statistics.median(s for _, s, _ in plain))
    return plain, zipped, cpu_spent / (2 * scrapes), page


def timed_get(http: httpx.Client, url: str, *, compressed: bool = False) -> tuple[float, int]:
    """(seconds to the last byte and decoded, bytes on the wire) of one GET."""
    encoding = "gzip" if compressed else "identity"
    started = time.perf_counter()
    with http.stream("GET", url, headers={"Accept-Encoding": encoding}) as response:
        response.raise_for_status()
        raw = b"".join(response.iter_raw())
    if response.headers.get("content-encoding") == "gzip":
        gzip.decompress(raw)  # as a browser must before it can use the body
    return time.perf_counter() - started, len(raw)


def page_rows(w: Watcher, part: str, scrape_alone: float) -> list[Row]:
    """The status page on these runs, and /metrics scrapes while someone watches it."""
    api = [timed_get(w.http, f"{w.url}/api/v1/runs") for _ in range(5)]
    zipped = [timed_get(w.http, f"{w.url}/api/v1/runs", compressed=True) for _ in range(5)]
    html = [timed_get(w.http, f"{w.url}/") for _ in range(5)]
    # The page's script in a process of its own, so it takes no CPU from this one's scrapes.
    argv = [sys.executable, __file__, "--watch-page", f"{w.url}/api/v1/runs"]
    browser = Child("page watcher", argv, stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        watched = [w.scrape()[1] for _ in range(10)]
        browser.check()
    finally:
        browser.stop()
    api_s, html_s = statistics.median(s for s, _ in api), statistics.median(s for s, _ in html)
    zipped_s = statistics.median(s for s, _ in zipped)
    watched_s = statistics.median(watched)
    return [
        Row(
            part,
            "/api/v1/runs, median of 5",
            f"{api_s:.3f} s, {api[-1][1] / 1e6:.1f} MB",
            "< 0.5 s",
            verdict(api_s < 0.5),
        ),
        Row(
            part,
            "/api/v1/runs, gzip, median of 5",
            f"{zipped_s:.3f} s, {zipped[-1][1] / 1e6:.2f} MB sent",
            "< 0.5 s",
            verdict(zipped_s < 0.5),
        ),
        Row(
            part,
            "status page /, first 100 rows, median of 5",
            f"{html_s:.3f} s, {html[-1][1] / 1e3:.0f} kB",
            "< 0.5 s",
            verdict(html_s < 0.5),
        ),
        Row(
            part,
            "/metrics scrape while the page is open, median of 10",
            f"{watched_s:.3f} s (alone: {scrape_alone:.3f} s)",
            "< 0.5 s",
            verdict(watched_s < 0.5),
        ),
    ]


@dataclass(frozen=True)
class ListRounds:
    """What a watcher in list mode cost and asked of the simulator over one window."""

    lists: float  # list requests per interval
    settled: float  # GETs of runs never transitional, per interval
    fast: float  # GETs of runs that do turn transitional, per interval
    ideal: float  # the fast polls there could be: all their transitional time / fast interval
    core: float  # the watcher's share of one core

    def rows(self, part: str, core_target: float) -> list[Row]:
        other = self.lists + self.settled
        return [
            Row(part, "list requests per interval", f"{self.lists:.1f}"),
            Row(part, "GETs of runs never transitional", f"{self.settled:.1f} per interval"),
            Row(
                part,
                "requests besides fast polls",
                f"{other:.1f} per interval",
                "<= 2",
                verdict(other <= 2),
            ),
            Row(
                part,
                "fast polls (all transitional time / fast)",
                f"{self.fast:,.0f} ({self.ideal:,.0f}) per interval",
            ),
            Row(
                part,
                "CPU",
                f"{self.core:.1%} of a core",
                f"< {core_target:.0%}",
                verdict(self.core < core_target),
            ),
        ]


def list_rounds(sim: Simulator, child: Child, intervals: int) -> ListRounds:
    """Measure a watcher in list mode over `intervals` poll intervals."""
    moving = [run for run in sim.runs if ever_transitional(run)]
    moving_ids = {run.id for run in moving}
    before = sim.requests()
    start = time.monotonic() - sim.epoch
    window = measure(child, lambda: 0.0, intervals * SCALE_INTERVAL)
    end = time.monotonic() - sim.epoch
    after = sim.requests()
    per_interval = window.seconds / SCALE_INTERVAL
    delta = {path: after[path] - before.get(path, 0) for path in after}
    gets = {path[len(RUN_PATH) :]: n for path, n in delta.items() if path.startswith(RUN_PATH)}
    return ListRounds(
        lists=delta.get(RUN_PATH.rstrip("/"), 0) / per_interval,
        settled=sum(n for run_id, n in gets.items() if run_id not in moving_ids) / per_interval,
        fast=sum(n for run_id, n in gets.items() if run_id in moving_ids) / per_interval,
        ideal=transitional_seconds(moving, start, end) / SCALE_FAST_INTERVAL / per_interval,
        core=window.cpu / window.seconds,
    )


def list_mode(
    sim: Simulator, tmp: Path, run_ids: Sequence[str], options: Sequence[str], results: Results
) -> None:
    part = f"3 list mode: {SCALE_RUNS:,} runs/{SCALE_INTERVAL:g} s"
    command = results.image or WATCHER
    with watcher(sim, tmp, run_ids, results, *options, command=command) as w:
        wait_until(w.ready, 90, "watcher readiness")
        time.sleep(2 * SCALE_FAST_INTERVAL)  # polls of runs the first list found moving
        rounds = list_rounds(sim, w.child, 2)
        rss, first_peak = w.child.memory(), w.child.memory("VmHWM")
    peaks = [
        first_peak,
        *list_mode_peaks(sim, tmp, run_ids, options, results, command=command, ready_within=90),
    ]
    results.rows += [
        *rounds.rows(part, 0.5),
        Row(part, "resident memory now", f"{rss / 1e6:.0f} MB"),
        peak_row(part, peaks, 100e6),
    ]


def list_mode_peaks(
    sim: Simulator,
    tmp: Path,
    run_ids: Sequence[str],
    options: Sequence[str],
    results: Results,
    *,
    command: Path,
    ready_within: float,
) -> list[int]:
    """Peak memory of PEAK_WATCHERS - 1 more watchers in list mode, each through its first
    list (when a run is read for the first time) and the next one."""
    peaks = []
    for _ in range(PEAK_WATCHERS - 1):
        with watcher(sim, tmp, run_ids, results, *options, command=command) as w:
            wait_until(w.ready, ready_within, "watcher readiness")
            time.sleep(1.2 * SCALE_INTERVAL)
            peaks.append(w.child.memory("VmHWM"))
    return peaks


def peak_row(part: str, peaks: Sequence[int], target: float) -> Row:
    peak = statistics.median(peaks)
    return Row(
        part,
        f"peak resident memory, median of {len(peaks)} watchers",
        f"{peak / 1e6:.0f} MB ({', '.join(f'{p / 1e6:.0f}' for p in sorted(peaks))})",
        f"< {target / 1e6:.0f} MB",
        verdict(peak < target),
    )


def part_large_org(tmp: Path, results: Results) -> None:
    """Every run of a large organisation, discovered from one list per interval."""
    part = f"7 list mode, --discover org: {ORG_RUNS:,} runs/{SCALE_INTERVAL:g} s"
    results.image = results.image or runtime_environment(tmp)
    command = results.image or WATCHER
    with simulator(ORG_RUNS) as sim:
        size = list_bytes(sim)
        options = [
            "--discover", "org",
            "--poll-interval", str(SCALE_INTERVAL),
            "--fast-poll-interval", str(SCALE_FAST_INTERVAL),
            "--max-requests-per-second", str(SCALE_RATE),
        ]  # fmt: skip
        with watcher(sim, tmp, [], results, *options, command=command) as w:
            started = time.monotonic()
            wait_until(w.ready, 300, "watcher readiness")  # the first list has been recorded
            first = time.monotonic() - started
            time.sleep(2 * SCALE_FAST_INTERVAL)  # polls of runs the first list found moving
            rounds = list_rounds(sim, w.child, 2)
            seen, fresh, sampled = sampled_statuses(w, sim.runs, ORG_SAMPLE)
            rss, first_peak = w.child.memory(), w.child.memory("VmHWM")
        peaks = [
            first_peak,
            *list_mode_peaks(sim, tmp, [], options, results, command=command, ready_within=300),
        ]
    keeps_up = rounds.lists >= 0.9 and seen == fresh == sampled
    results.rows += [
        Row(part, "the org's list", f"about {size / 1e6:.0f} MB of JSON"),
        Row(part, "watching and first list recorded", f"after {first:.0f} s"),
        Row(
            part,
            "sampled settled runs showing their status",
            f"{seen:,} of {sampled:,}, {fresh:,} read within {FRESH_WITHIN:g} intervals",
            "all",
            verdict(seen == fresh == sampled),
        ),
        *rounds.rows(part, 0.1),
        Row(part, "keeps up", "yes" if keeps_up else "no", "yes", verdict(keeps_up)),
        Row(part, "resident memory now", f"{rss / 1e6:.0f} MB"),
        peak_row(part, peaks, 250e6),
    ]


def list_bytes(sim: Simulator) -> int:
    """The size of the org's list, read and counted as it streams in."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with sim.http.stream("GET", f"{sim.url}{RUN_PATH.rstrip('/')}?scope=org", headers=headers) as r:
        r.raise_for_status()
        return sum(len(chunk) for chunk in r.iter_raw())


def sampled_statuses(w: Watcher, runs: Sequence[RunSpec], count: int) -> tuple[int, int, int]:
    """Of `count` runs whose status never changes, drawn at random: how many the watcher shows
    with that status, how many of those were read lately, and `count`; one run at a time from
    `/api/v1/runs/{id}`, which renders only that run."""
    settled = [run for run in runs if not ever_transitional(run)]
    seen = fresh = 0
    for run in random.Random(7).sample(settled, count):
        step = run.at(0.0)
        response = w.http.get(f"{w.url}/api/v1/runs/{run.id}")
        if response.status_code != 200:
            continue
        shown = response.json()["run"]
        if shown["status"] != (step.status if step is not None else None):
            continue
        seen += 1
        last = shown["last_success_at"]
        age = time.time() - datetime.fromisoformat(last).timestamp() if last else math.inf
        fresh += age <= FRESH_WITHIN * SCALE_INTERVAL
    return seen, fresh, count


def part_latency(tmp: Path, results: Results) -> None:
    part = f"4 detection: {LATENCY_INTERVAL:g} s, fast {LATENCY_FAST_INTERVAL:g} s, list mode"
    rng = random.Random(5)
    steered = [f"bench-latency-{n}" for n in range(LATENCY_TRIALS)]
    with simulator(LATENCY_RUNS) as sim:
        for run_id in steered:
            sim.control("PUT", f"runs/{run_id}", {"status": "ACTIVE"})
        options = [
            "--poll-interval", str(LATENCY_INTERVAL),
            "--fast-poll-interval", str(LATENCY_FAST_INTERVAL),
            "--max-requests-per-second", "1000",
        ]  # fmt: skip
        run_ids = [*(run.id for run in sim.runs), *steered]
        with watcher(sim, tmp, run_ids, results, *options) as w:
            wait_until(w.ready, 30, "watcher readiness")
            wait_until(
                lambda: all(shows_status(w.scrape()[0], r, "ACTIVE") for r in steered),
                3 * LATENCY_INTERVAL,
                "the steered runs to show ACTIVE",
            )

            def change(run_id: str, status: str) -> float:
                started = time.monotonic()
                sim.control("PUT", f"runs/{run_id}", {"status": status})
                wait_until(
                    lambda: shows_status(w.scrape()[0], run_id, status),
                    4 * LATENCY_INTERVAL,
                    f"{run_id} to show {status}",
                )
                return time.monotonic() - started

            settled, moving = [], []
            for run_id in steered:
                time.sleep(rng.uniform(0, LATENCY_INTERVAL))  # a random phase against the polls
                settled.append(change(run_id, "DEPLOYING"))
                time.sleep(rng.uniform(0.2, 1.0) * LATENCY_FAST_INTERVAL)
                moving.append(change(run_id, "ACTIVE"))
    for label, seconds, interval in (
        ("settled run, ACTIVE -> DEPLOYING", settled, LATENCY_INTERVAL),
        ("transitional run, DEPLOYING -> ACTIVE", moving, LATENCY_FAST_INTERVAL),
    ):
        bound = 1.1 * interval + 0.5  # the next poll, at most one interval and its jitter away
        results.rows.append(
            Row(
                part,
                f"{label}, median / max of {len(seconds)}",
                f"{statistics.median(seconds):.2f} / {max(seconds):.2f} s",
                f"max <= {bound:g} s",
                verdict(max(seconds) <= bound),
            )
        )


def part_shards(tmp: Path, results: Results) -> None:
    one_by_one = functools.partial(shard_processes, mode="per-run GETs")
    listing = functools.partial(shard_processes, mode="list mode")
    both_modes(tmp, results, one_by_one, listing, "--total-shards", str(SHARDS))


def shard_processes(
    sim: Simulator,
    tmp: Path,
    run_ids: Sequence[str],
    options: Sequence[str],
    results: Results,
    *,
    mode: str,
) -> None:
    part = f"5 {SHARDS} shards, {mode}: {SCALE_RUNS:,} runs/{SCALE_INTERVAL:g} s"
    with contextlib.ExitStack() as stack:
        shards = [
            stack.enter_context(watcher(sim, tmp, run_ids, results, *options, "--shard", str(i)))
            for i in range(SHARDS)
        ]
        for shard in shards:
            wait_until(shard.ready, 90, "shard readiness")
        time.sleep(SCALE_INTERVAL / 3)  # the first round, as in part 2
        before = sim.requests()
        cpu = [shard.child.cpu() for shard in shards]
        started = time.monotonic()
        time.sleep(2 * SCALE_INTERVAL)
        cores = [
            (shard.child.cpu() - cpu0) / (time.monotonic() - started)
            for shard, cpu0 in zip(shards, cpu, strict=True)
        ]
        intervals = (time.monotonic() - started) / SCALE_INTERVAL
        after = sim.requests()
        watched = [
            sum(sample_values(shard.scrape()[0], "loops_watcher_watched_runs")) for shard in shards
        ]
        peaks = [shard.child.memory("VmHWM") for shard in shards]
    lists = (after.get(RUN_PATH.rstrip("/"), 0) - before.get(RUN_PATH.rstrip("/"), 0)) / intervals
    results.rows += [
        Row(
            part,
            "runs per shard (all shards)",
            f"{min(watched):,.0f}-{max(watched):,.0f} ({sum(watched):,.0f})",
            f"sum = {SCALE_RUNS:,}",
            verdict(sum(watched) == SCALE_RUNS),
        ),
        Row(part, "CPU per shard", f"{min(cores):.1%}-{max(cores):.1%} of a core"),
        Row(
            part,
            "peak resident memory per shard",
            f"{min(peaks) / 1e6:.0f}-{max(peaks) / 1e6:.0f} MB",
        ),
        Row(part, "list requests per interval, all shards", f"{lists:.1f}"),
    ]


def bench_run(run_id: str, status: str) -> Run:
    sampler = Sampler(
        id=f"smp-{run_id}",
        status=status,
        model_id=f"mdl-{run_id}",
        deployment_id=f"dep-{run_id}",
        base_model="Qwen/Qwen3-8B",
        instance_type="1xH100",
        node_count=1,
    )
    return Run(
        id=run_id,
        session_id=f"ses-{run_id}",
        base_model="Qwen/Qwen3-8B",
        created_at=1_700_000_000.0,
        sampler=sampler,
        name=f"qwen3-8b-sft-{run_id}",
        status="ACTIVE",
        user_email="ada@example.com",
    )


async def longest_stall(work: Awaitable[None]) -> tuple[float, float]:
    """The longest a running event loop did not run while `work` was awaited beside a probe:
    (wall seconds, CPU seconds of the process within one such pause). On a loaded machine the
    wall time also counts the turns other processes had; the CPU is this process's own."""
    walls: list[float] = []
    cpus: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            started, cpu = time.perf_counter(), time.process_time()
            await asyncio.sleep(0.001)
            walls.append(time.perf_counter() - started - 0.001)
            cpus.append(time.process_time() - cpu)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.05)
    await work
    done.set()
    await task
    return max(walls), max(cpus)


@dataclass(frozen=True)
class StoreRound:
    on_loop: float  # seconds the saves took on the event loop
    commit: float  # seconds until the writer thread had committed them
    commit_cpu: float  # CPU seconds of the process meanwhile: the writer's, mostly
    stall: float  # longest the event loop did not run, from the first save to the commit


async def store_round(path: Path, tracker: Tracker, status: str, now: float) -> StoreRound:
    """Every run of the tracker moves to `status` and is saved at once, on a running event
    loop whose stalls a probe measures until the writer thread has committed the rows."""
    store = StateStore(path, CollectorRegistry())
    await asyncio.to_thread(store.open)
    for run_id in tracker.runs:
        tracker.observe(bench_run(run_id, status), now)
    records = list(tracker.runs.values())
    measured: list[float] = []

    async def save_and_commit() -> None:
        started = time.perf_counter()
        for record in records:  # what the daemon adds to each changed run's poll
            store.save(record)
        on_loop = time.perf_counter() - started
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.to_thread(store.close)  # returns once the writer has committed
        measured.extend((on_loop, time.perf_counter() - wall0, time.process_time() - cpu0))

    stall, _ = await longest_stall(save_and_commit())
    on_loop, commit, commit_cpu = measured
    return StoreRound(on_loop, commit, commit_cpu, stall)


def scrape_delay(sim: Simulator, tmp: Path, results: Results, *options: str) -> tuple[float, float]:
    """(median scrape seconds before, median over the flips of the slowest scrape while every
    run changes status twice: into one status for one list response, then back)."""
    run_ids = [run.id for run in sim.runs]
    flip = {"kind": "unknown_status", "value": "HIBERNATING", "endpoint": "list", "count": 1}
    with watcher(sim, tmp, run_ids, results, "--poll-interval", str(STATE_INTERVAL), *options) as w:
        wait_until(w.ready, 90, "watcher readiness")
        time.sleep(2 * STATE_INTERVAL)  # the first lists, and the fast polls they set off
        baseline = statistics.median(w.scrape()[1] for _ in range(STATE_BASELINE_SCRAPES))
        slowest = []
        for _ in range(STATE_FLIPS):
            sim.control("POST", "faults", flip)
            longest, deadline = 0.0, time.monotonic() + 4 * STATE_INTERVAL
            for phase in (True, False):  # every sampler in the one status, then out of it
                while True:
                    text, seconds, _ = w.scrape()
                    longest = max(longest, seconds)
                    if (',status="HIBERNATING"} 1.0' in text) == phase:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the list responses did not flip every run")
            slowest.append(longest)
        text = w.scrape()[0]
    changes = sum(sample_values(text, "baseten_loops_sampler_status_transitions_total"))
    with_sampler = sum(run.timeline is not None for run in sim.runs)
    if changes < 2 * STATE_FLIPS * with_sampler:
        results.notes.append(f"part 5 saw {changes:,.0f} changes, fewer than every run's flips")
    return baseline, statistics.median(slowest)


def part_state(tmp: Path, results: Results) -> None:
    part = f"6 state file: {SCALE_RUNS:,} runs changing at once"
    configure_logging("json", "warning")  # the stores opened here say nothing unless wrong
    path = tmp / "state.db"
    tracker = Tracker()
    for number in range(SCALE_RUNS):
        tracker.observe(bench_run(f"run-{number:05}", "SCALED_TO_ZERO"), 0.0)
    first = asyncio.run(store_round(path, tracker, "WAKING_UP", 10.0))  # every row new
    again = asyncio.run(store_round(path, tracker, "ACTIVE", 20.0))  # every row replaced
    size = sum(p.stat().st_size for p in tmp.glob("state.db*"))
    loading = []
    for _ in range(3):
        store = StateStore(path, CollectorRegistry())
        started = time.perf_counter()
        loaded = store.open()
        loading.append(time.perf_counter() - started)
        store.close()
    assert len(loaded) == SCALE_RUNS

    with simulator(SCALE_RUNS) as sim:
        without = scrape_delay(sim, tmp, results)
        with_file = scrape_delay(sim, tmp, results, "--state-file", str(tmp / "watcher.db"))
    added = with_file[1] - without[1]
    results.rows += [
        Row(
            part,
            "saving every run, on the event loop (new / changed rows)",
            f"{first.on_loop:.3f} / {again.on_loop:.3f} s "
            f"({again.on_loop / SCALE_RUNS * 1e6:.1f} us a run)",
        ),
        Row(
            part,
            "writer thread: commit of all rows (new / changed)",
            f"{first.commit:.2f} s, {first.commit_cpu:.2f} s CPU / "
            f"{again.commit:.2f} s, {again.commit_cpu:.2f} s CPU",
        ),
        Row(
            part,
            "longest event-loop stall, saves to commit (new / changed)",
            f"{first.stall:.3f} / {again.stall:.3f} s",
            "<= 0.1 s",
            verdict(max(first.stall, again.stall) <= 0.1),
        ),
        Row(
            part,
            "file size (with its WAL)",
            f"{size / 1e6:.1f} MB, {size / SCALE_RUNS:.0f} bytes a run",
        ),
        Row(part, "loading it at start, median of 3", f"{statistics.median(loading):.2f} s"),
        Row(
            part,
            f"scrape before / slowest during a change (median of {STATE_FLIPS}), no state file",
            f"{without[0]:.3f} / {without[1]:.3f} s",
        ),
        Row(
            part,
            f"scrape before / slowest during a change (median of {STATE_FLIPS}), state file",
            f"{with_file[0]:.3f} / {with_file[1]:.3f} s",
        ),
        Row(
            part,
            "what the state file adds to the slowest scrape (noisy: other load)",
            f"{added:+.3f} s",
        ),
    ]


async def list_stalls(runs: int, statuses: Sequence[str]) -> list[tuple[float, float]]:
    """The longest event-loop stall while each list is recorded: `runs` runs, discovered with
    `--discover org`, listed once in each of `statuses` in turn."""
    settings = load_settings(["--discover", "org"], {"BASETEN_API_KEY": KEY}, stdout_is_tty=False)
    instance = InProcessWatcher(settings, registry=CollectorRegistry())
    instance.recorder.begin()
    stalls = []
    for status in statuses:
        listed = RunList([bench_run(f"run-{number:05}", status) for number in range(runs)], [])
        outcome = Fetched(listed, 1, "200", requested=time.time())
        stalls.append(await longest_stall(instance.listing.record(outcome)))
    return stalls


def part_loop_stall(tmp: Path, results: Results) -> None:
    part = "8 event loop while a list is recorded"
    with open(os.devnull, "w") as devnull:
        configure_logging("json", "info", stream=devnull)  # every line rendered, as deployed
        first_org = asyncio.run(list_stalls(ORG_RUNS, ["SCALED_TO_ZERO"]))[0]
        _, changed = asyncio.run(list_stalls(SCALE_RUNS, ["SCALED_TO_ZERO", "WAKING_UP"]))
    configure_logging("json", "warning")
    load = os.getloadavg()[0]
    for what, (wall, cpu) in (
        (f"first list of {ORG_RUNS:,} runs (all new)", first_org),
        (f"all {SCALE_RUNS:,} runs changed in one list", changed),
    ):
        # Held to the target by the loop's own CPU: the wall time grows with the machine's load.
        results.rows.append(
            Row(
                part,
                f"longest stall, CPU (wall at load {load:.1f}): {what}",
                f"{cpu:.3f} s ({wall:.3f} s)",
                f"< {STALL_TARGET} s",
                verdict(cpu < STALL_TARGET),
            )
        )


# --- the table -------------------------------------------------------------------------------


def finish(results: Results) -> list[Row]:
    rows = list(results.rows)
    if results.scale_rss is not None and results.idle_rss is not None:
        per_run = (results.scale_rss - results.idle_rss) / (SCALE_RUNS - 1)
        index = next(
            i for i, row in enumerate(rows) if row.measure == "resident memory between scrapes"
        )
        base = f"{per_run / 1e3:.1f} kB (over {results.idle_rss / 1e6:.1f} MB with one run)"
        rows.insert(index + 1, Row(rows[index].part, "memory per run", base))
    return rows


def print_table(rows: Sequence[Row]) -> None:
    table = [("part", "measure", "value", "target", "")]
    previous = ""
    for row in rows:
        table.append(
            (
                row.part if row.part != previous else "",
                row.measure,
                row.value,
                row.target,
                row.verdict,
            )
        )
        previous = row.part
    widths = [max(len(line[column]) for line in table) for column in range(5)]
    for line in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


PARTS: dict[str, Callable[[Path, Results], None]] = {
    "1": part_saturated,
    "2": part_scale,  # parts 2 and 3 share one simulator
    "4": part_latency,
    "5": part_shards,
    "6": part_state,
    "7": part_large_org,
    "8": part_loop_stall,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the watcher on loopback.")
    parser.add_argument(
        "--parts", default="1,2,3,4,5,6,7,8", help="parts to run (2 and 3 go together)"
    )
    parser.add_argument("--bare-loop", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--concurrency", type=int, default=SATURATE_CONCURRENCY, help=argparse.SUPPRESS
    )
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--per-connection", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--watch-page", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.watch_page:
        with http_client() as http:
            while True:  # until stopped: what the status page's script does
                timed_get(http, args.watch_page, compressed=True)
                time.sleep(2.0)
    if args.bare_loop:
        ids: list[str] = json.loads(args.ids.read_text())
        loop = bare_loop(
            args.bare_loop,
            ids,
            args.concurrency,
            args.seconds,
            per_connection=args.per_connection,
            rate=args.rate,
        )
        asyncio.run(loop)
        return 0

    def terminate(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # so that every `finally` stops its processes

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    chosen = {part.strip().replace("3", "2") for part in args.parts.split(",")}
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loops-bench-") as tmp:
        for name, run in PARTS.items():
            if name in chosen:
                print(f"part {name}...", file=sys.stderr, flush=True)
                run(Path(tmp), results)
    took = time.monotonic() - started
    print(
        f"\nloops-watcher benchmark: {os.cpu_count()} CPUs, {took:.0f} s, medians where repeated\n"
    )
    rows = finish(results)
    print_table(rows)
    for note in results.notes:
        print(f"note: {note}")
    return 0 if all(row.verdict != "MISS" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
