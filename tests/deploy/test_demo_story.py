"""The demo tells a story: run through the real alert rules, it fires exactly the scripted alerts.

The built-in scenario (watcher/simulator/scenarios/demo.json) is a normal day compressed
(scale to zero, wake-ups, a deploy, an update, a run finishing) plus three incidents. Its
timeline is sampled every 15 s, as the compose stack scrapes, into the series the watcher
exports; promtool
evaluates deploy/prometheus/alerts.yml over 90 minutes of them, and every minute the alerts
firing must be exactly the scripted ones. Each scripted alert is allowed a minute either side of
the moment the story gives it; no other alert may fire at any time, for any run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import ALERTS, DEFAULT_PORT, JOB, alert_rules, load_yaml, run, tool

from watcher.model import SAMPLER_STATUSES
from watcher.simulator.scenarios import RunSpec, load_scenario

SCRAPE = 15  # seconds, the compose stack's scrape and evaluation interval
HORIZON = 90  # minutes
INSTANCE = f"watcher:{DEFAULT_PORT}"


@dataclass(frozen=True, slots=True)
class Scripted:
    """An alert the story promises: from which minute it fires, and until which (if ever)."""

    alertname: str
    severity: str
    run_id: str
    status: str
    fires: int
    resolves: int | None = None

    def state(self, minute: int) -> bool | None:
        """Whether it fires at `minute`; None at a scripted moment itself, where either is right.

        So each alert must fire within a minute after its moment and not a minute before it.
        """
        if minute in (self.fires, self.resolves):
            return None
        return self.fires < minute and (self.resolves is None or minute < self.resolves)


STORY = (
    # llama31-8b-dpo serves for 2 minutes, then its sampler fails for good.
    Scripted("LoopsSamplerFailed", "critical", "ujzde8g", "FAILED", fires=2),
    # qwen3-8b-grpo is UNHEALTHY from 3 to 10 minutes: a warning after 5, never critical.
    Scripted("LoopsSamplerUnhealthy", "warning", "xd6ncf1", "UNHEALTHY", fires=8, resolves=10),
    # gemma3-27b-sft starts waking up at 1 minute and never finishes.
    Scripted("LoopsSamplerStuckTransitional", "warning", "0epf91d", "WAKING_UP", fires=11),
    Scripted("LoopsSamplerStuckTransitional", "critical", "0epf91d", "WAKING_UP", fires=21),
)


def compressed(values: Iterable[float]) -> str:
    """promtool's series notation, runs of one value written `VxN` (N repeats after the first)."""
    out: list[str] = []
    previous: float | None = None
    length = 0
    for value in [*values, None]:
        if value == previous:
            length += 1
            continue
        if previous is not None:
            out.append(f"{previous:g}x{length - 1}" if length > 1 else f"{previous:g}")
        previous, length = value, 1
    return " ".join(out)


def identity(spec: RunSpec) -> dict[str, str]:
    return {
        "run_id": spec.id,
        "run_name": spec.name,
        "session_id": f"sess-{spec.id}",
        "base_model": spec.base_model,
        "sampler_id": "" if spec.timeline is None else f"smp-{spec.id}",
        "model_id": "" if spec.timeline is None else f"mdl-{spec.id}",
        "deployment_id": "" if spec.timeline is None else f"dep-{spec.id}",
        "owner": spec.owner,
    }


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    text = ",".join(
        f'{key}="{value}"' for key, value in {"job": JOB, "instance": INSTANCE, **labels}.items()
    )
    return {"series": f"{name}{{{text}}}", "values": values}


def exported(specs: Iterable[RunSpec]) -> list[dict[str, str]]:
    """What the watcher exports for these runs, sampled at every scrape over the horizon."""
    times = [step * SCRAPE for step in range(HORIZON * 60 // SCRAPE + 1)]
    steps = len(times) - 1
    out = [
        series("up", f"1x{steps}"),
        series("loops_watcher_api_key_rejected", f"0x{steps}"),
    ]
    for spec in specs:
        out.append(series("baseten_loops_run_info", f"1x{steps}", **identity(spec)))
        out.append(series("loops_watcher_poll_success", f"1x{steps}", run_id=spec.id))
        out.append(
            series(
                "loops_watcher_last_success_timestamp_seconds",
                f"0+{SCRAPE}x{steps}",
                run_id=spec.id,
            )
        )
        if spec.timeline is None:
            continue
        statuses = [spec.at(t).status for t in times]  # type: ignore[union-attr]
        since: list[float] = []
        for index, status in enumerate(statuses):
            fresh = index == 0 or status != statuses[index - 1]
            since.append(times[index] if fresh else since[-1])
        out.append(
            series(
                "baseten_loops_sampler_status_since_timestamp_seconds",
                compressed(since),
                run_id=spec.id,
            )
        )
        for documented in SAMPLER_STATUSES:
            values = compressed(float(status == documented) for status in statuses)
            out.append(
                series("baseten_loops_sampler_status", values, run_id=spec.id, status=documented)
            )
    return out


def expected_checks(specs: dict[str, RunSpec]) -> list[dict[str, Any]]:
    """Every minute, for every alert name: exactly the scripted alerts firing then."""
    checks = []
    for minute in range(1, HORIZON + 1):
        for alertname in sorted({rule["alert"] for rule in alert_rules()}):
            scripted = [s for s in STORY if s.alertname == alertname]
            states = [s.state(minute) for s in scripted]
            if None in states:
                continue
            firing = [s for s, on in zip(scripted, states, strict=True) if on]
            checks.append(
                {
                    "eval_time": f"{minute}m",
                    "alertname": alertname,
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": s.severity,
                                "job": JOB,
                                "status": s.status,
                                **{
                                    key: value
                                    for key, value in identity(specs[s.run_id]).items()
                                    if key not in {"session_id", "sampler_id"}
                                },
                            }
                        }
                        for s in firing
                    ],
                }
            )
    return checks


def rules_without_annotations() -> dict[str, Any]:
    """alerts.yml as it is, but for the annotations: here only which alerts fire matters."""
    groups = load_yaml(ALERTS)["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return {"groups": groups}


def test_the_story_names_runs_of_the_demo() -> None:
    specs = {spec.id: spec for spec in load_scenario("demo").runs}
    for scripted in STORY:
        timeline = specs[scripted.run_id].timeline
        assert timeline is not None
        assert scripted.status in {step.status for step in timeline}
    assert {s.alertname for s in STORY} == {
        "LoopsSamplerFailed",
        "LoopsSamplerUnhealthy",
        "LoopsSamplerStuckTransitional",
    }


@pytest.mark.process
def test_the_demo_fires_exactly_the_scripted_alerts_each_in_time(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    scenario = load_scenario("demo")
    specs = {spec.id: spec for spec in scenario.runs}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules_without_annotations()))
    unit_test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": f"{SCRAPE}s",
        "tests": [
            {
                "name": "the demo scenario",
                "interval": f"{SCRAPE}s",
                "input_series": exported(scenario.runs),
                "alert_rule_test": expected_checks(specs),
            }
        ],
    }
    (tmp_path / "story_test.yml").write_text(yaml.safe_dump(unit_test, width=1_000_000))
    result = run(promtool, "test", "rules", tmp_path / "story_test.yml", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
