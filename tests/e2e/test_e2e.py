"""End to end: the real `loops-watcher` process against the real simulator, over loopback.

Each test starts `python -m watcher` with a fake key in `BASETEN_API_KEY`, steers the
simulator (in this process, on its own thread) and reads what a user would: `/metrics`
through prometheus-client's parser, the JSON log lines on stdout, exit codes and pages.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import FAKE_KEY, Exposition, wait_until
from support.e2e import (
    FAST,
    REPO,
    StartSimulator,
    StartWatcher,
    WatcherProcess,
    request_count,
    run_watcher,
    scenario,
    watcher_env,
)

from watcher import __version__
from watcher.model import SAMPLER_STATUSES, Result
from watcher.simulator import Fault, SimulatorThread

pytestmark = pytest.mark.e2e

RESULTS = tuple(str(result) for result in Result)


def run_id_args(run_ids: Iterable[str]) -> list[str]:
    return [arg for run_id in run_ids for arg in ("--run-id", run_id)]


def watch(api_url: str, run_ids: Iterable[str], *extra: str) -> tuple[str, ...]:
    """Arguments aiming a fast-polling watcher at `api_url` for these runs."""
    return ("--api-url", api_url, *FAST, *run_id_args(run_ids), *extra)


def fetch_run(api_url: str, run_id: str) -> dict[str, Any]:
    """The run as the simulator serves it: what the watcher's labels must match."""
    response = httpx.get(
        f"{api_url}/v1/loops/runs/{run_id}", headers={"Authorization": f"Bearer {FAKE_KEY}"}
    )
    response.raise_for_status()
    run: dict[str, Any] = response.json()["run"]
    return run


def unix(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# --- state, identity, watcher series ----------------------------------------------------

STEADY = {
    "run-active": "ACTIVE",
    "run-failed": "FAILED",
    "run-idle": "SCALED_TO_ZERO",
    "run-trainer": None,  # `sampler: null`
}


def test_exports_state_identity_and_watcher_series_for_each_run(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    served = start_simulator(STEADY)
    before = time.time()
    watcher = start_watcher(*watch(served.url, STEADY))
    metrics = watcher.wait_for_metrics(
        lambda m: all(m.value("loops_watcher_poll_success", run_id=r) == 1 for r in STEADY),
        what="a successful poll of every run",
    )
    after = time.time()

    for run_id, status in STEADY.items():
        body = fetch_run(served.url, run_id)
        sampler = body["sampler"]
        (info,) = metrics.find("baseten_loops_run_info", run_id=run_id)
        assert info.value == 1
        assert info.labels == {
            "run_id": run_id,
            "run_name": body["name"],
            "session_id": body["session_id"],
            "base_model": body["base_model"],
            "sampler_id": sampler["id"] if sampler else "",
            "model_id": sampler["model_id"] if sampler else "",
            "deployment_id": sampler["deployment_id"] if sampler else body["deployment_id"],
            "owner": body["user"]["email"],
        }
        assert metrics.value(
            "baseten_loops_run_created_timestamp_seconds", run_id=run_id
        ) == pytest.approx(unix(body["created_at"]), abs=1e-3)
        run_states = {
            s.labels["status"]: s.value
            for s in metrics.find("baseten_loops_run_status", run_id=run_id)
        }
        assert run_states == {"ACTIVE": 1.0, "INACTIVE": 0.0}

        sampler_states = {
            s.labels["status"]: s.value
            for s in metrics.find("baseten_loops_sampler_status", run_id=run_id)
        }
        since = metrics.value("baseten_loops_sampler_status_since_timestamp_seconds", run_id=run_id)
        if status is None:
            assert sampler_states == {}
            assert since is None
        else:
            assert sampler_states == {s: float(s == status) for s in SAMPLER_STATUSES}
            assert since is not None
            assert before <= since <= after

        assert metrics.value("loops_watcher_poll_success", run_id=run_id) == 1
        last = metrics.value("loops_watcher_last_success_timestamp_seconds", run_id=run_id)
        assert last is not None
        assert before <= last <= after
        polls = {
            s.labels["result"]: s.value
            for s in metrics.find("loops_watcher_polls_total", run_id=run_id)
        }
        assert set(polls) == {"ok"}
        assert polls["ok"] >= 1
        assert metrics.find("baseten_loops_sampler_status_transitions_total", run_id=run_id) == []

    assert metrics.value("loops_watcher_watched_runs") == len(STEADY)
    assert metrics.value("loops_watcher_build_info", version=__version__) == 1
    assert metrics.value("loops_watcher_api_key_rejected") == 0
    assert (metrics.value("process_resident_memory_bytes") or 0) > 0
    assert metrics.total("loops_watcher_api_requests_total", code="200") >= len(STEADY)
    assert metrics.total("loops_watcher_api_request_duration_seconds_count") >= len(STEADY)
    assert metrics.run_ids() == set(STEADY)

    observed = watcher.logs("sampler_status_observed")
    assert {log["run_id"]: log["status"] for log in observed} == STEADY
    assert len(observed) == len(STEADY)
    assert all(log["level"] == "info" for log in observed)
    assert watcher.logs("sampler_status_changed") == []
    assert_log_lines_well_formed(watcher.logs())


def assert_log_lines_well_formed(lines: list[dict[str, Any]]) -> None:
    assert lines, "no log lines at all"
    for line in lines:
        assert isinstance(line.get("event"), str), line
        assert line.get("level") in ("debug", "info", "warning", "error"), line
        moment = datetime.fromisoformat(line["timestamp"])
        assert moment.utcoffset() == timedelta(0), line


# --- transitions -------------------------------------------------------------------------

WAKE = "run-wake"
# run -> (status at start, status it moves to, level of the change's log line)
MOVES = {
    "to-failed": ("ACTIVE", "FAILED", "error"),
    "to-unhealthy": ("ACTIVE", "UNHEALTHY", "error"),
    "to-deploy-failed": ("DEPLOYING", "DEPLOY_FAILED", "error"),
    "to-build-failed": ("BUILDING", "BUILD_FAILED", "error"),
    "to-build-stopped": ("BUILDING", "BUILD_STOPPED", "error"),
    "to-inactive": ("ACTIVE", "INACTIVE", "warning"),
    "to-deactivating": ("ACTIVE", "DEACTIVATING", "warning"),
    "to-updating": ("ACTIVE", "UPDATING", "info"),
}


def test_each_transition_is_counted_and_logged_once_and_a_watched_wake_up_is_timed(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    runs = {WAKE: "SCALED_TO_ZERO", **{run_id: move[0] for run_id, move in MOVES.items()}}
    served = start_simulator(runs)
    watcher = start_watcher(*watch(served.url, runs))
    watcher.wait_for_metrics(
        lambda m: all(m.status_of(run_id) == status for run_id, status in runs.items()),
        what="every run's first status",
    )

    served.sim.set_status(WAKE, "WAKING_UP")
    for run_id, (_, to_status, _) in MOVES.items():
        served.sim.set_status(run_id, to_status)
    watcher.wait_for_metrics(
        lambda m: (
            m.status_of(WAKE) == "WAKING_UP"
            and all(m.status_of(run_id) == move[1] for run_id, move in MOVES.items())
        ),
        what="every run's new status",
    )
    woke = time.monotonic()
    served.sim.set_status(WAKE, "ACTIVE")
    seen = watcher.wait_for_metrics(
        lambda m: m.status_of(WAKE) == "ACTIVE", what="the wake-up to finish"
    )
    awake_for_at_most = time.monotonic() - woke
    # Two more polls of every run: a transition counted again would show now.
    watcher.wait_for_metrics(
        lambda m: all(
            m.total("loops_watcher_polls_total", run_id=run_id, result="ok")
            >= seen.total("loops_watcher_polls_total", run_id=run_id, result="ok") + 2
            for run_id in runs
        ),
        what="two more polls of every run",
    )
    metrics = watcher.scrape()

    expected = {
        (WAKE, "SCALED_TO_ZERO", "WAKING_UP"),
        (WAKE, "WAKING_UP", "ACTIVE"),
        *((run_id, start, end) for run_id, (start, end, _) in MOVES.items()),
    }
    transitions = metrics.find("baseten_loops_sampler_status_transitions_total")
    assert {
        (s.labels["run_id"], s.labels["from_status"], s.labels["to_status"]) for s in transitions
    } == expected
    assert all(s.value == 1 for s in transitions), transitions

    changes = watcher.logs("sampler_status_changed")
    assert sorted((c["run_id"], c["from_status"], c["to_status"]) for c in changes) == sorted(
        expected
    )
    sampler_ids = {
        s.labels["run_id"]: s.labels["sampler_id"] for s in metrics.find("baseten_loops_run_info")
    }
    for change in changes:
        run_id = change["run_id"]
        assert change["sampler_id"] == sampler_ids[run_id] != ""
        level = MOVES[run_id][2] if run_id in MOVES else "info"
        assert change["level"] == level, change
        if (change["from_status"], change["to_status"]) == ("WAKING_UP", "ACTIVE"):
            assert 0 < change["seconds_in_previous_status"] <= awake_for_at_most + 1.5
        else:  # the watcher did not see the previous status begin
            assert change["seconds_in_previous_status"] is None
    observed = watcher.logs("sampler_status_observed")
    assert sorted(log["run_id"] for log in observed) == sorted(runs)

    # Only WAKING_UP was seen from start to end: SCALED_TO_ZERO was already on at first sight.
    durations = metrics.find("baseten_loops_sampler_status_duration_seconds_count")
    assert [(s.labels["status"], s.value) for s in durations] == [("WAKING_UP", 1.0)]
    waking = metrics.value("baseten_loops_sampler_status_duration_seconds_sum", status="WAKING_UP")
    (wake_change,) = [c for c in changes if c["to_status"] == "ACTIVE"]
    # The log line rounds to the millisecond; the histogram keeps full precision.
    assert waking == pytest.approx(wake_change["seconds_in_previous_status"], abs=0.0005)
    assert_log_lines_well_formed(watcher.logs())


# --- faults, against one watcher shared by the tests below --------------------------------

# Faults take turns on these runs, so a run one test left backing off cannot slow the next.
TARGETS = tuple(f"fault-{n}" for n in range(6))
BYSTANDER = "bystander"  # never faulted: must keep polling fine through every fault
SHARED_RUNS = dict.fromkeys((*TARGETS, BYSTANDER), "ACTIVE")
# --request-timeout of the shared watcher: long enough that a busy machine does not time out a
# healthy poll (which would count as a result the fault did not cause), and twice it is one of
# the request duration histogram's bounds.
DEADLINE = 1.25


@dataclass(frozen=True, slots=True)
class Rig:
    served: SimulatorThread
    watcher: WatcherProcess
    targets: Iterator[str]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    """A watcher polling every 0.5 s with a DEADLINE and one retry, and its simulator."""
    with (
        SimulatorThread(scenario(SHARED_RUNS), [FAKE_KEY]) as served,
        WatcherProcess(
            "--api-url",
            served.url,
            *run_id_args(SHARED_RUNS),
            "--poll-interval",
            "0.5",
            "--fast-poll-interval",
            "0.5",
            "--request-timeout",
            str(DEADLINE),
            "--max-retries",
            "1",
            "--max-requests-per-second",
            "1000",
        ) as watcher,
    ):
        watcher.start()
        yield Rig(served, watcher, itertools.cycle(TARGETS))


@pytest.fixture
def target(rig: Rig) -> Iterator[str]:
    """The next run to fault, once it polls fine; every fault is cleared afterwards."""
    run_id = next(rig.targets)
    rig.served.sim.clear_faults()
    rig.watcher.wait_for_metrics(
        lambda m: (
            m.value("loops_watcher_poll_success", run_id=run_id) == 1
            and m.status_of(run_id) == "ACTIVE"
        ),
        what=f"{run_id} to poll fine before its fault",
    )
    yield run_id
    rig.served.sim.clear_faults()


@dataclass(frozen=True, slots=True)
class Case:
    fault: dict[str, Any]
    result: str
    retried: bool
    code: str  # the `code` label its attempts are counted under


CASES = {
    **{
        f"http-{code}": Case({"kind": "status", "status": code}, "server_error", True, str(code))
        for code in (500, 502, 503, 504)
    },
    "http-404": Case({"kind": "status", "status": 404}, "not_found", False, "404"),
    "slow-response": Case({"kind": "delay", "delay": 5.0}, "timeout", True, "error"),
    "trickled-body": Case({"kind": "trickle", "trickle_interval": 0.05}, "timeout", True, "200"),
    "truncated-body": Case({"kind": "truncate"}, "connection_error", True, "200"),
    "non-json-body": Case({"kind": "non_json"}, "invalid_response", False, "200"),
    "missing-fields": Case({"kind": "missing_fields"}, "invalid_response", False, "200"),
    "connection-reset": Case({"kind": "reset"}, "connection_error", True, "error"),
    "oversized-body": Case(
        {"kind": "oversized", "size": 5 * 1024 * 1024}, "invalid_response", False, "200"
    ),
    "oversized-body-of-undeclared-length": Case(
        {"kind": "oversized", "size": 5 * 1024 * 1024, "declare_length": False},
        "invalid_response",
        False,
        "200",
    ),
    "redirect": Case({"kind": "redirect"}, "invalid_response", False, "302"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fault_is_counted_and_survived(rig: Rig, target: str, case: Case) -> None:
    watcher, sim = rig.watcher, rig.served.sim
    before = watcher.scrape()
    mark = watcher.mark()
    memory_before = watcher.memory_kib()

    sim.add_fault(Fault(run_id=target, **case.fault))
    failed = watcher.wait_for_metrics(
        lambda m: (
            m.value("loops_watcher_poll_success", run_id=target) == 0
            and m.total("loops_watcher_polls_total", run_id=target, result=case.result)
            > before.total("loops_watcher_polls_total", run_id=target, result=case.result)
        ),
        what=f"a {case.result} poll of {target}",
    )
    # The last known status stays exported; nothing else about the run is made up.
    assert failed.status_of(target) == "ACTIVE"
    for result in set(RESULTS) - {"ok", case.result}:
        assert failed.total("loops_watcher_polls_total", run_id=target, result=result) == (
            before.total("loops_watcher_polls_total", run_id=target, result=result)
        ), result
    assert failed.total("loops_watcher_api_requests_total", code=case.code) > before.total(
        "loops_watcher_api_requests_total", code=case.code
    )
    retries = failed.total("loops_watcher_retries_total", reason=case.result)
    retries_before = before.total("loops_watcher_retries_total", reason=case.result)
    assert retries > retries_before if case.retried else retries == retries_before
    report = watcher.wait_for_log("poll_failed", since=mark, run_id=target)
    assert report["result"] == case.result
    assert report["level"] == "warning"
    assert report["attempts"] == (2 if case.retried else 1)
    for probe in ("/healthz", "/readyz"):
        assert watcher.get(probe).status_code == 200, probe

    if case.fault["kind"] == "trickle":
        # Every attempt ended by the deadline (plus margin), not when the body would have.
        finished = failed.total("loops_watcher_api_request_duration_seconds_count") - before.total(
            "loops_watcher_api_request_duration_seconds_count"
        )
        in_time = failed.total(
            "loops_watcher_api_request_duration_seconds_bucket", le=str(2 * DEADLINE)
        ) - before.total("loops_watcher_api_request_duration_seconds_bucket", le=str(2 * DEADLINE))
        assert finished > 0
        assert in_time == finished
    if case.fault["kind"] == "oversized":
        memory = watcher.memory_kib()
        # Neither now nor at its peak did the watcher hold a 5 MiB body.
        assert memory["VmRSS"] - memory_before["VmRSS"] < 3072, (memory_before, memory)
        assert memory["VmHWM"] - memory_before["VmHWM"] < 3072, (memory_before, memory)
    if case.fault["kind"] == "redirect":
        assert sim.request_counts().get("/login", 0) == 0

    sim.clear_faults()
    recovered = watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_poll_success", run_id=target) == 1,
        what=f"{target} to poll fine again",
    )
    assert recovered.status_of(target) == "ACTIVE"
    assert recovered.value("loops_watcher_poll_success", run_id=BYSTANDER) == 1
    # The scrape can see the success before the log line has been read from the pipe.
    watcher.wait_for_log("poll_recovered", since=mark, run_id=target)
    assert_log_lines_well_formed(watcher.logs(since=mark))


def test_retry_after_is_respected(rig: Rig, target: str) -> None:
    watcher, sim = rig.watcher, rig.served.sim
    path = f"/v1/loops/runs/{target}"
    before = watcher.scrape()
    # Arm the fault just after a poll went by, so that the next request is a poll's first.
    polled = sim.request_counts().get(path, 0)
    wait_until(
        lambda: sim.request_counts().get(path, 0) > polled, timeout=5, what=f"a poll of {target}"
    )
    sim.add_fault(Fault(kind="status", status=429, retry_after="1", run_id=target))
    # Note when each request for the run arrives: the retry must wait out the Retry-After.
    arrivals: list[float] = []
    seen = sim.request_counts().get(path, 0)

    def two_arrivals() -> bool:
        nonlocal seen
        count = sim.request_counts().get(path, 0)
        arrivals.extend([time.monotonic()] * (count - seen))
        seen = count
        return len(arrivals) >= 2

    # Looked at every 10 ms: the gap between the arrivals is what is measured.
    wait_until(two_arrivals, timeout=10, what="a request and its retry", every=0.01)
    assert arrivals[1] - arrivals[0] >= 0.95

    failed = watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_poll_success", run_id=target) == 0,
        what=f"{target}'s poll to fail",
    )
    assert failed.total("loops_watcher_polls_total", run_id=target, result="rate_limited") > 0
    assert failed.total("loops_watcher_retries_total", reason="rate_limited") > before.total(
        "loops_watcher_retries_total", reason="rate_limited"
    )
    assert failed.status_of(target) == "ACTIVE"
    sim.clear_faults()
    watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_poll_success", run_id=target) == 1,
        what=f"{target} to poll fine again",
    )


def test_undocumented_status_gets_its_own_series_and_one_warning(rig: Rig, target: str) -> None:
    watcher, sim = rig.watcher, rig.served.sim
    mark = watcher.mark()
    sim.add_fault(Fault(kind="unknown_status", value="HIBERNATING", run_id=target))
    seen = watcher.wait_for_metrics(
        lambda m: m.status_of(target) == "HIBERNATING", what=f"{target} HIBERNATING"
    )
    states = {
        s.labels["status"]: s.value
        for s in seen.find("baseten_loops_sampler_status", run_id=target)
    }
    assert states == {**dict.fromkeys(SAMPLER_STATUSES, 0.0), "HIBERNATING": 1.0}
    assert seen.value("loops_watcher_poll_success", run_id=target) == 1
    # More polls in the same status add no further warnings.
    watcher.wait_for_metrics(
        lambda m: (
            m.total("loops_watcher_polls_total", run_id=target, result="ok")
            >= seen.total("loops_watcher_polls_total", run_id=target, result="ok") + 2
        ),
        what=f"two more polls of {target}",
    )
    warnings = watcher.logs("undocumented_sampler_status", since=mark)
    assert [(w["run_id"], w["status"], w["level"]) for w in warnings] == [
        (target, "HIBERNATING", "warning")
    ]

    sim.clear_faults()
    back = watcher.wait_for_metrics(
        lambda m: m.status_of(target) == "ACTIVE", what=f"{target} ACTIVE again"
    )
    assert back.find("baseten_loops_sampler_status", status="HIBERNATING") == []


# --- the watcher's own endpoints ------------------------------------------------------------


def test_the_status_page_links_the_endpoints(rig: Rig) -> None:
    page = rig.watcher.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for path in ("/metrics", "/healthz", "/readyz"):
        assert f'href="{path}"' in page.text
        assert rig.watcher.get(path).status_code == 200, path


def test_metrics_speak_openmetrics_when_asked(rig: Rig) -> None:
    response = rig.watcher.get("/metrics", Accept="application/openmetrics-text; version=1.0.0")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    scraped = Exposition.parse(response.text, openmetrics=True)
    assert scraped.types["loops_watcher_polls"] == "counter"
    assert scraped.types["baseten_loops_sampler_status"] == "gauge"
    runs = {s.labels["run_id"] for s in scraped.find("baseten_loops_sampler_status")}
    assert runs == set(SHARED_RUNS)


def test_unknown_paths_other_methods_and_garbage_are_refused(rig: Rig) -> None:
    watcher = rig.watcher
    assert watcher.get("/nope").status_code == 404
    post = watcher.http.post(watcher.url + "/metrics", content=b"x")
    assert post.status_code == 405
    assert "GET" in post.headers["allow"]
    with socket.create_connection(("127.0.0.1", watcher.port), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert watcher.get("/metrics").status_code == 200  # still serving


# --- deadlines under load ------------------------------------------------------------------


def test_many_deadline_hits_do_not_starve_the_connection_pool(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    runs = dict.fromkeys((f"busy-{n:02d}" for n in range(60)), "ACTIVE")
    served = start_simulator(runs)
    sim = served.sim
    watcher = start_watcher(
        "--api-url",
        served.url,
        *run_id_args(runs),
        "--poll-interval",
        "1",
        "--fast-poll-interval",
        "0.5",
        "--request-timeout",
        "0.1",
        "--max-retries",
        "1",
        "--max-concurrency",
        "4",
        "--max-requests-per-second",
        "1000",
    )
    watcher.wait_for_metrics(
        lambda m: all(m.value("loops_watcher_poll_success", run_id=r) == 1 for r in runs),
        what="every run polled",
    )
    # Half the runs trickle their bodies; the rest, and the list, answer too late.
    for run_id in list(runs)[::2]:
        sim.add_fault(Fault(kind="trickle", trickle_interval=0.05, run_id=run_id))
    sim.add_fault(Fault(kind="delay", delay=5.0))
    attempts = "loops_watcher_api_request_duration_seconds_count"
    before = watcher.scrape().total(attempts)
    # Every attempt from now on ends at its deadline, whether or not it reached the server.
    hit = watcher.wait_for_metrics(
        lambda m: (
            m.total(attempts) - before >= 200
            and all(m.value("loops_watcher_poll_success", run_id=r) == 0 for r in runs)
        ),
        timeout=30,
        what="200 attempts to hit their deadline and every run's poll to fail",
    )
    assert hit.total("loops_watcher_retries_total", reason="timeout") >= 60

    sim.clear_faults()
    recovered = watcher.wait_for_metrics(
        lambda m: all(m.value("loops_watcher_poll_success", run_id=r) == 1 for r in runs),
        timeout=8,
        what="every run to poll fine again",
    )
    assert all(recovered.status_of(run_id) == "ACTIVE" for run_id in runs)
    assert watcher.get("/healthz").status_code == 200


# --- the API key -------------------------------------------------------------------------


def test_api_key_never_shows_in_logs_metrics_or_pages(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    served = start_simulator(STEADY)
    watcher = start_watcher(*watch(served.url, STEADY, "--log-level", "debug"))
    # An API that echoes the key back (here in a redirect) must not get it into a log line.
    mark = watcher.mark()
    served.sim.add_fault(
        Fault(kind="redirect", location=f"/login?key={FAKE_KEY}", run_id="run-active")
    )
    failure = watcher.wait_for_log("poll_failed", since=mark, run_id="run-active")
    assert "/login?key=<redacted>" in failure["detail"]
    served.sim.clear_faults()
    pages = [
        watcher.get(path, **headers).text
        for path in ("/", "/metrics", "/healthz", "/readyz", "/nope")
        for headers in ({}, {"Accept": "application/openmetrics-text; version=1.0.0"})
    ]
    watcher.send(signal.SIGTERM)
    assert watcher.wait_exit(timeout=5) == 0
    watcher.join_output()
    assert watcher.logs("watcher_started")
    everything = "\n".join((watcher.all_output(), *pages))
    assert FAKE_KEY not in everything
    assert FAKE_KEY[4:-4] not in everything  # nor a fragment of it


def test_a_rejected_key_is_reported_once_without_a_request_storm(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    runs = dict.fromkeys(("kr-1", "kr-2", "kr-3"), "ACTIVE")
    served = start_simulator(runs, api_keys=["the-only-key-the-simulator-takes"])
    watcher = start_watcher(*watch(served.url, runs))
    wait_until(
        lambda: request_count(served.sim.request_counts(), runs) > 0,
        timeout=10,
        what="the first request",
    )
    window_start = time.monotonic()
    # For 4.5 s, polls back off: at t = 0, 1 and 3 s (then 7 s), where a poll a second would
    # make 5; a storm would make hundreds. Checked throughout, so a storm fails fast.
    budget = 3 * len(runs)
    while time.monotonic() - window_start < 4.5:
        requests = request_count(served.sim.request_counts(), runs)
        assert requests <= budget, f"{requests} requests in {time.monotonic() - window_start:.1f} s"
        time.sleep(0.05)

    metrics = watcher.scrape()
    for run_id in runs:
        assert metrics.value("loops_watcher_poll_success", run_id=run_id) == 0
        assert metrics.total("loops_watcher_polls_total", run_id=run_id, result="unauthorized") >= 2
    # A 401 is not retried: each poll it ended was its one attempt answered 401. (A busy machine
    # may still time an attempt out and retry that; it says nothing about the key.)
    assert metrics.total("loops_watcher_retries_total", reason="unauthorized") == 0
    assert metrics.total("loops_watcher_api_requests_total", code="401") == metrics.total(
        "loops_watcher_polls_total", result="unauthorized"
    )
    assert metrics.value("loops_watcher_api_key_rejected") == 1
    rejected = watcher.logs("api_key_rejected")
    assert len(rejected) == 1
    assert rejected[0]["level"] == "error"
    assert rejected[0]["result"] == "unauthorized"
    assert_log_lines_well_formed(watcher.logs())


# --- the run-IDs file ----------------------------------------------------------------------


def run_series(metrics: Exposition, run_id: str) -> list[str]:
    return sorted({s.name for s in metrics.samples if s.labels.get("run_id") == run_id})


def test_run_ids_file_edits_and_sighup_change_the_watched_runs(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    runs = dict.fromkeys(("file-aaa", "file-bbb", "file-ccc", "file-ddd"), "ACTIVE")
    served = start_simulator(runs)
    ids_file = tmp_path / "run-ids"
    ids_file.write_text("# watched runs\nfile-aaa\nfile-bbb  # the second\n\n")
    watcher = start_watcher("--api-url", served.url, *FAST, "--run-ids-file", str(ids_file))
    first = watcher.wait_for_metrics(
        lambda m: (
            m.run_ids() == {"file-aaa", "file-bbb"}
            and all(m.status_of(r) == "ACTIVE" for r in ("file-aaa", "file-bbb"))
        ),
        what="the runs in the file",
    )
    assert "loops_watcher_polls_total" in run_series(first, "file-bbb")

    # An edit adds one run and removes another: the removed one loses every series.
    ids_file.write_text("file-aaa\nfile-ccc\n")
    edited = watcher.wait_for_metrics(
        lambda m: m.run_ids() == {"file-aaa", "file-ccc"} and m.status_of("file-ccc") == "ACTIVE",
        what="the edited file to take effect",
    )
    assert run_series(edited, "file-bbb") == []
    assert edited.value("loops_watcher_watched_runs") == 2
    assert watcher.logs("run_unwatched", run_id="file-bbb")

    # An edit the file watcher cannot notice (same size, same mtime): only SIGHUP reloads it.
    stamp = ids_file.stat()
    ids_file.write_text("file-aaa\nfile-ddd\n")
    os.utime(ids_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    mark = watcher.mark()
    watcher.send(signal.SIGHUP)
    loaded = watcher.wait_for_log("run_ids_file_loaded", since=mark)
    assert loaded["reason"] == "SIGHUP"
    watcher.wait_for_metrics(
        lambda m: m.run_ids() == {"file-aaa", "file-ddd"} and m.status_of("file-ddd") == "ACTIVE",
        what="the SIGHUP reload to take effect",
    )

    # A broken file keeps the previous set and says why.
    mark = watcher.mark()
    ids_file.write_text("file-aaa\nnot a run id!\n")
    invalid = watcher.wait_for_log("run_ids_file_invalid", since=mark)
    assert invalid["level"] == "error"
    assert "line 2" in invalid["error"]
    kept = watcher.scrape()
    watcher.wait_for_metrics(
        lambda m: (
            m.total("loops_watcher_polls_total", run_id="file-ddd", result="ok")
            > kept.total("loops_watcher_polls_total", run_id="file-ddd", result="ok")
        ),
        what="file-ddd to be polled again",
    )
    assert watcher.scrape().run_ids() == {"file-aaa", "file-ddd"}
    assert watcher.logs("run_unwatched", since=mark) == []


# --- shutting down ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_retry_stops_cleanly_and_quickly(
    start_simulator: StartSimulator, start_watcher: StartWatcher, signum: signal.Signals
) -> None:
    runs = dict.fromkeys(("stop-1", "stop-2"), "ACTIVE")
    served = start_simulator(runs)
    served.sim.add_fault(Fault(kind="status", status=503, retry_after="30"))
    watcher = start_watcher(*watch(served.url, runs), ready=False)
    watcher.wait_for_metrics(
        lambda m: m.total("loops_watcher_retries_total", reason="server_error") >= len(runs),
        what="every run's poll to wait 30 s for its retry",
    )
    sent = time.monotonic()
    watcher.send(signum)
    assert watcher.wait_exit(timeout=10) == 0
    assert time.monotonic() - sent < 5
    watcher.join_output()
    assert watcher.logs("watcher_stopped")
    assert watcher.stderr == []


# --- configuration, --check-config, --version, --once ----------------------------------------

BASE = ("--api-url", "http://127.0.0.1:9", "--run-id", "cfg-run")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def bad_config(
    case: str, tmp_path: Path, busy_port: int
) -> tuple[list[str], dict[str, str], tuple[str, ...]]:
    """(arguments, environment, what the error line must name) for one kind of bad input."""
    config = tmp_path / "watcher.toml"
    config.write_text('api_url = "http://127.0.0.1:9"\npol_interval = 5\n')
    listen = f"127.0.0.1:{busy_port}"
    cases = {
        "flag": ([*BASE, "--poll-interval", "abc"], watcher_env(), ("--poll-interval", "'abc'")),
        "environment": (
            list(BASE),
            watcher_env(LOOPS_WATCHER_MAX_RETRIES="-1"),
            ("LOOPS_WATCHER_MAX_RETRIES", "'-1'"),
        ),
        "config-file": (
            ["--config", str(config), "--run-id", "cfg-run"],
            watcher_env(),
            (str(config), "'pol_interval'"),
        ),
        "no-key": (list(BASE), watcher_env(api_key=None), ("BASETEN_API_KEY", "--api-key-file")),
        "unknown-flag": ([*BASE, "--pol-interval", "5"], watcher_env(), ("--pol-interval", "help")),
        "choice": ([*BASE, "--log-format", "yaml"], watcher_env(), ("--log-format", "'yaml'")),
        "port-in-use": (
            [*BASE, "--listen-address", listen],
            watcher_env(),
            ("--listen-address", f"'{listen}'", "in use"),
        ),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    ["flag", "environment", "config-file", "no-key", "unknown-flag", "choice", "port-in-use"],
)
def test_bad_configuration_exits_2_with_one_line_naming_option_and_value(
    case: str, tmp_path: Path, busy_port: int
) -> None:
    args, env, named = bad_config(case, tmp_path, busy_port)
    finished = run_watcher(*args, env=env)
    assert finished.returncode == 2, finished.stderr
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("loops-watcher: error: ")
    for name in named:
        assert name in lines[0]
    assert "Traceback" not in finished.stdout + finished.stderr


def test_check_config_prints_the_effective_config_without_the_key() -> None:
    finished = run_watcher(
        *BASE,
        "--poll-interval",
        "7",
        "--check-config",
        env=watcher_env(LOOPS_WATCHER_MAX_CONCURRENCY="5"),
    )
    assert finished.returncode == 0, finished.stderr
    assert FAKE_KEY not in finished.stdout + finished.stderr
    assert "redacted" in finished.stdout
    shown = tomllib.loads(finished.stdout)
    assert shown["poll_interval"] == 7
    assert shown["max_concurrency"] == 5
    assert shown["run_id"] == ["cfg-run"]
    assert "api_key" not in shown


def test_version() -> None:
    finished = run_watcher("--version", env=watcher_env(api_key=None))
    assert finished.returncode == 0
    assert finished.stdout.strip() == f"loops-watcher {__version__}"


ONCE_RUNS = {"once-ok": "ACTIVE", "once-idle": "SCALED_TO_ZERO", "once-trainer": None}


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({}, 0),
        ({"once-failed": "FAILED"}, 1),
        ({"once-unhealthy": "UNHEALTHY"}, 1),
        ({"once-missing": "(not served)"}, 3),
    ],
    ids=["all-fine", "failed", "unhealthy", "unreadable"],
)
def test_once_prints_a_table_and_exits_by_what_it_found(
    start_simulator: StartSimulator, extra: dict[str, str], code: int
) -> None:
    served_runs: dict[str, str | None] = {
        **ONCE_RUNS,
        **{run_id: s for run_id, s in extra.items() if s != "(not served)"},
    }
    served = start_simulator(served_runs)
    watched = [*ONCE_RUNS, *extra]
    finished = run_watcher(*watch(served.url, watched), "--once")
    assert finished.returncode == code, finished.stdout + finished.stderr
    *rows, summary = finished.stdout.splitlines()
    assert rows[0].split()[:3] == ["RUN", "NAME", "SAMPLER"]
    by_run = {row.split()[0]: row for row in rows[1:]}
    assert set(by_run) == set(watched)
    for run_id, status in served_runs.items():
        assert (status or "(no sampler)") in by_run[run_id]
    if code == 3:
        assert "unreadable: not_found" in by_run["once-missing"]
        assert summary == f"1 run unreadable: 404 Not Found from {served.url}; check the run IDs"
    elif code == 1:
        assert summary.startswith("1 run failing: name-once-")
    else:
        assert summary == "3 runs read, none failing"
    assert FAKE_KEY not in finished.stdout + finished.stderr


def test_once_into_a_closed_pipe_exits_quietly(start_simulator: StartSimulator) -> None:
    """`loops-watcher --once --output json | head -1`: the reader leaves early, no crash."""
    served = start_simulator(ONCE_RUNS)
    command = [sys.executable, "-m", "watcher", *watch(served.url, ONCE_RUNS), "--once"]
    with subprocess.Popen(
        [*command, "--output", "json"],
        env=watcher_env(),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        proc.stdout.close()  # before the report is written: every write meets EPIPE
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr  # what the runs were found to be: all fine
    assert "watcher_crashed" not in stderr
    assert "BrokenPipe" not in stderr
    assert "Traceback" not in stderr
