"""End to end: what the API sends cannot stop, blind or bloat the real watcher process.

The real `loops-watcher` against the project's simulator on loopback, with the bodies that
used to put it in a crash loop: a lone surrogate in one org member's run name, a 1 MB name,
serverless samplers, one broken list entry, bodies nested 200,000 deep, and an org whose list
is larger than the old cap allowed before any run was watched.
"""

from __future__ import annotations

import pytest
from support import Exposition
from support.e2e import FAST, StartSimulator, StartWatcher

from watcher.simulator import Fault

pytestmark = pytest.mark.e2e

RUNS = {"good001": "ACTIVE", "broken2": "ACTIVE", "srvless": "ACTIVE", "oddname": "ACTIVE"}


def polls(metrics: Exposition, run_id: str, result: str) -> float:
    return metrics.total("loops_watcher_polls_total", run_id=run_id, result=result)


def test_hostile_list_bodies_fail_one_run_at_most_and_never_the_watcher(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    served = start_simulator(RUNS)
    sim = served.sim
    sim.set_run("srvless", serverless=True)
    sim.set_run("oddname", name="x\udc80" + "n" * 1_000_000)
    sim.add_fault(Fault(kind="missing_fields", run_id="broken2", endpoint="list"))
    watcher = start_watcher("--api-url", served.url, "--discover", "org", *FAST)

    others = [run_id for run_id in RUNS if run_id != "broken2"]
    metrics = watcher.wait_for_metrics(
        lambda m: (
            polls(m, "broken2", "invalid_response") >= 1
            and all(m.value("loops_watcher_poll_success", run_id=r) == 1 for r in others)
        ),
        what="every run read, the broken entry counted against its run only",
    )
    (odd,) = metrics.find("baseten_loops_run_info", run_id="oddname")
    assert odd.labels["run_name"].startswith("x\ufffdnnn")
    assert len(odd.labels["run_name"]) == 256
    (serverless,) = metrics.find("baseten_loops_run_info", run_id="srvless")
    assert (serverless.labels["model_id"], serverless.labels["deployment_id"]) == ("", "")
    assert all(len(line) < 10_000 for line in watcher.stdout)

    # The broken entry does not hold back the others: a change shows within a list or two.
    sim.set_status("good001", "UNHEALTHY")
    watcher.wait_for_metrics(
        lambda m: m.status_of("good001") == "UNHEALTHY", what="good001 to turn UNHEALTHY"
    )

    # A list nested too deep to parse fails that list, over and over: discovery says so.
    mark = watcher.mark()
    sim.add_fault(Fault(kind="deep_nesting", endpoint="list"))
    failing = watcher.wait_for_log("discovery_failing", since=mark, timeout=15)
    assert failing["level"] == "error"
    assert failing["result"] == "invalid_response"
    assert "recursion" in failing["detail"]
    watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_discovery_failing") == 1, what="discovery failing"
    )
    sim.clear_faults()
    watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_discovery_failing") == 0, what="discovery recovered"
    )
    assert watcher.proc.poll() is None
    assert not [line for line in watcher.stderr if "Traceback" in line]


def test_a_run_body_nested_too_deep_is_an_invalid_response(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    served = start_simulator({"good001": "ACTIVE"})
    watcher = start_watcher("--api-url", served.url, "--run-id", "good001", *FAST)
    watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_poll_success", run_id="good001") == 1,
        what="a first good poll",
    )
    served.sim.add_fault(Fault(kind="deep_nesting", run_id="good001"))
    metrics = watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_poll_success", run_id="good001") == 0,
        what="the deep body to fail the poll",
    )
    assert polls(metrics, "good001", "invalid_response") >= 1
    assert metrics.status_of("good001") == "ACTIVE"
    served.sim.clear_faults()
    watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_poll_success", run_id="good001") == 1,
        timeout=15,
        what="recovery",
    )


def test_discover_org_reads_a_large_org_at_once(
    start_simulator: StartSimulator, start_watcher: StartWatcher
) -> None:
    org = {f"run{index:05d}": "ACTIVE" for index in range(8000)}
    served = start_simulator(org)
    for run_id in org:  # longer names, as real runs have: the list is about 6 MB
        served.sim.set_run(run_id, name=f"{run_id}-" + "sft-qwen3-8b-lr2e-5-" * 12)
    # The default deadline: FAST's 1 s is too short for 6 MB on a busy machine.
    watcher = start_watcher(
        "--api-url", served.url, "--discover", "org", *FAST, "--request-timeout", "10"
    )
    metrics = watcher.wait_for_metrics(
        lambda m: m.value("loops_watcher_watched_runs") == 8000, timeout=60, what="8,000 runs"
    )
    assert metrics.value("loops_watcher_discovery_failing") == 0
    assert not watcher.logs("list_failed")
