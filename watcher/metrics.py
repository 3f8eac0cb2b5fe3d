"""Prometheus exposition: per-run series rendered from cached blocks, the rest via a registry.

Per-run series (`run_id` label) are rendered into text once per run when that run changes and
kept as immutable UTF-8 bytes, one tuple of blocks a run (a block per family, `b""` where a
family has no sample); a scrape takes a shallow copy of the mapping (a snapshot: polls can go
on while it is sent) and lists the blocks family by family, which the server sends without
joining them: 10,000 runs make 17 MB of text, and one more copy of it a scrape made the
watcher's peak memory creep up. A run that stops being watched
is dropped from the mapping and so vanishes from the next scrape. prometheus-client's own
formatter needs over a second for 10,000 runs; the cached blocks parse to identical samples in
a fraction of that.

Series that outlive runs (API requests, retries, durations by status, build info, the key's
state) are ordinary prometheus-client metrics in the `CollectorRegistry` given to `Metrics`,
beside prometheus-client's standard `process_*` and `python_*` collectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from watcher.model import RETRIED_RESULTS, RUN_STATUSES, SAMPLER_STATUSES
from watcher.sharding import Shard
from watcher.tracker import RunRecord

OPENMETRICS = "application/openmetrics-text"
STATUS_DURATION_BUCKETS = (
    5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400, 259200, 604800,
)  # fmt: skip
API_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: str  # "gauge" or "counter"
    help: str

    def header(self, openmetrics: bool) -> str:
        # OpenMetrics names a counter family without `_total`; the 0.0.4 text format with it.
        name = (
            self.name.removesuffix("_total")
            if openmetrics and self.kind == "counter"
            else self.name
        )
        return f"# HELP {name} {self.help}\n# TYPE {name} {self.kind}\n"


# Families whose samples change only when the run's observed state does.
STATE_FAMILIES = (
    Family(
        "baseten_loops_sampler_status",
        "gauge",
        "Sampler status of a run: 1 for the current status, 0 for the other documented ones.",
    ),
    Family(
        "baseten_loops_run_info",
        "gauge",
        "Identity of a watched run; always 1. Empty label values are unknown.",
    ),
    Family(
        "baseten_loops_run_status",
        "gauge",
        "Run-level status (ACTIVE or INACTIVE), when the API reports it.",
    ),
    Family(
        "baseten_loops_run_created_timestamp_seconds",
        "gauge",
        "When the run was created, in Unix seconds.",
    ),
    Family(
        "baseten_loops_sampler_status_since_timestamp_seconds",
        "gauge",
        "When the watcher first observed the current sampler status, in Unix seconds.",
    ),
    Family(
        "baseten_loops_sampler_status_transitions_total",
        "counter",
        "Observed sampler status changes.",
    ),
)
# Families whose samples change with every poll.
POLL_FAMILIES = (
    Family("loops_watcher_poll_success", "gauge", "1 if the last poll of this run succeeded."),
    Family(
        "loops_watcher_last_success_timestamp_seconds",
        "gauge",
        "When this run was last polled successfully, in Unix seconds.",
    ),
    Family("loops_watcher_polls_total", "counter", "Polls of this run by result."),
)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _state_set(name: str, run_label: str, current: str, documented: Iterable[str]) -> str:
    lines = [
        f'{name}{{{run_label},status="{status}"}} {"1.0" if status == current else "0.0"}\n'
        for status in documented
    ]
    if current not in documented:
        lines.append(f'{name}{{{run_label},status="{escape(current)}"}} 1.0\n')
    return "".join(lines)


def render_state(record: RunRecord) -> tuple[str, ...]:
    """The STATE_FAMILIES samples of one run, one string per family."""
    run = record.run
    if run is None:
        return ("",) * len(STATE_FAMILIES)
    run_label = f'run_id="{escape(record.run_id)}"'
    sampler = run.sampler
    sampler_status = (
        _state_set("baseten_loops_sampler_status", run_label, record.status, SAMPLER_STATUSES)
        if record.status is not None
        else ""
    )
    info_labels = {
        "run_name": run.name,
        "session_id": run.session_id,
        "base_model": run.base_model,
        "sampler_id": sampler.id if sampler else "",
        "model_id": sampler.model_id if sampler else "",
        "deployment_id": sampler.deployment_id if sampler else (run.deployment_id or ""),
        "owner": run.user_email or "",
    }
    info = "".join(f',{key}="{escape(value)}"' for key, value in info_labels.items())
    run_status = (
        _state_set("baseten_loops_run_status", run_label, run.status, RUN_STATUSES)
        if run.status is not None
        else ""
    )
    since = (
        f"baseten_loops_sampler_status_since_timestamp_seconds{{{run_label}}} "
        f"{number(record.since)}\n"
        if record.since is not None
        else ""
    )
    transitions = "".join(
        f"baseten_loops_sampler_status_transitions_total{{{run_label},"
        f'from_status="{escape(old)}",to_status="{escape(new)}"}} {number(count)}\n'
        for (old, new), count in sorted(record.transitions.items())
    )
    return (
        sampler_status,
        f"baseten_loops_run_info{{{run_label}{info}}} 1.0\n",
        run_status,
        f"baseten_loops_run_created_timestamp_seconds{{{run_label}}} {number(run.created_at)}\n",
        since,
        transitions,
    )


def render_polls(record: RunRecord) -> tuple[str, ...]:
    """The POLL_FAMILIES samples of one run, one string per family."""
    run_label = f'run_id="{escape(record.run_id)}"'
    if record.last_result is None:
        return ("",) * len(POLL_FAMILIES)
    success = "1.0" if record.last_result == "ok" else "0.0"
    last = (
        f"loops_watcher_last_success_timestamp_seconds{{{run_label}}} "
        f"{number(record.last_success)}\n"
        if record.last_success is not None
        else ""
    )
    polls = "".join(
        f'loops_watcher_polls_total{{{run_label},result="{result}"}} {number(count)}\n'
        for result, count in sorted(record.polls.items())
    )
    return (f"loops_watcher_poll_success{{{run_label}}} {success}\n", last, polls)


def _encoded(blocks: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(block.encode() for block in blocks)


FAMILIES = STATE_FAMILIES + POLL_FAMILIES
_POLLS_AT = len(STATE_FAMILIES)  # where a run's POLL_FAMILIES blocks start in its tuple
_UNRENDERED = (b"",) * len(FAMILIES)  # a run watched but not read yet, shared by all of them


class Metrics:
    """All series the watcher exports, and their rendering for one scrape."""

    def __init__(
        self, registry: CollectorRegistry, version: str, shard: Shard, *, discovery: bool = False
    ) -> None:
        self.registry = registry
        self._blocks: dict[str, tuple[bytes, ...]] = {}  # run_id -> a block per FAMILIES
        self.status_duration = Histogram(
            "baseten_loops_sampler_status_duration_seconds",
            "Time a sampler spent in a status, observed on leaving a status seen to begin.",
            ["status"],
            buckets=STATUS_DURATION_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "loops_watcher_retries_total",
            "Retries of API requests, by the result that caused them.",
            ["reason"],
            registry=registry,
        )
        for result in RETRIED_RESULTS:
            self.retries.labels(str(result))
        self.api_requests = Counter(
            "loops_watcher_api_requests_total",
            "HTTP attempts to the Loops API by status code ('error' where none came back).",
            ["code"],
            registry=registry,
        )
        self.api_duration = Histogram(
            "loops_watcher_api_request_duration_seconds",
            "Duration of one HTTP attempt to the Loops API.",
            buckets=API_DURATION_BUCKETS,
            registry=registry,
        )
        watched = Gauge("loops_watcher_watched_runs", "Runs being watched.", registry=registry)
        watched.set_function(lambda: len(self._blocks))
        Gauge(
            "loops_watcher_build_info",
            "Version of the watcher; always 1.",
            ["version"],
            registry=registry,
        ).labels(version).set(1)
        Gauge(
            "loops_watcher_shard_info",
            "Which share of the runs this watcher watches: shard of total_shards; always 1.",
            ["shard", "total_shards"],
            registry=registry,
        ).labels(str(shard.index), str(shard.total)).set(1)
        # Born at 0, not at the first rejection: an alert sees the change from the first scrape.
        self.api_key_rejected = Gauge(
            "loops_watcher_api_key_rejected",
            "1 while the Loops API rejects the API key (401 or 403), else 0.",
            registry=registry,
        )
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.discovery_failing = (
            Gauge(
                "loops_watcher_discovery_failing",
                "1 while the list requests that discover runs keep failing, else 0.",
                registry=registry,
            )
            if discovery
            else None
        )

    def watch(self, run_id: str) -> None:
        self._blocks.setdefault(run_id, _UNRENDERED)

    def forget(self, run_id: str) -> None:
        self._blocks.pop(run_id, None)

    def update_state(self, record: RunRecord) -> None:
        """Render a run's observed state; raises, changing nothing, if it cannot be rendered."""
        blocks = self._blocks.get(record.run_id)
        if blocks is not None:  # else unwatched while its poll was in flight
            state = _encoded(render_state(record))
            self._blocks[record.run_id] = state + blocks[_POLLS_AT:]

    def update_polls(self, record: RunRecord) -> None:
        blocks = self._blocks.get(record.run_id)
        if blocks is not None:
            self._blocks[record.run_id] = blocks[:_POLLS_AT] + _encoded(render_polls(record))

    def render(self, accept: str) -> tuple[bytes, str]:
        """The whole exposition in the format the Accept header asks for, as one body."""
        parts, content_type = self.render_parts(accept)
        return b"".join(parts), content_type

    def render_parts(self, accept: str) -> tuple[list[bytes], str]:
        """The exposition as the pieces it is made of, in order; nothing is copied."""
        encoder, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith(OPENMETRICS)
        runs = list(self._blocks.values())
        parts: list[bytes] = []
        for index, family in enumerate(FAMILIES):
            parts.append(family.header(openmetrics).encode())
            parts.extend(blocks[index] for blocks in runs)
        parts.append(encoder(self.registry))
        return parts, content_type
