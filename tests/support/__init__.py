"""The tests' one support kit: a fake key, a fake clock, waiting with a deadline, reading
`/metrics`. `support.e2e` runs the real watcher process; `support.factories` makes runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

T = TypeVar("T")

# Obviously fake, and distinctive enough that finding it anywhere means it leaked.
FAKE_KEY = "e2e-FAKE-key-0xDEADBEEF-not-a-real-secret"
POLL_EVERY = 0.05


class FakeClock:
    """A wall clock that moves only when a test sets or advances `now`."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(
    condition: Callable[[], T | None], *, timeout: float, what: str, every: float = POLL_EVERY
) -> T:
    """Call `condition` every `every` seconds until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


async def until(condition: Callable[[], object], within: float = 5.0) -> None:
    """`wait_until` for a test on the event loop: the loop keeps running meanwhile.

    The deadline is on the loop's own clock (time.monotonic on a standard loop), so it also
    holds on a loop whose time is virtual.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {condition}")
        await asyncio.sleep(0.02)


@dataclass(frozen=True, slots=True)
class Exposition:
    """One parsed scrape of `/metrics` (or of `Metrics.render`)."""

    samples: tuple[Sample, ...]
    types: Mapping[str, str]  # each family's type (counter, gauge, ...) by its name

    @classmethod
    def parse(cls, text: str | bytes, *, openmetrics: bool = False) -> Exposition:
        """Text exposition, or OpenMetrics with its strict parser, which refuses any slip."""
        if isinstance(text, bytes):
            text = text.decode()
        families = list(
            openmetrics_families(text)  # type: ignore[no-untyped-call]
            if openmetrics
            else text_string_to_metric_families(text)
        )
        return cls(
            tuple(sample for family in families for sample in family.samples),
            {family.name: family.type for family in families},
        )

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Samples named `name` whose labels include `labels`."""
        return [
            sample
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample matching; None when there is none."""
        found = self.find(name, **labels)
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples: {found}"
        return found[0].value if found else None

    def by_labels(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample named `name`, keyed by its labels in name order."""
        return {tuple(sorted(sample.labels.items())): sample.value for sample in self.find(name)}

    def total(self, name: str, **labels: str) -> float:
        """Sum over every sample matching (0 when none does): counters split by label."""
        return sum(sample.value for sample in self.find(name, **labels))

    def run_ids(self) -> set[str]:
        return {sample.labels["run_id"] for sample in self.samples if "run_id" in sample.labels}

    def status_of(self, run_id: str) -> str | None:
        """The sampler status exported as 1 for a run, if exactly one is."""
        current = [
            sample.labels["status"]
            for sample in self.find("baseten_loops_sampler_status", run_id=run_id)
            if sample.value == 1
        ]
        return current[0] if len(current) == 1 else None
