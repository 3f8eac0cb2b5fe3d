"""Exposition: cached per-run blocks parse to exactly the samples the contract names."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample
from support import Exposition
from support.factories import make_run

from watcher.metrics import Metrics
from watcher.model import SAMPLER_STATUSES, Result
from watcher.sharding import Shard
from watcher.tracker import Tracker

OPENMETRICS_ACCEPT = "application/openmetrics-text; version=1.0.0"


def canonical(found: list[Sample]) -> list[tuple[str, list[tuple[str, str]], float]]:
    return sorted((s.name, sorted(s.labels.items()), s.value) for s in found)


def scrape(metrics: Metrics) -> Exposition:
    return Exposition.parse(metrics.render("")[0])


@pytest.fixture
def world() -> tuple[Tracker, Metrics]:
    tracker, metrics = Tracker(), Metrics(CollectorRegistry(), "1.2.3", Shard(1, 3))
    for run_id in ("k4q95w5", "7wq2m3x"):
        tracker.watch(run_id)
        metrics.watch(run_id)
    return tracker, metrics


def observe(
    tracker: Tracker, metrics: Metrics, sampler_status: str | None, at: float, **kw: Any
) -> None:
    run = make_run(sampler_status, **kw)
    tracker.observe(run, at)
    metrics.update_state(tracker.runs[run.id])
    metrics.update_polls(tracker.record_poll(run.id, Result.OK, at))


def test_state_set_and_identity(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    observe(tracker, metrics, "SCALED_TO_ZERO", 100.0)
    observe(tracker, metrics, "WAKING_UP", 130.0)
    body, content_type = metrics.render("")
    assert content_type.startswith("text/plain")
    found = Exposition.parse(body)
    states = found.find("baseten_loops_sampler_status", run_id="k4q95w5")
    assert sorted(s.labels["status"] for s in states) == sorted(SAMPLER_STATUSES)
    assert {s.labels["status"]: s.value for s in states if s.value == 1} == {"WAKING_UP": 1}
    assert found.value("baseten_loops_run_info", run_id="k4q95w5") == 1
    info = found.find("baseten_loops_run_info")[0].labels
    assert info == {
        "run_id": "k4q95w5",
        "run_name": "sft",
        "session_id": "s1",
        "base_model": "Qwen/Qwen3-8B",
        "sampler_id": "smp1",
        "model_id": "m1",
        "deployment_id": "d1",
        "owner": "",
    }
    assert found.value("baseten_loops_run_created_timestamp_seconds", run_id="k4q95w5") == 1.7e9
    assert (
        found.value("baseten_loops_sampler_status_since_timestamp_seconds", run_id="k4q95w5")
        == 130.0
    )
    assert (
        found.value(
            "baseten_loops_sampler_status_transitions_total",
            from_status="SCALED_TO_ZERO",
            to_status="WAKING_UP",
        )
        == 1
    )
    assert found.value("loops_watcher_poll_success", run_id="k4q95w5") == 1
    assert found.value("loops_watcher_last_success_timestamp_seconds", run_id="k4q95w5") == 130
    assert found.value("loops_watcher_polls_total", run_id="k4q95w5", result="ok") == 2
    assert found.value("loops_watcher_build_info", version="1.2.3") == 1
    (shard_info,) = found.find("loops_watcher_shard_info")
    assert (shard_info.labels, shard_info.value) == ({"shard": "1", "total_shards": "3"}, 1)
    assert found.value("loops_watcher_watched_runs") == 2
    # The run never polled yet exports nothing per run.
    assert "7wq2m3x" not in found.run_ids()


def test_owner_is_the_runs_user_email(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    observe(tracker, metrics, "ACTIVE", 1.0, user_email="ada@example.com")
    assert scrape(metrics).value("baseten_loops_run_info", owner="ada@example.com") == 1


def test_watcher_and_process_series_exist_before_any_poll() -> None:
    found = scrape(Metrics(CollectorRegistry(), "1.2.3", Shard(0, 1)))
    assert found.value("loops_watcher_api_key_rejected") == 0
    assert found.value("loops_watcher_watched_runs") == 0
    retries = {
        sample.labels["reason"]: sample.value
        for sample in found.find("loops_watcher_retries_total")
    }
    assert retries == {"rate_limited": 0, "server_error": 0, "timeout": 0, "connection_error": 0}
    for name in ("process_resident_memory_bytes", "process_start_time_seconds"):
        assert (found.value(name) or 0) > 0, name
    assert found.find("python_info")[0].labels["implementation"]
    assert found.find("python_gc_collections_total")


def test_run_status_state_set_when_reported(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    observe(tracker, metrics, "ACTIVE", 1.0, status="INACTIVE")
    found = scrape(metrics)
    assert found.value("baseten_loops_run_status", status="INACTIVE") == 1
    assert found.value("baseten_loops_run_status", status="ACTIVE") == 0


def test_failed_poll_keeps_status_and_zeroes_success(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    observe(tracker, metrics, "ACTIVE", 1.0)
    metrics.update_polls(tracker.record_poll("k4q95w5", Result.TIMEOUT, 99.0))
    found = scrape(metrics)
    assert found.value("baseten_loops_sampler_status", status="ACTIVE") == 1
    assert found.value("loops_watcher_poll_success", run_id="k4q95w5") == 0
    assert found.value("loops_watcher_polls_total", result="timeout") == 1
    assert found.value("loops_watcher_last_success_timestamp_seconds", run_id="k4q95w5") == 1


def test_undocumented_status_gets_its_own_series(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    observe(tracker, metrics, "HIBERNATING", 1.0)
    found = scrape(metrics)
    states = found.find("baseten_loops_sampler_status")
    assert len(states) == 15
    assert found.value("baseten_loops_sampler_status", status="HIBERNATING") == 1
    assert sum(s.value for s in states) == 1


def test_trainer_only_run_has_identity_but_no_sampler_series(
    world: tuple[Tracker, Metrics],
) -> None:
    tracker, metrics = world
    observe(tracker, metrics, None, 1.0)
    found = scrape(metrics)
    assert not found.find("baseten_loops_sampler_status")
    assert found.value("baseten_loops_run_info", run_id="k4q95w5", sampler_id="") == 1
    assert not found.find("baseten_loops_sampler_status_since_timestamp_seconds")


def test_forgotten_run_loses_every_series(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    observe(tracker, metrics, "ACTIVE", 1.0)
    observe(tracker, metrics, "FAILED", 2.0)
    metrics.forget("k4q95w5")
    tracker.unwatch("k4q95w5")
    text = metrics.render("")[0].decode()
    assert "k4q95w5" not in text
    assert Exposition.parse(text).value("loops_watcher_watched_runs") == 1


def test_late_update_of_forgotten_run_is_dropped(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    metrics.forget("k4q95w5")
    observe(tracker, metrics, "ACTIVE", 1.0)
    assert "k4q95w5" not in metrics.render("")[0].decode()


def test_label_values_are_escaped(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    tricky = 'he said "hi"\\ then\nleft'
    observe(tracker, metrics, "ACTIVE", 1.0, name=tricky)
    assert scrape(metrics).find("baseten_loops_run_info")[0].labels["run_name"] == tricky


def test_openmetrics_on_request(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    observe(tracker, metrics, "ACTIVE", 1.0)
    observe(tracker, metrics, "UNHEALTHY", 2.0)
    metrics.status_duration.labels("ACTIVE").observe(1.0)
    body, content_type = metrics.render(OPENMETRICS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert text.count("# EOF") == 1
    found = Exposition.parse(text, openmetrics=True)
    assert found.value("baseten_loops_sampler_status_transitions_total", to_status="UNHEALTHY") == 1
    assert found.value("loops_watcher_polls_total", result="ok") == 2


class Reference:
    """The same per-run samples built with prometheus-client's own families and formatter."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def collect(self) -> Iterator[Metric]:
        status = GaugeMetricFamily("baseten_loops_sampler_status", "x", labels=["run_id", "status"])
        transitions = CounterMetricFamily(
            "baseten_loops_sampler_status_transitions",
            "x",
            labels=["run_id", "from_status", "to_status"],
        )
        polls = CounterMetricFamily("loops_watcher_polls", "x", labels=["run_id", "result"])
        for record in self.tracker.runs.values():
            if record.status is not None:
                for name in SAMPLER_STATUSES:
                    status.add_metric([record.run_id, name], float(name == record.status))
            for (old, new), count in record.transitions.items():
                transitions.add_metric([record.run_id, old, new], count)
            for result, count in record.polls.items():
                polls.add_metric([record.run_id, result], count)
        yield from (status, transitions, polls)


def test_cached_blocks_match_prometheus_client_formatting(world: tuple[Tracker, Metrics]) -> None:
    tracker, metrics = world
    for at, status in enumerate(["SCALED_TO_ZERO", "WAKING_UP", "ACTIVE", "FAILED", "ACTIVE"]):
        observe(tracker, metrics, status, float(at))
        observe(tracker, metrics, "BUILDING" if at < 2 else "DEPLOYING", float(at), id="7wq2m3x")
    metrics.update_polls(tracker.record_poll("7wq2m3x", Result.SERVER_ERROR, 99.0))
    ours = scrape(metrics)
    registry = CollectorRegistry()
    registry.register(Reference(tracker))
    reference = Exposition.parse(generate_latest(registry))
    for name in (
        "baseten_loops_sampler_status",
        "baseten_loops_sampler_status_transitions_total",
        "loops_watcher_polls_total",
    ):
        assert ours.find(name), name
        assert canonical(ours.find(name)) == canonical(reference.find(name))
