"""End to end: every dashboard panel over what a real, quiet watcher exports.

A watcher that has read its runs (one ACTIVE, one scaled to zero, one without a sampler) and
has had no retry, no failed poll and no status change is scraped as Prometheus would scrape it,
every 15 s of rule time (the compose stack's interval), and promtool evaluates every query of
the dashboard over those scrapes. A panel that counts what did not happen shows 0, not
"No data"; only the panels that cannot have a value yet (quantiles of durations never
observed, the list of changes that did not happen) come back empty, and say why in their own
words (`noValue`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import Exposition
from support.e2e import FAST, StartSimulator, StartWatcher
from test_deploy import JOB, NO_SAMPLER, input_series, panel_query, panels, run, substitute, tool

pytestmark = pytest.mark.e2e

RUNS = {"quiet-active": "ACTIVE", "quiet-idle": "SCALED_TO_ZERO", "quiet-trainer": None}
SCRAPES = 9  # two minutes of rule time, 15 s apart
LAST = f"{(SCRAPES - 1) * 15}s"
# Counts of what a quiet watcher never saw: a value, and that value 0.
ZERO = {
    "Samplers in transition",
    "Samplers failing or failed",
    "Runs not read",
    "Status changes",
    "Retries in the selected range",
    "Retries by reason",
}
# Nothing to show yet, rightly: no status has been left, no status has changed.
EMPTY = {
    "Status changes in the selected range",
    "Wake-up time, median",
    "Wake-up time, p90",
    "Time in each status over the selected range",
    "Time in status, p90 over the past hour",
}


def quiet_scrapes(start_simulator: StartSimulator, start_watcher: StartWatcher) -> list[Exposition]:
    served = start_simulator(RUNS)
    run_ids = [arg for run_id in RUNS for arg in ("--run-id", run_id)]
    # A generous deadline: a machine under load must not turn this watcher's polls into retries.
    quiet = ("--request-timeout", "30")
    watcher = start_watcher("--api-url", served.url, *FAST, *quiet, *run_ids)
    watcher.wait_for_metrics(
        lambda m: (
            all(m.status_of(run_id) == status for run_id, status in RUNS.items() if status)
            and m.value("baseten_loops_run_info", run_id="quiet-trainer") == 1
        ),
        what="every run read",
    )
    scrapes = []
    for _ in range(SCRAPES):
        scrapes.append(watcher.scrape())
        time.sleep(0.3)
    assert scrapes[-1].total("loops_watcher_retries_total") == 0, "not a quiet watcher"
    assert scrapes[-1].total("loops_watcher_polls_total") == scrapes[-1].total(
        "loops_watcher_polls_total", result="ok"
    ), "not a quiet watcher"
    return scrapes


def test_every_panel_shows_a_value_0_where_nothing_happened_or_says_why_not(
    start_simulator: StartSimulator, start_watcher: StartWatcher, tmp_path: Path
) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    scrapes = quiet_scrapes(start_simulator, start_watcher)
    target = {"job": JOB, "instance": "watcher:9877"}
    series = input_series([[scrape] for scrape in scrapes], [target])

    titles = {panel["title"] for panel in panels() if panel["type"] != "row"}
    assert titles >= ZERO | EMPTY
    # The checks of each query are alert rules: which of them fire is the answer.
    rules: list[dict[str, str]] = []
    expected: list[dict[str, Any]] = []
    where: dict[str, str] = {}
    for panel in panels():
        title = panel["title"]
        if panel["type"] == "row":
            continue
        if title in EMPTY:
            assert panel["fieldConfig"]["defaults"].get("noValue"), f"{title!r} says No data"
        for target_ in panel["targets"]:
            expr = substitute(target_["expr"])
            present = title not in EMPTY
            checks = [
                ("some", f"count(\n{expr}\n) > 0", present, "a value" if present else "nothing")
            ]
            if title in ZERO:
                checks.append(("nonzero", f"count(\n({expr}) != 0\n) > 0", False, "0"))
            for kind, check, fires, shows in checks:
                name = f"{kind}_{len(rules)}"
                where[name] = f"panel {title!r} target {target_['refId']} should show {shows}"
                rules.append({"alert": name, "expr": check})
                expected.append(
                    {
                        "eval_time": LAST,
                        "alertname": name,
                        "exp_alerts": [{"exp_labels": {}}] if fires else [],
                    }
                )
    # The status table: one row per run, the run without a sampler too.
    table = panel_query("Current status of every run")
    where["table_rows"] = "the status table should list each run once, by its status"
    rules.append({"alert": "table_rows", "expr": f"count by (status) (\n{table}\n) == 1"})
    rows = [{"exp_labels": {"status": status or NO_SAMPLER}} for status in RUNS.values()]
    expected.append({"eval_time": LAST, "alertname": "table_rows", "exp_alerts": rows})
    (tmp_path / "panels.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}), encoding="utf-8"
    )
    unit_test = {
        "rule_files": ["panels.yml"],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": series, "alert_rule_test": expected}],
    }
    (tmp_path / "panels_test.yml").write_text(yaml.safe_dump(unit_test), encoding="utf-8")
    result = run(promtool, "test", "rules", tmp_path / "panels_test.yml", cwd=tmp_path)
    output = result.stdout + result.stderr
    wrong = [text for name, text in where.items() if f'alertname="{name}"' in output]
    assert result.returncode == 0, "expected, but not so:\n" + "\n".join(wrong or [output])
