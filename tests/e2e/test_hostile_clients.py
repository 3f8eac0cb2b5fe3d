"""End to end: clients of the endpoints that misbehave cannot bloat, blind or stop the watcher.

The real watcher process is watched through /proc: its resident memory and CPU time are
bounds, not timings, so they hold on a loaded machine too.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import FAKE_KEY, wait_until
from support.e2e import FAST, StartSimulator, StartWatcher, WatcherProcess

from watcher.simulator import SimulatorThread
from watcher.simulator.scenarios import synthetic_scenario

pytestmark = pytest.mark.e2e

RUNS = 10_000
SLOW_READERS = 200
GET = "GET /metrics HTTP/1.1\r\nHost: watcher\r\n{extra}\r\n"


def metrics_request(*, gzip: bool = False, close: bool = False) -> bytes:
    extra = ("Accept-Encoding: gzip\r\n" if gzip else "") + (
        "Connection: close\r\n" if close else ""
    )
    return GET.format(extra=extra).encode()


def healthz_seconds(watcher: WatcherProcess) -> float:
    """CPU time the watcher spent while /healthz, asked on a new connection as a kubelet probe
    asks, waited for its 200: the probe's latency on an idle machine. On a busy one the wall
    clock adds the time the watcher waited for a core, which says nothing about the watcher."""
    started = watcher.cpu_seconds()
    with socket.create_connection(("127.0.0.1", watcher.port), timeout=10.0) as probe:
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: watcher\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := probe.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    return watcher.cpu_seconds() - started


@pytest.fixture(scope="module")
def big_watcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WatcherProcess]:
    """A watcher of 10,000 runs, read with one list request and then left alone."""
    runs = synthetic_scenario(RUNS)
    ids = Path(tmp_path_factory.mktemp("big")) / "run-ids.txt"
    ids.write_text("".join(f"{run.id}\n" for run in runs.runs))
    with (
        SimulatorThread(runs, [FAKE_KEY]) as served,
        WatcherProcess(
            "--api-url", served.url,
            "--run-ids-file", str(ids),
            "--poll-interval", "600",
            "--fast-poll-interval", "600",
            "--request-timeout", "30",
            "--max-requests-per-second", "1000",
        ) as watcher,
    ):  # fmt: skip
        watcher.start()

        def loaded() -> bool:
            text = watcher.get("/metrics").text
            return text.count("\nloops_watcher_poll_success{") == RUNS

        wait_until(loaded, timeout=120, what=f"all {RUNS:,} runs in /metrics")
        yield watcher


def test_clients_that_never_read_a_big_scrape_cost_bounded_memory(
    big_watcher: WatcherProcess,
) -> None:
    watcher = big_watcher
    size = len(watcher.get("/metrics").content)
    assert size > 10_000_000  # what 10,000 runs make
    watcher.get("/metrics", **{"Accept-Encoding": "gzip"})
    baseline = watcher.memory_kib()["VmRSS"]
    peak = baseline
    probes: list[float] = []
    with contextlib.ExitStack() as stack:
        for n in range(SLOW_READERS):
            client = stack.enter_context(socket.socket())
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", watcher.port))
            client.sendall(metrics_request(gzip=n % 4 == 0))
            if n % 20 == 0:
                probes.append(healthz_seconds(watcher))
                peak = max(peak, watcher.memory_kib()["VmRSS"])
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:  # the watcher answers all of them meanwhile
            probes.append(healthz_seconds(watcher))
            peak = max(peak, watcher.memory_kib()["VmRSS"])
            time.sleep(0.2)
    grown_mb = (peak - baseline) / 1024
    assert grown_mb < 150, f"resident memory grew by {grown_mb:.0f} MB"
    assert max(probes) < 1.0, f"/healthz waited for up to {max(probes):.2f} s of the watcher's CPU"
    assert len(watcher.get("/metrics").content) > 10_000_000  # and it still serves


def test_pipelined_gzip_scrapes_cost_bounded_cpu(big_watcher: WatcherProcess) -> None:
    watcher = big_watcher
    requests = metrics_request(gzip=True) * 39 + metrics_request(gzip=True, close=True)
    before = watcher.cpu_seconds()
    with socket.create_connection(("127.0.0.1", watcher.port), timeout=60) as client:
        client.sendall(requests)  # one packet
        received = bytearray()
        while chunk := client.recv(1 << 20):
            received += chunk
    cpu = watcher.cpu_seconds() - before
    assert len(re.findall(rb"HTTP/1\.1 200 OK\r\n", received)) == 40
    # Compressed anew for each, they took about 3 s of CPU here; shared, about 0.15 s.
    assert cpu < 1.0, f"40 pipelined gzip scrapes took {cpu:.2f} s of CPU"


def test_out_of_descriptors_polling_and_probes_go_on(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    runs = {f"fd-{n}": "ACTIVE" for n in range(3)}
    served = start_simulator(runs)
    args = [arg for run_id in runs for arg in ("--run-id", run_id)]
    watcher = start_watcher("--api-url", served.url, *FAST, *args, nofile=1024)
    idle: list[socket.socket] = []
    try:
        for _ in range(1_100):
            client = socket.create_connection(("127.0.0.1", watcher.port), timeout=5)
            idle.append(client)
        assert max(healthz_seconds(watcher) for _ in range(5)) < 1.0
        polls = watcher.scrape().total("loops_watcher_polls_total", result="ok")
        watcher.wait_for_metrics(
            lambda m: m.total("loops_watcher_polls_total", result="ok") >= polls + 2 * len(runs),
            timeout=15,
            what="polls to go on",
        )
        assert max(healthz_seconds(watcher) for _ in range(5)) < 1.0
    finally:
        for client in idle:
            client.close()
    noted = [
        line
        for line in watcher.logs()
        if line["event"] in ("connection_limit_reached", "accept_failed")
    ]
    assert len(noted) == 1, noted
    assert "Traceback" not in "\n".join(watcher.stderr)
