"""Small builders shared by the unit tests."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from watcher.model import Run, Sampler


def make_run(sampler_status: str | None, run_id: str = "k4q95w5", **changes: Any) -> Run:
    sampler = (
        None
        if sampler_status is None
        else Sampler(
            id="smp1",
            status=sampler_status,
            model_id="m1",
            deployment_id="d1",
            base_model="Qwen/Qwen3-8B",
        )
    )
    run = Run(
        id=run_id,
        session_id="s1",
        base_model="Qwen/Qwen3-8B",
        created_at=1_700_000_000.0,
        sampler=sampler,
        name="sft",
    )
    return replace(run, **changes)
