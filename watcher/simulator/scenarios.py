"""What the Loops API simulator serves: its runs and the timeline each sampler's status follows.

Pure data and arithmetic: the only I/O is reading a scenario file, and time comes in as
seconds elapsed since the simulator started, so tests can step it.

Scenario file format (JSON; the built-in ones live in `watcher/simulator/scenarios/<name>.json`)::

    {
      "caller": "ada@example.com",        # the user the API key belongs to: without
                                          # ?scope=org the list shows only this owner's runs
      "runs": [
        {
          "id": "k4q95w5",                # the run ID, as it appears in URLs
          "name": "qwen3-8b-sft",
          "base_model": "Qwen/Qwen3-8B",
          "owner": "ada@example.com",
          "timeline": [                   # null for a trainer-only run (its sampler is null)
            {"status": "SCALED_TO_ZERO", "seconds": 30},
            {"status": "WAKING_UP", "seconds": 10},
            {"status": "ACTIVE", "seconds": 45},
            {"status": "INACTIVE", "seconds": 20, "run_status": "INACTIVE"}
          ],
          "loop": true,                   # optional (true): start over after the last step,
                                          # otherwise stay in the last step for good
          "offset": 0,                    # optional (0): seconds into the timeline at start
          "instance_type": "H100",        # optional ("H100"): a key of INSTANCE_TYPES
          "node_count": 1                 # optional (1)
        }
      ]
    }

`status` is the sampler status (any string: the simulator may serve statuses the watcher has
never heard of); `run_status` is the run-level ACTIVE/INACTIVE state during that step
(optional, "ACTIVE"). Unknown keys are rejected so a typo cannot pass silently.
"""

from __future__ import annotations

import importlib.resources
import random
import string
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, model_validator
from pydantic.dataclasses import dataclass

# The wire format's InstanceTypeV1 objects, keyed by the name scenario files use.
INSTANCE_TYPES: dict[str, dict[str, Any]] = {
    "A10G": {
        "id": "A10G",
        "name": "1xA10G",
        "memory_limit_mib": 32768,
        "millicpu_limit": 8000,
        "gpu_count": 1,
        "gpu_type": "A10G",
        "gpu_memory_limit_mib": 23028,
    },
    "H100": {
        "id": "H100",
        "name": "1xH100",
        "memory_limit_mib": 245760,
        "millicpu_limit": 26000,
        "gpu_count": 1,
        "gpu_type": "H100",
        "gpu_memory_limit_mib": 81559,
    },
    "H100x8": {
        "id": "H100x8",
        "name": "8xH100",
        "memory_limit_mib": 1966080,
        "millicpu_limit": 208000,
        "gpu_count": 8,
        "gpu_type": "H100",
        "gpu_memory_limit_mib": 81559,
    },
}

_STRICT = ConfigDict(extra="forbid", strict=True)
NonEmptyStr = Annotated[str, Field(min_length=1)]
RunId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]  # fits in a URL path unescaped


@dataclass(frozen=True, config=_STRICT)
class Step:
    """One stretch of a sampler's timeline."""

    status: NonEmptyStr
    seconds: Annotated[float, Field(gt=0)]
    run_status: NonEmptyStr = "ACTIVE"


@dataclass(frozen=True, config=_STRICT)
class RunSpec:
    """A run as a scenario declares it; `timeline` None means trainer-only (no sampler)."""

    id: RunId
    name: str
    base_model: NonEmptyStr
    owner: NonEmptyStr
    timeline: Annotated[tuple[Step, ...], Field(min_length=1)] | None
    loop: bool = True
    offset: Annotated[float, Field(ge=0)] = 0.0
    instance_type: str = "H100"
    node_count: Annotated[int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _known_instance_type(self) -> RunSpec:
        if self.instance_type not in INSTANCE_TYPES:
            raise ValueError(
                f"instance_type {self.instance_type!r} is not one of {sorted(INSTANCE_TYPES)}"
            )
        return self

    def at(self, elapsed: float) -> Step | None:
        """The timeline step in force `elapsed` seconds after the simulator started."""
        if self.timeline is None:
            return None
        moment = elapsed + self.offset
        if self.loop:
            moment %= sum(step.seconds for step in self.timeline)
        for step in self.timeline:
            if moment < step.seconds:
                return step
            moment -= step.seconds
        return self.timeline[-1]


@dataclass(frozen=True, config=_STRICT)
class Scenario:
    """The runs a simulator serves and the user its API key belongs to."""

    caller: NonEmptyStr
    runs: tuple[RunSpec, ...]

    @model_validator(mode="after")
    def _unique_ids(self) -> Scenario:
        counts = Counter(run.id for run in self.runs)
        duplicates = sorted(run_id for run_id, count in counts.items() if count > 1)
        if duplicates:
            raise ValueError(f"duplicate run ids: {', '.join(duplicates)}")
        return self


_SCENARIO_FILE = TypeAdapter(Scenario)


def load_scenario(name_or_path: str) -> Scenario:
    """A built-in scenario by name ("demo"), or a scenario JSON file by path.

    Raises OSError when the file cannot be read and pydantic's ValidationError when it does
    not follow the format in this module's docstring.
    """
    builtin = importlib.resources.files("watcher.simulator") / "scenarios" / f"{name_or_path}.json"
    if "/" not in name_or_path and builtin.is_file():
        return _SCENARIO_FILE.validate_json(builtin.read_bytes())
    return _SCENARIO_FILE.validate_json(Path(name_or_path).read_bytes())


# Settled statuses, weighted roughly as a large org's runs would be spread over them.
_SETTLED = {
    "ACTIVE": 60,
    "SCALED_TO_ZERO": 25,
    "INACTIVE": 8,
    "FAILED": 2,
    "UNHEALTHY": 2,
    "DEPLOY_FAILED": 1,
    "BUILD_FAILED": 1,
    "BUILD_STOPPED": 1,
}
_WAKE_CYCLE = (
    Step("SCALED_TO_ZERO", 120.0),
    Step("WAKING_UP", 15.0),
    Step("ACTIVE", 120.0),
)
_BASE_MODELS = (
    "Qwen/Qwen3-8B",
    "Qwen/Qwen3-32B",
    "meta-llama/Llama-3.1-8B-Instruct",
    "meta-llama/Llama-3.3-70B-Instruct",
    "google/gemma-3-27b-it",
)
_OWNERS = ("ada@example.com", "grace@example.com", "linus@example.com")


def synthetic_scenario(n_runs: int, *, seed: int = 0) -> Scenario:
    """`n_runs` runs for benchmarks: mostly settled, a tenth cycling through a wake-up."""
    rng = random.Random(seed)
    ids: set[str] = set()
    while len(ids) < n_runs:
        ids.add("".join(rng.choices(string.ascii_lowercase + string.digits, k=7)))
    runs = []
    for number, run_id in enumerate(sorted(ids)):
        timeline: tuple[Step, ...] | None
        if rng.random() < 0.1:
            timeline = _WAKE_CYCLE
        elif rng.random() < 0.02:
            timeline = None
        else:
            status = rng.choices(list(_SETTLED), weights=list(_SETTLED.values()))[0]
            timeline = (Step(status, 3600.0, "INACTIVE" if status == "INACTIVE" else "ACTIVE"),)
        runs.append(
            RunSpec(
                id=run_id,
                name=f"run-{number:05d}",
                base_model=rng.choice(_BASE_MODELS),
                owner=rng.choice(_OWNERS),
                timeline=timeline,
                offset=rng.uniform(0, 255),
            )
        )
    return Scenario(caller=_OWNERS[0], runs=tuple(runs))
