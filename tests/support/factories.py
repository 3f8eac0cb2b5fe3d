"""Small builders shared by the unit tests."""

from __future__ import annotations

import random
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


def mutate(data: bytes, rng: random.Random) -> bytes:
    """`data` with a few random deletions, hostile insertions and flipped bytes."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        spot = rng.randrange(len(buf) + 1)
        choice = rng.random()
        if choice < 0.3 and buf:
            del buf[spot : spot + rng.randint(1, 20)]
        elif choice < 0.6:
            piece = rng.choice(
                [b"[", b"]", b"{", b"}", b'"', b"\\", b"\\udc80", b"\xff", b"\xed\xb2\x80",
                 b"null", b"1e999", b"-", b",", b":", b"NaN", b'"\\u0000"', b"\x00", b"\xe2\x82"]
            )  # fmt: skip
            buf[spot:spot] = piece * rng.randint(1, 3)
        elif buf:
            buf[min(spot, len(buf) - 1)] = rng.randrange(256)
    return bytes(buf)


def run_json(run_id: str = "k4q95w5", status: str = "ACTIVE", **changes: Any) -> dict[str, Any]:
    run: dict[str, Any] = {
        "id": run_id,
        "session_id": "s1",
        "base_model": "Qwen/Qwen3-8B",
        "base_url": "https://example.invalid/run",
        "created_at": "2026-11-01T10:00:00Z",
        "name": "sft",
        "sampler": {
            "id": "smp1",
            "base_url": "https://example.invalid/sampler",
            "base_model": "Qwen/Qwen3-8B",
            "created_at": "2026-11-01T10:00:00Z",
            "model_id": "m1",
            "deployment_id": "d1",
            "status": {"name": status},
        },
    }
    run.update(changes)
    return run
