"""End to end: two replicas of one watcher, one killed, seen through the shipped alert rules.

Both replicas watch the same runs against the simulator and are scraped side by side, as
Prometheus would scrape two pods of the `ha` overlay; then one is killed. The scrapes become
promtool input series (one scrape a minute of rule time, the dead replica's series going stale
and its `up` to 0, as Prometheus records a failed scrape), and promtool evaluates every alert
of deploy/prometheus/alerts.yml every minute: each alert must fire exactly once per run, with no
replica's label on it, before and after the kill alike; the only news of the kill is the
`LoopsWatcherDown` warning for one replica down.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import Exposition
from support.e2e import FAST, StartSimulator, StartWatcher, WatcherProcess
from test_deploy import ALERTS, JOB, alert_rules, input_series, load_yaml, run, tool

pytestmark = pytest.mark.e2e

RUNS = {
    "ha-failed": "FAILED",
    "ha-unhealthy": "UNHEALTHY",
    "ha-active": "ACTIVE",
    "ha-idle": "SCALED_TO_ZERO",
}
STEPS = 40  # scrapes, one minute of rule time each
KILLED_AT = 20
REPLICAS = ("loops-watcher-7d9f-a", "loops-watcher-7d9f-b")  # pod names, as the operator labels


def target(pod: str) -> dict[str, str]:
    """The labels Prometheus (the operator's ServiceMonitor) attaches to a replica's series."""
    return {"job": JOB, "instance": f"{pod}:9877", "pod": pod}


def scrape_both(replicas: list[WatcherProcess]) -> list[list[Exposition | None]]:
    """STEPS scrapes of each replica; the second is killed before scrape KILLED_AT."""
    scrapes: list[list[Exposition | None]] = []
    for step in range(STEPS):
        if step == KILLED_AT:
            replicas[1].kill()
        scrapes.append(
            [replica.scrape() if replica.proc.poll() is None else None for replica in replicas]
        )
        time.sleep(0.2)
    return scrapes


def expected_alerts(
    identity: dict[str, dict[str, str]], minute: int
) -> dict[str, list[dict[str, str]]]:
    """Every alert that must fire at this minute of rule time, by name, with its labels."""

    def run_alert(run_id: str, severity: str) -> dict[str, str]:
        return {"severity": severity, "job": JOB, "run_id": run_id, **identity[run_id]}

    firing: dict[str, list[dict[str, str]]] = {name: [] for name in ALERT_NAMES}
    firing["LoopsSamplerFailed"].append(run_alert("ha-failed", "critical"))
    if minute >= 5:
        firing["LoopsSamplerUnhealthy"].append(run_alert("ha-unhealthy", "warning"))
    if minute >= 15:
        firing["LoopsSamplerUnhealthy"].append(run_alert("ha-unhealthy", "critical"))
    if minute >= KILLED_AT + 5:
        down = {"severity": "warning", **target(REPLICAS[1]), "shard": "0", "total_shards": "1"}
        firing["LoopsWatcherDown"].append(down)
    return firing


ALERT_NAMES = sorted({rule["alert"] for rule in alert_rules()})


def test_two_replicas_one_killed_alert_once_per_run_without_a_gap(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    served = start_simulator(RUNS)
    run_ids = [arg for run_id in RUNS for arg in ("--run-id", run_id)]
    replicas = [start_watcher("--api-url", served.url, *FAST, *run_ids) for _ in REPLICAS]
    for replica in replicas:
        replica.wait_for_metrics(
            lambda m: all(m.status_of(run_id) == status for run_id, status in RUNS.items()),
            what="every run's status",
        )
    scrapes = scrape_both(replicas)

    (first, _) = scrapes[0]
    assert first is not None
    identity = {}
    for run_id in RUNS:
        (info,) = first.find("baseten_loops_run_info", run_id=run_id)
        keep = ("run_name", "base_model", "model_id", "deployment_id", "owner")
        identity[run_id] = {key: info.labels[key] for key in keep}
    identity["ha-failed"]["status"] = "FAILED"
    identity["ha-unhealthy"]["status"] = "UNHEALTHY"

    # The annotations are tested in alerts_test.yml; here only who fires, how often, and when.
    groups = copy.deepcopy(load_yaml(ALERTS)["groups"])
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": groups}), encoding="utf-8")
    checks: list[dict[str, Any]] = [
        {
            "eval_time": f"{minute}m",
            "alertname": name,
            "exp_alerts": [{"exp_labels": labels} for labels in firing],
        }
        for minute in range(1, STEPS)
        for name, firing in expected_alerts(identity, minute).items()
    ]
    unit_test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": input_series(scrapes, [target(pod) for pod in REPLICAS]),
                "alert_rule_test": checks,
            }
        ],
    }
    (tmp_path / "replicas_test.yml").write_text(yaml.safe_dump(unit_test), encoding="utf-8")
    result = run(promtool, "test", "rules", tmp_path / "replicas_test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr
